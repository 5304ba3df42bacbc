"""Decode backends: awkward files, parity between backends (and bf16/fp32), auto choice, synthetic X-rays."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from featcache.eval import parity
from featcache.backbones.registry import create_backbone, get_entry
from featcache.decode import make_loader, resolve_backend
from featcache.data.demo import DEMO_DATA
from featcache.data.manifest import scan
from featcache.data.synth import plan, render, synth
from helpers import link_subset, make_dataset, write_awkward_images

BACKENDS = ["torchvision", "pil", "dali"]
SPEC = get_entry("resnet18").spec()


def decode_all(manifest, backend, batch_size=4, rows=None):
    images, failed = {}, {}
    for batch in make_loader(manifest, SPEC, backend=backend, batch_size=batch_size, workers=0, rows=rows):
        failed.update({manifest.paths[r]: reason for r, reason in batch.failed})
        for r, image in zip(batch.indices.tolist(), batch.images):
            assert manifest.paths[r] not in images, "a row came back twice"
            images[manifest.paths[r]] = image
    return images, failed


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    root = tmp_path_factory.mktemp("awkward")
    expected = write_awkward_images(root / "train" / "A")
    make_dataset(root, {"train": {"B": ["b1.png", "b2.png", "b3.png"]}}, size=(40, 40))
    return scan(root, min_val=0, val_fraction=0.5), expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_awkward_files_never_stop_a_run(awkward, backend):
    manifest, expected = awkward
    images, failed = decode_all(manifest, backend)
    assert failed == {f"train/A/{name}": reason for name, reason in expected.items() if reason}
    good = {f"train/A/{name}" for name, reason in expected.items() if reason is None}
    assert good <= set(images) and len(images) + len(failed) == len(manifest)
    reference, _ = decode_all(manifest, "torchvision")
    for path in good:
        image = images[path]
        assert image.shape == (3, 224, 224) and image.dtype == torch.uint8
        # 16-bit, CMYK, RGBA, progressive: each backend sees the same picture as torchvision.
        assert (image.float() - reference[path].float()).abs().mean() < 4.0, path


@pytest.mark.parametrize("batch_size", [3, 7, 32])
def test_dali_rows_are_exact_with_a_partial_last_batch(batch_size):
    manifest = scan(DEMO_DATA)
    rows = np.arange(5, 5 + 2 * batch_size + 1)  # two full batches and one image
    images, failed = decode_all(manifest, "dali", batch_size=batch_size, rows=rows)
    assert not failed and sorted(images) == sorted(manifest.paths[r] for r in rows)


# Parity between decodes (and precisions) with the criteria of featcache.eval.parity: (a) crops within 2 grey
# levels on average, (b) the nearest other-side row is the same image for >= 99.5 % of rows, (c) same-image
# feature distance <= 5 % of the median different-image distance. "Mean cosine >= 0.99" is not one of them:
# random-init features of two different X-rays already have cosine 0.993-0.995 (test_parity_rejects_...).

# 96 real Kermany images (both splits and classes, from the embedded demo subset, so these checks run on
# every clone): enough rivals for (b) to mean something (99.5 % of 96 rows is every row), few enough for
# seconds per backend on 2 cores. The copy is 224 px, so every
# backend upscales it and PIL never takes its reduced-scale (draft) path...
REAL_SUBSET = {"train": {"NORMAL": 18, "PNEUMONIA": 42}, "test": {"NORMAL": 14, "PNEUMONIA": 22}}
# ... which full-size (1-3 MP) synthetic X-rays do, with every backend's strongest downscale.
N_SYNTH = 24
_BACKBONE = None


def forward(crops: torch.Tensor, amp: str = "off") -> np.ndarray:
    """Random-init (seed 0) resnet18 features of uint8 crops, fp32 or under bf16 autocast."""
    from featcache.runtime.amp import autocast

    global _BACKBONE
    if _BACKBONE is None:
        _BACKBONE = create_backbone("resnet18", "none")
    with torch.inference_mode(), autocast("cpu", torch.bfloat16 if amp == "bf16" else None):
        return torch.cat([_BACKBONE.model(crops[i:i + 32]).float() for i in range(0, len(crops), 32)]).numpy()


class Decoded:
    """One manifest's crops per backend and features per (backend, precision), in manifest row order, made once."""

    def __init__(self, manifest, root=None):
        self.manifest, self.root = manifest, root
        self._crops, self._features = {}, {}
        self.same = parity.duplicate_groups(manifest.paths, manifest.root)  # byte-identical files: one image

    def crops(self, backend: str) -> torch.Tensor:
        if backend not in self._crops:
            images, failed = decode_all(self.manifest, backend, batch_size=16)
            assert not failed
            self._crops[backend] = torch.stack([images[path] for path in self.manifest.paths])
        return self._crops[backend]

    def features(self, backend: str = "torchvision", amp: str = "off") -> np.ndarray:
        if (backend, amp) not in self._features:
            self._features[backend, amp] = forward(self.crops(backend), amp)
        return self._features[backend, amp]

    def crops_of(self, backend: str, paths) -> np.ndarray:
        """This backend's crops in the order of ``paths`` (a cache's rows)."""
        where = {path: i for i, path in enumerate(self.manifest.paths)}
        return self.crops(backend).numpy()[[where[p] for p in paths]]


