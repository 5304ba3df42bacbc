"""Scanning a CheXpert-size label source: seconds and peak memory of reading 224,316 listed images.

    python bench/scan_scale.py [--rows 224316] [--tree DIR] [--views all] [--json OUT]

It builds (once; kept in --tree, default runs/bench/chexpert-scale) a
``CheXpert-v1.0-small`` folder in CheXpert's exact format: ``train.csv`` and
``valid.csv`` (about 234 rows, the official size: whole patients) with the 14 observation columns
(1.0 / 0.0 / -1.0 / blank) over ``train/patientNNNNN/studyS/viewV_frontal.jpg``,
every image a hard link to one of a few small JPEGs, so the tree costs inodes,
not disk. Then, in a fresh process (so its peak RSS is the scan's alone),
it times ``read_manifest(--format chexpert)``: the CSVs parsed, every listed
file looked at once, the validation split carved by patient with iterative
stratification over the 14 labels, and the manifest's digest (the fingerprint
input extract computes). The issue's goals: <= 15 s and <= 1 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL_ROWS = 224_316
VALID_ROWS = 234
GOALS = {"seconds": 15.0, "peak_mb": 1024.0}


def build_tree(parent: Path, rows: int, seed: int = 0) -> Path:
    """``parent/CheXpert-v1.0-small`` with ``rows`` listed images over hard links; reused when complete."""
    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    from helpers import CHEXPERT_HEADER, write_csv, write_image

    folder = parent / "CheXpert-v1.0-small"
    done = folder / ".complete"
    if done.is_file() and done.read_text() == str(rows):
        return folder
    rng = np.random.default_rng(seed)
    sources = [write_image(parent / "sources" / f"{k}.jpg", size=(64, 64), seed=k, fmt="JPEG") for k in range(4)]
    choices = np.array(["1.0", "0.0", "-1.0", ""])
    tables, patient, made = {"train": [], "valid": []}, 0, 0
    start = time.perf_counter()
    while made < rows:
        split = "valid" if made >= rows - VALID_ROWS else "train"
        patient += 1
        for study in range(1, int(rng.integers(1, 4)) + 1):
            study_dir = folder / split / f"patient{patient:05d}" / f"study{study}"
            study_dir.mkdir(parents=True, exist_ok=True)
            for view in range(1, int(rng.integers(1, 3)) + 1):
                if made >= rows:
                    break
                target = study_dir / f"view{view}_frontal.jpg"
                if not target.exists():
                    os.link(sources[made % len(sources)], target)
                labels = choices[rng.choice(4, 14, p=[0.12, 0.18, 0.05, 0.65])].tolist()
                tables[split].append([target.relative_to(parent).as_posix(), "Female", "60", "Frontal", "AP",
                                      *labels])
                made += 1
    for split, table in tables.items():
        write_csv(folder / f"{split}.csv", CHEXPERT_HEADER, table)
    done.write_text(str(rows))
    print(f"built {rows:,} listed images ({patient:,} patients) in {folder} in {time.perf_counter() - start:.0f} s")
    return folder


SCAN = """
import json, sys, time
t0 = time.perf_counter()
from featcache.data.sources import read_manifest
from featcache.runtime.device import peak_host_mb
t1 = time.perf_counter()
m = read_manifest(sys.argv[1], format="chexpert", views=sys.argv[2])
t2 = time.perf_counter()
digest = m.digest()
t3 = time.perf_counter()
print(json.dumps({"rows": len(m), "skipped": len(m.skipped), "splits": {s: int(len(m.indices(s))) for s in m.split_names},
                  "patients": len(set(m.patients)), "import_seconds": t1 - t0, "scan_seconds": t2 - t1,
                  "digest_seconds": t3 - t2, "seconds": t3 - t1, "peak_mb": peak_host_mb()}))
"""


def measure(folder: Path, views: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", SCAN, str(folder), views], capture_output=True, text=True, env=env,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=FULL_ROWS)
    parser.add_argument("--tree", type=Path, default=REPO / "runs" / "bench" / "chexpert-scale")
    parser.add_argument("--views", default="all")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    folder = build_tree(args.tree, args.rows)
    facts = {"rows_listed": args.rows, "views": args.views, **measure(folder, args.views), "goals": GOALS}
    met = facts["seconds"] <= GOALS["seconds"] and facts["peak_mb"] <= GOALS["peak_mb"]
    print(f"{facts['rows']:,} rows ({facts['patients']:,} patients; {facts['splits']}) read in "
          f"{facts['seconds']:.1f} s (CSV, files and carve {facts['scan_seconds']:.1f} s, digest "
          f"{facts['digest_seconds']:.1f} s; imports {facts['import_seconds']:.1f} s before), peak RSS "
          f"{facts['peak_mb']:,.0f} MB; goals <= {GOALS['seconds']:.0f} s and <= {GOALS['peak_mb']:,.0f} MB: "
          f"{'met' if met else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(facts, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
