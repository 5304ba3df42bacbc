"""featcache bench: stage speeds and the headline comparison, measured in one run.

Stages: ``decode`` (images/s of the decode backend alone), ``forward``
(the backbone on preloaded tensors: the ceiling), ``extract`` (the whole
pipeline, with where its time goes), ``fit-head`` (the 64-head sweep on the
cache), ``finetune-step`` (training images/s, full and frozen).

``compare`` runs three ways to the same answer on the same images, each in
its own process (so each peak memory is its own), and puts them side by
side: featcache extract + head sweep; the classic PyTorch tutorial's
frozen-backbone training for E epochs (``bench/tutorial_baseline.py``); and
featcache full fine-tuning for E epochs. It also times the usual naive
feature-extraction script, for the ratio to featcache's extract.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from featcache.amp import autocast
from featcache.errors import UserError

STAGES = ("decode", "forward", "extract", "fit-head", "finetune-step", "compare")
BASELINES = Path(__file__).resolve().parents[1] / "bench" / "tutorial_baseline.py"

_PEAK_WRAPPER = """
import resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(proc.stdout)
sys.stderr.write(proc.stderr[-4000:])
print("@@", time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
      proc.returncode)
"""


def measured(cmd: list[str]) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS MB) of ``cmd`` run in a fresh process."""
    result = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *cmd], capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    tail = lines[-1].split() if lines else []
    if not tail or tail[0] != "@@" or tail[3] != "0":
        raise RuntimeError(f"benchmark step failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return "\n".join(lines[:-1]), float(tail[1]), float(tail[2])


def forward_only(backbone, manifest, *, n_images: int, batch_size: int, device: str = "cpu",
                 repeats: int = 3) -> float:
    """Best of ``repeats`` passes of the frozen backbone over preloaded decoded images, images/s."""
    import torch

    from featcache.decode.cpu import load_torchvision

    rows = range(min(n_images, len(manifest)))
    images = torch.stack([load_torchvision(os.path.join(manifest.root, manifest.paths[i]), backbone.spec)
                          for i in rows]).to(device)
    batches = [images[i : i + batch_size].contiguous(memory_format=torch.channels_last)
               for i in range(0, len(images), batch_size)]
    model = backbone.model.to(device, memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = 0.0
    with torch.inference_mode():
        model(batches[0])
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for batch in batches:
                model(batch)
            sync()
            best = max(best, len(images) / (time.perf_counter() - start))
    return best


def decode_only(manifest, spec, backend: str, workers: int) -> float:
    from featcache.decode import make_loader

    start = time.perf_counter()
    n = sum(len(b.indices) for b in make_loader(manifest, spec, backend=backend, batch_size=32, workers=workers))
    return n / (time.perf_counter() - start)


def run_bench(data: str, *, backbone: str = "resnet18", max_images: int | None = 600, epochs: int = 2,
              batch_size: int = 32, stages=STAGES, seed: int = 0, keep: str | None = None) -> dict:
    """Measure ``stages`` on a stratified subset of ``data``; returns every figure."""
    import torch

    from featcache.backbones import create_backbone
    from featcache.decode import resolve_backend
    from featcache.extract import extract, resolve_device
    from featcache.manifest import scan

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown bench stage {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    manifest = scan(data, seed=seed).stratified_subset(max_images, seed)
    device = resolve_device("auto")
    decode = resolve_backend("auto", device)
    bb = create_backbone(backbone, "none", seed=seed)
    facts = {"data": manifest.root, "images": len(manifest), "backbone": backbone, "device": device,
             "decode": decode.mode, "threads": torch.get_num_threads(), "epochs": epochs}
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if "decode" in stages and decode.name != "dali":
            facts["decode_images_per_s"] = decode_only(manifest, bb.spec, decode.name, workers=os.cpu_count() or 1)
        if "forward" in stages or "extract" in stages:
            facts["forward_images_per_s"] = forward_only(bb, manifest, n_images=min(256, len(manifest)),
                                                         batch_size=batch_size, device=device)
        cache = work / f"{backbone}.h5"
        if "extract" in stages or "fit-head" in stages:
            summary = extract(data, cache, backbone=backbone, weights="none", batch_size=batch_size, seed=seed,
                              max_images=max_images, overwrite=True, progress=sys.stdout.isatty())
            facts["extract"] = {k: summary[k] for k in ("images_per_second", "seconds", "stages")}
            if "forward_images_per_s" in facts:
                facts["extract_fraction_of_forward"] = summary["images_per_second"] / facts["forward_images_per_s"]
        if "fit-head" in stages:
            from featcache.fit import fit_head

            metrics = fit_head(cache, work / "sweep", heads="sweep", n_resamples=0, seed=seed)
            facts["fit_head"] = {"heads": metrics["n_heads"], "seconds": metrics["fit_seconds"],
                                 "test_auroc": metrics.get("test", {}).get("auroc")}
        if "finetune-step" in stages:
            facts["finetune_step"] = _train_steps(backbone, device, batch_size)
        if "compare" in stages:
            facts["compare"] = _compare(data, work, backbone=backbone, max_images=max_images, epochs=epochs,
                                        batch_size=batch_size, seed=seed)
    finally:
        if not keep:  # caches and runs of a benchmark are scratch unless asked for
            shutil.rmtree(work, ignore_errors=True)
    return facts


def train_step_images_per_s(backbone: str, *, frozen: bool, amp_dtype, device: str, batch_size: int,
                            steps: int) -> float:
    """Training images/s of finetune's step (channels_last, autocast, GradScaler for fp16, AdamW,
    cross-entropy) on one preloaded uint8 batch of random-init ``backbone``, after one warm-up step."""
    import torch

    from featcache.backbones import create_backbone
    from featcache.finetune import _classifier_class

    bb = create_backbone(backbone, "none")
    model = _classifier_class()(bb.model.requires_grad_(not frozen), bb.feature_dim, 2, frozen)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp_dtype == torch.float16)
    images = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch_size,), device=device)

    def step():
        with autocast(device, amp_dtype):
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch_size / (time.perf_counter() - start)


