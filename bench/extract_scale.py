"""Extraction at scale: peak memory of extracting 20,000, 100,000 and 200,000 rows into a cache.

    python bench/extract_scale.py [--rows 20000 100000 200000] [--tree DIR] [--json OUT]

For each size it builds (once; kept in --tree, default runs/bench/extract-scale) a
folder dataset ``train/{NORMAL,PNEUMONIA}/IM-NNNNNNN-0001.png`` (one patient per
image, so the validation carve works on N patients), every image a hard link to one
of 64 16x16 grayscale PNGs, so the tree costs directory entries, not disk. Then,
in a fresh process per size, it scans the folder and runs ``extract`` over every row
with a backbone registered for the bench (a 4x4 average pool of a 16x16 input,
48-d features: real rows, decoded and cached, without hours of CPU; the point is
memory against rows, not speed). Peak RSS is read three times: after the imports and
the backbone, after the scan (the manifest), and after the cache is assembled.
The growth per 1,000 rows is the slope between the smallest and the largest size.
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
SIZES = (20_000, 100_000, 200_000)
TINY = "bench-tiny"
SIDE = 16
CLASSES = ("NORMAL", "PNEUMONIA")
SOURCES = 64  # a file takes at most 65,000 hard links (ext4)
POOL = 4  # the bench backbone's pooled side: 3 * 4 * 4 = 48 features


def build_tree(parent: Path, rows: int) -> Path:
    """``parent/rows-N``: a folder dataset of ``rows`` hard links to a few small PNGs; reused when complete."""
    import numpy as np
    from PIL import Image

    folder = parent / f"rows-{rows}"
    done = folder / ".complete"
    if done.is_file():
        return folder
    sources = parent / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    images = []
    for k in range(SOURCES):
        image = sources / f"{k}.png"
        if not image.exists():
            pixels = np.random.default_rng(k).integers(k, 160 + k, (SIDE, SIDE), dtype=np.uint8)
            Image.fromarray(pixels).save(image)
        images.append(image)
    for c, cls in enumerate(CLASSES):
        (folder / "train" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(c, rows, len(CLASSES)):
            target = folder / "train" / cls / f"IM-{i:07d}-0001.png"
            if not target.exists():
                os.link(images[i % len(images)], target)
    done.write_text(str(rows))
    return folder


def register_tiny(pool: int = POOL) -> str:
    """Registers the bench's backbone: a ``pool`` x ``pool`` average pool of a 16x16 centre crop (3 * pool**2
    features), no weights."""
    from featcache.backbones.registry import REGISTRY, BackboneEntry
    from featcache.backbones.spec import PreprocessSpec

    def load():
        import torch.nn as nn

        return (lambda weights=None: nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten())), None

    spec = PreprocessSpec(resize=SIDE, crop=SIDE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    REGISTRY[TINY] = BackboneEntry(TINY, 3 * pool * pool, load, strip_head=lambda model: None, head_prefixes=(),
                                   make_spec=lambda: spec)
    return TINY


def measure_here(data: Path, out: Path, pool: int = POOL) -> dict:
    """Scan ``data`` and extract it into ``out`` in this process; peak RSS (MB) after each stage."""
    from featcache.backbones.registry import create_backbone
    from featcache.data.sources import read_manifest
    from featcache.extract import extract
    from featcache.runtime.device import peak_host_mb

    create_backbone(register_tiny(pool), "none")
    facts = {"peak_mb_start": peak_host_mb()}
    t0 = time.perf_counter()
    manifest = read_manifest(data)
    facts.update(scan_seconds=time.perf_counter() - t0, peak_mb_scan=peak_host_mb())
    t0 = time.perf_counter()
    summary = extract(data, out, manifest=manifest, backbone=TINY, weights="none", workers=0, batch_size=256,
                      overwrite=True, progress=False)
    facts.update(rows=summary["rows"], extract_seconds=time.perf_counter() - t0, peak_mb=peak_host_mb())
    return facts


def measure(data: Path, out: Path, pool: int = POOL) -> dict:
    """:func:`measure_here` in a fresh process, so its peak RSS is this extraction's alone."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, __file__, "--measure", str(data), str(out), str(pool)], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"measuring {data} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def growth_per_thousand(facts: list[dict], key: str = "peak_mb") -> float:
    """MB of peak RSS per 1,000 rows, between the smallest and the largest size measured."""
    first, last = min(facts, key=lambda f: f["rows"]), max(facts, key=lambda f: f["rows"])
    return (last[key] - first[key]) / (last["rows"] - first["rows"]) * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--tree", type=Path, default=REPO / "runs" / "bench" / "extract-scale")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        data, out, pool = args.measure
        print(json.dumps(measure_here(Path(data), Path(out), int(pool))))
        return 0
    facts = []
    for rows in sorted(args.rows):
        data = build_tree(args.tree, rows)
        fact = {"rows_listed": rows, **measure(data, args.tree / f"rows-{rows}.h5")}
        facts.append(fact)
        print(f"{fact['rows']:,} rows: peak RSS {fact['peak_mb']:,.0f} MB (after imports and backbone "
              f"{fact['peak_mb_start']:,.0f} MB, after the scan {fact['peak_mb_scan']:,.0f} MB); scan "
              f"{fact['scan_seconds']:.1f} s, extract {fact['extract_seconds']:.1f} s", flush=True)
    if len(facts) > 1:
        print(f"growth per 1,000 rows: {growth_per_thousand(facts):.2f} MB of peak RSS (of the peak at the end of "
              f"the scan: {growth_per_thousand(facts, 'peak_mb_scan'):.2f} MB)")
    if args.json:
        growth = growth_per_thousand(facts) if len(facts) > 1 else None
        args.json.write_text(json.dumps({"sizes": facts, "mb_per_1000_rows": growth}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
