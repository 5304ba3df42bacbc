"""Parity of the decode backends with torchvision, and of bf16 with fp32, by criteria that discriminate.

    python bench/parity.py [DATA ...] [--max-images N] [--weights none|imagenet|PATH] [--json OUT]

"Mean cosine >= 0.99" cannot tell a right decode from a wrong one (random-init
features of two *different* X-rays have cosine ~0.993), so this reports, for
DALI (CPU pipelines) vs torchvision, PIL vs torchvision, and `--amp bf16` vs
fp32 on the same decode (featcache.eval.parity):

  (a) mean absolute difference of the uint8 224x224 crops, in grey levels (<= 2);
  (b) fraction of rows whose nearest row (cosine) on the other side is the same
      image, the smaller of both directions (>= 99.5 %);
  (c) mean same-image feature distance / median different-image distance (<= 5 %).

DATA defaults to the shared Kermany set (../shared/data/chest_xray_224, or
$FEATCACHE_SHARED_DATA), every image of every split; --max-images N takes a
stratified (split x class), seeded subset of all splits. --synth N adds N
full-size synthetic X-rays (kept in runs/bench/synth-N), the only inputs on
which PIL's reduced-scale JPEG decode runs. Backbone: random-init resnet18
(--weights none, seed 0) unless told otherwise; CPU, fp32 unless bf16.

Every backend decodes the same rows in lockstep; the crops are compared as
they come and not kept, the features (N x 512 each) are. Byte-identical
files (the Kermany set has 30 groups, 62 images) count as one image in (b)
and (c): a copy is not a rival of its twin.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEATCACHE_SHARED_DATA", REPO.parent / "shared" / "data" / "chest_xray_224"))
REFERENCE = "torchvision"


def pairings(backends: list[str], amp_backend: str) -> list[tuple[str, tuple[str, str], tuple[str, str]]]:
    """(name, (backend, precision) compared, (backend, precision) it is compared with)."""
    out = [(f"{'dali-cpu' if b == 'dali' else b} vs {REFERENCE}", (b, "fp32"), (REFERENCE, "fp32"))
           for b in backends if b != REFERENCE]
    out.append((f"bf16 vs fp32 ({amp_backend} decode)", (amp_backend, "bf16"), (amp_backend, "fp32")))
    return out


def measure(manifest, *, backbone: str, weights: str, seed: int, backends: list[str], amp_backend: str,
            batch_size: int, workers: int, always_forward: bool, log) -> dict:
    """Decode every row with every backend in lockstep; crop differences on the fly, features kept."""
    import torch

    from featcache.eval import parity
    from featcache.runtime.amp import autocast
    from featcache.backbones.registry import create_backbone
    from featcache.decode import make_loader

    bb = create_backbone(backbone, weights, seed=seed)
    model = bb.model.to("cpu", memory_format=torch.channels_last)
    n = len(manifest)
    wanted = sorted({(b, "fp32") for b in backends} | {(amp_backend, "bf16")})
    feats = {key: np.full((n, bb.feature_dim), np.nan, np.float32) for key in wanted}
    crop_diff = {b: np.full(n, np.nan) for b in backends if b != REFERENCE}
    identical = {b: 0 for b in crop_diff}  # batches whose crops equal torchvision's bit for bit
    iters = {b: iter(make_loader(manifest, bb.spec, backend=b, batch_size=batch_size, workers=workers))
             for b in backends}
    pending = {b: {} for b in backends}
    failed = {b: {} for b in backends}
    seconds = {f"decode {b}": 0.0 for b in backends} | {f"forward {b} {p}": 0.0 for b, p in wanted}
    live, done, start, last = set(backends), 0, time.perf_counter(), 0.0

    def forward(images, precision):
        x = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast("cpu", torch.bfloat16 if precision == "bf16" else None):
            return model(x).float().numpy()

    while live:
        for b in sorted(live):
            t0 = time.perf_counter()
            batch = next(iters[b], None)
            seconds[f"decode {b}"] += time.perf_counter() - t0
            if batch is None:
                live.discard(b)
                continue
            failed[b].update(dict(batch.failed))
            pending[b].update(zip(batch.indices.tolist(), batch.images))
        ready = sorted(set.intersection(*(set(p) for p in pending.values())))
        if not ready:
            continue
        crops = {b: torch.stack([pending[b].pop(r) for r in ready]) for b in backends}
        for b in crop_diff:
            crop_diff[b][ready] = parity.crop_difference(crops[b], crops[REFERENCE])["per_image"]
        copied = []
        for b, precision in wanted:
            if (b != REFERENCE and precision == "fp32" and not always_forward
                    and torch.equal(crops[b], crops[REFERENCE])):
                copied.append(b)  # identical input, identical features: the forward is not repeated
                continue
            t0 = time.perf_counter()
            feats[b, precision][ready] = forward(crops[b], precision)
            seconds[f"forward {b} {precision}"] += time.perf_counter() - t0
        for b in copied:
            identical[b] += 1
            feats[b, "fp32"][ready] = feats[REFERENCE, "fp32"][ready]
        done += len(ready)
        now = time.perf_counter() - start
        if now - last > 30 or done == n:
            last = now
            log(f"  {done:,}/{n:,} rows, {now:.0f} s ({done / now:.1f} rows/s)")
    bad = sorted(set().union(*failed.values()))
    keep = np.setdiff1d(np.arange(n), bad)
    # Byte-identical files are one image to (b) and (c), not rivals that tie with it.
    same = parity.duplicate_groups(manifest.paths, manifest.root)[keep]
    results = {}
    for name, a, b in pairings(backends, amp_backend):
        crop = crop_diff[a[0]][keep] if a[1] == b[1] == "fp32" and a[0] in crop_diff else None
        results[name] = parity.parity(feats[a][keep], feats[b][keep], crop_per_image=crop, same=same, seed=seed)
    return {"rows": int(len(keep)), "duplicate_rows": int(len(same) - len(np.unique(same))),
            "failed": {b: {manifest.paths[r]: why for r, why in f.items()} for b, f in failed.items() if f},
            "identical_crop_batches": identical, "seconds": seconds, "pairings": results}


def print_table(console, title: str, pairs: dict) -> None:
    from rich.table import Table

    from featcache.eval import parity

    table = Table(title=title, title_justify="left")
    cols = ("pairing", "(a) grey levels", "(b) nearest same", "(c) distance ratio", "pass", "cos same", "cos diff")
    for col in cols:
        table.add_column(col, justify="left" if col == "pairing" else "right")
    for name, r in pairs.items():
        a, near, dist = r["crop_difference"], r["nearest_same"], r["distance_ratio"]
        table.add_row(
            name,
            "n/a" if a is None else f"{a['mean']:.3f}{_mark(a['passed'])}",
            f"{near['fraction']:.2%}{_mark(near['passed'])}",
            f"{dist['ratio']:.2%}{_mark(dist['passed'])}",
            "yes" if r["passed"] else "[bold red]NO[/]",
            f"{r['mean_cosine']:.6f}",
            f"{r['different_cosine_median']:.4f}",
        )
    console.print(table)
    pairs_used = next(iter(pairs.values()))["distance_ratio"]["pairs"]
    console.print(
        f"(a) mean |crop - torchvision crop|, uint8 grey levels (<= {parity.MAX_MEAN_GREY_LEVELS}; n/a: same crops); "
        f"(b) rows whose nearest other-side row (cosine) is the same image, min of both directions "
        f"(>= {parity.MIN_NEAREST_SAME:.1%}); (c) mean same-image feature distance / median different-image "
        f"distance (<= {parity.MAX_DISTANCE_RATIO:.0%}, median over {pairs_used:,} pairs); cos same: mean cosine "
        f"of the same image (the old '>= 0.99' check); cos diff: median cosine of two different images")


def _mark(ok: bool) -> str:
    return "" if ok else " [bold red]FAIL[/]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="*", help=f"image folders (default: {SHARED})")
    parser.add_argument("--max-images", type=int, default=None,
                        help="stratified (split x class), seeded subset of every split (default: every image)")
    parser.add_argument("--synth", type=int, default=0, help="also N full-size synthetic X-rays (PIL's draft path)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="none", help="none (seeded random init, default), imagenet or PATH")
    parser.add_argument("--seed", type=int, default=0, help="init seed, subset seed and (c)'s pair sample")
    parser.add_argument("--backends", nargs="+", default=["torchvision", "pil", "dali"])
    parser.add_argument("--amp-backend", default=REFERENCE, help="decode for the bf16 vs fp32 comparison")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the CPU decoders")
    parser.add_argument("--always-forward", action="store_true",
                        help="run the forward even for batches whose crops equal torchvision's bit for bit")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    from rich.console import Console

    from featcache.runtime.console import get_console
    from featcache.data.manifest import scan

    if REFERENCE not in args.backends:
        args.backends.insert(0, REFERENCE)
    if args.amp_backend not in args.backends:
        parser.error(f"--amp-backend {args.amp_backend} is not among --backends")
    console = Console(highlight=False, width=max(get_console().width, 124))  # the table fits unwrapped
    folders = [Path(d) for d in args.data] or [SHARED]
    if args.synth:
        from featcache.data.synth import synth

        target = REPO / "runs" / "bench" / f"synth-{args.synth}"
        synth(target, args.synth, progress=sys.stdout.isatty())
        folders.append(target)
    command = "python bench/parity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command.strip(), "backbone": args.backbone, "weights": args.weights, "seed": args.seed,
              "device": "cpu", "torch_threads": torch.get_num_threads(), "data": []}
    for folder in folders:
        whole = scan(folder)
        manifest = whole.stratified_subset(args.max_images, args.seed) if args.max_images else whole
        sub = f"stratified subset of {len(manifest):,} of {len(whole):,} images" if len(manifest) < len(whole) \
            else f"all {len(whole):,} images"
        console.print(f"[bold]{folder}[/]: {sub}; {args.backbone}, weights {args.weights} (seed {args.seed}), CPU")
        start = time.perf_counter()
        result = measure(manifest, backbone=args.backbone, weights=args.weights, seed=args.seed,
                         backends=args.backends, amp_backend=args.amp_backend, batch_size=args.batch_size,
                         workers=args.workers, always_forward=args.always_forward, log=console.print)
        result.update(data=str(folder), images=len(whole), subset=len(manifest) < len(whole),
                      wall_seconds=time.perf_counter() - start)
        print_table(console, f"parity on {result['rows']:,} images of {folder} ({sub})", result["pairings"])
        if result["duplicate_rows"]:
            console.print(f"{result['duplicate_rows']} rows are byte-identical copies of another row's file: "
                          "(b) counts a copy as the same image, (c) leaves copy pairs out of the different-image "
                          "distances")
        skipped = {b: n for b, n in result["identical_crop_batches"].items() if n}
        if skipped:
            console.print("crops bit-identical to torchvision's, forward not repeated: "
                          + ", ".join(f"{b} {n} batch{'es' if n != 1 else ''}" for b, n in skipped.items())
                          + " (--always-forward runs it)")
        console.print(f"wall {result['wall_seconds']:.0f} s")
        report["data"].append(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=_plain) + "\n")
    return 0 if all(r["passed"] for d in report["data"] for r in d["pairings"].values()) else 1


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x))


if __name__ == "__main__":
    sys.exit(main())
