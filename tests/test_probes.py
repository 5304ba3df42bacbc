from __future__ import annotations

import csv
import shutil

import h5py
import numpy as np
import pytest
import torch

from featcache.cli import main
from featcache.errors import UserError
from featcache.fit import fit_head
from featcache.heads import knn
from featcache.predict import load_run, predict
from test_heads import synthetic_cache


@pytest.mark.parametrize("heads", ["knn", "mlp"])
def test_probes_on_the_demo_cache_reach_a_sensible_auroc_and_export_the_head_chosen(demo_cache, tmp_path, heads):
    metrics = fit_head(demo_cache, tmp_path / heads, heads=heads, n_resamples=0)
    chosen = [h for h in metrics["heads"] if h["name"] == metrics["selected"]["name"]][0]
    # The exported head is the one scored: for mlp its weights at its best validation epoch, not the last.
    assert metrics["val"]["auroc"] == pytest.approx(chosen["val_auroc"], abs=1e-6)
    assert chosen["val_auroc"] == max(h["val_auroc"] for h in metrics["heads"])
    # Random-init resnet18 features of 400 demo images: the logistic head reaches 0.91 val, 0.92 test;
    # knn 0.87 and 0.82, mlp 0.93 and 0.87.
    assert metrics["val"]["auroc"] > 0.8 and metrics["test"]["auroc"] > 0.75
    if heads == "knn":
        ks = [k for k in knn.K_GRID if k <= metrics["n_train"]]
        assert metrics["n_heads"] == 2 * len(knn.TEMPERATURES) * len(ks)
    else:
        assert {(h["width"], h["weight_decay"], h["lr"]) for h in metrics["heads"]} == {
            (w, wd, lr) for w in (256, 1024) for wd in (1e-4, 1e-2) for lr in (1e-3, 3e-3)}
        assert 1 <= metrics["selected"]["epoch"] <= metrics["selected"]["epochs_run"] <= 20


def test_knn_searches_in_bounded_blocks_and_finds_the_exact_neighbours(tmp_path, monkeypatch):
    cache = synthetic_cache(tmp_path / "c.h5")  # 300 train, 120 val, 150 test rows
    whole = fit_head(cache, tmp_path / "whole", heads="knn", n_resamples=0)
    blocks = []
    real = knn.similarity_blocks

    def spy(train, queries, block_bytes=None):
        for start, block in real(train, queries, block_bytes):
            blocks.append(tuple(block.shape))
            yield start, block

    monkeypatch.setattr(knn, "similarity_blocks", spy)
    monkeypatch.setattr(knn, "BLOCK_BYTES", 7 * 300 * 4)  # seven queries' similarities to the 300 train rows
    small = fit_head(cache, tmp_path / "small", heads="knn", n_resamples=0)
    assert blocks and max(rows for rows, _ in blocks) == 7 and {cols for _, cols in blocks} == {300}
    assert sum(rows for rows, _ in blocks) == 120 + 120 + 150  # val for the grid, then val and test once more
    # The same neighbours, their cosines equal to float rounding (another BLAS blocking).
    assert small["selected"] == whole["selected"]
    assert [h["val_auroc"] for h in small["heads"]] == pytest.approx([h["val_auroc"] for h in whole["heads"]])
    assert small["test"]["auroc"] == pytest.approx(whole["test"]["auroc"])

    rng = np.random.default_rng(0)
    train, queries = knn.l2_rows(rng.normal(size=(50, 8))), knn.l2_rows(rng.normal(size=(9, 8)))
    sims, index = knn.nearest(train, queries, 5, block_bytes=2 * 50 * 4)
    full = (queries @ train.T).numpy()
    assert np.array_equal(index.numpy(), np.argsort(-full, axis=1)[:, :5])
    assert np.allclose(sims.numpy(), np.take_along_axis(full, index.numpy(), axis=1))


def test_knn_votes_every_k_and_temperature_from_one_search():
    sims = np.array([[0.9, 0.8, 0.1]], dtype=np.float32)
    targets = knn.one_hot(np.array([1, 0, 0]), 2)[None]  # neighbours' classes, nearest first
    probs = knn.vote_probabilities(sims, targets, [1, 2, 3], 0.1, None)[:, 0]
    w = np.exp(np.array([0.9, 0.8, 0.1]) / 0.1)
    assert np.allclose(probs[0], [0, 1])
    assert np.allclose(probs[1], [w[1], w[0]] / w[:2].sum())
    assert np.allclose(probs[2], [w[1] + w[2], w[0]] / w.sum())
    # Class-balanced: each class's votes times N / (K n_c); with one row of class 1 in four, x2 and x2/3.
    balanced = knn.vote_probabilities(sims, targets, [3], 0.1, np.array([4 / 6, 4 / 2]))[0, 0]
    raw = np.array([(w[1] + w[2]) * 4 / 6, w[0] * 4 / 2])
    assert np.allclose(balanced, raw / raw.sum())