def _train_steps(backbone: str, device: str, batch_size: int) -> dict:
    from featcache.amp import resolve_amp

    amp_dtype, _, words = resolve_amp("auto", device)
    out = {("frozen" if frozen else "full"): train_step_images_per_s(backbone, frozen=frozen, amp_dtype=amp_dtype,
                                                                     device=device, batch_size=batch_size, steps=3)
           for frozen in (False, True)}
    out["amp"] = words
    return out


def _compare(data, work: Path, *, backbone, max_images, epochs, batch_size, seed) -> dict:
    if not BASELINES.is_file():
        raise UserError(f"bench compare needs {BASELINES} (a source checkout of featcache)")
    featcache = [sys.executable, "-m", "featcache"]
    subset = ["--max-images", str(max_images)] if max_images else []
    common = ["--weights", "none", "--seed", str(seed), "--batch-size", str(batch_size), "--no-progress"]
    rows = {}
    cache = work / "compare.h5"
    _, t_extract, m_extract = measured([*featcache, "extract", str(data), "--out", str(cache), "--overwrite",
                                        "--backbone", backbone, *common, *subset])
    _, t_fit, m_fit = measured([*featcache, "fit-head", str(cache), "--out", str(work / "compare-sweep"),
                                "--heads", "sweep", "--bootstrap", "0"])
    sweep = json.loads((work / "compare-sweep" / "metrics.json").read_text())
    rows["featcache extract + head sweep"] = {"seconds": t_extract + t_fit, "peak_memory_mb": max(m_extract, m_fit),
                                              "test_auroc": sweep["test"]["auroc"],
                                              "images_per_second": json.loads(_attr(cache, "extract"))[
                                                  "images_per_second"]}
    out, t_tut, m_tut = measured([sys.executable, str(BASELINES), "tutorial", str(data), "--epochs", str(epochs),
                                  "--batch-size", str(batch_size), *subset])
    tut = json.loads(out.strip().splitlines()[-1])
    rows[f"tutorial frozen backbone, {epochs} epochs"] = {"seconds": t_tut, "peak_memory_mb": m_tut,
                                                          "test_auroc": tut["test_auroc"],
                                                          "images_per_second": tut["images_per_second"]}
    run = work / "compare-finetune"
    _, t_ft, m_ft = measured([*featcache, "finetune", str(data), "--out", str(run), "--overwrite", "--epochs",
                              str(epochs), "--backbone", backbone, "--bootstrap", "0", *common, *subset])
    ft = json.loads((run / "metrics.json").read_text())
    rows[f"featcache full fine-tuning, {epochs} epochs"] = {
        "seconds": t_ft, "peak_memory_mb": m_ft, "test_auroc": ft["test"]["auroc"],
        "images_per_second": json.loads((run / "run.json").read_text())["images_per_second"]}
    out, t_naive, _ = measured([sys.executable, str(BASELINES), "naive", str(data), "--batch-size", str(batch_size),
                                *subset])
    naive = json.loads(out.strip().splitlines()[-1])
    base = rows["featcache extract + head sweep"]["seconds"]
    for row in rows.values():
        row["time_vs_featcache"] = row["seconds"] / base
    return {"rows": rows, "naive_extract_images_per_second": naive["images_per_second"],
            "featcache_extract_images_per_second": rows["featcache extract + head sweep"]["images_per_second"],
            "tutorial_vs_cache_time": t_tut / base}


