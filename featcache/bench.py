"""featcache bench: stage speeds and the headline comparison, measured in one run.

Stages: ``decode`` (images/s of the decode backend alone), ``forward``
(the backbone on preloaded tensors: the ceiling), ``extract`` (the whole
pipeline, with where its time goes), ``fit-head`` (the 64-head sweep on the
cache), ``finetune-step`` (training images/s, full and frozen).

``compare`` runs three ways to the same answer on the same images (the same
manifest, ``--max-images`` subset and starting weights), each as a fresh
command timed whole, startup included (so each wall time and peak memory is
its own), and puts them side by side: featcache extract + head sweep; the
classic PyTorch tutorial's "ConvNet as fixed feature extractor", as written
there, for E epochs (:mod:`featcache.baselines`; E defaults to the
tutorial's 25); and featcache full fine-tuning for E epochs. Each gives test
AUROC with its patient-bootstrap CI. It also times the usual naive
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


from featcache.errors import UserError
from featcache.eval.rundir import RunRecord
from featcache.runtime.device import cpu_cores, place, synchronizer

STAGES = ("decode", "forward", "extract", "fit-head", "finetune-step", "compare")

def measured(cmd: list[str]) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS MB) of ``cmd`` run in a fresh process."""
    result = subprocess.run([sys.executable, "-m", "featcache.runtime.peak", *cmd], capture_output=True, text=True)
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
    model, layout = place(backbone.model.for_inference(), device)  # the network and layout extract runs
    batches = [images[i : i + batch_size].contiguous(memory_format=layout)
               for i in range(0, len(images), batch_size)]
    sync = synchronizer(device)
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


def resolve_weights(backbone: str, weights: str, seed: int = 0) -> tuple[str, str]:
    """``auto``: ImageNet when featcache's create_backbone can get it, else its seeded random init;
    every side of ``compare`` then starts from these. Returns (weights, why, in words)."""
    if weights not in ("auto", "imagenet", "none"):
        raise UserError(f"bench --weights takes auto, imagenet or none, got {weights!r}")
    if weights != "auto":
        return weights, "asked for"
    from featcache.backbones.registry import auto_weights

    ref, why = auto_weights(backbone, seed)
    if why is None:
        return ref.cli_value, "ImageNet weights available"
    return ref.cli_value, f"ImageNet weights unavailable, seeded random init instead ({why.split('. ')[0]})"


def run_bench(data: str, *, backbone: str = "resnet18", max_images: int | None = 600, epochs: int = 25,
              batch_size: int = 32, stages=STAGES, seed: int = 0, keep: str | None = None,
              subsample_all: bool = False, weights: str = "auto", n_resamples: int = 1000, amp: str = "auto") -> dict:
    """Measure ``stages`` on ``data``, ``--max-images`` train images (every split with ``subsample_all``);
    returns every figure."""
    import torch

    from featcache.backbones.registry import create_backbone, file_word
    from featcache.decode import resolve_backend
    from featcache.extract import extract
    from featcache.runtime.amp import resolve_amp
    from featcache.runtime.device import resolve_device
    from featcache.data.manifest import scan

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown bench stage {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    resolve_amp(amp, resolve_device("auto"))  # a wrong --amp stops here, not after minutes of earlier stages
    manifest = scan(data, split_seed=0).limit(max_images, seed, subsample_all=subsample_all)
    device = resolve_device("auto")
    decode = resolve_backend("auto", device)
    bb = create_backbone(backbone, "none", seed=seed)
    facts = {"data": manifest.root, "images": len(manifest), "backbone": backbone, "device": device,
             "decode": decode.mode, "threads": torch.get_num_threads(), "epochs": epochs,
             "max_images": max_images, "subsample_all": subsample_all,
             "subsampled": [] if not max_images else (manifest.split_names if subsample_all else ["train"]),
             "n": {s: int(len(manifest.indices(s))) for s in manifest.split_names}}
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if "decode" in stages and decode.name != "dali":
            facts["decode_images_per_s"] = decode_only(manifest, bb.spec, decode.name, workers=cpu_cores())
        if "forward" in stages or "extract" in stages:
            facts["forward_images_per_s"] = forward_only(bb, manifest, n_images=min(256, len(manifest)),
                                                         batch_size=batch_size, device=device)
        cache = work / f"{file_word(backbone)}.h5"
        if "extract" in stages or "fit-head" in stages:
            summary = extract(data, cache, backbone=backbone, weights="none", batch_size=batch_size, seed=seed,
                              max_images=max_images, subsample_all=subsample_all, overwrite=True,
                              progress=sys.stdout.isatty())
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
            weights, why = resolve_weights(backbone, weights, seed)
            facts["weights"] = {"weights": weights, "why": why}
            facts["compare"] = _compare(data, work, backbone=backbone, max_images=max_images,
                                        subsample_all=subsample_all, epochs=epochs, batch_size=batch_size,
                                        seed=seed, weights=weights, n_resamples=n_resamples, amp=amp)
    finally:
        if not keep:  # caches and runs of a benchmark are scratch unless asked for
            shutil.rmtree(work, ignore_errors=True)
    return facts


def train_step_images_per_s(backbone: str, *, frozen: bool, amp_dtype, device: str, batch_size: int,
                            steps: int) -> float:
    """Training images/s of finetune's step (finetune's memory layout, autocast, GradScaler for fp16, AdamW,
    cross-entropy) on one preloaded uint8 batch of random-init ``backbone``, after one warm-up step."""
    import torch

    from featcache.backbones.registry import create_backbone
    from featcache.finetune import classifier_class, train_step

    bb = create_backbone(backbone, "none")
    model = classifier_class()(bb.model.requires_grad_(not frozen), bb.feature_dim, 2, frozen)
    model, layout = place(model, device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp_dtype == torch.float16)
    images = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=layout)
    labels = torch.randint(0, 2, (batch_size,), device=device)

    criterion = torch.nn.CrossEntropyLoss()

    def step():
        train_step(model, images, labels, optimizer, scaler, criterion, device_type=device.split(":")[0],
                   amp_dtype=amp_dtype)

    sync = synchronizer(device)
    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch_size / (time.perf_counter() - start)


