"""A cache you can trust: kill -9 and resume, one writer, torn files, torchrun shards, flat memory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featcache.cache.h5 import FeatureCache, partial_path
from featcache.cli import main
from featcache.cache.lock import lock_path
from featcache.cache.parts import parts_dir
from helpers import REPO, flat, kermany_names, make_dataset

EXTRACT = ["--weights", "none", "--workers", "0", "--batch-size", "2", "--chunk-rows", "4", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """64 small images: 16 chunks of 4 rows. Shared by this module's tests: read-only."""
    return make_dataset(tmp_path_factory.mktemp("lock_data") / "data",
                        {"train": kermany_names("", 12, 12), "test": kermany_names("", 4, 4)}, size=(24, 20))


def start_extract(data, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "featcache", "extract", str(data), "--out", str(out), *EXTRACT,
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def committed(out) -> int:
    return len(list(parts_dir(out).glob("chunk-*.npz"))) if parts_dir(out).exists() else 0


def same_cache(a, b):
    x, y = FeatureCache.open(a), FeatureCache.open(b)
    ra = x.read("features", "labels", "paths", "splits", "patients", "skipped")
    rb = y.read("features", "labels", "paths", "splits", "patients", "skipped")
    for name in ("labels", "paths", "splits", "patients", "skipped"):
        assert ra[name].tolist() == rb[name].tolist(), name
    assert ra["features"].shape == rb["features"].shape
    assert np.allclose(ra["features"], rb["features"], atol=1e-5)
    assert x.attrs["fingerprint"] == y.attrs["fingerprint"]


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """The cache of ``dataset`` made in one go, once for this module: read-only."""
    out = tmp_path_factory.mktemp("lock_reference") / "reference.h5"
    assert main(["extract", str(dataset), "--out", str(out), *EXTRACT]) == 0
    return out


def collect_stdout(proc) -> list[str]:
    """``proc``'s stdout lines as they come (a reader thread appends them to the list returned)."""
    import threading

    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return lines


def test_sigkill_at_several_points_then_resume(dataset, reference, tmp_path, capsys):
    out = tmp_path / "killed.h5"
    for after in (1, 6, 11):  # committed chunks before each kill
        proc = start_extract(dataset, out)
        wait_for(lambda: committed(out) >= after or proc.poll() is not None)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists() and committed(out) >= after
    before = committed(out)
    capsys.readouterr()
    assert main(["extract", str(dataset), "--out", str(out), *EXTRACT]) == 0
    shown = flat(capsys.readouterr().out)
    assert "resuming" in shown and f"{before} of 16 chunks" in shown
    same_cache(out, reference)
    assert not parts_dir(out).exists() and not lock_path(out).exists()
    assert FeatureCache.open(out).attrs["rows_written"] == 64


def test_second_writer_is_refused_and_the_first_completes_intact(dataset, reference, tmp_path):
    out = tmp_path / "shared.h5"
    first = start_extract(dataset, out)
    wait_for(lambda: committed(out) >= 1 or first.poll() is not None)
    # Paused mid-run (SIGSTOP), the first writer holds the lock for as long as the second needs, on any machine.
    first.send_signal(signal.SIGSTOP)
    try:
        assert first.poll() is None, "the first run ended before it could be paused"
        second = subprocess.run([sys.executable, "-m", "featcache", "extract", str(dataset), "--out", str(out),
                                 *EXTRACT], capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert f"being written by pid {first.pid}" in second.stderr and "--wait" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    same_cache(out, reference)


def test_wait_queues_behind_the_holder(dataset, reference, tmp_path):
    from featcache.cache.lock import CacheLock

    out = tmp_path / "queued.h5"
    with CacheLock(out):
        queued = start_extract(dataset, out, "--wait")
        lines = collect_stdout(queued)
        # It has started, found the lock taken, and says it waits (however long the start took).
        wait_for(lambda: any("waiting" in line for line in lines) or queued.poll() is not None, timeout=300)
        assert queued.poll() is None and not out.exists()
        assert any("waiting" in line for line in lines)
    assert queued.wait(timeout=300) == 0, queued.stderr.read()[-2000:]
    same_cache(out, reference)


def test_stale_lock_is_cleared(dataset, tmp_path, capsys):
    out = tmp_path / "c.h5"
    lock_path(out).write_text(json.dumps({"pid": 999999, "host": "gone", "since": "yesterday", "command": "x"}))
    assert main(["extract", str(dataset), "--out", str(out), *EXTRACT]) == 0
    assert "cleared a stale lock" in flat(capsys.readouterr().out)
    assert not lock_path(out).exists()


def test_torn_files_are_rebuilt_never_used(dataset, reference, tmp_path, capsys):
    out = tmp_path / "torn.h5"
    data = reference.read_bytes()
    out.write_bytes(data[: len(data) // 3])  # a cache cut short by a crash or a full disk
    with pytest.raises(Exception, match="damaged HDF5 file"):
        FeatureCache.open(out)
    assert main(["fit-head", str(out), "--out", str(tmp_path / "run")]) == 2
    assert main(["extract", str(dataset), "--out", str(out), *EXTRACT]) == 0
    assert "damaged HDF5 file" in flat(capsys.readouterr().out)
    same_cache(out, reference)
    # A half-written assembly file next to complete parts: rebuilt from the parts.
    partial_path(out).write_bytes(data[:5000])
    assert main(["extract", str(dataset), "--out", str(out), *EXTRACT]) == 0  # up to date: cache untouched
    same_cache(out, reference)


def test_parts_of_other_inputs_are_discarded(dataset, reference, tmp_path, capsys):
    out = tmp_path / "c.h5"
    proc = start_extract(dataset, out, "--seed", "1")
    wait_for(lambda: committed(out) >= 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["extract", str(dataset), "--out", str(out), *EXTRACT]) == 0
    assert "progress of an interrupted run with other inputs" in flat(capsys.readouterr().out)
    same_cache(out, reference)


def test_two_torchrun_processes_make_the_same_cache(dataset, reference, tmp_path):
    out = tmp_path / "two.h5"
    # Run from a folder holding hostile featcache/ and torch/ packages: the ranks must import the
    # installed ones, never code from the working directory.
    hostile = tmp_path / "cwd"
    marker = tmp_path / "hostile-code-ran"
    for package in ("featcache", "torch"):
        (hostile / package).mkdir(parents=True)
        (hostile / package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('{package}')\n")
    script = Path(sys.executable).parent / "featcache"
    result = subprocess.run([str(script), "extract", str(dataset), "--out", str(out), *EXTRACT, "--nproc", "2"],
                            capture_output=True, text=True, timeout=600, cwd=hostile)
    assert not marker.exists(), marker.read_text()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 processes" in flat(result.stdout)
    same_cache(out, reference)
    assert json.loads(FeatureCache.open(out).attrs["extract"])["processes"] == 2


def test_nproc_refuses_user_mistakes_before_launching(dataset, tmp_path):
    result = subprocess.run([sys.executable, "-m", "featcache", "extract", str(dataset), "--out",
                             str(tmp_path / "x.h5"), *EXTRACT, "--nproc", "2", "--backbone", "resnet19"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "unknown backbone" in result.stderr


def test_inspect_complete_and_in_progress(dataset, reference, tmp_path, capsys):
    assert main(["inspect", str(reference), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["state"] == "complete" and info["rows"] == 64 and info["backbone"] == "resnet18"
    assert info["rows_per_split"]["test"] == {"NORMAL": 8, "PNEUMONIA": 8}
    assert info["weights"] == "none:seed=0" and info["size_bytes"] > 64 * 512 * 4
    assert main(["inspect", str(reference)]) == 0
    shown = flat(capsys.readouterr().out)
    assert "rows per split and class" in shown and "resnet18" in shown
    out = tmp_path / "partial.h5"
    proc = start_extract(dataset, out)
    wait_for(lambda: committed(out) >= 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["state"] == "in progress or interrupted" and info["chunks"] == 16
    assert info["chunks_committed"] >= 3


def test_cache_reads_in_dataloader_workers(reference):
    import torch

    cache = FeatureCache.open(reference)
    features, labels, _ = cache.arrays("train")
    loader = torch.utils.data.DataLoader(cache.dataset("train"), batch_size=5, num_workers=2)
    got = torch.cat([x for x, _ in loader]).numpy()
    got_labels = torch.cat([y for _, y in loader]).numpy()
    assert np.allclose(got, features) and got_labels.tolist() == labels.tolist()


def test_memory_stays_flat_with_dataset_size(tmp_path):
    """Peak RSS grows by under 1.5 KB a row from 1,000 to 20,000 rows of 768-d features (3 KB a row): the
    features are never held whole, and what grows is the manifest's metadata of a row. Measured as
    bench/extract_scale.py measures, each size in a fresh process."""
    sys.path.insert(0, str(REPO / "bench"))
    import extract_scale

    facts = [extract_scale.measure(extract_scale.build_tree(tmp_path, n), tmp_path / f"{n}.h5", pool=16)
             for n in (1000, 20000)]
    assert [f["rows"] for f in facts] == [1000, 20000]
    growth = extract_scale.growth_per_thousand(facts)
    print(f"peak RSS: 1,000 rows {facts[0]['peak_mb']:.0f} MB, 20,000 rows {facts[1]['peak_mb']:.0f} MB; "
          f"{growth:.2f} MB per 1,000 rows")
    assert growth < 1.5


def _processes_writing(out) -> list[int]:
    """PIDs whose command line names ``out`` (the parent, torchrun and its ranks)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(out).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_ranks_die_with_a_killed_nproc_parent(dataset, reference, tmp_path):
    out = tmp_path / "orphans.h5"
    proc = start_extract(dataset, out, "--nproc", "2")
    wait_for(lambda: committed(out) >= 1, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = committed(out)
    # torchrun and both ranks follow their parent at once: nothing is left to race the next writer, and
    # nothing more was written after the kill (orphans would go on committing chunks, then assemble).
    # The generous timeout only allows for a loaded machine's slow process teardown.
    wait_for(lambda: not _processes_writing(out), timeout=60)
    assert committed(out) <= at_kill + 2 and not out.exists()  # at most one chunk in flight per rank
    assert main(["extract", str(dataset), "--out", str(out), *EXTRACT]) == 0
    same_cache(out, reference)
