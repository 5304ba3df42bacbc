"""Task B: one AMP loop for full fine-tuning and the frozen-backbone baseline."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from featcache.cli import main
from featcache.data.demo import DEMO_DATA
from featcache.data.sources import read_manifest
from featcache.errors import UserError
from featcache.finetune import finetune
from helpers import QUICK, QUICK_RUNS, copy_tree, flat, make_chexpert

# The runs of helpers.QUICK_RUNS are made once per session by conftest's quick_finetune.


def test_frozen_and_full_share_the_loop_and_the_fit_head_keys(quick_finetune, tmp_path):
    (frozen_dir, frozen), (full_dir, full) = quick_finetune("frozen"), quick_finetune("full")
    runs = {"frozen": frozen_dir, "full": full_dir}
    from featcache.backbones.registry import create_backbone

    initial = create_backbone("resnet18", "none").model.body.state_dict()
    for name, expect_changed in (("frozen", False), ("full", True)):
        best = torch.load(runs[name] / "best.pt", weights_only=True)["model"]
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
        history = json.loads((runs[name] / "history.json").read_text())
        assert len(history) == 1
        assert set(history[0]) >= {"train_loss", "train_accuracy", "val_loss", "val_auroc", "val_accuracy",
                                   "images_per_second", "epoch_seconds", "peak_memory_mb"}
        assert (runs[name] / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
        run = json.loads((runs[name] / "run.json").read_text())
        assert run["complete"] and run["strategy"] == f"finetune-{name}"
        params = run["parameters"]
        assert params["total"] == 11_176_512 + 1026
        assert params["trainable"] == (1026 if name == "frozen" else params["total"])
        assert run["checkpoint_bytes"] == (runs[name] / "best.pt").stat().st_size
        assert run["inference"]["ms_per_image"] > 0 and run["time_split"]["train"] > 0
        assert run["peak_host_mb"] > 100 and run["peak_gpu_mb"] is None


# `featcache finetune ARGS` that SIGKILLs itself at the second optimizer step after last.pt (the end of
# epoch 1) appeared: killed mid-epoch 2 wherever the machine's speed would have put a timed kill.
KILLED_MID_EPOCH_2 = """
import os, signal, sys
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_pre_hook

last, steps = Path(sys.argv[1]) / "last.pt", []


def kill_mid_epoch_2(optimizer, args, kwargs):
    if last.exists():
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGKILL)


register_optimizer_step_pre_hook(kill_mid_epoch_2)
from featcache.cli import main

