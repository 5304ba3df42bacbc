"""Extraction with 1 vs K processes, and peak memory at 1,000 vs 20,000 images.

    python bench/extract_scaling.py [DATA] [--nproc 1 2] [--max-images N] [--memory 1000 20000] [--json OUT]

--nproc: `featcache extract DATA --nproc K` for each K, images/s side by side
(the same data and backbone, one run of this script); --max-images N
extracts a stratified subset of N images of every split (extract
--max-images N --subsample-all), the same for every K.
--memory: for each N, N generated 64x64 grayscale PNGs extracted with resnet18
in a fresh process; its peak resident memory (the largest process, torchrun
workers included) is reported. Memory that grows with N would show here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chest_xray_224"

WRAPPER = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, rc)
"""


def run_extract(data: Path, out: Path, *extra: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MB of the largest process) of one extract run, in a fresh wrapper."""
    cmd = [sys.executable, "-m", "featcache", "extract", str(data), "--out", str(out), "--weights", "none",
           "--no-progress", *extra]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    peak, rc = result.stdout.split()
    if rc != "0":
        raise SystemExit(f"extract failed ({rc}): {' '.join(cmd)}")
    return seconds, float(peak)


def generated(root: Path, n: int) -> Path:
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for cls in ("NORMAL", "PNEUMONIA"):
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / f"IM-{i:05d}-0001.png")
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(DEFAULT_DATA))
    parser.add_argument("--nproc", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--max-images", type=int, default=None, metavar="N",
                        help="--nproc runs on a stratified N-image subset of every split")
    parser.add_argument("--memory", type=int, nargs="*", default=[])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from rich.table import Table

    from featcache.cache.h5 import FeatureCache
    from featcache.runtime.console import get_console

    console = get_console()
    report = {"nproc": [], "memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in args.nproc:
            out = tmp / f"nproc{k}.h5"
            subset = ["--max-images", str(args.max_images), "--subsample-all"] if args.max_images else []
            seconds, peak = run_extract(Path(args.data), out, "--nproc", str(k), *subset)
            facts = json.loads(FeatureCache.open(out).attrs["extract"])
            report["nproc"].append({"nproc": k, "images": facts["images"], "images_per_s": facts["images_per_second"],
                                    "command_seconds": seconds, "peak_rss_mb": peak})
        for n in args.memory:
            data = generated(tmp / f"gen{n}", n)
            seconds, peak = run_extract(data, tmp / f"gen{n}.h5")
            report["memory"].append({"images": n, "seconds": seconds, "peak_rss_mb": peak})

    if report["nproc"]:
        base = report["nproc"][0]["images_per_s"]
        table = Table(title=f"extract, resnet18, {args.data}", title_justify="left")
        for col in ("processes", "images", "images/s", "vs first", "command s", "peak RSS MB"):
            table.add_column(col, justify="right")
        for r in report["nproc"]:
            table.add_row(str(r["nproc"]), f"{r['images']:,}", f"{r['images_per_s']:.1f}",
                          f"{r['images_per_s'] / base:.2f}", f"{r['command_seconds']:.1f}", f"{r['peak_rss_mb']:.0f}")
        console.print(table)
    if report["memory"]:
        table = Table(title="peak memory vs dataset size (generated 64x64 PNGs, resnet18)", title_justify="left")
        for col in ("images", "seconds", "peak RSS MB", "vs first"):
            table.add_column(col, justify="right")
        first = report["memory"][0]["peak_rss_mb"]
        for r in report["memory"]:
            table.add_row(f"{r['images']:,}", f"{r['seconds']:.0f}", f"{r['peak_rss_mb']:.0f}",
                          f"{r['peak_rss_mb'] - first:+.0f} MB")
        console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
