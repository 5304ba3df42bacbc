from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import QUICK_RUNS, SHARED_DATA, kermany_names, make_dataset, register_tiny

# Every test that needs the shared Kermany set says so with this prefix in its skip reason; the
# summary at the end counts them and says where the set belongs (see pytest_terminal_summary).
SHARED_SKIP = "NEEDS THE SHARED KERMANY SET"


@pytest.fixture(scope="session", autouse=True)
def _share_the_cores_between_test_processes():
    # Under pytest-xdist (make test runs two processes) each process takes its share of the cores for the
    # work it runs in-process, so two processes never run four torch threads on two cores.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        from featcache.runtime.device import cpu_cores

        torch.set_num_threads(max(1, cpu_cores() // workers))
    yield


@pytest.fixture(scope="session", autouse=True)
def _offline_torch_home_for_the_session(tmp_path_factory):
    # Session fixtures build backbones before any test's own TORCH_HOME is set: they get an empty one too.
    before = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("session_torch_home"))
    yield
    if before is None:
        os.environ.pop("TORCH_HOME", None)
    else:
        os.environ["TORCH_HOME"] = before


@pytest.fixture(autouse=True)
def _offline_torch_home(tmp_path_factory, monkeypatch):
    # Tests never reach the network or a user's hub cache: ImageNet weights are
    # "missing" unless a test puts a file into this TORCH_HOME itself.
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "train").is_dir():
        pytest.skip(f"{SHARED_SKIP}: not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    """Says loudly, in the summary, which tests the missing shared set skipped and how to provide it."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if SHARED_SKIP in str(r.longrepr)]
    if not skipped:
        return
    tests = f"{len(skipped)} test{'s' if len(skipped) != 1 else ''} skipped"
    terminalreporter.write_sep("!", f"{tests}: the shared Kermany set was not found", yellow=True, bold=True)
    terminalreporter.write_line(
        f"{tests}: the shared Kermany set was not found at {SHARED_DATA}; put it at "
        "../shared/data/chest_xray_224 beside the repository (CI has it), or point FEATCACHE_SHARED_DATA at "
        "a copy of chest_xray/{train,test}/{NORMAL,PNEUMONIA}. Skipped:", yellow=True, bold=True)
    for report in skipped:
        terminalreporter.write_line(f"  {report.nodeid}", yellow=True)


def small_layout() -> dict:
    return {"train": kermany_names("", 8, 8), "test": kermany_names("NORMAL2-", 2, 3, per_patient=1)}


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    """train (carved into train/val) and test, Kermany names, 16x20 grayscale JPEGs."""
    return make_dataset(tmp_path / "data", small_layout(), size=(20, 16))


# Artefacts built once per session, each in its own tmp_path_factory folder. They are shared by
# several tests: read them, never change them (copy first: copy_tree / shutil.copy).

@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """(data, cache, summary): the ``small_dataset`` layout through resnet18 (random init, seed 0), batch 5,
    no workers, as the cache tests' ``extract`` calls make it. Read-only."""
    from featcache.extract import extract

    root = tmp_path_factory.mktemp("small_cache")
    data = make_dataset(root / "data", small_layout(), size=(20, 16))
    cache = root / "c.h5"
    summary = extract(data, cache, weights="none", batch_size=5, workers=0, progress=False)
    return data, cache, summary


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(exit status, what it printed, its output folder) of `featcache demo`, run once: offline, so on
    the embedded demo subset with random-init resnet18 (seed 0). Read-only."""
    import contextlib
    import io

    from featcache.cli import main

    out, shown = tmp_path_factory.mktemp("demo") / "demo", io.StringIO()
    with contextlib.redirect_stdout(shown):  # the console writes to whatever sys.stdout is at the time
        status = main(["demo", "--out", str(out)])
    return status, shown.getvalue(), out


@pytest.fixture(scope="session")
def demo_cache(demo_run) -> Path:
    """The embedded demo subset through resnet18 (random init, seed 0), default settings: the cache
    `featcache demo` wrote. Read-only."""
    status, _, out = demo_run
    assert status == 0
    [cache] = out.glob("*.h5")
    return cache


@pytest.fixture(scope="session")
def quick_finetune(tmp_path_factory):
    """``quick_finetune(name)`` -> (run folder, metrics) for ``name`` in QUICK_RUNS, each run made once. Read-only."""
    from featcache.data.demo import DEMO_DATA
    from featcache.finetune import finetune

    root, made = tmp_path_factory.mktemp("quick_finetune"), {}

    def get(name: str):
        if name not in made:
            made[name] = root / name, finetune(DEMO_DATA, root / name, **QUICK_RUNS[name])
        return made[name]

    return get


@pytest.fixture
def tiny_backbone(monkeypatch) -> str:
    """Registers "tiny" for this test only (helpers.register_tiny): for tests about the cache's plumbing,
    where resnet18's forward is only cost."""
    return register_tiny(monkeypatch)


# The files that take longest, longest first. `make test` hands whole files to its pytest processes in
# collection order, so these start first and the short files fill in behind them (longest-processing-time-
# first scheduling); in the default order the longest file could start last and run on alone.
LONGEST_FILES = ("test_finetune.py", "test_end_to_end.py", "test_report.py", "test_resume_lock.py", "test_zoo.py",
                 "test_backbones.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