@pytest.fixture(scope="module")
def real_images(tmp_path_factory):
    root = link_subset(DEMO_DATA, tmp_path_factory.mktemp("real") / "xray", REAL_SUBSET)
    return Decoded(scan(root, min_val=0), root)


@pytest.fixture(scope="module")
def full_size_synth(tmp_path_factory):
    out = synth(tmp_path_factory.mktemp("synth") / "synth", N_SYNTH, progress=False)["out"]
    return Decoded(scan(out, min_val=0), out)


@pytest.fixture(scope="module")
def real_caches(real_images, tmp_path_factory):
    """``get(backend, amp)``: the cache `extract` writes for the real subset, made once per module."""
    from featcache.cache.h5 import FeatureCache
    from featcache.extract import extract

    folder, made = tmp_path_factory.mktemp("caches"), {}

    def get(backend: str, amp: str = "off"):
        if (backend, amp) not in made:
            out = folder / f"{backend}-{amp}.h5"
            extract(real_images.root, out, weights="none", backend=backend, amp=amp, batch_size=32, workers=0,
                    device="cpu", progress=False)
            made[backend, amp] = FeatureCache.open(out)
        return made[backend, amp]

    return get


def assert_parity(result: dict) -> None:
    assert result["passed"], (f"{'; '.join(parity.failures(result))} (mean cosine {result['mean_cosine']:.5f}: "
                              f"the old '>= 0.99' check {'passes' if result['mean_cosine'] >= 0.99 else 'fails'})")


@pytest.mark.parametrize("data", ["kermany 224 px", "full-size synthetic"])
@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_features_agree_with_torchvision(backend, data, request):
    """Resize filters differ slightly between libraries; the crops and the features must not, by (a), (b), (c)."""
    decoded = request.getfixturevalue("real_images" if data == "kermany 224 px" else "full_size_synth")
    result = parity.parity(decoded.features(backend), decoded.features("torchvision"),
                           decoded.crops(backend), decoded.crops("torchvision"), same=decoded.same)
    assert result["rows"] == (96 if data == "kermany 224 px" else N_SYNTH) and result["crop_difference"]
    assert_parity(result)


def test_extract_with_dali_writes_the_same_rows(real_images, real_caches):
    a, b = real_caches("dali"), real_caches("torchvision")
    assert a.fingerprint_inputs["decode"] == "dali-cpu" and b.fingerprint_inputs["decode"] == "torchvision"
    ra, rb = a.read("paths", "labels", "features"), b.read("paths", "labels", "features")
    assert ra["paths"].tolist() == rb["paths"].tolist() and ra["labels"].tolist() == rb["labels"].tolist()
    paths = [str(p) for p in ra["paths"].tolist()]
    assert sorted(paths) == sorted(real_images.manifest.paths)
    assert_parity(parity.parity(ra["features"], rb["features"], real_images.crops_of("dali", paths),
                                real_images.crops_of("torchvision", paths),
                                same=parity.duplicate_groups(paths, real_images.root)))


def test_extract_in_bf16_agrees_with_fp32(real_images, real_caches):
    """`extract --amp bf16` against fp32, same decode: (b) and (c); (a) does not apply (the same crops)."""
    bf16, fp32 = real_caches("torchvision", "bf16"), real_caches("torchvision")
    assert bf16.fingerprint_inputs["precision"] == "bf16" and "precision" not in fp32.fingerprint_inputs
    ra, rb = bf16.read("paths", "features"), fp32.read("paths", "features")
    assert ra["paths"].tolist() == rb["paths"].tolist()
    assert not np.array_equal(ra["features"], rb["features"])  # bf16 did run
    result = parity.parity(ra["features"], rb["features"],
                           same=parity.duplicate_groups(ra["paths"].tolist(), real_images.root))
    assert result["crop_difference"] is None
    assert_parity(result)