def _train_steps(backbone: str, device: str, batch_size: int) -> dict:
    from featcache.runtime.amp import resolve_amp

    amp_dtype, _, words = resolve_amp("auto", device)
    out = {("frozen" if frozen else "full"): train_step_images_per_s(backbone, frozen=frozen, amp_dtype=amp_dtype,
                                                                     device=device, batch_size=batch_size, steps=3)
           for frozen in (False, True)}
    out["amp"] = words
    return out


def forward_work(n: dict, epochs: int) -> dict:
    """Images forwarded through the backbone: the tutorial runs train and val every epoch and test once,
    featcache every image once. At equal speed per image and no startup the time ratio would be this work
    ratio; a time ratio above it needs faster per-image work, not fewer passes."""
    tutorial = epochs * (n.get("train", 0) + n.get("val", 0)) + n.get("test", 0)
    featcache = sum(n.values())
    return {"tutorial_image_forwards": tutorial, "featcache_image_forwards": featcache,
            "ratio": tutorial / max(featcache, 1)}


def _compare(data, work: Path, *, backbone, max_images, subsample_all, epochs, batch_size, seed, weights,
             n_resamples, amp="auto") -> dict:
    """featcache extract + sweep, the tutorial, featcache fine-tuning and the naive extraction loop on the
    same images and weights, each a fresh command timed whole (startup included), with its peak RSS.

    The tutorial runs in fp32, as written. featcache's extract + sweep runs in fp32 too, and once more
    under ``amp`` when that resolves to a reduced precision on this machine (its own row and ratio, beside
    the fp32 one, so the cache's gain and the precision's gain can be told apart); fine-tuning runs under
    ``amp``, its default."""
    from featcache.runtime.amp import resolve_amp
    from featcache.runtime.device import resolve_device

    featcache = [sys.executable, "-m", "featcache"]
    amp_dtype, _, words = resolve_amp(amp, resolve_device("auto"))
    ft_words = words.removeprefix("auto: ").removesuffix(" (supported here)")
    subset = ["--max-images", str(max_images), *(["--subsample-all"] if subsample_all else [])] if max_images else []
    same = ["--backbone", backbone, "--weights", weights, "--seed", str(seed)]
    ci = ["--bootstrap", str(n_resamples)]

    rows = {}
    for precision in ("off", *([amp] if amp_dtype is not None else [])):
        name = FEATCACHE_ROW if precision == "off" else FEATCACHE_AMP_ROW
        rows[name] = _featcache_row(data, work / f"compare-{precision}", [*same, "--amp", precision],
                                    batch_size=batch_size, seed=seed, subset=subset, ci=ci)
        rows[name]["precision"] = "fp32" if precision == "off" else ft_words
    out, t_tut, m_tut = measured([sys.executable, "-m", "featcache.baselines", "tutorial", str(data),
                                  "--epochs", str(epochs),
                                  *same, *ci, *subset])
    tut = json.loads(out.strip().splitlines()[-1])
    rows[f"PyTorch tutorial, {epochs} epochs"] = {
        "seconds": t_tut, "peak_memory_mb": m_tut, "images_per_second": tut["images_per_second"],
        "test_auroc": tut["test_auroc"], "test_auroc_ci": tut["test_auroc_ci"], "n": tut["n"],
        "settings": {k: tut[k] for k in ("batch_size", "lr", "momentum", "step_size", "gamma", "epochs", "workers",
                                         "device", "weights", "best_epoch", "best_val_accuracy", "train_seconds")}}
    run = work / "compare-finetune"
    _, t_ft, m_ft = measured([*featcache, "finetune", str(data), "--out", str(run), "--overwrite", "--epochs",
                              str(epochs), *same, "--amp", amp, "--batch-size", str(batch_size), "--no-progress", *ci, *subset])
    ft = RunRecord(run).metrics
    rows[f"featcache full finetune, {epochs} epochs ({ft_words})"] = {
        "seconds": t_ft, "peak_memory_mb": m_ft,
        "images_per_second": RunRecord(run).run["images_per_second"],
        "test_auroc": ft["test"]["auroc"], "test_auroc_ci": ft["test"].get("ci", {}).get("auroc"), "n": _n_of(ft)}
    out, t_naive, _ = measured([sys.executable, "-m", "featcache.baselines", "naive", str(data), *same,
                                "--batch-size", str(batch_size), *subset])
    naive = json.loads(out.strip().splitlines()[-1])
    featcache_row = rows[FEATCACHE_ROW]
    base = featcache_row["seconds"]
    for row in rows.values():
        row["time_vs_featcache"] = row["seconds"] / base
    return {"rows": rows, "weights": weights, "bootstrap": n_resamples, "work": forward_work(tut["n"], epochs),
            "naive_extract_images_per_second": naive["images_per_second"],
            "naive": {k: naive[k] for k in ("device", "workers", "batch_size", "grad", "seconds")},
            "featcache_extract_images_per_second": featcache_row["images_per_second"],
            "tutorial_vs_cache_time": t_tut / base, "finetune_vs_cache_time": t_ft / base,
            "amp": ft_words, **({"tutorial_vs_cache_time_amp": t_tut / rows[FEATCACHE_AMP_ROW]["seconds"],
                              "auroc_featcache_amp_minus_tutorial": _gap(rows[FEATCACHE_AMP_ROW], tut)}
                             if FEATCACHE_AMP_ROW in rows else {}),
            "auroc_featcache_minus_tutorial": _gap(featcache_row, tut)}


