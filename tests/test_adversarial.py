"""Hostile and awkward inputs through the commands a user runs: scan, extract (every CPU backend),
fit-head and predict. Each command runs in its own process under a timeout, with its peak memory
measured: no traceback, no hang, bounded memory, and every bad file listed with its reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from featcache.cache.h5 import FeatureCache
from helpers import kermany_names, make_dataset, write_awkward_images

PEAK_WRAPPER = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:], timeout=240).returncode
print("@@", rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
"""
MAX_PEAK_MB = 2500  # a resnet18 extraction peaks near 1.2 GB; a 20000 x 20000 decode alone is 1.2 GB more


def featcache(*argv, cwd=None) -> tuple[int, int, str]:
    """(exit status, peak RSS MB, stderr) of ``featcache ARGV`` in a fresh process."""
    result = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, sys.executable, "-m", "featcache",
                             *map(str, argv)], capture_output=True, text=True, timeout=300, cwd=cwd)
    tail = result.stdout.strip().splitlines()[-1].split()
    assert tail[0] == "@@", result.stdout[-2000:]
    return int(tail[1]), int(tail[2]), result.stderr


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "d"
    make_dataset(root, {"train": kermany_names("", 6, 6)}, size=(40, 40))
    expected = {f"train/NORMAL/{k}": v for k, v in write_awkward_images(root / "train" / "NORMAL").items() if v}
    normal = root / "train" / "NORMAL"
    os.mkfifo(normal / "fifo.jpeg")
    (normal / "zero.jpeg").symlink_to("/dev/zero")
    (normal / "loop").symlink_to(".")
    (root / "train" / "PNEUMONIA" / "up").symlink_to("..")
    with open(os.fsencode(normal) + b"/bad\xffname.jpeg", "wb") as f:
        f.write((normal / "baseline.jpeg").read_bytes())
    expected.update({"train/NORMAL/fifo.jpeg": "not a regular file", "train/NORMAL/zero.jpeg": "not a regular file",
                     "train/NORMAL/bad\\xffname.jpeg": "name is not valid UTF-8"})
    return root, expected


@pytest.fixture(scope="module")
def extracted(hostile, tmp_path_factory):
    """``extracted(backend)`` -> (exit status, peak MB, stderr, cache) of one extraction of ``hostile`` with that
    backend, made once for this module (fit-head and predict reuse the pil one). Read-only."""
    root, _ = hostile
    folder, made = tmp_path_factory.mktemp("hostile_caches"), {}

    def get(backend: str):
        if backend not in made:
            cache = folder / f"{backend}.h5"
            made[backend] = (*featcache("extract", root, "--out", cache, "--weights", "none", "--backend", backend,
                                        "--min-val", "0", "--val-fraction", "0.3", "--workers", "1",
                                        "--no-progress"), cache)
        return made[backend]

    return get


@pytest.mark.parametrize("backend", ["pil", "torchvision", "dali"])
def test_extract_lists_every_bad_file_and_stays_bounded(hostile, extracted, backend):
    root, expected = hostile
    rc, peak, err, cache = extracted(backend)
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    assert peak < MAX_PEAK_MB, peak
    skipped = {p: r for p, r in FeatureCache.open(cache).read("skipped")["skipped"].tolist()}
    for path, reason in expected.items():
        assert skipped.get(path, "").startswith(reason), (path, skipped.get(path))
    paths = FeatureCache.open(cache).read("paths")["paths"].tolist()
    assert len(paths) == len(set(paths)) and not any("/loop/" in p or "/up/" in p for p in paths)


def test_fit_head_and_predict_over_hostile_files(hostile, extracted, tmp_path):
    root, expected = hostile
    rc, _, err, cache = extracted("pil")  # the CPU default backend's cache of the hostile folder
    assert rc == 0, err[-3000:]
    run = tmp_path / "run"
    assert featcache("fit-head", cache, "--out", run, "--bootstrap", "0")[0] == 0
    out = tmp_path / "pred.csv"
    rc, peak, err = featcache("predict", run, root / "train" / "NORMAL", "--out", out)
    assert rc == 0 and "Traceback" not in err and peak < MAX_PEAK_MB, err[-3000:]
    import csv

    rows = {r["path"].split("/train/NORMAL/")[-1]: r for r in csv.DictReader(out.open())}
    assert rows["animated.jpeg"]["error"].startswith("GIF data") and rows["strip.png"]["error"]
    assert rows["baseline.jpeg"]["prediction"] in ("NORMAL", "PNEUMONIA")
    assert json.loads((run / "metrics.json").read_text())["val"]["n"] > 0
