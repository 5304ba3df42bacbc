from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch

from featcache.backbones.registry import create_backbone
from featcache.cache.h5 import FeatureCache, partial_path
from featcache.cli import main
from featcache.decode.cpu import load_torchvision as load_image
from featcache.errors import UserError
from featcache.extract import extract
from featcache.data.demo import DEMO_DATA
from featcache.data.manifest import scan
from helpers import flat, write_image


def _extract(data, out, **kw):
    kw.setdefault("weights", "none")
    kw.setdefault("batch_size", 5)
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return extract(data, out, **kw)


def _tiny(data, out, **kw):
    """``_extract`` with conftest's "tiny" backbone (the test asks for ``tiny_backbone``): for tests of the
    cache's plumbing, where resnet18's forward pass would only cost time."""
    return _extract(data, out, backbone="tiny", **kw)


def test_schema_row_order_and_values(small_cache):
    small_dataset, out, summary = small_cache  # resnet18, batch 5, no workers: _extract's defaults
    manifest = scan(small_dataset)
    assert summary["status"] == "written" and summary["rows"] == len(manifest) == 37
    with h5py.File(out, "r") as f:
        assert set(f) == {"features", "labels", "paths", "splits", "patients", "skipped"}
        assert f["features"].dtype == np.float32 and f["features"].shape == (37, 512)
        assert f["labels"].dtype == np.int64
        assert f["skipped"].shape == (0, 2)
        for name in ("paths", "splits", "patients", "skipped"):
            assert h5py.check_string_dtype(f[name].dtype).encoding == "utf-8"
        assert list(f["paths"].asstr()[()]) == list(manifest.paths)
        assert list(f["splits"].asstr()[()]) == list(manifest.splits)
        assert list(f["patients"].asstr()[()]) == list(manifest.patients)
        assert f["labels"][()].tolist() == list(manifest.labels)
        a = dict(f.attrs)
        assert json.loads(a["classes"]) == ["NORMAL", "PNEUMONIA"]
        assert a["backbone"] == "resnet18" and a["weights"] == "none:seed=0"
        assert json.loads(a["preprocess"])["resize"] == 256
        assert a["complete"] and len(a["fingerprint"]) == 64
        assert a["featcache_version"] and a["created"]
        features = f["features"][()]
    # Every row holds the features of its own file, whatever the batching.
    bb = create_backbone("resnet18", "none")
    rows = [0, 4, 5, 36]
    images = torch.stack([load_image(os.path.join(manifest.root, manifest.paths[i]), bb.spec) for i in rows])
    with torch.inference_mode():
        expected = bb.model(images).numpy()
    assert np.allclose(features[rows], expected, atol=1e-4)
    assert not partial_path(out).exists()


def test_workers_and_batch_size_do_not_change_the_cache(small_dataset, tmp_path, tiny_backbone):
    _tiny(small_dataset, tmp_path / "a.h5", batch_size=7, workers=0)
    _tiny(small_dataset, tmp_path / "b.h5", batch_size=3, workers=2)
    a, b = (FeatureCache.open(tmp_path / n).read("features", "paths") for n in ("a.h5", "b.h5"))
    assert list(a["paths"]) == list(b["paths"])
    assert np.allclose(a["features"], b["features"], atol=1e-5)