sys.exit(main(sys.argv[2:]))
"""


def test_killed_mid_epoch_resumes_from_the_last_checkpoint(tmp_path, capsys):
    # 48 images of every split, batch 8: 4 optimizer steps an epoch; the kill lands on step 2 of epoch 2.
    args = ["finetune", str(DEMO_DATA), "--weights", "none", "--epochs", "2", "--batch-size", "8", "--max-images",
            "48", "--subsample-all", "--amp", "off", "--bootstrap", "50", "--workers", "0", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    out = tmp_path / "killed"
    script = tmp_path / "killed_mid_epoch_2.py"
    script.write_text(KILLED_MID_EPOCH_2)
    killed = subprocess.run([sys.executable, str(script), str(out), *args, "--out", str(out)], capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "epoch 1/2" in flat(killed.stdout) and "epoch 2/2" not in flat(killed.stdout)  # died inside epoch 2
    assert (out / "last.pt").exists() and not (out / "run.json").exists()
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    assert "resuming" in flat(capsys.readouterr().out)
    a = json.loads((out / "history.json").read_text())
    b = json.loads((tmp_path / "clean" / "history.json").read_text())
    assert [h["epoch"] for h in a] == [1, 2]
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-3)
        assert x["val_auroc"] == pytest.approx(y["val_auroc"], abs=1e-3)
    assert main([*args, "--out", str(out)]) == 0
    assert "nothing to do" in flat(capsys.readouterr().out)


def test_settings_mistakes_and_other_runs(quick_finetune, tmp_path):
    copy_tree(quick_finetune("full")[0], tmp_path / "run")  # a finished quick run, ours to replace
    with pytest.raises(UserError, match=r"holds a run with other settings \(lr\)"):
        finetune(DEMO_DATA, tmp_path / "run", lr=0.01, **QUICK_RUNS["full"])
    # The replacement only needs to differ; a smaller one (every split subsampled) is quicker.
    replaced = finetune(DEMO_DATA, tmp_path / "run", lr=0.01, overwrite=True,
                        **{**QUICK, "max_images": 40, "subsample_all": True})
    assert replaced["selected"]["lr"] == 0.01
    with pytest.raises(UserError, match="--amp fp16 needs a CUDA GPU"):
        finetune(DEMO_DATA, tmp_path / "x", **{**QUICK, "amp": "fp16"})
    with pytest.raises(UserError, match="--augment"):
        finetune(DEMO_DATA, tmp_path / "x", augment="heavy", **QUICK)
    assert main(["finetune", str(DEMO_DATA), "--out", str(tmp_path / "y"), "--backbone", "resnet19"]) == 2


def test_bf16_autocast_runs_on_cpu_and_the_checkpoint_feeds_extract(tmp_path):
    small = {"max_images": 40, "subsample_all": True}  # every split subsampled: the point is the path, not size
    metrics = finetune(DEMO_DATA, tmp_path / "bf16", **{**QUICK, **small, "amp": "bf16"})
    assert "bf16" in metrics["selected"]["amp"]
    assert main(["extract", str(DEMO_DATA), "--out", str(tmp_path / "tuned.h5"), "--weights",
                 str(tmp_path / "bf16" / "best.pt"), "--no-progress", "--workers", "0", "--max-images", "40",
                 "--subsample-all"]) == 0


def _two_process_finetune(data, out, *flags) -> tuple[dict, dict]:
    """``featcache finetune DATA --nproc 2`` (gloo, CPU, resnet18 random init, batch 8): (run.json, metrics.json),
    once both ranks are checked to have run the same epochs and to hold identical weights."""
    result = subprocess.run([sys.executable, "-m", "featcache", "finetune", str(data), "--out", str(out),
                             "--weights", "none", "--batch-size", "8", "--amp", "off", "--bootstrap", "20",
                             "--workers", "0", "--no-progress", "--nproc", "2", *flags],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["complete"] and run["settings"]["world"] == 2
    # Rank 0 decides "improved" and "stop": both ranks ran the same epochs and hold identical weights,
    # BatchNorm running statistics included.
    ranks = run["ranks"]
    assert len(ranks) == 2
    assert ranks[0]["epochs_run"] == ranks[1]["epochs_run"] == run["epochs_run"]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    return run, json.loads((out / "metrics.json").read_text())


def test_two_process_ddp_on_cpu(tmp_path):
    _, metrics = _two_process_finetune(DEMO_DATA, tmp_path / "ddp", "--epochs", "3", "--early-stop", "1",
                                       "--max-images", "40", "--subsample-all")
    assert metrics["test"]["n"] > 0


def test_two_process_ddp_on_a_multilabel_set(tmp_path):
    """CheXpert-format labels under --nproc 2: the masked loss trains every label on both ranks, and the per-label
    metrics count exactly the labels the policy keeps (uncertain and blank cells left out)."""
    folder = make_chexpert(tmp_path, n_train_patients=14, n_valid_patients=6)
    run, metrics = _two_process_finetune(folder, tmp_path / "ddp", "--format", "chexpert", "--epochs", "2",
                                         "--unmentioned", "ignore")
    assert run["epochs_run"] == 2 and metrics["task"] == "multilabel"
    history = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert all(np.isfinite([h["train_loss"], h["val_loss"]]).all() for h in history)  # a NaN target would leak
    m = read_manifest(folder, format="chexpert")
    labels = np.asarray(m.labels)
    for split in ("val", "test"):
        known = np.isin(labels[np.asarray(m.splits) == split], (0, 1))
        positive = labels[np.asarray(m.splits) == split] == 1
        per_label = metrics[split]["per_label"]
        assert list(per_label) == list(m.classes)
        assert [per_label[n]["n_positive"] + per_label[n]["n_negative"] for n in m.classes] == known.sum(0).tolist()
        assert [per_label[n]["n_positive"] for n in m.classes] == positive.sum(0).tolist()
        for j, name in enumerate(m.classes):  # AUROC where a label has both classes, None where it cannot
            both = 0 < positive[:, j].sum() < known[:, j].sum()
            assert (0.0 <= per_label[name]["auroc"] <= 1.0) if both else per_label[name]["auroc"] is None


def test_launcher_reports_exit_2_only_for_a_user_mistake(monkeypatch):
    from featcache.runtime import distributed

    def fake_run(cmd, env, **_):
        if "--bad-input" in cmd:  # the worker's CLI notes its UserError, then torchrun exits 1
            monkeypatch.setenv(distributed.USER_ERROR_FILE_ENV, env[distributed.USER_ERROR_FILE_ENV])
            distributed.note_user_error("--backbone resnet19 is not a backbone")
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(distributed.subprocess, "run", fake_run)
    assert distributed.launch(2, ["finetune", "--bad-input"]) == 2
    assert distributed.launch(2, ["finetune", "crashes"]) == 1  # a crashed worker is not a user mistake


def _permuted_test_copy(src, dst):
    """A copy of ``src`` whose test images are dealt to the class folders at random (counts kept)."""
    import random
    import shutil

    shutil.copytree(src, dst)
    files = sorted((dst / "test").glob("*/*"))
    classes = [f.parent.name for f in files]
    random.Random(0).shuffle(classes)
    for f, cls in zip(files, classes):
        if f.parent.name != cls:
            f.rename(dst / "test" / cls / ("moved-" + f.name))
    return dst


def test_finetune_choices_are_blind_to_the_test_labels(quick_finetune, tmp_path):
    permuted = _permuted_test_copy(DEMO_DATA, tmp_path / "permuted")
    a_dir, a = quick_finetune("frozen-youden")  # 3 epochs, early stop 1, Youden threshold, frozen backbone
    b = finetune(permuted, tmp_path / "b", **QUICK_RUNS["frozen-youden"])
    assert a["test"]["auroc"] != b["test"]["auroc"]  # the test labels did change
    assert a["selected"] == b["selected"] and a["threshold"] == b["threshold"]  # best epoch, threshold
    assert a["val"] == b["val"]
    ha = json.loads((a_dir / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    keep = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_auroc", "val_accuracy")
    assert [{k: h[k] for k in keep} for h in ha] == [{k: h[k] for k in keep} for h in hb]  # the same early stop


def test_tutorial_recipe_in_featcaches_loop(tmp_path):
    from featcache.backbones.registry import create_backbone

    metrics = finetune(DEMO_DATA, tmp_path / "tut", recipe="tutorial",
                       **{**QUICK, "epochs": 2, "batch_size": None, "max_images": 40, "subsample_all": True})
    run = json.loads((tmp_path / "tut" / "run.json").read_text())
    settings = run["settings"]
    assert (settings["recipe"], settings["batch_size"], settings["lr"], settings["augment"],
            settings["freeze_backbone"]) == ("tutorial", 4, 1e-3, "tutorial", True)
    assert run["strategy"] == "finetune-tutorial-recipe"
    assert metrics["selected"]["epoch_chosen_by"] == "val_accuracy"
    last = torch.load(tmp_path / "tut" / "last.pt", weights_only=True)
    group = last["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and "betas" not in group  # SGD, not AdamW
    assert last["scheduler"]["step_size"] == 7 and last["scheduler"]["gamma"] == 0.1
    assert last["scheduler"]["last_epoch"] == 2  # stepped once per epoch
    best = torch.load(tmp_path / "tut" / "best.pt", weights_only=True)["model"]
    assert "fc.0.weight" in best and "fc.1.weight" not in best  # a bare linear layer, no standardizing BatchNorm
    initial = create_backbone("resnet18", "none").model.body.state_dict()
    assert torch.equal(best["conv1.weight"], initial["conv1.weight"])  # frozen weights
    assert not torch.equal(best["bn1.running_mean"], initial["bn1.running_mean"])  # BatchNorm in train mode


def test_quick_real_finetune_reaches_val_auroc_080(shared_data, tmp_path):
    """resnet18 --weights none, 2 epochs on a 600-image stratified subset of train (val AUROC 0.93 here)."""
    assert main(["finetune", str(shared_data), "--out", str(tmp_path / "run"), "--weights", "none",
                 "--epochs", "2", "--max-images", "600", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val"]["auroc"] >= 0.80
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 2 and metrics["n_train"] >= 590
    assert metrics["val"]["n"] == 784 and metrics["test"]["n"] == 624  # --max-images leaves val and test whole


def test_dali_decodes_and_augments_training_batches(tmp_path):
    metrics = finetune(DEMO_DATA, tmp_path / "dali", backend="dali", augment="strong",
                       **{**QUICK, "max_images": 40, "subsample_all": True})
    assert metrics["test"]["n"] > 0
    history = json.loads((tmp_path / "dali" / "history.json").read_text())
    assert history[0]["skipped"] == 0 and history[0]["images_per_second"] > 0


def test_a_misspelt_positive_class_stops_before_the_run_folder_is_touched(quick_finetune, tmp_path):
    source, _ = quick_finetune("full")
    run = copy_tree(source, tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(UserError, match="--positive-class tumour is not a class here"):
        finetune(DEMO_DATA, run, overwrite=True, positive_class="tumour", **QUICK_RUNS["full"])
    assert sorted(p.name for p in run.iterdir()) == before  # --overwrite did not clear the run first
