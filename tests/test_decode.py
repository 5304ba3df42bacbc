"""Decode backends: awkward files, parity between backends, auto choice, synthetic X-rays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featcache.backbones import create_backbone, get_entry
from featcache.decode import make_loader, resolve_backend
from featcache.demo import DEMO_DATA
from featcache.manifest import scan
from featcache.synth import plan, render, synth
from helpers import make_dataset, write_awkward_images

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


def mean_cosine(a, b):
    a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    return float((a * b).sum(dim=1).mean())


def features(manifest, backend, rows):
    bb = create_backbone("resnet18", "none")
    images, failed = decode_all(manifest, backend, batch_size=16, rows=rows)
    assert not failed
    batch = torch.stack([images[manifest.paths[r]] for r in rows])
    with torch.inference_mode():
        return bb.model(batch)


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_features_agree_with_torchvision(backend, tmp_path):
    """Resize filters differ slightly between libraries; the features must not."""
    real = scan(DEMO_DATA)
    rows = list(range(0, len(real), 13))
    assert mean_cosine(features(real, backend, rows), features(real, "torchvision", rows)) >= 0.99
    full = scan(synth(tmp_path / "synth", 6, progress=False)["out"], min_val=0)
    rows = list(range(len(full)))
    assert mean_cosine(features(full, backend, rows), features(full, "torchvision", rows)) >= 0.99


def test_auto_picks_pil_on_cpu_and_keeps_a_cache_backend():
    choice = resolve_backend("auto", "cpu")
    assert choice.mode == "pil" and "fastest CPU decoder" in choice.reason
    kept = resolve_backend("auto", "cpu", previous="torchvision")
    assert kept.mode == "torchvision" and "existing cache" in kept.reason
    assert resolve_backend("auto", "cpu", previous="dali-mixed").mode == "pil"
    assert resolve_backend("dali", "cpu").mode == "dali-cpu"
    assert resolve_backend("dali", "cuda").mode == "dali-mixed"


def test_extract_with_dali_writes_the_same_rows(small_dataset, tmp_path):
    from featcache.cache import FeatureCache
    from featcache.extract import extract

    for backend in ("dali", "torchvision"):
        extract(small_dataset, tmp_path / f"{backend}.h5", weights="none", backend=backend, batch_size=5,
                workers=0, progress=False)
    a = FeatureCache.open(tmp_path / "dali.h5")
    b = FeatureCache.open(tmp_path / "torchvision.h5")
    assert a.fingerprint_inputs["decode"] == "dali-cpu" and b.fingerprint_inputs["decode"] == "torchvision"
    ra, rb = a.read("paths", "labels", "features"), b.read("paths", "labels", "features")
    assert ra["paths"].tolist() == rb["paths"].tolist() and ra["labels"].tolist() == rb["labels"].tolist()
    assert mean_cosine(torch.from_numpy(ra["features"]), torch.from_numpy(rb["features"])) >= 0.99


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
