"""featcache zoo: backbones ranked on validation, never on test, with paired CIs and costs."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest

from featcache.cli import main
from featcache.data.demo import DEMO_DATA
from featcache.zoo import leaderboard, rank

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

    before = leaderboard({b: zoo_dir / "runs" / b.replace(":", "-") for b in BACKBONES}, n_resamples=50)
    runs = {}
    for b in BACKBONES:
        cache = tmp_path / f"{b.replace(':', '-')}.h5"
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
