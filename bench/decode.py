"""Decode-only images/s per backend, on full-size synthetic X-rays (and any other folder).

    python bench/decode.py [DATA ...] [--n 200] [--json OUT]

It first generates --n full-size images with `featcache synth` into
runs/bench/synth-N (kept for reuse), then measures them and each DATA folder. Each backend produces the uint8
(3, 224, 224) tensors extract feeds the backbone, using every core (DataLoader
workers for the CPU decoders, pipeline threads for DALI); no backbone runs.
PIL appears twice: with draft (reduced-scale JPEG decode, featcache's `pil`)
and without.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sample_image_sizes(manifest, n: int = 64) -> list[tuple[str, int, int]]:
    """(format, width, height) of up to ``n`` files spread over the manifest (headers only)."""
    import numpy as np
    from PIL import Image

    picks = np.unique(np.linspace(0, len(manifest) - 1, min(n, len(manifest))).astype(int))
    out = []
    for row in picks:
        with Image.open(os.path.join(manifest.root, manifest.paths[row])) as im:
            out.append((im.format or "", *im.size))
    return out


def pil_no_draft(path: str, spec):
    """PIL decode at full scale: featcache's pil backend with the draft step removed."""
    import io

    import torch
    from PIL import Image

    from featcache.decode.cpu import _read, _to_uint8, resize_crop

    with Image.open(io.BytesIO(_read(path))) as im:
        array = _to_uint8(im)
    tensor = torch.from_numpy(array)
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return resize_crop(tensor, spec)


def run_backend(name: str, manifest, spec, cores: int, repeats: int = 2) -> float:
    """Best images/s over ``repeats`` passes."""
    from featcache.decode import make_loader
    from featcache.decode.cpu import LOADERS

    if name == "pil (no draft)":
        LOADERS["pil-nodraft"] = pil_no_draft
        backend = "pil-nodraft"
    else:
        backend = name.split()[0]
    best = 0.0
    for _ in range(repeats):
        if backend == "pil-nodraft":
            from featcache.decode.cpu import CpuLoader
            import numpy as np

            loader = CpuLoader(manifest, spec, np.arange(len(manifest)), backend=backend, batch_size=32,
                               workers=cores, pin_memory=False)
        else:
            loader = make_loader(manifest, spec, backend=backend, batch_size=32, workers=cores)
        start = time.perf_counter()
        n = sum(len(batch.indices) for batch in loader)
        best = max(best, n / (time.perf_counter() - start))
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="*")
    parser.add_argument("--n", type=int, default=200, help="synthetic full-size images to add (0: none)")
    parser.add_argument("--backends", nargs="+", default=["torchvision", "pil", "pil (no draft)", "dali"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from rich.table import Table

    from featcache.backbones.registry import get_entry
    from featcache.runtime.console import get_console
    from featcache.decode.dali import dali_available
    from featcache.data.manifest import scan
    from featcache.runtime.device import cpu_cores

    console = get_console()
    folders = list(args.data)
    if args.n:
        from featcache.data.synth import synth

        target = REPO / "runs" / "bench" / f"synth-{args.n}"
        synth(target, args.n, progress=sys.stdout.isatty())
        folders.insert(0, str(target))
    spec = get_entry("resnet18").spec()
    cores = cpu_cores()
    report = []
    for folder in folders:
        manifest = scan(folder)
        sizes = sample_image_sizes(manifest)
        mp = sum(w * h for _, w, h in sizes) / max(len(sizes), 1) / 1e6
        rates = {}
        for backend in args.backends:
            if backend == "dali" and not dali_available()[0]:
                continue
            rates[backend] = run_backend(backend, manifest, spec, cores)
        fastest = max(rates.values())
        table = Table(title=f"decode to 3x224x224, {len(manifest)} images of {folder} (mean {mp:.2f} MP), "
                            f"{cores} cores", title_justify="left")
        for col in ("backend", "images/s", "vs fastest"):
            table.add_column(col, justify="left" if col == "backend" else "right")
        for backend, rate in sorted(rates.items(), key=lambda kv: -kv[1]):
            table.add_row(backend + (" (dali-cpu)" if backend == "dali" else ""), f"{rate:.1f}",
                          f"{rate / fastest:.2f}")
        console.print(table)
        report.append({"data": folder, "images": len(manifest), "mean_megapixels": mp, "images_per_s": rates})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
