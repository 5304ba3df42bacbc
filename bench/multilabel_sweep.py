"""The multi-label sweep at scale: every label and head at once against a plain loop of the same matmuls.

On N x D float32 features with L labels (defaults: 100,000 x 768, 14 labels,
a fifth of the entries unknown), featcache's sweep (the default 64-head grid,
default epochs) is timed against the floor it cannot beat: a loop doing only
the two batched matrix products of each step (forward and weight gradient,
the same shapes, steps and torch threads), without the row gathering,
normalization, masked loss and Nesterov update around them. Peak resident
memory is read from the kernel (VmHWM, reset before the features exist), so
the figure counts the feature matrix and everything the fit adds to it.

    python bench/multilabel_sweep.py [--rows N] [--dim D] [--labels L] [--epochs E] [--json OUT]

Goals (issue 16): the sweep within 2x of the plain loop, at most 60 s, and a
peak of at most twice the feature matrix.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

GOAL_RATIO = 2.0
GOAL_SECONDS = 60.0
GOAL_MEMORY = 2.0
UNKNOWN_SHARE = 0.2


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def reset_peak() -> None:
    """Make VmHWM start again from the current resident size (Linux's clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def features(n: int, d: int, labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 features made block by block (no float64 copy), and (N, L) targets, NaN where unknown."""
    rng = np.random.default_rng(seed)
    X = np.empty((n, d), dtype=np.float32)
    Y = np.empty((n, labels), dtype=np.float32)
    for lo in range(0, n, 8192):
        block = rng.standard_normal((min(8192, n - lo), d), dtype=np.float32)
        logits = block[:, :labels] + rng.standard_normal((len(block), labels), dtype=np.float32)
        Y[lo : lo + len(block)] = logits > 1.0
        X[lo : lo + len(block)] = block
    Y[rng.random((n, labels)) < UNKNOWN_SHARE] = np.nan
    return X, Y


def plain_loop(X: np.ndarray, n_heads: int, groups: int, labels: int, epochs: int, batch: int) -> float:
    """Seconds for the sweep's matmuls alone: per step (G, B, D) @ (G, D, L*H) and its transpose product."""
    import torch

    n, d = X.shape
    cols = labels * (n_heads // groups)
    xb = torch.as_tensor(X[: batch * groups]).view(groups, batch, d).clone()
    W = torch.zeros(groups, d, cols)
    b = torch.zeros(groups, 1, cols)
    steps = epochs * math.ceil(n / batch)
    start = time.perf_counter()
    for _ in range(steps):
        logits = torch.baddbmm(b, xb, W)
        xb.transpose(1, 2) @ logits
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--labels", type=int, default=14)
    parser.add_argument("--epochs", type=int, default=None, help="default: fit-head's")
    parser.add_argument("--json", default=None, metavar="OUT")
    args = parser.parse_args()

    import torch

    from featcache.heads.sweep import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, LinearHeadSweep, sweep_grid

    epochs = args.epochs or DEFAULT_EPOCHS
    grid = sweep_grid()
    groups = len({c.norm for c in grid})
    torch.zeros(1) @ torch.zeros(1)  # torch's own start-up memory counted in the baseline
    baseline = status_mb("VmRSS")
    reset_peak()
    X, Y = features(args.rows, args.dim, args.labels)
    matrix_mb = X.nbytes / 2**20
    start = time.perf_counter()
    sweep = LinearHeadSweep(grid, epochs=epochs).fit(X, Y, args.labels)
    sweep_s = time.perf_counter() - start
    peak = status_mb("VmHWM") - baseline
    threads = max(sweep.threads_) if sweep.threads_ else torch.get_num_threads()
    with_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    loop_s = plain_loop(X, len(grid), groups, args.labels, epochs, DEFAULT_BATCH_SIZE)
    torch.set_num_threads(with_threads)
    steps = epochs * math.ceil(args.rows / DEFAULT_BATCH_SIZE)
    flops = 2 * 2 * groups * DEFAULT_BATCH_SIZE * args.dim * args.labels * (len(grid) // groups) * steps
    result = {
        "rows": args.rows, "dim": args.dim, "labels": args.labels, "heads": len(grid), "epochs": epochs,
        "steps": steps, "threads": sweep.threads_, "sweep_seconds": sweep_s, "plain_loop_seconds": loop_s,
        "ratio": sweep_s / loop_s, "sweep_gflops": flops / sweep_s / 1e9, "loop_gflops": flops / loop_s / 1e9,
        "feature_matrix_mb": matrix_mb, "peak_mb_above_baseline": peak, "peak_over_matrix": peak / matrix_mb,
    }
    print(f"{args.rows:,} x {args.dim} float32, {args.labels} labels, {len(grid)} heads, {epochs} epochs "
          f"({steps:,} steps), torch threads {sorted(set(sweep.threads_))}")
    print(f"sweep       {sweep_s:7.1f} s  {result['sweep_gflops']:6.1f} GFLOP/s   (goal <= {GOAL_SECONDS:.0f} s)")
    print(f"plain loop  {loop_s:7.1f} s  {result['loop_gflops']:6.1f} GFLOP/s   (the same matmuls only)")
    print(f"ratio       {result['ratio']:7.2f}                    (goal <= {GOAL_RATIO:.0f}x)")
    print(f"peak memory {peak:7.0f} MB = {result['peak_over_matrix']:.2f}x the {matrix_mb:.0f} MB feature matrix "
          f"(goal <= {GOAL_MEMORY:.0f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
