"""The whole path on real chest X-rays from ../shared (and the embedded demo subset)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from featcache.cli import main
from helpers import flat, link_subset


def test_real_subset_reaches_auroc_080_with_random_resnet18(shared_data, tmp_path, capsys):
    data = link_subset(shared_data, tmp_path / "xray", {"train": {"NORMAL": 110, "PNEUMONIA": 190},
                                                        "test": {"NORMAL": 60, "PNEUMONIA": 90}})
    cache, run = tmp_path / "r18.h5", tmp_path / "run"
    assert main(["extract", str(data), "--out", str(cache), "--weights", "none", "--no-progress"]) == 0
    assert main(["fit-head", str(cache), "--out", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "AUROC" in shown and "sensitivity" in shown
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["n"] == 150
    assert metrics["test"]["auroc"] >= 0.80
    assert metrics["backbone"] == "resnet18" and metrics["weights"] == "none:seed=0"


def test_demo_runs_on_the_embedded_subset_and_says_random_init_loudly(demo_run):
    status, shown, out = demo_run  # `featcache demo --out OUT`, run once per session (its cache is shared)
    assert status == 0
    shown = flat(shown)
    assert "RANDOMLY INITIALISED" in shown and "resnet18-f37072fd.pth" in shown
    metrics = json.loads((out / "logistic" / "metrics.json").read_text())
    assert metrics["test"]["n"] == 100 and metrics["test"]["auroc"] >= 0.80


@pytest.mark.slow
def test_full_shared_set(shared_data, tmp_path):
    """The acceptance run on all 5,840 images: schema and AUROC, sweep against logistic.

    Decode backends are compared image by image in test_decode's parity tests (on real images, with
    criteria that tell a match from a near miss), so one full extraction is enough here. It runs under
    bf16 autocast, half the time of fp32 on a CPU with native bf16; bf16 features are held to fp32's by
    the same discriminating criteria in test_decode and test_backbones, and fp32 on real images reaches
    its AUROC in test_real_subset_reaches_auroc_080_with_random_resnet18.
    """
    cache, run = tmp_path / "torchvision.h5", tmp_path / "run-torchvision"
    assert main(["extract", str(shared_data), "--out", str(cache), "--weights", "none", "--no-progress",
                 "--backend", "torchvision", "--amp", "bf16"]) == 0
    assert main(["fit-head", str(cache), "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    with h5py.File(cache, "r") as f:
        assert f["features"].shape == (5840, 512)
        splits = f["splits"].asstr()[()]
        assert int(np.sum(splits == "test")) == 624
        assert f.attrs["complete"]
    assert metrics["test"]["auroc"] >= 0.85
    # The sweep's best validation AUROC is at least the logistic head's minus 0.01.
    assert main(["fit-head", str(cache), "--out", str(tmp_path / "sweep"), "--heads", "sweep"]) == 0
    sweep = json.loads((tmp_path / "sweep" / "metrics.json").read_text())
    assert sweep["n_heads"] >= 32
    assert sweep["val"]["auroc"] >= metrics["val"]["auroc"] - 0.01
    for m in (metrics, sweep):
        lo, hi = m["test"]["ci"]["auroc"]
        assert lo <= m["test"]["auroc"] <= hi


def test_three_class_kermany_subset(shared_data, tmp_path):
    """NORMAL / BACTERIA / VIRUS from file names: one flag, a 3x3 confusion matrix."""
    data = link_subset(shared_data, tmp_path / "xray", {"train": {"NORMAL": 100, "PNEUMONIA": 200},
                                                        "test": {"NORMAL": 50, "PNEUMONIA": 100}})
    cache, run = tmp_path / "k3.h5", tmp_path / "run"
    assert main(["extract", str(data), "--out", str(cache), "--weights", "none", "--no-progress",
                 "--label-from-name", "kermany-3class"]) == 0
    assert main(["fit-head", str(cache), "--out", str(run), "--heads", "sweep"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == ["BACTERIA", "NORMAL", "VIRUS"]
    assert np.array(metrics["test"]["confusion_matrix"]).shape == (3, 3)
    assert np.array(metrics["test"]["confusion_matrix"]).sum() == 150
    assert metrics["test"]["per_class"]["NORMAL"]["auroc"] > 0.8
