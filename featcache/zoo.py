"""``featcache zoo``: which encoder is best for *this* data, with confidence intervals and cost.

Every backbone is extracted once into ``OUT/caches/NAME-WEIGHTS.h5``
(resumable; a complete cache with the same fingerprint is reused; WEIGHTS is
imagenet, none or the weights file's stem, so other weights make other
caches), the head sweep is fitted on each into ``OUT/runs/NAME-WEIGHTS``, and a leaderboard ranks them **by validation AUROC**,
never by test. Beside each backbone's test AUROC (patient-bootstrap 95 % CI)
stands the paired patient-bootstrap CI of its test-AUROC difference to the
backbone ranked first on validation: whether a gap on test is more than
noise. Written as ``leaderboard.json``, ``leaderboard.csv`` and
``leaderboard.png`` (test AUROC with CI against extraction cost).

A multi-label set is fitted under ``--uncertain``/``--unmentioned``; its
backbones are ranked by mean validation AUROC over labels, and the test
AUROC beside each, its CI and the paired difference to the first are the
mean over labels (macro).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from featcache.data.labels import MULTILABEL
from featcache.errors import UserError
from featcache.options import EXTRACT, HEAD

COLUMNS = ("rank", "backbone", "family", "feature_dim", "params_m", "gmacs", "extract_images_per_second",
           "cache_mb", "val_auroc", "test_auroc", "test_auroc_ci", "sensitivity", "specificity",
           "difference_to_first", "difference_to_first_ci")


def rank(rows: list[dict]) -> list[dict]:
    """Rows ordered by validation AUROC (highest first; ties by name), ranks attached. Test plays no part."""
    ordered = sorted(rows, key=lambda r: (-r["val_auroc"], r["backbone"]))
    for i, r in enumerate(ordered, 1):
        r["rank"] = i
    return ordered


def leaderboard(runs: dict[str, Path], *, n_resamples: int = HEAD.n_resamples, seed: int = 0,
                costs: dict[str, dict] | None = None) -> list[dict]:
    """One row per backbone from its run folder (``runs``: backbone name -> fit-head run), ranked on
    validation, with the paired test-AUROC difference to the first."""
    from featcache.cache.h5 import FeatureCache
    from featcache.eval.rundir import RunRecord
    from featcache.report import analysis

    rows, predictions = [], {}
    for name, folder in runs.items():
        record = RunRecord(folder)
        metrics = record.metrics
        if metrics is None:
            raise UserError(f"{folder} holds no finished fit-head run")
        test = metrics.get("test") or {}
        cache = record.cache
        extract_facts, size_mb, dim = {}, None, metrics.get("feature_dim")
        if cache is not None and Path(cache).is_file():
            c = FeatureCache.open(cache)
            extract_facts = c.attrs.get("extract") or {}
            extract_facts = json.loads(extract_facts) if isinstance(extract_facts, str) else extract_facts
            dim = c.attrs.get("feature_dim", dim)
            c.close()
            size_mb = os.path.getsize(cache) / 2**20
        rows.append({
            "backbone": name, "family": name.split(":", 1)[0] if ":" in name else "tv",
            "feature_dim": None if dim is None else int(dim),
            **(costs or {}).get(name, {"params_m": None, "gmacs": None}),
            "extract_images_per_second": extract_facts.get("images_per_second"), "cache_mb": size_mb,
            "val_auroc": metrics["val"]["auroc"], "test_auroc": test.get("auroc"),
            "test_auroc_ci": test.get("ci", {}).get("auroc"),
            "sensitivity": test.get("sensitivity"), "specificity": test.get("specificity"),
            "threshold": metrics.get("threshold"), "classes": metrics["classes"],
            "positive_class": metrics.get("positive_class"), "run": str(folder)})
        if metrics.get("task") == MULTILABEL:
            rows[-1].update(task=MULTILABEL, policy=metrics["policy"])
        predictions[name] = analysis.read_predictions(record.predictions_path) if record.predictions_path else None
    ordered = rank(rows)
    first = ordered[0]
    for r in ordered:
        r["difference_to_first"], r["difference_to_first_ci"] = None, None
        if r is first or predictions[r["backbone"]] is None or predictions[first["backbone"]] is None:
            continue
        a, b = predictions[r["backbone"]], predictions[first["backbone"]]
        if r.get("task") == MULTILABEL:
            paired = analysis.paired_mean_auroc(a, b, r["classes"], n_resamples=n_resamples, seed=seed)
        else:
            paired = analysis.paired_comparison(a, b, r["classes"], threshold_a=r["threshold"],
                                                threshold_b=first["threshold"], n_resamples=n_resamples, seed=seed,
                                                positive_class=r["positive_class"])
        if paired:
            r["difference_to_first"], r["difference_to_first_ci"] = paired["auroc_difference"], \
                paired["auroc_difference_ci"]
    return ordered


def zoo(data, out, *, backbones: list[str], weights: str = EXTRACT.weights, heads: str = "sweep",
        seed: int = 0, max_images: int | None = None, subsample_all: bool = False,
        batch_size: int = EXTRACT.batch_size, backend: str = EXTRACT.backend, device: str = EXTRACT.device,
        workers: int | None = None, n_resamples: int = HEAD.n_resamples, positive_class: str | None = None,
        uncertain: str = HEAD.uncertain, unmentioned: str = HEAD.unmentioned, scan_options: dict | None = None,
        progress: bool = True, overwrite: bool = False) -> list[dict]:
    """Extract and fit every backbone, then rank them on validation; returns the leaderboard rows.

    ``uncertain`` and ``unmentioned`` make a multi-label set's targets, for every backbone alike."""
    from featcache.backbones.costs import counted_facts
    from featcache.backbones.registry import file_word, get_entry
    from featcache.backbones.weights import WeightsRef
    from featcache.data.labels import check_policy, check_task_flags
    from featcache.data.sources import read_manifest
    from featcache.extract import extract
    from featcache.fit import fit_head
    from featcache.heads import HEADS
    from featcache.runtime.console import get_console

    if not backbones:
        raise UserError("--backbones names none; give at least one")
    if heads not in HEADS:
        raise UserError(f"--heads takes {', '.join(HEADS)}, got {heads!r}")
    names = list(dict.fromkeys(get_entry(b).name for b in backbones))  # every name checked before any work
    check_policy(uncertain, unmentioned)
    manifest = read_manifest(data, **(scan_options or {}))  # read once for every backbone
    # Flags that do not fit the set's task stop here, not after hours of extraction.
    check_task_flags(manifest.task == MULTILABEL, positive_class, uncertain, unmentioned)
    console = get_console()
    out = Path(out)
    # Other weights (or another random init), other caches and runs: a rerun with them never meets a mismatch.
    ref = WeightsRef.parse(weights)
    tag = ref.file_tag + (f"-seed{seed}" if ref.is_random and seed else "")
    runs, costs = {}, {}
    for i, name in enumerate(names, 1):
        console.rule(f"[bold]{i}/{len(names)}: {name}")
        cache = out / "caches" / f"{file_word(name)}-{tag}.h5"
        extract(data, cache, backbone=name, weights=weights, seed=seed, max_images=max_images,
                subsample_all=subsample_all, batch_size=batch_size, backend=backend, device=device, workers=workers,
                manifest=manifest, progress=progress, overwrite=overwrite)
        runs[name] = out / "runs" / f"{file_word(name)}-{tag}"
        fit_head(cache, runs[name], heads=heads, seed=seed, n_resamples=n_resamples, device=device,
                 positive_class=positive_class, uncertain=uncertain, unmentioned=unmentioned)
        facts = counted_facts(name)
        costs[name] = {"params_m": facts["params_m"], "gmacs": facts["gflops"]}
    rows = leaderboard(runs, n_resamples=n_resamples, seed=seed, costs=costs)
    write(rows, out)
    return rows


