"""Task B: one AMP loop for full fine-tuning and the frozen-backbone baseline."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from featcache.cli import main
from featcache.demo import DEMO_DATA
from featcache.errors import UserError
from featcache.finetune import finetune

QUICK = dict(weights="none", epochs=1, batch_size=16, max_images=90, amp="off", n_resamples=50, workers=0,
             progress=False)


def test_frozen_and_full_share_the_loop_and_the_fit_head_keys(tmp_path):
    frozen = finetune(DEMO_DATA, tmp_path / "frozen", freeze_backbone=True, **QUICK)
    full = finetune(DEMO_DATA, tmp_path / "full", **QUICK)
    from featcache.backbones import create_backbone

    initial = create_backbone("resnet18", "none").model.body.state_dict()
    for name, expect_changed in (("frozen", False), ("full", True)):
        best = torch.load(tmp_path / name / "best.pt", weights_only=True)["model"]
        changed = any(not torch.equal(best[k], v) for k, v in initial.items() if k.endswith("weight"))
        assert changed == expect_changed, name
        linear = "fc.1.weight" if name == "frozen" else "fc.0.weight"
        assert best[linear].shape == (2, 512)
    assert set(frozen) == set(full)
    assert frozen["selected"]["mode"] == "frozen" and full["selected"]["mode"] == "full"
    # The same keys as a fit-head run: reports compare the two directly.
    from test_heads import synthetic_cache

    from featcache.fit import fit_head

    head = fit_head(synthetic_cache(tmp_path / "c.h5"), tmp_path / "head", n_resamples=50)
    assert set(full) == set(head)
    assert set(full["test"]) == set(head["test"])
    for name in ("frozen", "full"):
        history = json.loads((tmp_path / name / "history.json").read_text())
        assert len(history) == 1
        assert set(history[0]) >= {"train_loss", "train_accuracy", "val_loss", "val_auroc", "val_accuracy",
                                   "images_per_second", "epoch_seconds", "peak_memory_mb"}
        assert (tmp_path / name / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
        run = json.loads((tmp_path / name / "run.json").read_text())
        assert run["complete"] and run["strategy"] == f"finetune-{name}"


def test_killed_mid_epoch_resumes_from_the_last_checkpoint(tmp_path):
    args = [sys.executable, "-m", "featcache", "finetune", str(DEMO_DATA), "--weights", "none", "--epochs", "3",
            "--batch-size", "16", "--max-images", "90", "--amp", "off", "--bootstrap", "50", "--workers", "0",
            "--no-progress"]
    reference = subprocess.run([*args, "--out", str(tmp_path / "clean")], capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "last.pt").exists() and not (out / "run.json").exists()
    resumed = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    a = json.loads((out / "history.json").read_text())
    b = json.loads((tmp_path / "clean" / "history.json").read_text())
    assert [h["epoch"] for h in a] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-3)
        assert x["val_auroc"] == pytest.approx(y["val_auroc"], abs=1e-3)
    again = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_settings_mistakes_and_other_runs(tmp_path):
    finetune(DEMO_DATA, tmp_path / "run", **QUICK)
    with pytest.raises(UserError, match=r"holds a run with other settings \(lr\)"):
        finetune(DEMO_DATA, tmp_path / "run", lr=0.01, **QUICK)
    replaced = finetune(DEMO_DATA, tmp_path / "run", lr=0.01, overwrite=True, **QUICK)
    assert replaced["selected"]["lr"] == 0.01
    with pytest.raises(UserError, match="--amp fp16 needs a CUDA GPU"):
        finetune(DEMO_DATA, tmp_path / "x", **{**QUICK, "amp": "fp16"})
    with pytest.raises(UserError, match="--augment"):
        finetune(DEMO_DATA, tmp_path / "x", augment="heavy", **QUICK)
    assert main(["finetune", str(DEMO_DATA), "--out", str(tmp_path / "y"), "--backbone", "resnet19"]) == 2


def test_bf16_autocast_runs_on_cpu_and_the_checkpoint_feeds_extract(tmp_path):
    metrics = finetune(DEMO_DATA, tmp_path / "bf16", **{**QUICK, "amp": "bf16"})
    assert "bf16" in metrics["selected"]["amp"]
    assert main(["extract", str(DEMO_DATA), "--out", str(tmp_path / "tuned.h5"), "--weights",
                 str(tmp_path / "bf16" / "best.pt"), "--no-progress", "--workers", "0"]) == 0


def test_two_process_ddp_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, "-m", "featcache", "finetune", str(DEMO_DATA), "--out",
                             str(tmp_path / "ddp"), "--weights", "none", "--epochs", "1", "--batch-size", "8",
                             "--max-images", "60", "--amp", "off", "--bootstrap", "20", "--workers", "0",
                             "--no-progress", "--nproc", "2"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["complete"] and run["settings"]["world"] == 2
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["test"]["n"] > 0


def test_quick_real_finetune_reaches_val_auroc_080(shared_data, tmp_path):
    """The issue's acceptance run: resnet18 --weights none, 2 epochs on a 1,500-image stratified subset."""
    assert main(["finetune", str(shared_data), "--out", str(tmp_path / "run"), "--weights", "none",
                 "--epochs", "2", "--max-images", "1500", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val"]["auroc"] >= 0.80
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 2 and metrics["n_train"] > 1000


def test_dali_decodes_and_augments_training_batches(tmp_path):
    metrics = finetune(DEMO_DATA, tmp_path / "dali", backend="dali", augment="strong", **QUICK)
    assert metrics["test"]["n"] > 0
    history = json.loads((tmp_path / "dali" / "history.json").read_text())
    assert history[0]["skipped"] == 0 and history[0]["images_per_second"] > 0
