"""featcache models (Task A): what each backbone costs, from metadata and measured here."""

from __future__ import annotations

import json
import subprocess
import sys

from featcache.backbones.registry import REGISTRY, backbone_facts, get_entry

def probe(name: str, batch_size: int, device: str) -> dict:
    """Best of two timed forward passes of ``name`` at ``batch_size`` (after a warm-up) and peak memory.

    Run in a process of its own (:func:`measure`), so the peak is this backbone's alone.
    """
    import time

    import torch

    from featcache.backbones.registry import create_backbone
    from featcache.runtime.device import peak_memory_mb, place, synchronizer

    bb = create_backbone(name, "none")
    model, layout = place(bb.model, device)
    x = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=layout)
    sync = synchronizer(device)
    with torch.inference_mode():
        model(x)
        sync()
        best = 0.0
        for _ in range(2):
            start = time.perf_counter()
            model(x)
            sync()
            best = max(best, batch_size / (time.perf_counter() - start))
    return {"images_per_s": best, "peak_memory_mb": peak_memory_mb(device)}


def measure(name: str, batch_size: int, device: str) -> dict:
    """Forward images/s and peak memory of one backbone, in a fresh process (so memory is its own)."""
    result = subprocess.run([sys.executable, "-m", "featcache.backbones.costs", name, str(batch_size), device],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"measuring {name} on {device} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def counted_facts(name: str) -> dict:
    """Parameters and multiply-adds of one forward at the backbone's crop, counted on the built feature
    extractor with ``torch.utils.flop_counter`` (FLOPs / 2: the unit of torchvision's "GFLOPS" metadata,
    which counts multiply-adds, so rows from either source compare)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from featcache.backbones.registry import create_backbone

    bb = create_backbone(name, "none")
    x = torch.zeros(1, 3, bb.spec.crop, bb.spec.crop, dtype=torch.uint8)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        bb.model(x)
    return {"name": bb.name, "weights": "-", "params_m": round(sum(p.numel() for p in bb.model.parameters()) / 1e6, 2),
            "gflops": round(counter.get_total_flops() / 2e9, 2), "imagenet_top1": None,
            "feature_dim": bb.feature_dim, "resize": bb.spec.resize}


def model_table(*, names: list[str] | None = None, measure_speed: bool = True, batch_size: int = 32,
                progress=None) -> list[dict]:
    """One row per backbone: the four short names from torchvision's metadata, any other name
    (``tv:``, ``timm:``) counted on the built model; forward speed measured when asked."""
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    seen = set()
    for name in names or list(REGISTRY):
        canonical = get_entry(name).name
        if canonical in seen:  # tv:resnet18 and resnet18: one network, one row
            continue
        seen.add(canonical)
        row = backbone_facts(canonical) if canonical in REGISTRY else counted_facts(name)
        if measure_speed:
            for device in devices:
                if progress:
                    progress(f"measuring {name} on {device} (batch {batch_size})")
                row[device] = measure(name, batch_size, device)
        rows.append(row)
    return rows


def render(rows: list[dict], batch_size: int):
    from rich.table import Table

    devices = [d for d in ("cpu", "cuda") if any(d in r for r in rows)]
    table = Table(title=f"backbones (forward at batch {batch_size}, 224 px, measured here)", title_justify="left")
    for col in ("backbone", "weights", "params (M)", "GMACs", "ImageNet top-1", "feature dim"):
        table.add_column(col, justify="left" if col in ("backbone", "weights") else "right")
    for d in devices:
        table.add_column(f"{d} images/s", justify="right")
        table.add_column(f"{d} peak MB", justify="right")
    for r in rows:
        top1 = "-" if r["imagenet_top1"] is None else f"{r['imagenet_top1']:.1f}"
        cells = [r["name"], r["weights"], f"{r['params_m']:.1f}", f"{r['gflops']:.2f}", top1, str(r["feature_dim"])]
        for d in devices:
            cells += [f"{r[d]['images_per_s']:.1f}", f"{r[d]['peak_memory_mb']:.0f}"] if d in r else ["-", "-"]
        table.add_row(*cells)
    return table



def families_table():
    """The backbone families and names that work in each."""
    from rich.table import Table

    from featcache.backbones.registry import FAMILIES, FAMILY_EXAMPLES

    table = Table(title="backbone families (--backbone FAMILY:NAME; the four short names are tv models)",
                  title_justify="left")
    for col in ("family", "what", "examples"):
        table.add_column(col)
    for family in FAMILIES:
        what, examples = FAMILY_EXAMPLES[family]
        table.add_row(family, what, examples)
    return table


if __name__ == "__main__":  # python -m featcache.backbones.costs NAME BATCH DEVICE: one line of JSON
    print(json.dumps(probe(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