def test_predict_applies_knn_and_mlp_runs_as_fit_head_scored_them(small_cache, tmp_path):
    data, cache, _ = small_cache
    for heads in ("knn", "mlp"):
        run = tmp_path / heads
        assert main(["fit-head", str(cache), "--out", str(run), "--heads", heads, "--bootstrap", "0"]) == 0
        head, _ = load_run(run)
        assert head.kind == heads
        expected = {r["path"]: float(r["p_PNEUMONIA"]) for r in csv.DictReader((run / "predictions.csv").open())
                    if r["split"] == "test"}
        rows = predict(run, [str(data / "test")], out_csv=tmp_path / f"{heads}.csv")
        assert len(rows) == len(expected) == 5
        for row in rows:
            assert row["p_PNEUMONIA"] == pytest.approx(expected[row["path"][len(str(data)) + 1:]], abs=1e-4)


def test_a_knn_head_refuses_a_cache_that_moved_or_changed(tmp_path, capsys):
    cache = synthetic_cache(tmp_path / "c.h5")
    run = tmp_path / "run"
    fit_head(cache, run, heads="knn", n_resamples=0)
    payload = torch.load(run / "head.pt", weights_only=True)
    assert "train_cache" in payload["head"] and not any(
        isinstance(v, torch.Tensor) and v.numel() > 1 for v in payload["head"].values())  # no rows copied
    head, _ = load_run(run)
    X = np.random.default_rng(2).normal(size=(4, 32))
    before = head.predict_proba(X)

    moved = shutil.move(cache, tmp_path / "elsewhere.h5")
    with pytest.raises(UserError, match=r"train features are in .*c\.h5, which is not there now"):
        load_run(run)
    assert main(["predict", str(run), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "which is not there now" in err and len(err.splitlines()) == 1

    # A copied project (run folder and cache moved together) finds the cache relative to the run folder.
    project = tmp_path / "copied"
    shutil.copytree(run, project / "run")
    shutil.copy(moved, project / "c.h5")
    assert np.allclose(load_run(project / "run")[0].predict_proba(X), before)

    shutil.copy(moved, cache)
    assert np.allclose(load_run(run)[0].predict_proba(X), before)
    with h5py.File(cache, "r+") as f:
        f.attrs["fingerprint"] = "1" * 64
    with pytest.raises(UserError, match="not the cache the knn head was fitted on .its fingerprint differs"):
        load_run(run)


def test_mlp_training_stops_when_the_best_head_stops_improving_and_keeps_each_heads_best_epoch():
    from featcache.heads import MlpSweep
    from featcache.heads.mlp import PATIENCE

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(64, 8)), rng.integers(0, 2, 64)
    calls = []

    def score(labels, probs):  # scripted: head 0 peaks at epoch 3, head 1 creeps up every epoch below it
        calls.append(None)
        epoch, head = divmod(len(calls) - 1, 2)
        return 0.5 + min(epoch + 1, 3) / 10 if head == 0 else 0.1 + (epoch + 1) / 1000

    grid = [{"width": 4, "weight_decay": 1e-4, "lr": 1e-3}, {"width": 4, "weight_decay": 1e-2, "lr": 1e-3}]
    sweep = MlpSweep(grid, epochs=20).fit((X, y), (X, y), 2, score)
    assert sweep.epochs_run_ == 3 + PATIENCE
    assert [(epoch, round(best, 6)) for _, best, epoch, _ in sweep.results()] == [
        (3, 0.8), (3 + PATIENCE, round(0.1 + (3 + PATIENCE) / 1000, 6))]


def test_fit_head_prints_the_grid_edges_of_the_chosen_knn_head(tmp_path, capsys):
    # Classes far apart: every kNN head scores val AUROC 1, and the tie goes to the smoothest, largest k and T.
    cache = synthetic_cache(tmp_path / "c.h5", sizes={"train": 30, "val": 20, "test": 20}, shift=6.0)
    assert main(["fit-head", str(cache), "--heads", "knn", "--out", str(tmp_path / "run"), "--bootstrap", "0"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "head on the grid's edge: selected k 20 is the largest of the grid 1..20" in shown
    assert "head on the grid's edge: selected temperature 0.5 is the largest of the grid 0.01..0.5" in shown


def test_grid_edges_of_knn_and_mlp_heads_as_of_the_sweep():
    from featcache.fit import grid_edges

    knn_grid = [{"k": k, "temperature": t} for k in (1, 5, 20, 200) for t in (0.01, 0.07, 0.5)]
    assert grid_edges({"selected": {"k": 20, "temperature": 0.07}, "heads": knn_grid}) == []
    assert grid_edges({"selected": {"k": 200, "temperature": 0.01}, "heads": knn_grid}) == [
        "selected k 200 is the largest of the grid 1..200; the best value may lie beyond it",
        "selected temperature 0.01 is the smallest of the grid 0.01..0.5; the best value may lie beyond it"]

    def mlp(lrs):
        return [{"width": w, "weight_decay": wd, "lr": lr, "epoch": e} for w in (256, 512, 1024) for wd in (1e-4, 1e-2)
                for lr in lrs for e in (1, 9)]

    chosen = {"width": 1024, "weight_decay": 1e-2, "lr": 3e-3, "epoch": 9}
    # An axis of two values (the default weight decays, here lr too) has no inside: never flagged.
    assert grid_edges({"selected": chosen, "heads": mlp((1e-3, 3e-3))}) == [
        "selected width 1024 is the largest of the grid 256..1024; the best value may lie beyond it"]
    assert grid_edges({"selected": {**chosen, "width": 512}, "heads": mlp((1e-4, 1e-3, 3e-3))}) == [
        "selected lr 0.003 is the largest of the grid 0.0001..0.003; the best value may lie beyond it"]