def _mismatch(decoded, kind: str):
    """(features, crops or None) standing in for torchvision's fp32 ones, wrong in the way ``kind`` says."""
    if kind == "dali rows rolled by one":
        return np.roll(decoded.features("dali"), 1, axis=0), np.roll(decoded.crops("dali").numpy(), 1, axis=0)
    if kind == "pil rows shuffled":
        order = np.random.default_rng(0).permutation(len(decoded.manifest))
        return decoded.features("pil")[order], decoded.crops("pil").numpy()[order]
    if kind == "bf16 rows rolled by one":
        return np.roll(decoded.features("torchvision", "bf16"), 1, axis=0), None
    crops = decoded.crops("torchvision")
    crops = torch.roll(crops, 8, dims=3) if kind == "crop shifted 8 px" else torch.flip(crops, dims=[3])
    return forward(crops), crops.numpy()


@pytest.mark.parametrize("kind", ["dali rows rolled by one", "pil rows shuffled", "bf16 rows rolled by one",
                                  "crop shifted 8 px", "crop mirrored"])
def test_parity_rejects_mismatches_that_mean_cosine_passes(real_images, kind):
    """Rows paired with the wrong image, or a wrong crop of the right one: the old check ("mean cosine
    >= 0.99") still passes, because random-init features of any two X-rays are that close; every new
    criterion fails."""
    features, crops = _mismatch(real_images, kind)
    reference = real_images.features("torchvision")
    assert parity.mean_cosine(features, reference) >= 0.99  # the old check would have passed...
    assert parity.different_image_cosine(reference) >= 0.99  # ...as it does for any two different images
    result = parity.parity(features, reference, crops, None if crops is None else real_images.crops("torchvision"),
                           same=real_images.same)
    assert not result["nearest_same"]["passed"] and not result["distance_ratio"]["passed"]
    assert crops is None or not result["crop_difference"]["passed"]
    assert result["distance_ratio"]["ratio"] > 5 * parity.MAX_DISTANCE_RATIO  # failed by far, not by a hair


def test_parity_functions_on_known_arrays():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16)) + 10.0  # a large common component: every cosine is high
    b = a + rng.normal(scale=0.01, size=a.shape)
    assert parity.mean_cosine(np.roll(b, 1, axis=0), a) > 0.98
    assert parity.nearest_same_fraction(a, b, chunk=7) == parity.nearest_same_fraction(a, b) == {
        "a_to_b": 1.0, "b_to_a": 1.0, "fraction": 1.0}
    swapped = b.copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    near = parity.nearest_same_fraction(a, swapped, chunk=64)
    assert near["a_to_b"] == near["b_to_a"] == near["fraction"] == 298 / 300
    constant = np.ones((5, 4))  # ties are misses: identical rows cannot pass (b)
    assert parity.nearest_same_fraction(constant, constant)["fraction"] == 0.0
    twins = a.copy()  # rows 0 and 1 the same picture (duplicate files): a tie unless they are one image
    twins[1] = twins[0]
    assert parity.nearest_same_fraction(twins, twins)["fraction"] == 298 / 300
    groups = np.arange(300)
    groups[1] = 0
    assert parity.nearest_same_fraction(twins, twins, same=groups)["fraction"] == 1.0
    assert parity.distance_ratio(twins, twins, same=groups)["pairs"] == 300 * 299 // 2 - 1
    assert parity.parity(twins, twins, same=groups)["duplicate_rows"] == 1
    exact = parity.distance_ratio(a, b)
    sampled = parity.distance_ratio(a, b, max_pairs=5000, seed=1)
    assert not exact["sampled"] and exact["pairs"] == 300 * 299 // 2 and sampled["sampled"]
    assert sampled == parity.distance_ratio(a, b, max_pairs=5000, seed=1)  # seeded
    assert abs(sampled["ratio"] - exact["ratio"]) < 0.05 * exact["ratio"] and exact["ratio"] < 0.01
    assert parity.distance_ratio(np.roll(b, 1, axis=0), a)["ratio"] > 0.9
    x = np.zeros((2, 3, 4, 4), np.uint8)
    y = x.copy()
    y[1] = 3
    y[0, 0, 0, 0] = 255
    crops = parity.crop_difference(x, y)
    assert crops["per_image"].tolist() == [255 / 48, 3.0] and crops["mean"] == (255 / 48 + 3) / 2
    result = parity.parity(a, b, crop_per_image=[1.0] * 150 + [3.5] * 150)
    assert result["crop_difference"]["mean"] == 2.25 and not result["crop_difference"]["passed"]
    assert not result["passed"] and parity.failures(result)[0].startswith("(a)")
    assert parity.parity(a, b)["crop_difference"] is None and parity.parity(a, b)["passed"]
    with pytest.raises(ValueError):
        parity.nearest_same_fraction(a, b[:-1])
    with pytest.raises(ValueError):
        parity.parity(a, b, crop_per_image=[1.0])


