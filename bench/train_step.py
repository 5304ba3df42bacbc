"""Training images/s of featcache's fine-tuning step: backbones x full/frozen x bf16/fp32, in one run.

    python bench/train_step.py [--backbones resnet18 mobilenet_v2] [--steps 6] [--batch-size 32] [--json OUT]

Each configuration times ``featcache.bench.train_step_images_per_s``: the step
finetune runs (channels_last, autocast when bf16, AdamW, cross-entropy) on one
preloaded uint8 batch, so decoding is left out and the figures compare the
model side only. On a GPU it times cuda
as well; there fp16 joins the list.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch
    from rich.table import Table

    from featcache.bench import train_step_images_per_s
    from featcache.runtime.console import get_console

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        precisions = [("fp32", None), ("bf16", torch.bfloat16)] + ([("fp16", torch.float16)] if device == "cuda"
                                                                   else [])
        for backbone in args.backbones:
            for frozen in (False, True):
                for name, dtype in precisions:
                    rate = train_step_images_per_s(backbone, frozen=frozen, amp_dtype=dtype, device=device,
                                                   batch_size=args.batch_size, steps=args.steps)
                    rows.append({"device": device, "backbone": backbone, "mode": "frozen" if frozen else "full",
                                 "precision": name, "images_per_s": rate})
    table = Table(title=f"training images/s, batch {args.batch_size} ({torch.get_num_threads()} CPU threads)",
                  title_justify="left")
    for col in ("device", "backbone", "mode", "precision", "images/s", "vs full fp32"):
        table.add_column(col, justify="right" if col in ("images/s", "vs full fp32") else "left")
    for r in rows:
        base = next(x["images_per_s"] for x in rows if x["device"] == r["device"]
                    and x["backbone"] == r["backbone"] and x["mode"] == "full" and x["precision"] == "fp32")
        table.add_row(r["device"], r["backbone"], r["mode"], r["precision"], f"{r['images_per_s']:.1f}",
                      f"{r['images_per_s'] / base:.2f}")
    get_console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
