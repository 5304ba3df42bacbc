"""Extract images/s against the same backbone's forward-only images/s, in one run.

Forward-only is the ceiling: decoded, cropped uint8 tensors already in memory,
fed to the frozen backbone in batches. ``featcache extract`` does the same
forward plus reading, decoding, resizing and writing the cache; the ratio of
the two says how much of the backbone's speed the pipeline keeps.

    python bench/extract_vs_forward.py [DATA] [--backbone resnet18] [--workers 0 1 2] [--amp off|bf16]
        [--max-images N] [--json OUT]

With ``--amp bf16`` both sides run under the same autocast, so the ratio still
compares like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chest_xray_224"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(DEFAULT_DATA))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[None],
                        help="decode worker counts to try (default: featcache's default)")
    parser.add_argument("--forward-images", type=int, default=512)
    parser.add_argument("--max-images", type=int, default=None,
                        help="extract a stratified subset of this many images of every split (slow backbones)")
    parser.add_argument("--backend", default="auto", help="decode backend for extract (default auto)")
    parser.add_argument("--amp", default="off", metavar="off|auto|bf16|fp16",
                        help="autocast for both the forward-only pass and extract (as extract --amp; default off)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)

    import h5py
    from rich.table import Table

    from featcache.backbones.registry import create_backbone
    from featcache.bench import forward_only
    from featcache.runtime.console import get_console
    from featcache.decode import default_workers
    from featcache.runtime.amp import autocast
    from featcache.extract import extract, resolve_inference_amp
    from featcache.data.manifest import scan

    console = get_console()
    manifest = scan(args.data).limit(args.max_images, subsample_all=True)
    backbone = create_backbone(args.backbone, "none")
    import torch

    amp_dtype, _, amp_words = resolve_inference_amp(args.amp, "cpu")
    console.print(f"{len(manifest)} images from {manifest.root}; {args.backbone}, batch {args.batch_size}, "
                  f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores, precision {amp_words}")
    results = {"data": manifest.root, "amp": amp_words}
    with autocast("cpu", amp_dtype):  # the same precision as extract --amp below
        fwd = forward_only(backbone, manifest, n_images=args.forward_images, batch_size=args.batch_size)
    console.print(f"forward-only on {args.forward_images} preloaded images: [bold]{fwd:.1f}[/] images/s")

    results.update({"backbone": args.backbone, "images": len(manifest), "forward_only_images_per_s": fwd,
                    "extract": []})
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            summary = extract(args.data, Path(tmp) / "bench.h5", backbone=args.backbone, weights="none",
                              batch_size=args.batch_size, workers=workers, device="cpu", manifest=manifest,
                              backend=args.backend, amp=args.amp, progress=sys.stdout.isatty())
            with h5py.File(Path(tmp) / "bench.h5") as f:
                decode = json.loads(f.attrs["decode"])["mode"]
        results["extract"].append({
            "workers": default_workers() if workers is None else workers,
            "decode": decode,
            "images_per_s": summary["images_per_second"],
            "seconds": summary["seconds"],
            "fraction_of_forward_only": summary["images_per_second"] / fwd,
        })

    table = Table(title=f"{args.backbone}, {amp_words}: extract vs forward-only (same run)", title_justify="left")
    for col in ("decode", "workers", "extract images/s", "forward-only images/s", "extract / forward-only",
                "seconds"):
        table.add_column(col, justify="right")
    for r in results["extract"]:
        table.add_row(r["decode"], str(r["workers"]), f"{r['images_per_s']:.1f}", f"{fwd:.1f}",
                      f"{r['fraction_of_forward_only']:.2f}", f"{r['seconds']:.1f}")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
