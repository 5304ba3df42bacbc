from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from featcache.cache.h5 import FeatureCache
from featcache.cli import main
from featcache.errors import UserError
from featcache.predict import load_run, predict
from helpers import copy_tree, flat


@pytest.fixture(scope="module")
def fitted_once(small_cache, tmp_path_factory):
    """A sweep head fitted on the session's small resnet18 cache, once for this module. Read-only."""
    data, cache, _ = small_cache
    run = tmp_path_factory.mktemp("fitted") / "run"
    assert main(["fit-head", str(cache), "--out", str(run), "--heads", "sweep", "--bootstrap", "0"]) == 0
    return data, cache, run


@pytest.fixture
def fitted_run(fitted_once, tmp_path):
    """(data, cache, run): this test's own copies of the data and the run folder (the cache is shared, read-only)."""
    data, cache, run = fitted_once
    return copy_tree(data, tmp_path / "data"), cache, copy_tree(run, tmp_path / "run")


def test_predict_agrees_with_the_head_on_cached_features(fitted_run, tmp_path):
    data, cache, run = fitted_run
    (data / "test" / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run), str(data / "test"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6
    broken = [r for r in rows if r["path"].endswith("broken.jpeg")][0]
    assert broken["prediction"] == "" and broken["error"]
    head, config = load_run(run)
    arrays = FeatureCache.open(cache).read("features", "paths")
    by_path = dict(zip(arrays["paths"], arrays["features"]))
    for r in rows:
        if r["error"]:
            continue
        rel = r["path"][len(str(data)) + 1:]
        expected = head.predict_proba(by_path[rel][None])[0]
        assert [float(r["p_NORMAL"]), float(r["p_PNEUMONIA"])] == pytest.approx(expected.tolist(), abs=1e-4)
        label = "PNEUMONIA" if expected[1] >= config["threshold"] else "NORMAL"
        assert r["prediction"] == label


def test_predict_rebuilds_a_weights_file_backbone_and_asks_when_it_moved(small_dataset, tmp_path):
    import torchvision

    torch.manual_seed(3)
    weights = tmp_path / "w.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    cache, run = tmp_path / "c.h5", tmp_path / "run"
    assert main(["extract", str(small_dataset), "--out", str(cache), "--weights", str(weights), "--workers", "0",
                 "--no-progress"]) == 0
    assert main(["fit-head", str(cache), "--out", str(run), "--bootstrap", "0"]) == 0
    image = str(small_dataset / "test" / "NORMAL")
    first = predict(run, [image])
    moved = weights.rename(tmp_path / "moved.pt")
    with pytest.raises(UserError, match="pass it with --weights PATH"):
        predict(run, [image])
    again = predict(run, [image], weights=str(moved))
    assert [r["p_NORMAL"] for r in again] == pytest.approx([r["p_NORMAL"] for r in first])
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "other.pt")
    with pytest.raises(UserError, match="but the head was fitted on file:sha256="):
        predict(run, [image], weights=str(tmp_path / "other.pt"))


def test_predict_mistakes(fitted_run, tmp_path):
    _, _, run = fitted_run
    with pytest.raises(UserError, match="no head.pt"):
        predict(tmp_path, ["x.png"])
    with pytest.raises(UserError, match="no such image or folder"):
        predict(run, [str(tmp_path / "missing.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .jpeg/.jpg/.png images"):
        predict(run, [str(tmp_path / "empty")])
    assert isinstance(torch.load(run / "head.pt", weights_only=True)["head"]["weight"], torch.Tensor)
    assert np.isfinite(load_run(run)[0].weight).all()


def test_predict_never_writes_over_the_runs_files(fitted_run, tmp_path, capsys):
    data, _, run = fitted_run
    before = (run / "predictions.csv").read_bytes()
    assert main(["predict", str(run), str(data / "test")]) == 0
    assert (run / "predictions.csv").read_bytes() == before
    written = sorted(run.glob("predict-*.csv"))
    assert len(written) == 1 and len(list(csv.DictReader(written[0].open()))) == 5
    shown = flat(capsys.readouterr().out)
    assert "decided by" in shown and "(fixed)" in shown
    assert main(["predict", str(run), str(data / "test"), "--out", str(run / "predictions.csv")]) == 2
    assert (run / "predictions.csv").read_bytes() == before


def test_predict_applies_a_finetuned_run_with_its_threshold(quick_finetune, tmp_path):
    import json

    from featcache.data.demo import DEMO_DATA

    run, _ = quick_finetune("frozen-youden")  # a frozen-backbone run with a Youden threshold (read-only)
    metrics = json.loads((run / "metrics.json").read_text())
    run_rows = [r for r in csv.DictReader((run / "predictions.csv").open()) if r["split"] == "test"][:8]
    images = [str(DEMO_DATA / r["path"]) for r in run_rows]
    rows = predict(run, images, out_csv=tmp_path / "p.csv")
    for mine, theirs in zip(rows, run_rows):
        assert mine["p_PNEUMONIA"] == pytest.approx(float(theirs["p_PNEUMONIA"]), abs=1e-4)
        expected = "PNEUMONIA" if mine["p_PNEUMONIA"] >= metrics["threshold"] else "NORMAL"
        assert mine["prediction"] == expected and mine["threshold_rule"] == "youden"
        assert float(mine["threshold"]) == pytest.approx(metrics["threshold"], abs=1e-6)


def test_predict_takes_a_file_name_that_is_not_utf8(fitted_run, tmp_path):
    import os

    data, _, run = fitted_run
    good = next((data / "test" / "NORMAL").glob("*.jpeg"))
    odd = tmp_path / "imgs"
    odd.mkdir()
    with open(os.fsencode(odd) + b"/scan\xff.jpeg", "wb") as f:
        f.write(good.read_bytes())
    rows = predict(run, [str(odd)], out_csv=tmp_path / "p.csv")
    assert len(rows) == 1 and rows[0]["prediction"] and rows[0]["path"].endswith("scan\\xff.jpeg")
    assert "scan\\xff.jpeg" in (tmp_path / "p.csv").read_text()