def write(rows: list[dict], out: Path) -> None:
    """leaderboard.json (every field), leaderboard.csv (the columns) and leaderboard.png."""
    from featcache.report.plots import plot_leaderboard

    out.mkdir(parents=True, exist_ok=True)
    board = {"ranked_by": "val_auroc", "rows": rows}
    if multilabel_board(rows):
        board.update(task=MULTILABEL, policy=rows[0]["policy"])
    (out / "leaderboard.json").write_text(json.dumps(board, indent=2) + "\n")
    with open(out / "leaderboard.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([";".join(f"{v:.4f}" for v in r[c]) if isinstance(r[c], list) else
                             (f"{r[c]:.4f}" if isinstance(r[c], float) else r[c]) for c in COLUMNS])
    plot_leaderboard(rows, out / "leaderboard.png")


def multilabel_board(rows: list[dict]) -> bool:
    """Whether leaderboard ``rows`` rank a multi-label set: their val and test AUROCs are means over labels."""
    return bool(rows) and rows[0].get("task") == MULTILABEL


def table(rows: list[dict]):
    """The leaderboard as a rich table."""
    from rich import box
    from rich.table import Table

    mean = "mean " if multilabel_board(rows) else ""  # over labels
    t = Table(title=f"backbones ranked by {mean}validation AUROC (test reported, never used to rank)",
              box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("#", "backbone", "dim", "params M", "GMACs", "extract img/s", "cache MB", f"val {mean}AUROC",
                f"test {mean}AUROC (95% CI)", "sens.", "spec.", "test diff. to #1 (95% CI)"):
        t.add_column(col, justify="left" if col == "backbone" else "right")

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        ci = r["test_auroc_ci"]
        dci = r["difference_to_first_ci"]
        t.add_row(str(r["rank"]), r["backbone"], num(r["feature_dim"], "d"), num(r["params_m"], ".1f"),
                  num(r["gmacs"], ".2f"), num(r["extract_images_per_second"], ".1f"), num(r["cache_mb"], ".1f"),
                  num(r["val_auroc"], ".3f"),
                  num(r["test_auroc"], ".3f") + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""),
                  num(r["sensitivity"], ".3f"), num(r["specificity"], ".3f"),
                  "-" if r["difference_to_first"] is None else
                  f"{r['difference_to_first']:+.3f}" + (f" ({dci[0]:+.3f} to {dci[1]:+.3f})" if dci else ""))
    return t