def _gap(row: dict, tutorial: dict) -> float | None:
    """featcache's test AUROC minus the tutorial's (None when either has none)."""
    if row["test_auroc"] is None or tutorial["test_auroc"] is None:
        return None
    return row["test_auroc"] - tutorial["test_auroc"]


def _featcache_row(data, work: Path, same: list, *, batch_size, seed, subset, ci) -> dict:
    """featcache's Task C path as two fresh commands: extract, then fit-head's sweep with its CIs."""
    featcache = [sys.executable, "-m", "featcache"]
    cache = work.with_suffix(".h5")
    _, t_extract, m_extract = measured([*featcache, "extract", str(data), "--out", str(cache), "--overwrite",
                                        *same, "--batch-size", str(batch_size), "--no-progress", *subset])
    _, t_fit, m_fit = measured([*featcache, "fit-head", str(cache), "--out", str(work),
                                "--heads", "sweep", "--seed", str(seed), *ci])
    sweep = RunRecord(work).metrics
    extracted = json.loads(_attr(cache, "extract"))
    return {"seconds": t_extract + t_fit, "peak_memory_mb": max(m_extract, m_fit),
            "images_per_second": extracted["images_per_second"],
            "test_auroc": sweep["test"]["auroc"], "test_auroc_ci": sweep["test"].get("ci", {}).get("auroc"),
            "n": _n_of(sweep),
            # where featcache's wall time goes: the rest of each command is startup, imports, scan, bootstrap
            "breakdown": {"extract_command_s": t_extract, "extract_in_process_s": extracted["seconds"],
                          "fit_head_command_s": t_fit, "sweep_fit_s": sweep["fit_seconds"]}}