def test_bad_files_are_skipped_and_listed(small_dataset, tmp_path, tiny_backbone):
    good = small_dataset / "train" / "NORMAL" / "IM-0000-0001.jpeg"
    data = good.read_bytes()
    (small_dataset / "train" / "NORMAL" / "IM-0100-0001.jpeg").write_bytes(data[: len(data) // 2])
    (small_dataset / "train" / "PNEUMONIA" / "person99_virus_1.jpeg").write_text("this is not an image")
    (small_dataset / "test" / "PNEUMONIA" / "person77_bacteria_2.jpeg").write_bytes(b"")
    write_image(small_dataset / "test" / "NORMAL" / "with space.png")
    out = tmp_path / "c.h5"
    summary = _tiny(small_dataset, out, batch_size=4)
    assert summary["rows"] == 37 + 1  # 37 good files, 4 added, 3 of them bad
    cache = FeatureCache.open(out)
    skipped = {p: r for p, r in cache.read("skipped")["skipped"].tolist()}
    assert skipped == {
        "train/NORMAL/IM-0100-0001.jpeg": "truncated image",
        "train/PNEUMONIA/person99_virus_1.jpeg": "not an image",
        "test/PNEUMONIA/person77_bacteria_2.jpeg": "empty file",
    }
    arrays = cache.read("paths", "features", "labels")
    assert not set(skipped) & set(arrays["paths"])
    assert "test/NORMAL/with space.png" in set(arrays["paths"])
    # Compaction kept the rows in manifest order with their own labels and features.
    manifest = scan(small_dataset)
    kept = [i for i, p in enumerate(manifest.paths) if p not in skipped]
    assert list(arrays["paths"]) == [manifest.paths[i] for i in kept]
    assert arrays["labels"].tolist() == [manifest.labels[i] for i in kept]
    clean = FeatureCache.open(_clean_copy(small_dataset, tmp_path, skipped)).read("features", "paths")
    reference = dict(zip(clean["paths"], clean["features"]))
    assert np.allclose(arrays["features"], np.stack([reference[p] for p in arrays["paths"]]), atol=1e-5)


def _clean_copy(data, tmp_path, skipped):
    for rel in skipped:
        os.remove(data / rel)
    out = tmp_path / "clean.h5"
    _tiny(data, out, batch_size=6)
    return out


def test_rerun_is_a_no_op_and_different_inputs_are_refused(small_dataset, tmp_path, tiny_backbone):
    out = tmp_path / "c.h5"
    _tiny(small_dataset, out)
    mtime = out.stat().st_mtime_ns
    again = _tiny(small_dataset, out)
    assert again["status"] == "up to date" and out.stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match=r"holds a different cache \(.*weights: cache has none:seed=0, this run "
                                        r"has none:seed=1\).*--overwrite"):
        _tiny(small_dataset, out, seed=1)
    write_image(small_dataset / "test" / "NORMAL" / "IM-0555-0001.jpeg")
    with pytest.raises(UserError, match="manifest: cache has"):
        _tiny(small_dataset, out)
    replaced = _tiny(small_dataset, out, overwrite=True, seed=1)
    assert replaced["status"] == "written" and FeatureCache.open(out).attrs["weights"] == "none:seed=1"


def test_existing_non_cache_and_leftover_partial(small_dataset, tmp_path, tiny_backbone):
    out = tmp_path / "c.h5"
    out.write_text("precious notes")
    with pytest.raises(UserError, match="not a featcache cache; pass --overwrite"):
        _tiny(small_dataset, out)
    assert out.read_text() == "precious notes"
    out.unlink()
    partial_path(out).write_bytes(b"half a file")
    _tiny(small_dataset, out)
    assert FeatureCache.open(out).attrs["complete"] and not partial_path(out).exists()


def test_reader_rejects_missing_non_hdf5_and_incomplete(tmp_path):
    with pytest.raises(UserError, match="cache not found"):
        FeatureCache.open(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(UserError, match="not an HDF5 file"):
        FeatureCache.open(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2]
    with pytest.raises(UserError, match="not a featcache cache"):
        FeatureCache.open(tmp_path / "other.h5")


def test_float16_features(small_dataset, tmp_path, tiny_backbone):
    _tiny(small_dataset, tmp_path / "h.h5", dtype="float16")
    _tiny(small_dataset, tmp_path / "f.h5")
    half, full = FeatureCache.open(tmp_path / "h.h5"), FeatureCache.open(tmp_path / "f.h5")
    assert half.attrs["fingerprint"] != full.attrs["fingerprint"]
    xh, _, _ = half.arrays("train")
    xf, labels, patients = full.arrays("train")
    assert xh.dtype == np.float32 and np.allclose(xh, xf, rtol=2e-3, atol=2e-3)
    assert len(labels) == len(patients) == len(xf)


def test_bf16_autocast_extraction_is_close_and_keyed(small_cache, tmp_path):
    small_dataset, fp32, _ = small_cache  # resnet18 in fp32, _extract's defaults
    _extract(small_dataset, tmp_path / "bf16.h5", amp="bf16")
    low, full = FeatureCache.open(tmp_path / "bf16.h5"), FeatureCache.open(fp32)
    assert low.fingerprint_inputs["precision"] == "bf16" and "precision" not in full.fingerprint_inputs
    a, b = low.read("features")["features"], full.read("features")["features"]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.99
    with pytest.raises(UserError, match="--amp fp16 needs a CUDA GPU"):
        _extract(small_dataset, tmp_path / "fp16.h5", amp="fp16")


def _crafted(tmp_path, name, edit):
    """A copy of a small valid cache with ``edit(h5py_file)`` applied."""
    import shutil

    from test_heads import synthetic_cache

    base = tmp_path / "base.h5"
    if not base.exists():
        synthetic_cache(base, sizes={"train": 40, "val": 20, "test": 20})
    path = tmp_path / f"{name}.h5"
    shutil.copy(base, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def _replace(f, name, data):
    del f[name]
    f.create_dataset(name, data=data)


CRAFTED = {
    "nan features": (lambda f: f["features"].__setitem__((3, 2), float("nan")), "'features' holds NaN or Inf"),
    "inf features": (lambda f: f["features"].__setitem__((5, 0), float("inf")), "'features' holds NaN or Inf"),
    "altered bytes": (lambda f: f["features"].__setitem__((7, 1), 1234.5), "checksum mismatch"),
    "classes not JSON": (lambda f: f.attrs.__setitem__("classes", "NORMAL,PNEUMONIA"), "attribute 'classes'"),
    "one class": (lambda f: f.attrs.__setitem__("classes", '["NORMAL"]'), "attribute 'classes'"),
    "1-D features": (lambda f: _replace(f, "features", np.zeros(80, "f4")), "'features' must be 2-D"),
    "3-D features": (lambda f: _replace(f, "features", np.zeros((80, 4, 8), "f4")),
                     "'features' must be 2-D"),
    "string features": (lambda f: _replace(f, "features", np.array([["a"] * 32] * 80, "S1")),
                        "'features' must be 2-D floats"),
    "fewer rows": (lambda f: _replace(f, "labels", np.zeros(70, "i8")),
                   "'labels' has 70 rows where 'features' has 80"),
    "float labels": (lambda f: _replace(f, "labels", np.zeros(80, "f8")),
                     "'labels' must be 1-D integers"),
    "label out of range": (lambda f: f["labels"].__setitem__(4, 7), "outside 0..1"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_or_damaged_caches_are_refused_naming_the_dataset(case, tmp_path, capsys):
    edit, expected = CRAFTED[case]
    path = _crafted(tmp_path, case.replace(" ", "-"), edit)
    for argv in (["fit-head", str(path), "--out", str(tmp_path / "run")], ["inspect", str(path)]):
        assert main(argv) == 2, (case, argv[0])
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, (case, argv[0], err)


def test_a_cache_altered_after_writing_is_rebuilt_not_up_to_date(small_dataset, tmp_path, tiny_backbone, capsys):
    out = tmp_path / "c.h5"
    _tiny(small_dataset, out)
    original = FeatureCache.open(out).read("features")["features"]
    with h5py.File(out, "r+") as f:
        f["features"][2, 3] += 1.0  # one flipped value, fingerprint and attributes untouched
    again = _tiny(small_dataset, out)
    assert again["status"] == "written" and "checksum mismatch" in flat(capsys.readouterr().out)
    assert np.array_equal(FeatureCache.open(out).read("features")["features"], original)


def test_a_full_disk_stops_before_assembly_and_the_rerun_resumes(small_dataset, tmp_path, tiny_backbone,
                                                                 monkeypatch):
    import shutil
    from collections import namedtuple

    from featcache.cache.parts import parts_dir

    out = tmp_path / "c.h5"
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match=r"not enough disk space to assemble .*MB free, about .*parts are kept"):
        _tiny(small_dataset, out)
    assert not out.exists() and not partial_path(out).exists() and any(parts_dir(out).glob("chunk-*"))
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert _tiny(small_dataset, out)["status"] == "written"


def test_parts_left_after_a_finished_assembly_are_removed(small_dataset, tmp_path, tiny_backbone, capsys):
    from featcache.cache.parts import parts_dir

    out = tmp_path / "c.h5"
    _tiny(small_dataset, out)
    parts_dir(out).mkdir()
    (parts_dir(out) / "chunk-00000.npz").write_bytes(b"left by a run killed after its rename")
    assert _tiny(small_dataset, out)["status"] == "up to date"
    assert not parts_dir(out).exists() and "removing" in capsys.readouterr().out


def test_each_network_runs_in_the_memory_layout_that_is_fastest_for_it():
    """channels_last for BatchNorm CNNs on a CPU and for everything on a GPU; ConvNeXt and ViTs stay contiguous
    on a CPU, where channels_last made convnext_tiny 0.8x as fast."""
    import torchvision

    from featcache.runtime.device import memory_format

    with torch.device("meta"):
        nets = {name: torchvision.models.get_model(name) for name in ("resnet18", "convnext_tiny", "vit_b_16")}
    assert memory_format(nets["resnet18"], "cpu") == torch.channels_last
    assert memory_format(nets["convnext_tiny"], "cpu") == torch.contiguous_format
    assert memory_format(nets["vit_b_16"], "cpu") == torch.contiguous_format
    assert all(memory_format(net, "cuda") == torch.channels_last for net in nets.values())


def test_extract_feeds_each_network_the_layout_chosen_for_it(tmp_path, monkeypatch):
    """What reaches the network in extract: channels_last for a BatchNorm CNN, the default layout otherwise."""
    import torch.nn as nn
    from torchvision.models import ResNet18_Weights

    from featcache.backbones import registry

    seen = {}

    class Record(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            seen.setdefault(self.name, set()).add(
                "channels_last" if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                else "contiguous")
            return x

    def net(name, bn):
        def load():
            def build(weights=None):
                layers = [Record(name), nn.Conv2d(3, 8, 8, stride=8)] + ([nn.BatchNorm2d(8)] if bn else [])
                return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
            return build, ResNet18_Weights.IMAGENET1K_V1
        registry.register(name, feature_dim=32, strip_head=lambda model: None, head_prefixes=())(load)
        monkeypatch.setitem(registry.REGISTRY, name, registry.REGISTRY.pop(name))

    net("with-bn", True)
    net("without-bn", False)
    for name in ("with-bn", "without-bn"):
        extract(DEMO_DATA, tmp_path / f"{name}.h5", backbone=name, weights="none", max_images=16,
                subsample_all=True, workers=0, progress=False)
    assert seen == {"with-bn": {"channels_last"}, "without-bn": {"contiguous"}}
