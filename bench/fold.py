"""Frozen forward passes with and without BatchNorm folded into the convolutions (what extract runs).

Builds one backbone (seeded random init), then times its forward over the
same random uint8 batch three ways in this process, turn by turn: as built,
folded (``FeatureExtractor.for_inference``, what extract and forward-only
run), and folded under bf16 autocast; each in the memory layout extract uses.
Prints the first (cold) call and the best of ``--repeats`` for each, the
folded / as-built ratio, and the largest relative difference of the folded
features.

    python bench/fold.py [--backbone resnet18] [--batch-size 32] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch

    from featcache.backbones.registry import create_backbone
    from featcache.runtime.amp import autocast
    from featcache.runtime.device import place

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bb = create_backbone(args.backbone, "none", seed=0)
    built, layout = place(bb.model, "cpu")
    folded, _ = place(bb.model.for_inference(), "cpu")
    x = torch.randint(0, 256, (args.batch_size, 3, bb.spec.crop, bb.spec.crop), dtype=torch.uint8).contiguous(
        memory_format=layout)
    sides = {"as built": (built, None), "BatchNorm folded": (folded, None),
             "folded, bf16 autocast": (folded, torch.bfloat16)}
    times = {name: [] for name in sides}
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # the first turn is each side's cold call
            for name, (model, dtype) in sides.items():
                start = time.perf_counter()
                with autocast("cpu", dtype):
                    model(x)
                times[name].append(time.perf_counter() - start)
        ref, got = built(x), folded(x)
    print(f"{args.backbone}, batch {args.batch_size}, {args.threads} thread(s), images/s (cold, best of "
          f"{args.repeats}):")
    for name, t in times.items():
        print(f"  {name:22s} {args.batch_size / t[0]:7.1f}  {args.batch_size / min(t[1:]):7.1f}")
    ratio = min(times["as built"][1:]) / min(times["BatchNorm folded"][1:])
    diff = float((got - ref).abs().max() / ref.abs().max())
    print(f"folded / as built: {ratio:.2f}x; largest relative difference of the features {diff:.1e}")


if __name__ == "__main__":
    main()
