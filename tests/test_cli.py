from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import flat, make_dataset


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "featcache", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_help_is_instant_and_imports_no_torch():
    code = ("import sys, featcache.cli as c; c.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'h5py', 'torchvision', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert run_cli("--help").returncode == 0


@pytest.fixture
def bad_inputs(tmp_path, small_dataset):
    empty = make_dataset(tmp_path / "empty", {"train": {"A": ["1.png"], "B": ["2.png"]}}, size=(8, 8))
    (empty / "train" / "C").mkdir()
    differ = make_dataset(tmp_path / "differ", {"train": {"A": ["1.png"], "B": ["2.png"]},
                                                "test": {"A": ["3.png"], "C": ["4.png"]}}, size=(8, 8))
    (tmp_path / "notes.h5").write_text("not hdf5")
    return {"good": small_dataset, "empty": empty, "differ": differ, "tmp": tmp_path}


CASES = {
    "missing folder": (lambda d: ["scan", d["tmp"] / "nowhere"], "data folder not found"),
    "empty class": (lambda d: ["extract", d["empty"], "--out", d["tmp"] / "x.h5", "--weights", "none"],
                    "empty class folder: train/C"),
    "classes differ": (lambda d: ["extract", d["differ"], "--out", d["tmp"] / "x.h5", "--weights", "none"],
                       "classes differ across splits"),
    "unknown backbone": (lambda d: ["extract", d["good"], "--out", d["tmp"] / "x.h5", "--backbone", "resnet19"],
                         "unknown backbone 'resnet19'"),
    "missing weights file": (lambda d: ["extract", d["good"], "--out", d["tmp"] / "x.h5", "--weights",
                                        d["tmp"] / "w.pt"], "weights file not found"),
    "imagenet offline": (lambda d: ["extract", d["good"], "--out", d["tmp"] / "x.h5", "--weights", "imagenet"],
                         "resnet18-f37072fd.pth"),
    "non-HDF5 cache": (lambda d: ["fit-head", d["tmp"] / "notes.h5", "--out", d["tmp"] / "run"],
                       "not an HDF5 file"),
    "missing cache": (lambda d: ["fit-head", d["tmp"] / "nope.h5", "--out", d["tmp"] / "run"], "cache not found"),
    "bad flag value": (lambda d: ["extract", d["good"], "--out", d["tmp"] / "x.h5", "--batch-size", "many"],
                       "'many' is not a whole number of 1 or more"),
    "cuda without a GPU": (lambda d: ["extract", d["good"], "--out", d["tmp"] / "x.h5", "--weights", "none",
                                      "--device", "cuda"], "no CUDA GPU"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_mistakes_exit_2_with_one_line(case, bad_inputs, _offline_torch_home):
    make_args, expected = CASES[case]
    if case == "cuda without a GPU":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")  # the refusal only exists without one
    result = run_cli(*make_args(bad_inputs), env={"TORCH_HOME": str(_offline_torch_home)})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_scan_prints_the_table_and_writes_a_manifest(small_dataset, tmp_path):
    result = run_cli("scan", small_dataset, "--out", tmp_path / "m.json")
    assert result.returncode == 0, result.stderr
    for text in ("NORMAL", "PNEUMONIA", "train", "val", "test", "patients", "carved from train"):
        assert text in flat(result.stdout)
    import json

    manifest = json.loads((tmp_path / "m.json").read_text())
    assert len(manifest["rows"]) == 37 and manifest["classes"] == ["NORMAL", "PNEUMONIA"]


def test_piped_output_never_breaks_a_long_path(tmp_path):
    from helpers import kermany_names

    deep = tmp_path / ("a_rather_long_folder_name_for_chest_x_rays_" * 3) / "data"
    make_dataset(deep, {"train": kermany_names("", 4, 4)}, size=(8, 8))
    manifest = tmp_path / ("manifest_with_a_long_name_" * 3 + ".json")
    result = subprocess.run([sys.executable, "-m", "featcache", "scan", str(deep), "--min-val", "0", "--out",
                             str(manifest)], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(str(deep)) > 80 and any(str(manifest) in line for line in lines)
    assert any(str(deep) in line for line in lines)


@pytest.mark.parametrize("argv, expected", [
    (["scan", ".", "--seed", "-1"], "--seed: '-1' is not a whole number of 0 or more"),
    (["fit-head", "c.h5", "--out", "r", "--C", "nan"], "--C: 'nan' is not a positive finite number"),
    (["finetune", ".", "--out", "r", "--lr", "nan"], "--lr: 'nan' is not a positive finite number"),
    (["fit-head", "c.h5", "--out", "r", "--bootstrap", "-5"], "--bootstrap: '-5' is not a whole number of 0"),
    (["extract", ".", "--out", "c.h5", "--nproc", "0"], "--nproc: '0' is not a whole number of 1 or more"),
    (["fit-head", "c.h5", "--out", "r", "--device", "tpu"], "--device: 'tpu' is not a device"),
    (["synth", "o", "--n", "3", "--workers", "-1"], "--workers: '-1' is not a whole number of 0 or more"),
    (["fit-head", "c.h5", "--out", "r", "--target-sensitivity", "1.5"], "is not a number between 0 and 1"),
])
def test_flag_values_are_checked_before_any_work(argv, expected, capsys):
    from featcache.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    from featcache.cli import main
    from helpers import kermany_names
    from test_heads import synthetic_cache

    data = make_dataset(tmp_path / "d", {"train": kermany_names("", 3, 3)}, size=(8, 8))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cache = synthetic_cache(tmp_path / "c.h5")
    (tmp_path / "x.h5.parts").write_text("not a folder")
    (tmp_path / "y.h5.lock").mkdir()
    long_name = "n" * 252 + ".h5"  # fits alone, not with the .partial beside it
    refused = {
        "scan --out onto a folder": (["scan", data, "--out", tmp_path], "is a folder"),
        "fit-head --out a file": (["fit-head", cache, "--out", a_file], "is a file; give a folder"),
        "report --out a file": (["report", tmp_path, "--out", a_file], "--out"),
        "name over 255 bytes": (["extract", data, "--out", tmp_path / long_name, "--weights", "none"],
                                "over 255 bytes"),
        "parts as a file": (["extract", data, "--out", tmp_path / "x.h5", "--weights", "none"], "is in the way"),
        "lock as a folder": (["extract", data, "--out", tmp_path / "y.h5", "--weights", "none"], "is in the way"),
        "a file as a folder": (["scan", data, "--out", a_file / "m.json"], "is a file, not a folder"),
    }
    for name, (argv, expected) in refused.items():
        assert main([str(a) for a in argv]) == 2, name
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, (name, err)
    assert not (a_file.parent / "file.txt" / "metrics.json").exists()
    # A missing folder is made, not refused.
    assert main(["scan", str(data), "--min-val", "0", "--out", str(tmp_path / "new" / "deeper" / "m.json")]) == 0
    assert main(["models", "--no-measure", "--json", str(tmp_path / "made" / "models.json")]) == 0
    assert (tmp_path / "new" / "deeper" / "m.json").is_file() and (tmp_path / "made" / "models.json").is_file()


def test_read_only_output_is_one_line(tmp_path, monkeypatch, capsys):
    """Simulated: tests run as root, for whom every folder is writable."""
    from featcache.runtime import outputs
    from featcache.cli import main

    locked = tmp_path / "ro"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    for argv in (["extract", str(tmp_path), "--out", str(locked / "c.h5")],
                 ["fit-head", str(tmp_path / "c.h5"), "--out", str(locked / "run")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{locked} is not writable" in err and len(err.strip().splitlines()) == 1
