"""Tasks A, D and E: models table, bench, report and the config runner."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from featcache.cli import main
from featcache.data.demo import DEMO_DATA
from featcache.errors import UserError
from featcache.fit import fit_head
from helpers import flat

REPO = Path(__file__).resolve().parents[1]


def _write_runs(root: Path, cache: Path, finetune_test_aurocs: dict) -> Path:
    """Two real fit-head runs on ``cache`` and two fine-tuning runs written by hand, in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    fit_head(cache, root / "r18-logistic", n_resamples=100)
    fit_head(cache, root / "r18-sweep", heads="sweep", n_resamples=100)
    base = json.loads((root / "r18-logistic" / "metrics.json").read_text())
    for name, augment, val_losses in (("ft-light", "light", [0.52, 0.38, 0.25]), ("ft-none", "none", [0.5, 0.6, 0.8])):
        folder = root / name
        folder.mkdir()
        metrics = json.loads(json.dumps(base))
        metrics["test"]["auroc"] = finetune_test_aurocs[name]
        metrics["val"]["auroc"] = {"ft-light": 0.91, "ft-none": 0.88}[name]
        metrics["test"].pop("ci")
        metrics["selected"] = {"head": "finetune", "name": f"finetune_full_lr_0.0003_aug_{augment}"}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        history = [{"epoch": e + 1, "train_loss": 0.5 - 0.15 * e, "train_accuracy": 0.8 + 0.05 * e,
                    "val_loss": v, "val_auroc": 0.9 - 0.01 * e * (augment == "none"), "val_accuracy": 0.8,
                    "images_per_second": 20.0, "epoch_seconds": 30.0, "peak_memory_mb": 1500.0}
                   for e, v in enumerate(val_losses)]
        (folder / "history.json").write_text(json.dumps(history))
        shutil.copy(root / "r18-logistic" / "predictions.csv", folder / "predictions.csv")
        (folder / "run.json").write_text(json.dumps({
            "complete": True, "kind": "finetune", "strategy": "finetune-full", "backbone": "resnet18",
            "data_root": str(DEMO_DATA), "wall_seconds": 95.0, "images_per_second": 20.0, "peak_memory_mb": 1500.0,
            "settings": {"augment": augment, "freeze_backbone": False}}))
    return root


@pytest.fixture(scope="module")
def fixture_runs(demo_cache, tmp_path_factory):
    """Two real fit-head runs on the demo subset and two fine-tuning runs written by hand."""
    root = tmp_path_factory.mktemp("runs")
    cache = root / "r18.h5"
    shutil.copy(demo_cache, cache)  # beside the runs, as `featcache run` keeps it (the portability test moves both)
    return _write_runs(root, cache, {"ft-light": 0.8123, "ft-none": 0.7456})


@pytest.fixture(scope="module")
def permuted_runs(fixture_runs, tmp_path_factory):
    """The same runs, but every test label permuted (the fine-tuning runs' test figures changed to match)."""
    import h5py

    root = tmp_path_factory.mktemp("permuted")
    cache = root / "r18.h5"
    shutil.copy(fixture_runs / "r18.h5", cache)
    with h5py.File(cache, "r+") as f:
        test = np.flatnonzero(f["splits"].asstr()[:] == "test")
        labels = f["labels"][:]
        labels[test] = np.random.default_rng(0).permutation(labels[test])
        f["labels"][:] = labels
    # A test-driven choice would flip: ft-none now has the higher test AUROC, ft-light the higher val AUROC.
    return _write_runs(root / "runs", cache, {"ft-light": 0.41, "ft-none": 0.97})


def test_report_choices_are_blind_to_the_test_labels(fixture_runs, permuted_runs, tmp_path):
    from featcache.report.document import build_report

    names = ("r18-logistic", "r18-sweep", "ft-light", "ft-none")
    a = build_report([str(fixture_runs / n) for n in names], tmp_path / "a")
    b = build_report([str(permuted_runs / n) for n in names], tmp_path / "b")
    assert set(a["choices"]) >= {"best_run", "best_fixed_feature_run", "best_finetune_run",
                                 "class_weight_and_threshold", "worst_errors_run", "near_duplicate_threshold"}
    assert a["choices"] == b["choices"]
    assert a["choices"]["best_finetune_run"]["chosen"] == "ft-light"
    assert [r["test_auroc"] for r in a["task_d"]] != [r["test_auroc"] for r in b["task_d"]]  # the test did change
    assert [r["val_auroc"] for r in a["task_d"]] == [r["val_auroc"] for r in b["task_d"]]
    for ea, eb in zip(a["weighting_threshold"], b["weighting_threshold"]):
        assert {k: v for k, v in ea.items() if not k.startswith("test_")} == \
               {k: v for k, v in eb.items() if not k.startswith("test_")}
    on_disk = json.loads((tmp_path / "b" / "report.json").read_text())
    assert on_disk["choices"] == b["choices"]
    chosen = b["choices"]["class_weight_and_threshold"]["chosen"]
    assert "Chosen by validation balanced accuracy" in (tmp_path / "b" / "report.md").read_text() and chosen


