"""featcache zoo: backbones ranked on validation, never on test, with paired CIs and costs."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache.cli import main
from featcache.data.demo import DEMO_DATA
from featcache.errors import UserError
from featcache.zoo import leaderboard, rank, write
from helpers import flat

BACKBONES = ["resnet18", "timm:resnet18"]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    assert main(["zoo", str(DEMO_DATA), "--backbones", *BACKBONES, "--weights", "none", "--max-images", "120",
                 "--subsample-all", "--bootstrap", "50", "--workers", "0", "--no-progress", "--out", str(out)]) == 0
    return out


def test_zoo_writes_a_leaderboard_ranked_on_validation(zoo_dir):
    board = json.loads((zoo_dir / "leaderboard.json").read_text())
    rows = board["rows"]
    assert board["ranked_by"] == "val_auroc" and [r["rank"] for r in rows] == [1, 2]
    assert {r["backbone"] for r in rows} == set(BACKBONES)
    assert rows[0]["val_auroc"] >= rows[1]["val_auroc"]
    first, second = rows
    assert first["difference_to_first"] is None
    assert second["difference_to_first"] == pytest.approx(second["test_auroc"] - first["test_auroc"], abs=1e-9)
    lo, hi = second["difference_to_first_ci"]
    assert lo <= second["difference_to_first"] <= hi
    for r in rows:
        assert r["feature_dim"] == 512 and r["params_m"] > 10 and r["gmacs"] > 1
        assert r["extract_images_per_second"] > 0 and r["cache_mb"] > 0
        assert r["test_auroc_ci"][0] <= r["test_auroc"] <= r["test_auroc_ci"][1]
    with open(zoo_dir / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["backbone"] for t in table] == [r["backbone"] for r in rows]
    assert (zoo_dir / "leaderboard.png").stat().st_size > 0


def test_the_ranking_is_blind_to_the_test_labels(zoo_dir, tmp_path):
    from featcache.fit import fit_head

    before = leaderboard({b: zoo_dir / "runs" / f"{b.replace(':', '-')}-none" for b in BACKBONES}, n_resamples=50)
    runs = {}
    for b in BACKBONES:
        cache = tmp_path / f"{b.replace(':', '-')}-none.h5"  # the zoo's name: backbone and weights
        cache.write_bytes((zoo_dir / "caches" / cache.name).read_bytes())
        with h5py.File(cache, "r+") as f:
            rows = np.flatnonzero(f["splits"].asstr()[()] == "test")
            labels = f["labels"][()]
            labels[rows] = np.random.default_rng(7).permutation(labels[rows])
            labels[rows[:10]] = 1 - labels[rows[:10]]
            f["labels"][...] = labels
        runs[b] = tmp_path / "runs" / b.replace(":", "-")
        fit_head(cache, runs[b], heads="sweep", n_resamples=50)
    after = leaderboard(runs, n_resamples=50)
    assert [(r["backbone"], r["val_auroc"]) for r in after] == [(r["backbone"], r["val_auroc"]) for r in before]
    assert [r["test_auroc"] for r in after] != [r["test_auroc"] for r in before]  # test did change


def test_rank_follows_validation_even_when_test_disagrees():
    rows = [{"backbone": "a", "val_auroc": 0.80, "test_auroc": 0.95},
            {"backbone": "b", "val_auroc": 0.90, "test_auroc": 0.60},
            {"backbone": "c", "val_auroc": 0.90, "test_auroc": 0.70}]
    assert [r["backbone"] for r in rank(rows)] == ["b", "c", "a"]  # ties by name, never by test


def test_a_bad_backbone_name_stops_the_zoo_before_any_work(tmp_path, capsys):
    out = tmp_path / "zoo"
    assert main(["zoo", str(DEMO_DATA), "--backbones", "resnet18", "timm:not_a_model", "--out", str(out)]) == 2
    assert "timm:not_a_model is not a timm model" in capsys.readouterr().err
    assert not (out / "caches").exists()


# -- the zoo in `featcache report` and in `featcache run` configs

def _shuffle_split(source, target, split: str) -> None:
    """A copy of the cache at ``source`` whose ``split`` rows have their features shuffled among themselves
    (checksum rewritten, as extraction writes it): the same features, no longer tied to their labels there."""
    shutil.copy(source, target)
    with h5py.File(target, "r+") as f:
        features = f["features"][()]
        rows = np.flatnonzero(f["splits"].asstr()[()] == split)
        features[rows] = features[np.random.default_rng(3).permutation(rows)]
        f["features"][...] = features
        f.attrs["features_sha256"] = hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest()


def _permute_test_labels(cache) -> None:
    with h5py.File(cache, "r+") as f:
        rows = np.flatnonzero(f["splits"].asstr()[()] == "test")
        labels = f["labels"][()]
        labels[rows] = np.random.default_rng(7).permutation(labels[rows])
        f["labels"][...] = labels


def _zoo_folder(root, caches: dict) -> tuple:
    """A zoo folder as `featcache zoo` writes it (runs/, leaderboard.*), from one cache per backbone name."""
    from featcache.fit import fit_head

    runs = {name: root / "runs" / name for name in caches}
    for name, cache in caches.items():
        fit_head(cache, runs[name], heads="sweep", n_resamples=100)
    rows = leaderboard(runs, n_resamples=100)
    write(rows, root)
    return root, rows


@pytest.fixture(scope="module")
def disagreeing_zoos(demo_cache, tmp_path_factory):
    """Two zoo folders of two "backbones" whose validation and test disagree: "val-shuffled" has its validation
    features shuffled (test intact), "test-shuffled" its test features. The second has the same caches with
    every test label permuted. Returns (zoo, zoo with permuted test labels, cache of the first run)."""
    built = []
    for permuted in (False, True):
        root = tmp_path_factory.mktemp("permuted" if permuted else "zoo")
        caches = {"val-shuffled": root / "val-shuffled.h5", "test-shuffled": root / "test-shuffled.h5"}
        _shuffle_split(demo_cache, caches["val-shuffled"], "val")
        _shuffle_split(demo_cache, caches["test-shuffled"], "test")
        for cache in caches.values():
            if permuted:
                _permute_test_labels(cache)
        built.append(_zoo_folder(root / "zoo", caches))
    return built


def test_the_report_names_the_backbone_first_on_validation_and_is_blind_to_test_labels(disagreeing_zoos, tmp_path):
    from featcache.report.document import build_report

    (zoo, rows), (permuted, permuted_rows) = disagreeing_zoos
    by_name = {r["backbone"]: r for r in rows}
    # The construction holds: first on validation is last on test, and that by more than noise.
    assert [r["backbone"] for r in rows] == ["test-shuffled", "val-shuffled"]
    assert by_name["val-shuffled"]["test_auroc"] > by_name["test-shuffled"]["test_auroc"]
    assert by_name["val-shuffled"]["difference_to_first_ci"][0] > 0
    a = build_report([str(zoo)], tmp_path / "a", title="zoo report")
    assert main(["report", str(permuted), "--out", str(tmp_path / "b")]) == 0
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a["choices"] == {"zoo": {"chosen": "test-shuffled", "by": "val_auroc",
                                    "value": by_name["test-shuffled"]["val_auroc"]}}
    assert b["choices"] == a["choices"]
    assert [r["val_auroc"] for r in b["zoo"]["rows"]] == [r["val_auroc"] for r in rows]
    assert [r["test_auroc"] for r in permuted_rows] != [r["test_auroc"] for r in rows]  # the test did change
    md = (tmp_path / "a" / "report.md").read_text()
    assert "## Task A: which backbone for this data" in md and "## Task D" not in md
    assert "Ranked first on validation: test-shuffled" in md
    assert "val-shuffled scores higher on test beyond noise" in md and "the choice stays with validation" in md
    ci = by_name["val-shuffled"]["test_auroc_ci"]
    assert f"| 2 | val-shuffled | {by_name['val-shuffled']['val_auroc']:.3f} | " \
           f"{by_name['val-shuffled']['test_auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | +" in md
    assert (tmp_path / "a" / "zoo_leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "a" / "report.json").read_text())["choices"] == a["choices"]


def test_a_zoo_beside_runs_adds_task_a_and_keeps_every_choice(disagreeing_zoos, tmp_path):
    from featcache.report.document import build_report

    (zoo, rows), _ = disagreeing_zoos
    facts = build_report([str(zoo / "runs" / "val-shuffled"), str(zoo)], tmp_path / "r", analyses=False)
    assert facts["choices"]["zoo"]["chosen"] == "test-shuffled"
    assert facts["choices"]["best_run"]["chosen"] == "val-shuffled"
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.index("## Provenance") < md.index("## Task A") < md.index("## Task D")


def _row(name, val, test, diff=None, ci=None):
    return {"backbone": name, "val_auroc": val, "test_auroc": test, "test_auroc_ci": [test - 0.05, test + 0.05],
            "difference_to_first": diff, "difference_to_first_ci": ci}


def test_the_zoo_sentence_says_beyond_noise_only_when_the_paired_interval_does():
    from featcache.report.document import zoo_sentence

    first = _row("a", 0.95, 0.90)
    behind = _row("c", 0.85, 0.70, -0.2, [-0.3, -0.1])
    text = zoo_sentence([first, _row("b", 0.90, 0.80, -0.10, [-0.15, -0.04]), behind])
    assert text.startswith("Ranked first on validation: a (val AUROC 0.950; test AUROC 0.900 [0.850, 0.950]).")
    assert "Its test lead over every other backbone is beyond noise" in text
    assert "b -0.100 [-0.150, -0.040]; c -0.200 [-0.300, -0.100]" in text
    text = zoo_sentence([first, _row("b", 0.90, 0.92, 0.02, [-0.01, 0.05]), behind])
    assert "Its test lead over c is beyond noise" in text and "every other" not in text
    assert "Against b the interval includes 0 (b +0.020 [-0.010, +0.050]): on this test set the difference is " \
           "within noise" in text and "higher on test beyond noise" not in text
    text = zoo_sentence([first, _row("b", 0.90, 0.95, 0.05, [0.01, 0.09]), _row("c", 0.8, 0.9, None, None)])
    assert "b scores higher on test beyond noise (b +0.050 [+0.010, +0.090])" in text and "lead" not in text
    assert "For c there is no paired interval" in text
    assert zoo_sentence([first]).endswith("It is the only backbone, so there is nothing to compare it with.")
    # a multi-label leaderboard ranks by the mean AUROC over labels, and says so
    labels = [{**r, "task": "multilabel"} for r in (first, _row("b", 0.90, 0.80, -0.10, [-0.15, -0.04]))]
    text = zoo_sentence(labels)
    assert text.startswith("Ranked first on validation: a (val mean AUROC 0.950; test mean AUROC 0.900 [0.850, 0.950]).")
    assert "CI of the test mean AUROC difference" in text


def test_the_report_refuses_a_leaderboard_it_cannot_trust(tmp_path):
    from featcache.report.document import build_report

    def zoo(name, rows, ranked_by="val_auroc"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "leaderboard.json").write_text(json.dumps({"ranked_by": ranked_by, "rows": rows}))
        return str(tmp_path / name)

    ranked_on_test = zoo("t", [{**_row("a", 0.7, 0.9), "rank": 1}, {**_row("b", 0.9, 0.6, -0.3, [-0.4, -0.2]),
                                                                      "rank": 2}])
    with pytest.raises(UserError, match="is not ranked by validation AUROC"):
        build_report([ranked_on_test], tmp_path / "r")
    with pytest.raises(UserError, match="is not a featcache zoo leaderboard"):
        build_report([zoo("u", [{"backbone": "a"}])], tmp_path / "r")
    with pytest.raises(UserError, match="one featcache zoo folder per report, got 2"):
        build_report([ranked_on_test, zoo("v", [{**_row("a", 0.7, 0.9), "rank": 1}])], tmp_path / "r")
    assert not (tmp_path / "r").exists()  # refused before any output


def _config(tmp_path, text: str):
    config = tmp_path / "zoo.toml"
    config.write_text(f'data = {json.dumps(str(DEMO_DATA))}\nout = {json.dumps(str(tmp_path / "out"))}\n'
                      'weights = "none"\nmax_images = 60\nsubsample_all = true\nbootstrap = 50\n' + text)
    return config


def test_a_config_with_only_a_zoo_table_runs_the_zoo_and_reports_it(tmp_path, tiny_backbone):
    from featcache.run import run_config

    facts = run_config(_config(tmp_path, f'[zoo]\nbackbones = ["{tiny_backbone}", "resnet18"]\nheads = "sweep"\n'))
    board = json.loads((tmp_path / "out" / "zoo" / "leaderboard.json").read_text())
    assert [r["backbone"] for r in board["rows"]] == [r["backbone"] for r in rank(board["rows"])]
    assert {r["backbone"] for r in board["rows"]} == {"tiny", "resnet18"}
    assert {r["feature_dim"] for r in board["rows"]} == {32, 512}
    assert facts["runs"] == [] and facts["choices"] == {"zoo": {
        "chosen": board["rows"][0]["backbone"], "by": "val_auroc", "value": board["rows"][0]["val_auroc"]}}
    md = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "## Task A: which backbone for this data" in md and "RANDOM INIT" in md
    assert f"Ranked first on validation: {board['rows'][0]['backbone']}" in md


def test_a_config_sets_the_positive_class_for_its_runs_and_its_zoo(tmp_path, tiny_backbone):
    from featcache.run import run_config

    facts = run_config(_config(tmp_path, f'positive_class = "NORMAL"\n[[fixed]]\nbackbone = "{tiny_backbone}"\n'
                                         f'heads = "logistic"\n[zoo]\nbackbones = ["{tiny_backbone}"]\n'))
    [run] = facts["runs"]
    assert json.loads((tmp_path / "out" / "runs" / run / "metrics.json").read_text())["positive_class"] == "NORMAL"
    [row] = json.loads((tmp_path / "out" / "zoo" / "leaderboard.json").read_text())["rows"]
    assert row["positive_class"] == "NORMAL"
    assert set(facts["choices"]) >= {"zoo", "best_run"} and facts["zoo"]["rows"][0]["positive_class"] == "NORMAL"


@pytest.mark.parametrize("table, message", [
    ('[zoo]\nbackbones = ["resnet18", "timm:not_a_model"]\n', "timm:not_a_model is not a timm model"),
    ('[zoo]\nbackbones = ["resnet18"]\nheads = "nope"\n', "heads takes"),
    ('[zoo]\nbackbones = "resnet18"\n', "backbones must be a list"),
    ('[zoo]\nbackbones = []\n', "backbones must be a list of one or more backbone names"),
    ('[zoo]\nbackbones = ["resnet18"]\nmax_images = 10\n', "max_images is set at the top of the config"),
    ('[zoo]\nbackbones = ["resnet18"]\nbackbone = "vgg16"\n', "unknown setting backbone"),
    ('[[zoo]]\nbackbones = ["resnet18"]\n', "write one [zoo] table"),
    ('positive_class = 1\n[zoo]\nbackbones = ["resnet18"]\n', "positive_class must be a str"),
])
def test_zoo_table_mistakes_stop_the_run_before_any_work(tmp_path, table, message):
    from featcache.run import run_config

    with pytest.raises(UserError, match=re.escape(message)):
        run_config(_config(tmp_path, table))
    assert not (tmp_path / "out").exists()


def test_featcache_zoo_reads_the_same_zoo_table(tmp_path, capsys):
    config = _config(tmp_path, '[zoo]\nbackbones = ["resnet18", "timm:not_a_model"]\n')
    assert main(["zoo", str(DEMO_DATA), "--out", str(tmp_path / "z"), "--config", str(config)]) == 2
    assert "timm:not_a_model is not a timm model" in capsys.readouterr().err
    assert main(["run", str(config)]) == 2
    assert "timm:not_a_model is not a timm model" in capsys.readouterr().err
    assert not (tmp_path / "z").exists() and not (tmp_path / "out").exists()


def test_featcache_zoo_runs_a_run_configs_zoo_with_its_top_level_settings(tmp_path, tiny_backbone):
    """`featcache zoo --config C` and `featcache run C` give the same zoo: data, weights, subset, seed from the
    top of the config, into OUT/zoo; a flag still wins over the config."""
    config = tmp_path / "c.toml"
    config.write_text(f'data = {json.dumps(str(DEMO_DATA))}\nout = {json.dumps(str(tmp_path / "o"))}\n'
                      'weights = "none"\nmax_images = 40\nsubsample_all = true\nseeds = [3, 4]\nbootstrap = 20\n'
                      f'[zoo]\nbackbones = ["{tiny_backbone}"]\n')
    assert main(["zoo", "--config", str(config), "--no-progress", "--heads", "logistic"]) == 0
    [row] = json.loads((tmp_path / "o" / "zoo" / "leaderboard.json").read_text())["rows"]
    metrics = json.loads((Path(row["run"]) / "metrics.json").read_text())
    assert metrics["weights"] == "none:seed=3" and metrics["heads"][0]["name"].startswith("logistic")
    assert metrics["n_train"] + metrics["val"]["n"] + metrics["test"]["n"] <= 40


def test_a_zoo_rerun_with_other_weights_makes_its_own_caches(tmp_path, tiny_backbone):
    """Each weights (each random seed, each weights file, even two files both named best.pt) has its own caches
    and runs in one zoo folder, so a rerun with them fits instead of stopping at a cache made from different
    inputs; a rerun over other data stops, and --overwrite replaces the cache."""
    import torch

    from featcache.backbones.registry import create_backbone
    from featcache.zoo import zoo

    common = dict(backbones=[tiny_backbone], max_images=40, subsample_all=True, n_resamples=20, progress=False)
    zoo(DEMO_DATA, tmp_path / "z", weights="none", **common)
    zoo(DEMO_DATA, tmp_path / "z", weights="none", seed=1, **common)
    for folder, seed in (("a", 2), ("b", 3)):
        (tmp_path / folder).mkdir()
        torch.save(create_backbone(tiny_backbone, "none", seed=seed).model.body.state_dict(),
                   tmp_path / folder / "best.pt")
        zoo(DEMO_DATA, tmp_path / "z", weights=str(tmp_path / folder / "best.pt"), **common)
    caches = sorted(p.name for p in (tmp_path / "z" / "caches").glob("*.h5"))
    assert len(caches) == 4 and {"tiny-none.h5", "tiny-none-seed1.h5"} < set(caches)
    assert sorted(p.name for p in (tmp_path / "z" / "runs").iterdir()) == sorted(c[:-3] for c in caches)
    args = ["zoo", str(DEMO_DATA), "--out", str(tmp_path / "z"), "--backbones", tiny_backbone, "--weights", "none",
            "--max-images", "30", "--subsample-all", "--bootstrap", "20", "--no-progress"]
    assert main(args) == 2  # another subset: the cache is not silently replaced
    assert main([*args, "--overwrite"]) == 0
    with h5py.File(tmp_path / "z" / "caches" / "tiny-none.h5") as f:
        assert len(f["paths"]) <= 30


def test_zoo_fits_a_multi_label_set_under_the_policy_given(tmp_path, tiny_backbone, capsys):
    from helpers import make_chexpert

    folder = make_chexpert(tmp_path, n_train_patients=16, n_valid_patients=4)
    args = ["zoo", str(folder), "--format", "chexpert", "--backbones", tiny_backbone, "--weights", "none",
            "--out", str(tmp_path / "z"), "--no-progress", "--heads", "logistic", "--bootstrap", "20"]
    assert main([*args, "--positive-class", "Edema"]) == 2  # refused before any extraction
    assert "--positive-class applies to two-class sets" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    assert main([*args, "--uncertain", "ones", "--unmentioned", "ignore"]) == 0
    assert "mean validation AUROC" in flat(capsys.readouterr().out)
    board = json.loads((tmp_path / "z" / "leaderboard.json").read_text())
    assert board["task"] == "multilabel" and board["policy"] == {"uncertain": "ones", "unmentioned": "ignore"}
    [row] = board["rows"]
    metrics = json.loads((Path(row["run"]) / "metrics.json").read_text())
    assert metrics["policy"] == board["policy"] and len(metrics["thresholds"]) == 14
    assert row["val_auroc"] == metrics["val"]["auroc"]  # the mean over labels
    assert row["test_auroc"] == metrics["test"]["auroc"] and row["test_auroc_ci"] == metrics["test"]["ci"]["auroc"]


@pytest.fixture(scope="module")
def multilabel_zoos(tmp_path_factory):
    """Leaderboards of two multi-label "backbones" (features carrying each label strongly, and weakly), then
    of the same caches with every test label row permuted: (rows, rows with permuted test labels)."""
    from featcache.fit import fit_head
    from test_multilabel import chexpert_cache

    root = tmp_path_factory.mktemp("multilabel_zoo")
    caches = {name: chexpert_cache(root / name, signal=signal)[0] for name, signal in (("strong", 1.5), ("weak", 0.4))}
    boards = []
    for permuted in (False, True):
        runs = {}
        for name, cache in caches.items():
            if permuted:
                _permute_test_labels(cache)
            runs[name] = root / f"runs{int(permuted)}" / name
            fit_head(cache, runs[name], heads="sweep", epochs=5, uncertain="ones", n_resamples=100)
        boards.append(leaderboard(runs, n_resamples=100))
    return boards


def test_a_multi_label_leaderboard_ranks_by_mean_validation_auroc_with_a_paired_test_difference(multilabel_zoos):
    rows, _ = multilabel_zoos
    first, second = rows
    assert [r["backbone"] for r in rows] == ["strong", "weak"] and first["val_auroc"] > second["val_auroc"]
    assert {r["task"] for r in rows} == {"multilabel"} and rows[0]["policy"]["uncertain"] == "ones"
    for r in rows:
        metrics = json.loads((Path(r["run"]) / "metrics.json").read_text())
        assert r["val_auroc"] == metrics["val"]["auroc"] and r["test_auroc"] == metrics["test"]["auroc"]
        assert r["test_auroc_ci"][0] <= r["test_auroc"] <= r["test_auroc_ci"][1]
    assert second["difference_to_first"] == pytest.approx(second["test_auroc"] - first["test_auroc"], abs=1e-9)
    lo, hi = second["difference_to_first_ci"]
    assert lo <= second["difference_to_first"] <= hi < 0  # weaker features, lower on test beyond noise


def test_a_multi_label_ranking_is_blind_to_the_test_labels(multilabel_zoos):
    rows, permuted = multilabel_zoos
    assert [(r["backbone"], r["val_auroc"]) for r in permuted] == [(r["backbone"], r["val_auroc"]) for r in rows]
    assert [r["test_auroc"] for r in permuted] != [r["test_auroc"] for r in rows]  # test did change