def test_auto_picks_pil_on_cpu_and_keeps_a_cache_backend():
    choice = resolve_backend("auto", "cpu")
    assert choice.mode == "pil" and "fastest CPU decoder" in choice.reason
    kept = resolve_backend("auto", "cpu", previous="torchvision")
    assert kept.mode == "torchvision" and "existing cache" in kept.reason
    assert resolve_backend("auto", "cpu", previous="dali-mixed").mode == "pil"
    assert resolve_backend("dali", "cpu").mode == "dali-cpu"
    assert resolve_backend("dali", "cuda").mode == "dali-mixed"


def test_synth_is_deterministic_full_size_and_kermany_named(tmp_path):
    assert np.array_equal(render(3, 5, True), render(3, 5, True))
    assert not np.array_equal(render(3, 5, True), render(4, 5, True))
    result = synth(tmp_path / "s", 12, seed=1, progress=False)
    manifest = scan(result["out"], min_val=0)
    assert len(manifest) == 12 and set(manifest.classes) == {"NORMAL", "PNEUMONIA"}
    counts = manifest.counts()
    assert min(counts["test"]) > 0 and min(counts["train"]) > 0
    assert manifest.patient_sources == {"kermany name": 12}
    from PIL import Image

    for path in manifest.paths:
        with Image.open(f"{manifest.root}/{path}") as im:
            assert im.format == "JPEG" and im.mode == "L" and 1.0e6 <= im.size[0] * im.size[1] <= 3.0e6
    assert 100e3 * 12 <= result["bytes"] <= 1.5e6 * 12
    bigger = plan(20, 1)
    assert bigger[:12] == plan(12, 1)  # a larger set extends a smaller one


@pytest.mark.gpu
def test_dali_mixed_matches_cpu_on_a_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    full = scan(synth(tmp_path / "synth", 8, progress=False)["out"], min_val=0)
    gpu = {}
    for batch in make_loader(full, SPEC, backend="dali", batch_size=4, workers=0, device="cuda"):
        assert batch.images.is_cuda
        gpu.update({full.paths[r]: img.cpu() for r, img in zip(batch.indices.tolist(), batch.images)})
    cpu, _ = decode_all(full, "dali")
    for path, image in cpu.items():
        assert (gpu[path].float() - image.float()).abs().mean() < 3.0


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_training_augmentation_is_seeded_and_changes_the_crop(backend):
    from featcache.decode.augment import augment_params

    manifest = scan(DEMO_DATA)
    rows = np.arange(6)
    aug = augment_params("strong", hflip=True)

    def first_batch(seed):
        torch.manual_seed(seed)  # CPU workers draw from torch's generator
        return next(iter(make_loader(manifest, SPEC, backend=backend, batch_size=6, workers=0, rows=rows,
                                     augment=aug, seed=seed))).images

    plain = next(iter(make_loader(manifest, SPEC, backend=backend, batch_size=6, workers=0, rows=rows))).images
    a, b, c = first_batch(1), first_batch(1), first_batch(2)
    assert a.shape == plain.shape == (6, 3, 224, 224) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.float() - plain.float()).abs().mean() > 5.0
    assert augment_params("none") is None


def _private_growth_of_a_forked_reader(paths) -> float:
    """MB of private memory a forked child gains by reading every one of ``paths``, as a DataLoader worker does."""
    def private_mb() -> float:
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("Private_")) / 1024

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, read every path, measure again, report, leave at once
        before = private_mb()
        sum(len(paths[i]) for i in range(len(paths)))
        os.write(write, str(private_mb() - before).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        return float(f.read())


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc/self/smaps_rollup")
def test_forked_workers_read_paths_without_copying_a_page_per_row():
    from featcache.decode.cpu import PackedPaths

    paths = tuple(f"train/PNEUMONIA/person{i}_bacteria_{i * 7}.jpeg" for i in range(200_000)) + ("ünïcødé/ä b.png",)
    packed = PackedPaths(paths)
    assert [packed[i] for i in (0, 199_999, 200_000)] == [paths[0], paths[199_999], paths[200_000]]
    assert len(packed) == len(paths)
    # Reading a tuple of str bumps each string's reference count, so the child copies every page holding one
    # (the control: about 20 MB here); reading the packed buffer copies next to nothing.
    assert _private_growth_of_a_forked_reader(paths) > 8
    assert _private_growth_of_a_forked_reader(packed) < 2
