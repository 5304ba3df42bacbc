from __future__ import annotations

import json

from featcache.cli import main
from test_cli import run_cli


def test_config_tables_drive_extract_and_fit_head_and_flags_win(small_dataset, tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text(f"""
[extract]
data = "{small_dataset}"
out = "{tmp_path / 'from-config.h5'}"
weights = "none"
batch-size = 4
workers = 0
no-progress = true

[fit-head]
cache = "{tmp_path / 'from-config.h5'}"
out = "{tmp_path / 'run'}"
threshold = "youden"
C = 0.1
""")
    assert main(["extract", "--config", str(config)]) == 0
    assert (tmp_path / "from-config.h5").exists()
    assert main(["fit-head", "--config", str(config), "--threshold", "0.4"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["threshold"] == 0.4 and metrics["selected"]["C"] == 0.1


def test_config_mistakes_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[extract]\nbackbone = 'resnet18'\nbatchsize = 3\n")
    result = run_cli("extract", "--config", bad)
    assert result.returncode == 2 and "unknown setting batchsize" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for text, expected in (("[fit-head]\nC = 1\n", "no [extract] table"), ("[extract\n", "not valid TOML")):
        bad.write_text(text)
        result = run_cli("extract", "--config", bad)
        assert result.returncode == 2 and expected in result.stderr
    assert "config file not found" in run_cli("extract", "--config", tmp_path / "nope.toml").stderr
    missing = run_cli("extract", "--weights", "none")
    assert missing.returncode == 2 and "DATA is required" in missing.stderr


def test_shipped_configs_are_valid(tmp_path):
    from pathlib import Path

    from featcache.cli import _subparser, build_parser
    from featcache.runtime.config import load_table

    parser = build_parser()
    # Command-table configs (for --config); run configs are checked in test_report.
    configs = [Path(__file__).resolve().parents[1] / "configs" / "kermany_resnet18.toml"]
    for path in configs:
        import tomllib

        for command in tomllib.loads(path.read_text()):
            sub = _subparser(parser, command)
            load_table(str(path), command, {a.dest for a in sub._actions})


def test_config_values_are_checked_as_their_flags(tmp_path):
    bad = tmp_path / "bad.toml"
    for text, expected in (("batch-size = 2.5", "batch-size: '2.5' is not a whole number of 1 or more"),
                           ("seed = -1", "seed: '-1' is not a whole number of 0 or more"),
                           ("no-progress = 'yes'", "no-progress: expected true or false"),
                           ("device = 'tpu'", "device: 'tpu' is not a device"),
                           ("backbone = ['resnet18']", "backbone: expected one value")):
        bad.write_text(f"[extract]\ndata = 'd'\nout = 'o.h5'\n{text}\n")
        result = run_cli("extract", "--config", bad)
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    # README: a threshold may be written as a number.
    good = tmp_path / "good.toml"
    good.write_text("[fit-head]\ncache = 'missing.h5'\nout = 'run'\nthreshold = 0.3\n")
    result = run_cli("fit-head", "--config", good)
    assert result.returncode == 2 and "missing.h5" in result.stderr  # past the config, at the missing cache
