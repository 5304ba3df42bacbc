"""featcache.baselines is the real thing: the PyTorch tutorial's recipe, featcache's weights, device
and images; and `featcache bench --stages compare` runs it at the tutorial's 25 epochs."""

from __future__ import annotations

import json

import pytest

from featcache.data.demo import DEMO_DATA



@pytest.fixture(scope="module")
def baseline():
    from featcache import baselines

    return baselines


def _run(baseline, capsys, *argv) -> dict:
    assert baseline.main([*argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _no_imagenet(monkeypatch):
    import featcache.backbones.registry as backbones
    from featcache.errors import UserError

    def offline(entry, weights):
        raise UserError("cannot get ImageNet weights (offline, in this test)")

    monkeypatch.setattr(backbones, "_imagenet_state_dict", offline)


def test_tutorial_baseline_is_the_tutorial_recipe_from_featcache_weights(baseline, capsys):
    from featcache.backbones.registry import create_backbone
    from featcache.runtime.device import resolve_device

    defaults = baseline.build_parser().parse_args(["tutorial", "DATA"])
    assert defaults.epochs == 25 and defaults.weights == "imagenet"
    got = _run(baseline, capsys, "tutorial", str(DEMO_DATA), "--epochs", "1", "--max-images", "40",
               "--subsample-all", "--weights", "none", "--bootstrap", "50")
    assert (got["batch_size"], got["lr"], got["momentum"], got["workers"]) == (4, 0.001, 0.9, 4)
    assert (got["optimizer"], got["scheduler"], got["step_size"], got["gamma"]) == ("SGD", "StepLR", 7, 0.1)
    assert got["epochs"] == 1 and got["device"] == resolve_device("auto")
    assert got["trained_parameters"] == ["fc.weight", "fc.bias"]
    assert got["train_transforms"][:2] == ["RandomResizedCrop(224)", "RandomHorizontalFlip()"]
    assert got["val_transforms"][:2] == ["Resize(256)", "CenterCrop(224)"]
    # the same starting tensors as featcache's create_backbone
    featcache_bb = create_backbone("resnet18", "none", seed=0)
    assert got["weights"] == featcache_bb.weights == "none:seed=0"
    assert got["initial_backbone_sha256"] == baseline.state_digest(featcache_bb.model.body.state_dict())
    # model.train() in the train phase: the frozen backbone's BatchNorm statistics moved, nothing else did
    changed = got["backbone_changed_by_training"]
    assert changed["tensors"] > 0 and changed["only_batchnorm_statistics"]
    # the best validation epoch, a val phase every epoch
    accs = [h["val_accuracy"] for h in got["history"]]
    assert len(accs) == 1 and got["best_epoch"] in range(1) and got["best_val_accuracy"] == max(accs)
    # the --subsample-all subset of every split, and a patient-bootstrap CI on test
    assert got["subsampled"] == ["train", "val", "test"] and sum(got["n"].values()) <= 40
    lo, hi = got["test_auroc_ci"]
    assert lo <= got["test_auroc"] <= hi and got["train_seconds"] > 0 and got["images_per_second"] > 0


def test_baseline_falls_back_to_featcache_seeded_init_when_imagenet_is_unavailable(baseline, monkeypatch):
    _no_imagenet(monkeypatch)
    bb, why = baseline.featcache_backbone("resnet18", "imagenet", seed=3)
    assert bb.weights == "none:seed=3" and "offline" in why
    bb, why = baseline.featcache_backbone("resnet18", "none", seed=3)
    assert bb.weights == "none:seed=3" and why is None


def test_naive_loop_uses_featcache_device_workers_and_inference_mode(baseline, capsys):
    from featcache.decode import default_workers
    from featcache.runtime.device import resolve_device

    got = _run(baseline, capsys, "naive", str(DEMO_DATA), "--max-images", "16", "--subsample-all",
               "--weights", "none")
    assert (got["workers"], got["batch_size"], got["device"]) == (default_workers(), 32, resolve_device("auto"))
    assert got["grad"] == "torch.inference_mode" and got["weights"] == "none:seed=0"
    from featcache.data.manifest import scan

    assert got["rows"] == len(scan(DEMO_DATA).limit(16, 0, subsample_all=True))


def test_bench_compare_defaults_to_the_tutorial_epochs_and_one_set_of_weights(monkeypatch):
    from featcache.cli import build_parser

    args = build_parser().parse_args(["bench", "DATA"])
    assert args.epochs == 25
    assert args.subsample_all is False and args.weights == "auto"
    assert build_parser().parse_args(["bench", "DATA", "--subsample-all"]).subsample_all is True
    from featcache.bench import resolve_weights

    assert resolve_weights("resnet18", "none")[0] == "none"
    _no_imagenet(monkeypatch)
    weights, why = resolve_weights("resnet18", "auto")
    assert weights == "none" and "unavailable" in why


def test_a_wrong_bench_amp_stops_before_any_stage_runs(capsys, monkeypatch):
    import featcache.bench as bench
    from featcache.cli import main

    monkeypatch.setattr(bench, "decode_only", lambda *a, **k: pytest.fail("a stage ran before --amp was checked"))
    assert main(["bench", str(DEMO_DATA), "--amp", "fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--amp takes auto, bf16, fp16, off, got 'fp8'" in err


def test_bench_compare_states_the_work_each_side_does():
    from featcache.bench import forward_work

    work = forward_work({"train": 400, "val": 80, "test": 120}, epochs=25)
    assert work == {"tutorial_image_forwards": 25 * 480 + 120, "featcache_image_forwards": 600,
                    "ratio": pytest.approx(20.2)}
    assert forward_work({"train": 10, "val": 0}, epochs=1)["ratio"] == 1.0