def _n_of(metrics: dict) -> dict:
    return {"train": metrics.get("n_train"), **{s: metrics[s]["n"] for s in ("val", "test") if s in metrics}}


FEATCACHE_ROW = "featcache extract + head sweep"
FEATCACHE_AMP_ROW = "featcache extract + head sweep, --amp"


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
    if stages.row_count:  # --stages compare alone has none
        out.append(stages)
    if "compare" in facts:
        c = facts["compare"]
        n = facts.get("n", {})
        if facts.get("subsampled"):
            whole = [s for s in n if s not in facts["subsampled"]]
            out.append(f"--max-images {facts['max_images']}: stratified subset of {', '.join(facts['subsampled'])}"
                       + (f"; {', '.join(whole)} whole" if whole else " (--subsample-all)") + " - "
                       + ", ".join(f"{s} {k}" for s, k in n.items()))
        else:
            out.append("every image of every split - " + ", ".join(f"{s} {k}" for s, k in n.items()))
        if "weights" in facts:
            out.append(f"every side starts from weights {facts['weights']['weights']} "
                       f"({facts['weights']['why']}); test AUROC CIs: patient bootstrap, {c['bootstrap']} resamples")
        from rich import box

        table = Table(title=f"the same images, each way ({facts['epochs']} epochs for the trained ones; "
                            f"each a fresh command, wall time including startup; time ratio: / featcache's)",
                      title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("approach", "wall s", "time ratio", "images/s", "peak MB", "test AUROC (95% CI)"):
            table.add_column(col, justify="left" if col == "approach" else "right", no_wrap=col != "approach")
        for name, r in c["rows"].items():
            lo_hi = r.get("test_auroc_ci")
            auroc = "-" if r["test_auroc"] is None else f"{r['test_auroc']:.3f}"
            table.add_row(name + (f" ({r['precision']})" if "precision" in r else ""), f"{r['seconds']:.1f}", f"{r['time_vs_featcache']:.2f}x", f"{r['images_per_second']:.1f}",
                          f"{r['peak_memory_mb']:.0f}", auroc + (f" ({lo_hi[0]:.3f}-{lo_hi[1]:.3f})" if lo_hi else ""))
        out.append(table)
        gap = c.get("auroc_featcache_minus_tutorial")
        out.append(f"tutorial time / featcache time: [bold]{c['tutorial_vs_cache_time']:.2f}x[/]; fine-tuning time / "
                   f"featcache time: [bold]{c['finetune_vs_cache_time']:.2f}x[/]"
                   + ("" if gap is None else f"; featcache test AUROC - tutorial's: {gap:+.3f}"))
        if "tutorial_vs_cache_time_amp" in c:
            gap = c["auroc_featcache_amp_minus_tutorial"]
            out.append(f"under {c['amp']}: tutorial time / featcache time: [bold]{c['tutorial_vs_cache_time_amp']:.2f}x[/]"
                       + ("" if gap is None else f"; featcache test AUROC - tutorial's: {gap:+.3f}")
                       + " (the tutorial runs in fp32, as written)")
        w = c.get("work")
        if w:
            out.append(f"work: the tutorial forwards {w['tutorial_image_forwards']:,} images (train + val every "
                       f"epoch, test once), featcache {w['featcache_image_forwards']:,} (every image once): "
                       f"{w['ratio']:.1f}x, the time ratio at equal speed per image and no startup")
        b = c["rows"][FEATCACHE_ROW].get("breakdown")
        if b:
            out.append(f"featcache's wall time: extract command {b['extract_command_s']:.1f} s (decode + forward + "
                       f"cache {b['extract_in_process_s']:.1f} s), fit-head command {b['fit_head_command_s']:.1f} s "
                       f"(sweep fit {b['sweep_fit_s']:.2f} s); the rest: process startup, imports, scan, bootstrap")
        out.append(f"featcache extract {c['featcache_extract_images_per_second']:.1f} images/s vs a naive ImageFolder + "
                   f"PIL + DataLoader loop {c['naive_extract_images_per_second']:.1f} images/s "
                   f"({c['featcache_extract_images_per_second'] / c['naive_extract_images_per_second']:.2f}x; "
                   f"{c['naive']['workers']} workers, batch {c['naive']['batch_size']}, {c['naive']['device']}, "
                   f"inference_mode)")
    return out