def _attr(cache: Path, name: str) -> str:
    import h5py

    with h5py.File(cache, "r") as f:
        return f.attrs[name]


def render(facts: dict) -> list:
    from rich.table import Table

    out = [f"{facts['backbone']} on {facts['images']:,} images of {facts['data']} ({facts['device']}, "
           f"{facts['threads']} threads, decode {facts['decode']})"]
    stages = Table(title="stages", title_justify="left")
    stages.add_column("stage")
    stages.add_column("figure", justify="right")
    if "decode_images_per_s" in facts:
        stages.add_row("decode only", f"{facts['decode_images_per_s']:,.1f} images/s")
    if "forward_images_per_s" in facts:
        stages.add_row("forward only (preloaded tensors)", f"{facts['forward_images_per_s']:,.1f} images/s")
    if "extract" in facts:
        e = facts["extract"]
        stages.add_row("extract (decode + forward + cache)", f"{e['images_per_second']:,.1f} images/s")
        if "extract_fraction_of_forward" in facts:
            stages.add_row("extract / forward-only", f"{facts['extract_fraction_of_forward']:.2f}")
        total = sum(e["stages"].values()) or 1.0
        for name, seconds in e["stages"].items():
            stages.add_row(f"  extract time: {name.replace('_', ' ')}", f"{seconds:.2f} s ({100 * seconds / total:.0f}%)")
    if "fit_head" in facts:
        f = facts["fit_head"]
        stages.add_row(f"fit-head sweep ({f['heads']} heads)", f"{f['seconds']:.2f} s")
    if "finetune_step" in facts:
        t = facts["finetune_step"]
        stages.add_row(f"training step, full ({t['amp']})", f"{t['full']:,.1f} images/s")
        stages.add_row("training step, frozen backbone", f"{t['frozen']:,.1f} images/s")
    out.append(stages)
    if "compare" in facts:
        c = facts["compare"]
        table = Table(title=f"the same images three ways ({facts['epochs']} epochs for the trained ones)",
                      title_justify="left")
        for col in ("approach", "wall s", "vs featcache", "images/s", "peak MB", "test AUROC"):
            table.add_column(col, justify="left" if col == "approach" else "right")
        for name, r in c["rows"].items():
            table.add_row(name, f"{r['seconds']:.1f}", f"{r['time_vs_featcache']:.2f}x", f"{r['images_per_second']:.1f}",
                          f"{r['peak_memory_mb']:.0f}", "-" if r["test_auroc"] is None else f"{r['test_auroc']:.3f}")
        out.append(table)
        out.append(f"tutorial time / featcache time: [bold]{c['tutorial_vs_cache_time']:.2f}x[/]; featcache extract "
                   f"{c['featcache_extract_images_per_second']:.1f} images/s vs a naive ImageFolder + PIL + "
                   f"DataLoader loop {c['naive_extract_images_per_second']:.1f} images/s "
                   f"({c['featcache_extract_images_per_second'] / c['naive_extract_images_per_second']:.2f}x)")
    return out
