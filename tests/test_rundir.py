from __future__ import annotations

import json

import pytest

from featcache.errors import UserError
from featcache.eval.rundir import RunRecord, load_run


def test_a_run_record_writes_and_reads_a_run_folder(tmp_path):
    record = RunRecord(tmp_path / "run")
    assert record.metrics is None and record.run == {} and record.history == []
    assert record.kind == "fit-head" and not record.is_complete and record.files() == []
    record.folder.mkdir()
    record.write_metrics({"backbone": "x", "val": {"auroc": 0.5}})
    record.write_history([{"epoch": 1}])
    record.write_run({"complete": True, "kind": "finetune", "cache_relative": "../c.h5"})
    assert (record.folder / "metrics.json").read_text() == json.dumps(record.metrics, indent=2) + "\n"
    assert record.history == [{"epoch": 1}] and record.is_complete and record.kind == "finetune"
    assert record.cache is None
    (tmp_path / "c.h5").write_bytes(b"")
    assert RunRecord(record.folder).cache == record.folder / "../c.h5"
    assert {p.name for p in record.files()} == {"metrics.json", "history.json", "run.json"}
    assert record.is_run_file(record.folder / "best.pt") and not record.is_run_file(tmp_path / "best.pt")
    record.write_predictions(["A", "B"], {"test": (["a.png"], [1], [[0.25, 0.75]], ["p1"])})
    assert record.predictions_path.read_text().splitlines() == ["split,path,patient,label,p_A,p_B",
                                                               "test,a.png,p1,B,0.250000,0.750000"]
    record.clear_progress()
    assert [p.name for p in record.files()] == ["predictions.csv"] and record.metrics is None
    with pytest.raises(UserError, match="is not a run folder"):
        load_run(record.folder)
