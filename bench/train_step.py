"""Training images/s of featcache's fine-tuning step: backbones x full/frozen x bf16/fp32, in one run.

    python bench/train_step.py [--backbones resnet18 mobilenet_v2] [--steps 6] [--batch-size 32] [--json OUT]

Each configuration runs the same step finetune runs (channels_last, autocast
when bf16, AdamW, cross-entropy) on one preloaded uint8 batch, so decoding is
left out and the figures compare the model side only. On a GPU it times cuda
as well; there fp16 joins the list.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def steps_per_second(backbone: str, *, frozen: bool, amp_dtype, device: str, batch_size: int, steps: int) -> float:
    import torch

    from featcache.backbones import create_backbone
    from featcache.finetune import _classifier_class

    bb = create_backbone(backbone, "none")
    model = _classifier_class()(bb.model.requires_grad_(not frozen), bb.feature_dim, 2, frozen)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)
    images = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch_size,), device=device)

    def step():
        with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch
    from rich.table import Table

    from featcache.console import get_console

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        precisions = [("fp32", None), ("bf16", torch.bfloat16)] + ([("fp16", torch.float16)] if device == "cuda"
                                                                   else [])
        for backbone in args.backbones:
            for frozen in (False, True):
                for name, dtype in precisions:
                    rate = steps_per_second(backbone, frozen=frozen, amp_dtype=dtype, device=device,
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