def test_report_sections_and_numbers(fixture_runs, tmp_path, capsys):
    runs = [str(fixture_runs / n) for n in ("r18-logistic", "r18-sweep", "ft-light", "ft-none")]
    assert main(["report", *runs, "--out", str(tmp_path / "report"), "--title", "fixture report"]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    for heading in ("# fixture report", "## Task D", "### Backbones used", "## Task E",
                    "### Learning curves and overfitting", "### Augmentation ablation",
                    "### Class balance, class weighting and the threshold", "### Train/test shift",
                    "### Leakage: duplicates across splits", "### Worst test errors"):
        assert heading in md, heading
    facts = json.loads((tmp_path / "report" / "report.json").read_text())
    logistic = json.loads((fixture_runs / "r18-logistic" / "metrics.json").read_text())
    row = next(r for r in facts["task_d"] if r["run"] == "r18-logistic")
    assert row["test_auroc"] == pytest.approx(logistic["test"]["auroc"])
    ci = logistic["test"]["ci"]["auroc"]
    assert f"{logistic['test']['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" in md
    assert "| ft-light | resnet18 (random init) | finetune-full |" in md and "0.812" in md
    assert facts["overfitting"]["ft-none"]["flag"] and not facts["overfitting"]["ft-light"]["flag"]
    assert [a["augment"] for a in facts["augmentation"]] == ["light", "none"]
    assert facts["class_balance"]["test"] == {"NORMAL": 40, "PNEUMONIA": 60}
    assert 0.0 <= facts["domain_shift"]["auroc"] <= 1.0 and len(facts["domain_shift"]["folds"]) == 5
    assert facts["exact_duplicates"] == []
    sweep_row = next(r for r in facts["task_d"] if r["run"] == "r18-sweep")
    assert sweep_row["trainable_parameters"] == 512 * 2 + 2
    assert sweep_row["total_parameters"] == 11_176_512 + 1026  # resnet18 without its ImageNet layer, + head
    assert sweep_row["checkpoint_mb"] > 0 and sweep_row["inference_ms"] > 0 and sweep_row["fit_seconds"] > 0
    assert "| r18-sweep | 1,026 | 11.18 M |" in md and "inference ms/image" in md
    b_vs_c = facts["b_vs_c"]
    assert b_vs_c["b"] == "ft-light" and b_vs_c["c"] in ("r18-logistic", "r18-sweep")
    assert b_vs_c["n"] == 100 and b_vs_c["unit"] == "patient" and "### B vs C, decided with statistics" in md
    assert "RANDOM INIT: 4 of 4 runs" in md and "## Provenance" in md
    task_d = md[md.index("## Task D"):md.index("## Per run")]
    assert task_d.count("resnet18 (random init)") == 4
    prov = {p["run"]: p for p in facts["provenance"]}
    assert prov["r18-logistic"]["weights_words"] == "random init (seed 0)"
    assert prov["r18-logistic"]["counts"]["test"] == {"NORMAL": 40, "PNEUMONIA": 60}
    assert prov["r18-logistic"]["featcache_version"] and "carved from train" in prov["r18-logistic"]["validation"]
    assert prov["r18-logistic"]["data_root"].endswith("(folders: split/class)")
    per_run = facts["per_run"]["r18-logistic"]
    assert per_run["confusion_matrix"] == logistic["test"]["confusion_matrix"]
    assert per_run["classification_report"]["PNEUMONIA"]["recall"] == pytest.approx(logistic["test"]["sensitivity"])
    assert "### r18-logistic (test, threshold 0.500)" in md and "| weighted avg |" in md
    assert (tmp_path / "report" / "confusion_matrix_r18-sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert len(facts["weighting_threshold"]) == 4
    best = max(facts["task_d"], key=lambda r: r["val_auroc"])
    assert f"By validation AUROC the best run is {best['run']}" in facts["verdict"]
    assert f"its test AUROC is {best['test_auroc']:.3f}" in facts["verdict"]
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and 'src="http' not in html
    for png in ("auroc_vs_time.png", "worst_errors.png", "closest_pairs.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_folders_that_are_not_runs(tmp_path):
    with pytest.raises(UserError, match="not a run folder"):
        from featcache.report.document import build_report

        build_report([str(tmp_path)], tmp_path / "out")


def test_models_metadata_and_one_measurement():
    from featcache.backbones.costs import measure, model_table

    rows = {r["name"]: r for r in model_table(measure_speed=False)}
    assert set(rows) == {"resnet18", "vgg16", "resnet50", "mobilenet_v2"}
    assert rows["resnet18"]["params_m"] == pytest.approx(11.69, abs=0.01)
    assert rows["vgg16"]["gflops"] == pytest.approx(15.47, abs=0.01)
    assert rows["resnet50"]["imagenet_top1"] == pytest.approx(80.858, abs=0.01)
    assert rows["mobilenet_v2"]["feature_dim"] == 1280
    speed = measure("mobilenet_v2", 4, "cpu")
    assert speed["images_per_s"] > 0 and speed["peak_memory_mb"] > 100


def test_bench_prints_the_fraction_and_the_ratios(tmp_path, capsys):
    # Every stage, on 40 images in batches of 8: what is checked is that each figure is there and adds up.
    assert main(["bench", str(DEMO_DATA), "--max-images", "40", "--subsample-all", "--epochs", "1",
                 "--batch-size", "8", "--weights", "none", "--bootstrap", "50", "--amp", "bf16",
                 "--json", str(tmp_path / "bench.json")]) == 0
    shown = flat(capsys.readouterr().out)  # phrases match wherever the console broke the lines
    assert "extract / forward-only" in shown and "tutorial time / featcache time" in shown
    assert "fine-tuning time / featcache time" in shown and "naive ImageFolder" in shown
    assert "stratified subset of train, val, test (--subsample-all)" in shown
    facts = json.loads((tmp_path / "bench.json").read_text())
    # The fraction is what it says (a speed ratio; how far below 1 it lands depends on the machine's load).
    assert facts["extract_fraction_of_forward"] == pytest.approx(
        facts["extract"]["images_per_second"] / facts["forward_images_per_s"])
    assert facts["extract_fraction_of_forward"] > 0
    assert facts["subsampled"] == ["train", "val", "test"] and sum(facts["n"].values()) <= 40
    rows = facts["compare"]["rows"]
    assert len(rows) == 4 and all(r["seconds"] > 0 and r["peak_memory_mb"] > 0 for r in rows.values())
    # featcache's path in fp32 always, and again under --amp with its own ratio; the tutorial stays fp32
    fp32, amp = rows["featcache extract + head sweep"], rows["featcache extract + head sweep, --amp"]
    assert fp32["precision"] == "fp32" and amp["precision"].startswith("bf16 autocast")  # "(emulated ...)" on old CPUs
    tutorial = next(r for name, r in rows.items() if name.startswith("PyTorch tutorial"))
    assert facts["compare"]["tutorial_vs_cache_time_amp"] == pytest.approx(tutorial["seconds"] / amp["seconds"])
    assert f"under {amp['precision']}: tutorial time / featcache time" in shown
    assert all(len(r["test_auroc_ci"]) == 2 and r["n"]["test"] == facts["n"]["test"] for r in rows.values())
    assert set(facts["extract"]["stages"]) == {"decode_wait", "host_to_device", "forward", "cache_write", "assemble"}


def test_run_config_mistakes(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('data = "x"\n[[fixed]]\nbackbone = "resnet18"\nheadz = "sweep"\n')
    with pytest.raises(UserError, match=r"unknown setting headz"):
        from featcache.run import run_config

        run_config(bad)
    bad.write_text('data = "x"\n')
    with pytest.raises(UserError, match="lists no runs"):
        run_config(bad)
    bad.write_text('data = "x"\n[[finetune]]\nbackbone = "resnet99"\n')
    assert main(["run", str(bad)]) == 2


def test_a_curve_table_draws_on_the_fixed_runs_caches_and_reaches_the_report(demo_cache, tmp_path, monkeypatch):
    import featcache.extract

    made = []

    def extract(data, cache, **options):  # the demo cache stands for the extraction (its own tests cover it)
        made.append(Path(cache).name)
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_cache, cache)

    monkeypatch.setattr(featcache.extract, "extract", extract)
    config = tmp_path / "c.toml"
    config.write_text(f'data = {json.dumps(str(DEMO_DATA))}\nbootstrap = 50\n[[fixed]]\nbackbone = "resnet18"\n'
                      'heads = "logistic"\n[curve]\nfractions = [0.1, 1.0]\nrepeats = 1\nheads = "logistic"\n')
    assert main(["run", str(config), "--weights", "none", "--out", str(tmp_path / "o")]) == 0
    record = json.loads((tmp_path / "o" / "curve" / "curve.json").read_text())
    assert record["settings"]["values"] == [0.1, 1.0] and record["settings"]["heads"] == "logistic"
    assert [c["name"] for c in record["settings"]["caches"]] == [Path(made[0]).stem]
    facts = json.loads((tmp_path / "o" / "report" / "report.json").read_text())
    assert [r["value"] for r in facts["curves"][0]["summary"]] == [0.1, 1.0]
    assert "## Label efficiency" in (tmp_path / "o" / "report" / "report.md").read_text()
    for text, words in (('[curve]\nfractions = [0.5]\n[[finetune]]\nbackbone = "resnet18"\n', "add one"),
                        ('[curve]\nfraction = [0.5]\n[[fixed]]\nbackbone = "resnet18"\n', "unknown setting fraction"),
                        ('[[curve]]\nrepeats = 1\n[[fixed]]\nbackbone = "resnet18"\n', "not [[curve]]")):
        config.write_text('data = "x"\n' + text)
        with pytest.raises(UserError, match=re.escape(words)):
            from featcache.run import read_config

            read_config(config)


def test_shipped_configs_read(tmp_path):
    from featcache.run import read_config

    for path in sorted((REPO / "configs").glob("*.toml")):
        if path.name == "kermany_resnet18.toml":
            continue  # command tables for --config, not a run config
        config = read_config(path)
        assert config["fixed"] or config["finetune"] or config["zoo"]["backbones"]


def test_small_config_runs_end_to_end(tmp_path):
    """`featcache run configs/small.toml --weights none`: every report section filled with measured numbers.

    The shipped config, scaled down to plumbing size: the embedded demo subset instead of the shared set,
    200 images instead of 600, one epoch instead of two, 100 bootstrap resamples instead of 500. Every run,
    step and report section of the config is kept; what is checked is that each is there, measured.
    """
    config = tmp_path / "small.toml"
    text = (REPO / "configs" / "small.toml").read_text()
    for old, new in (('"../shared/data/chest_xray_224"', json.dumps(str(DEMO_DATA))),
                     ("max_images = 600", "max_images = 200"), ("epochs = 2", "epochs = 1"),
                     ("bootstrap = 500", "bootstrap = 100")):
        assert old in text, old
        text = text.replace(old, new)
    config.write_text(text)
    assert main(["run", str(config), "--weights", "none", "--out", str(tmp_path / "small")]) == 0
    md = (tmp_path / "small" / "report" / "report.md").read_text()
    facts = json.loads((tmp_path / "small" / "report" / "report.json").read_text())
    assert len(facts["task_d"]) == 4 and all(r["test_auroc"] is not None and r["wall_seconds"] > 0
                                             for r in facts["task_d"])
    assert {r["strategy"] for r in facts["task_d"]} == {"cached features + sweep", "finetune-frozen",
                                                        "finetune-full"}
    assert len(facts["augmentation"]) == 2 and facts["domain_shift"]["auroc"] > 0.5
    assert set(facts["overfitting"]) == {"resnet18-finetune-frozen-light", "resnet18-finetune-full-light",
                                         "resnet18-finetune-full-none"}
    assert sum(len(v) for v in facts["worst_errors"]["errors"].values()) > 0
    for heading in ("## Task D", "### Augmentation ablation", "### Train/test shift", "### Worst test errors"):
        assert heading in md
    shutil.rmtree(tmp_path / "small" / "caches")


def test_task_d_says_how_each_frozen_run_was_trained():
    from featcache.report.document import recipe_words

    def run(**settings):
        return {"kind": "finetune", "run": {"settings": settings}, "metrics": {}}

    assert recipe_words(run(recipe="tutorial", freeze_backbone=True)).startswith("tutorial recipe")
    frozen = recipe_words(run(recipe="featcache", freeze_backbone=True))
    assert "BatchNorm fixed" in frozen and "BatchNorm1d" in frozen and "AdamW" in frozen
    assert recipe_words(run(freeze_backbone=False)).startswith("full fine-tuning")
    assert "best of 64" in recipe_words({"kind": "fit-head", "run": {}, "metrics": {"n_heads": 64}})
    knn = recipe_words({"kind": "fit-head", "run": {}, "metrics": {"n_heads": 112, "selected": {
        "head": "knn", "name": "knn_k_20_T_0.07_cw_none"}}})
    assert knn.startswith("cosine kNN votes") and knn.endswith("best of 112 on val: knn_k_20_T_0.07_cw_none")


@pytest.fixture(scope="module")
def probe_runs(fixture_runs, tmp_path_factory):
    """knn and mlp runs on the fixture's cache, and a two-point, two-repeat curve of it (logistic heads)."""
    from featcache.curve import curve

    root = tmp_path_factory.mktemp("probes")
    for heads in ("knn", "mlp"):
        fit_head(fixture_runs / "r18.h5", root / f"r18-{heads}", heads=heads, epochs=5, n_resamples=100,
                 device="cpu")
    curve([str(fixture_runs / "r18.h5")], root / "curve", fractions=[0.05, 1], repeats=2, heads="logistic",
          n_resamples=100)
    return root


def test_report_puts_knn_and_mlp_beside_the_sweep_and_reads_a_curve_folder(fixture_runs, probe_runs, tmp_path,
                                                                           capsys):
    folders = [fixture_runs / "r18-sweep", probe_runs / "r18-knn", probe_runs / "r18-mlp", probe_runs / "curve"]
    assert main(["report", *map(str, folders), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    facts = json.loads((tmp_path / "r" / "report.json").read_text())
    task_d = md[md.index("## Task D"):md.index("## Per run")]
    table = task_d[:task_d.index("\n\n", task_d.index("| run |"))]  # the first table: test figures with CIs
    for name in ("r18-sweep", "r18-knn", "r18-mlp"):
        metrics = json.loads(((fixture_runs if name == "r18-sweep" else probe_runs) / name / "metrics.json")
                             .read_text())["test"]
        ci = metrics["ci"]["auroc"]
        [row] = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
        assert f"{metrics['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" in row, row
    assert "| r18-knn | cosine kNN votes" in task_d and "| r18-mlp | one-hidden-layer MLP probes" in task_d

    record = json.loads((probe_runs / "curve" / "curve.json").read_text())
    [curve] = facts["curves"]
    assert [r["value"] for r in curve["summary"]] == [0.05, 1.0] and "## Label efficiency" in md
    for row in curve["summary"]:  # each point's interval holds both repeats' CIs, and no more
        cis = [p["test_auroc_ci"] for p in record["points"] if p["value"] == row["value"]]
        assert row["test_auroc_ci_span"] == [min(c[0] for c in cis), max(c[1] for c in cis)]
    [sentence] = curve["sentences"]
    low, high = (r["test_auroc_ci_span"] for r in curve["summary"])
    apart = low[1] < high[0] or high[1] < low[0]
    assert sentence.startswith("r18: with 5% of train (") and "; with 100% of train (" in sentence
    assert ("beyond noise" in sentence) == apart and ("within noise" in sentence) == (not apart)
    assert sentence in md and sentence in capsys.readouterr().out
    assert (tmp_path / "r" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    from featcache.report.document import build_report

    alone = build_report([str(probe_runs / "curve")], tmp_path / "alone")
    assert alone["curves"][0]["sentences"] == [sentence] and "task_d" not in alone


def test_curve_sentence_follows_the_intervals_alone():
    from featcache.report.document import curve_sentence

    def row(value, images, auroc, span):
        return {"value": value, "train_images": images, "test_auroc": auroc, "test_auroc_ci_span": span}

    apart = curve_sentence("r", [row(0.01, 40, 0.70, [0.62, 0.78]), row(1.0, 4000, 0.90, [0.86, 0.94])], "fraction")
    assert apart == ("r: with 1% of train (40 images) test AUROC 0.700 [0.620, 0.780]; with 100% of train (4,000 "
                     "images) test AUROC 0.900 [0.860, 0.940]. The intervals do not overlap: the largest point's "
                     "test AUROC is higher beyond noise.")
    close = curve_sentence("r", [row(2, 4, 0.70, [0.55, 0.87]), row(32, 64, 0.80, [0.72, 0.88])], "shots")
    assert "2 images per class" in close and "within noise" in close and "beyond" not in close
    worse = curve_sentence("r", [row(0.01, 40, 0.90, [0.86, 0.94]), row(1.0, 4000, 0.70, [0.62, 0.78])], "fraction")
    assert "the smallest point's test AUROC is higher beyond noise" in worse
    bare = curve_sentence("r", [row(0.01, 40, 0.7, None), row(1.0, 4000, 0.9, [0.86, 0.94])], "fraction")
    assert "cannot say" in bare and "higher beyond noise" not in bare and "within noise" not in bare


def _effect(cw, rule, val_ba, test_ba, test_sens=0.9, test_spec=0.5):
    return {"class_weight": cw, "threshold_rule": rule, "val_balanced_accuracy": val_ba,
            "test_balanced_accuracy": test_ba, "test_sensitivity": test_sens, "test_specificity": test_spec}


def test_weighting_sentence_says_only_what_the_numbers_show():
    from featcache.report.document import weighting_sentence

    base = _effect("none", "0.5", 0.80, 0.758)
    effects = [base, _effect("balanced", "youden", 0.85, 0.7581), _effect("none", "youden", 0.70, 0.9)]
    # Balanced train: no "leans to the majority class", however low the test specificity.
    text = weighting_sentence("resnet18", {"NORMAL": 500, "PNEUMONIA": 520}, effects, effects[1], "PNEUMONIA")
    assert "leans" not in text
    # The same rounded figure is "no change", never "from 0.758 to 0.758".
    assert "no change" in text and "0.758 for the plain head" not in text
    # Imbalanced train whose minority class is recalled better at test: still no "leans".
    flipped = [_effect("none", "0.5", 0.8, 0.7, test_sens=0.6, test_spec=0.9), *effects[1:]]
    assert "leans" not in weighting_sentence("r", {"NORMAL": 250, "PNEUMONIA": 750}, flipped, effects[1], "PNEUMONIA")
    imbalanced = weighting_sentence("r", {"NORMAL": 250, "PNEUMONIA": 750}, effects, effects[1], "PNEUMONIA")
    assert "Train is 75% PNEUMONIA" in imbalanced and "leans to that majority class" in imbalanced
    # The plain head chosen on validation is said to be chosen, not to "move" anything.
    plain = weighting_sentence("r", {"NORMAL": 250, "PNEUMONIA": 750}, effects, base, "PNEUMONIA")
    assert "already the best of the four" in plain


def _row(run, strategy, val, wall, test=0.8):
    return {"run": run, "strategy": strategy, "backbone": "resnet18", "val_auroc": val, "test_auroc": test,
            "wall_seconds": wall, "specificity": 0.8, "n_train": 100}


def test_verdict_never_says_1_0x_and_files_frozen_training_under_task_c():
    from featcache.report.document import choose_runs, verdict

    rows = [_row("sweep", "cached features + sweep", 0.90, 100.0), _row("frozen", "finetune-frozen", 0.95, 102.0),
            _row("tut", "finetune-tutorial-recipe", 0.85, 300.0), _row("full", "finetune-full", 0.93, 400.0)]
    choices = choose_runs(rows)
    assert choices["best_fixed_feature_run"]["chosen"] == "frozen"  # frozen backbone training is Task C style
    assert choices["best_finetune_run"]["chosen"] == "full"
    text = verdict(rows, choices)
    assert "1.0x" not in text and "about the same time as the fastest" in text
    assert "best full fine-tuning (Task B) (full)" in text


def test_overfitting_looks_at_the_whole_curve():
    from featcache.report.analysis import overfitting

    # The best epoch is the last and the gap never grows, but val loss is 20x the train loss.
    history = [{"epoch": e + 1, "train_loss": 0.05, "val_loss": 1.0, "val_auroc": 0.8 + 0.01 * e,
                "train_accuracy": 0.99, "val_accuracy": 0.8} for e in range(3)]
    verdict = overfitting(history)
    assert verdict["flag"] and "20x the training loss" in verdict["reason"]
    healthy = [{**h, "val_loss": 0.3, "train_loss": 0.25} for h in history]
    assert not overfitting(healthy)["flag"]


def test_warnings_are_computed_from_the_runs():
    from featcache.report.analysis import run_warnings

    def run(name, *, cm_test, threshold=0.5, rule="fixed", n_val=200, selected=None, heads=(), history=()):
        return {"name": name, "history": list(history), "metrics": {
            "classes": ["NORMAL", "PNEUMONIA"], "threshold": threshold, "threshold_rule": rule,
            "val": {"n": n_val, "confusion_matrix": [[40, 10], [10, 140]]},
            "test": {"n": int(np.sum(cm_test)), "confusion_matrix": cm_test},
            "selected": selected or {}, "heads": list(heads)}}

    grid = [{"lr": lr, "weight_decay": wd} for lr in (0.01, 0.1, 0.3) for wd in (1e-4, 1e-2, 1e-1)]
    flat = [{"epoch": e, "val_accuracy": 0.625} for e in (1, 2, 3)]
    kinds = {(w["run"], w["kind"]) for w in run_warnings([
        run("healthy", cm_test=[[200, 34], [30, 360]], selected={"lr": 0.1, "weight_decay": 1e-2}, heads=grid),
        run("one-class", cm_test=[[0, 234], [0, 390]], history=flat),
        run("extreme", cm_test=[[200, 34], [30, 360]], threshold=0.991, rule="youden", n_val=30),
        run("edge", cm_test=[[20, 3], [3, 36]], selected={"lr": 0.3, "weight_decay": 1e-2}, heads=grid),
    ])}
    assert not any(r == "healthy" for r, _ in kinds)
    assert ("one-class", "one class predicted") in kinds and ("one-class", "flat validation accuracy") in kinds
    assert ("extreme", "extreme threshold") in kinds and ("extreme", "threshold from few images") in kinds
    assert ("edge", "head on the grid's edge") in kinds and ("edge", "smaller test set") in kinds


@pytest.mark.parametrize("k", [2, 3])
def test_classification_report_matches_scikit_learn(k):
    from sklearn.metrics import classification_report as sk_report
    from sklearn.metrics import confusion_matrix

    from featcache.report.analysis import classification_report

    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, k, 300))
    if k == 3:
        pred[pred == 2] = 1  # a class never predicted: its precision is 0, as scikit-learn's zero_division
    classes = [f"c{i}" for i in range(k)]
    ours = classification_report(confusion_matrix(y, pred, labels=range(k)).tolist(), classes)
    theirs = sk_report(y, pred, labels=range(k), target_names=classes, output_dict=True, zero_division=0)
    for key in (*classes, "macro avg", "weighted avg"):
        for field in ("precision", "recall", "f1-score", "support"):
            assert ours[key][field] == pytest.approx(theirs[key][field]), (key, field)
    assert ours["accuracy"] == pytest.approx(theirs["accuracy"])


def _predictions(scores, labels, patients):
    return [{"split": "test", "path": f"p{i}.png", "patient": pt, "label": "PNEUMONIA" if y else "NORMAL",
             "p_PNEUMONIA": str(sc), "p_NORMAL": str(1 - sc)}
            for i, (sc, y, pt) in enumerate(zip(scores, labels, patients))]


def test_paired_comparison_by_patient_bootstrap_and_mcnemar():
    from featcache.report.analysis import paired_comparison
    from featcache.eval.metrics import auroc
    from featcache.report.document import b_vs_c_sentence

    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.6
    patients = [f"pt{i // 4}" for i in range(400)]
    good = np.clip(y * 0.6 + rng.normal(0.2, 0.15, 400), 0, 1)
    poor = np.clip(y * 0.15 + rng.normal(0.4, 0.2, 400), 0, 1)
    classes = ["NORMAL", "PNEUMONIA"]
    a = _predictions(good, y, patients)
    b = list(reversed(_predictions(poor, y, patients)))  # matched by path, not by order
    cmp = paired_comparison(a, b, classes, threshold_a=0.5, threshold_b=0.5, n_resamples=300)
    assert cmp["auroc_difference"] == pytest.approx(auroc(y, good) - auroc(y, poor))
    assert cmp["auroc_difference_ci"][0] > 0 and cmp["patients"] == 100 and cmp["unit"] == "patient"
    assert cmp["only_a_right"] > cmp["only_b_right"] and cmp["mcnemar_p"] < 0.05
    assert "A (Task C) has the higher AUROC" in b_vs_c_sentence("A", "B", cmp)
    same = paired_comparison(a, a, classes, threshold_a=0.5, threshold_b=0.5, n_resamples=100)
    assert same["auroc_difference"] == 0 and same["mcnemar_p"] == 1.0
    assert "cannot tell their AUROCs apart" in b_vs_c_sentence("A", "B", same)
    assert "no significant difference in accuracy" in b_vs_c_sentence("A", "B", same)


def test_recommendations_follow_from_the_findings():
    from featcache.report.analysis import recommendations

    healthy = {"provenance": [{"run": "a", "random_init": False}],
               "task_d": [{"run": "a", "sensitivity": 0.92, "specificity": 0.88}],
               "overfitting": {"a": {"flag": False}}, "domain_shift": {"auroc": 0.52}, "warnings": [],
               "near_duplicates": {"pairs_above": {"train-test": 0}}, "exact_duplicates": []}
    assert recommendations(healthy) == []
    troubled = {**healthy, "provenance": [{"run": "a", "random_init": True}],
                "task_d": [{"run": "a", "sensitivity": 0.98, "specificity": 0.41}],
                "overfitting": {"a": {"flag": True, "reason": "val loss rose"}}, "domain_shift": {"auroc": 0.81}}
    found = " | ".join(r["finding"] + " -> " + r["try"] for r in recommendations(troubled))
    assert "random weights" in found and "test specificity 0.410" in found and "--class-weight balanced" in found
    assert "val loss rose -> stronger augmentation" in found and "AUROC 0.810" in found
    assert not any("sensitivity" in r["finding"] for r in recommendations(troubled))  # 0.98 needs nothing


def test_report_is_portable_and_never_half_written(fixture_runs, tmp_path, monkeypatch):
    from featcache.report import document as report_module
    from featcache.report.document import build_report

    # A copied project: run folders and the cache moved together, report run from another directory.
    project = tmp_path / "copy"
    shutil.copytree(fixture_runs, project)
    monkeypatch.chdir(tmp_path)
    run_json = json.loads((project / "r18-logistic" / "run.json").read_text())
    run_json["cache"] = str(tmp_path / "gone" / "r18.h5")  # the original location no longer exists
    (project / "r18-logistic" / "run.json").write_text(json.dumps(run_json))
    facts = build_report([str(project / "r18-logistic")], "out")
    assert facts["class_balance"]["test"] == {"NORMAL": 40, "PNEUMONIA": 60}  # found beside the run folder
    # A failure half-way leaves neither a partial folder nor a damaged earlier report.
    before = (tmp_path / "out" / "report.md").read_text()
    monkeypatch.setattr(report_module, "_worst_errors", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build_report([str(project / "r18-logistic")], "out")
    with pytest.raises(ZeroDivisionError):
        build_report([str(project / "r18-logistic")], "fresh")
    assert (tmp_path / "out" / "report.md").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "out"]  # no "fresh", no scratch folders
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="not a featcache report folder"):
        build_report([str(project / "r18-logistic")], tmp_path / "notes")


def test_report_pdf_has_every_section(fixture_runs, tmp_path):
    import re

    from featcache.report.document import build_report

    names = ("r18-logistic", "r18-sweep", "ft-light", "ft-none")
    build_report([str(fixture_runs / n) for n in names], tmp_path / "r", title="pdf report", pdf=True)
    pdf = (tmp_path / "r" / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and b"pdf report" in pdf  # the title, in the document's metadata
    pages = len(re.findall(rb"/Type /Page\b", pdf))
    assert pages >= 4
    assert pdf.count(b"/Subtype /Image") >= 5  # the plots embedded: AUROC vs time, confusion matrices, ...


def test_runs_on_different_test_sets_are_never_mixed_in_one_table(fixture_runs, tmp_path):
    from featcache.report.document import build_report

    other = tmp_path / "other"
    shutil.copytree(fixture_runs / "ft-none", other)
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["test"]["n"], metrics["test"]["confusion_matrix"] = 50, [[15, 5], [5, 25]]
    (other / "metrics.json").write_text(json.dumps(metrics))
    facts = build_report([str(fixture_runs / "r18-logistic"), str(other)], tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "tested on 2 different test sets" in md and md.count("| run | backbone | strategy |") == 2
    assert {(w["run"], w["kind"]) for w in facts["warnings"]} >= {("other", "smaller test set")}


def test_run_repeats_over_seeds_and_the_report_shows_mean_and_sd(tmp_path):
    from featcache.report.document import seed_groups
    from featcache.run import run_config

    config = tmp_path / "seeds.toml"
    config.write_text(f'data = "{DEMO_DATA}"\nout = "{tmp_path / "out"}"\nweights = "none"\nmax_images = 40\n'
                      'subsample_all = true\nbootstrap = 0\nseeds = [0, 1]\n\n[[fixed]]\nbackbone = "resnet18"\n'
                      'heads = "logistic"\n')
    facts = run_config(config)
    assert sorted(facts["runs"]) == ["resnet18-logistic-seed0", "resnet18-logistic-seed1"]
    assert len(list((tmp_path / "out" / "caches").glob("*.h5"))) == 2  # random init: one cache per seed
    [group] = facts["seed_groups"]
    aurocs = [r["test_auroc"] for r in facts["task_d"]]
    assert group["group"] == "resnet18-logistic" and group["seeds"] == [0, 1]
    assert group["test_auroc"]["mean"] == pytest.approx(np.mean(aurocs))
    assert group["test_auroc"]["sd"] == pytest.approx(np.std(aurocs, ddof=1))
    md = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "| resnet18-logistic | 0, 1 | " in md and "±" in md
    assert seed_groups([{"run": "a-seed0", **dict.fromkeys(("val_auroc", "test_auroc", "test_accuracy",
                                                            "sensitivity", "specificity", "wall_seconds"))}]) == []


PROBE = """<script>
window.addEventListener("load", () => {
  const width = document.documentElement.clientWidth;
  const images = [...document.images].map(i => i.naturalWidth);
  const overflow = [...document.querySelectorAll("table")].map(t => t.getBoundingClientRect().right - width);
  document.body.setAttribute("data-probe", JSON.stringify({images, overflow}));
});
</script>"""


def _chromium() -> str:
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                 None)
    if not found:
        pytest.skip("SKIPPED LOUDLY: no chromium on this machine (make test installs Debian's chromium where it "
                    "can); the HTML report's rendering was not checked")
    return found


@pytest.mark.parametrize("width", [1280, 900])
def test_html_report_renders_every_image_and_no_table_overflows(fixture_runs, tmp_path, width):
    import html as html_module
    import subprocess

    from featcache.report.document import build_report

    browser = _chromium()
    names = ("r18-logistic", "r18-sweep", "ft-light", "ft-none")
    build_report([str(fixture_runs / n) for n in names], tmp_path / "r")
    page = (tmp_path / "r" / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},2000"]
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = json.loads(html_module.unescape(dom.split('data-probe="', 1)[1].split('"', 1)[0]))
    assert len(found["images"]) == page.count("<img ") >= 5 and min(found["images"]) > 0
    assert max(found["overflow"]) <= 0, found["overflow"]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", (tmp_path / "r" / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 50_000
