"""Terminal tables (rich) for scan results and metrics."""

from __future__ import annotations

from rich.table import Table

METRIC_ROWS = (
    ("n", "images", "{:d}"),
    ("auroc", "AUROC", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("balanced_accuracy", "balanced accuracy", "{:.3f}"),
    ("sensitivity", "sensitivity (recall)", "{:.3f}"),
    ("specificity", "specificity", "{:.3f}"),
    ("precision", "precision (PPV)", "{:.3f}"),
    ("f1", "F1", "{:.3f}"),
    ("brier", "Brier score", "{:.3f}"),
    ("ece", "calibration error (ECE)", "{:.3f}"),
)


def _with_ci(metrics: dict, key: str, fmt: str, ci_fmt: str = "{:.3f}") -> str:
    value = metrics.get(key)
    if value is None:
        return "-"
    text = fmt.format(value)
    ci = metrics.get("ci", {}).get(key)
    return f"{text} [dim][{ci_fmt.format(ci[0])}, {ci_fmt.format(ci[1])}][/]" if ci else text


def manifest_tables(manifest) -> list[Table]:
    table = (_multilabel_table(manifest) if manifest.multilabel else _class_table(manifest))
    tables = [table]
    by_reason = manifest.skipped_by_reason()
    if by_reason:
        skipped = Table(title="skipped while scanning", title_justify="left")
        skipped.add_column("reason")
        skipped.add_column("files", justify="right")
        skipped.add_column("e.g.")
        for reason, n in sorted(by_reason.items()):
            example = next(p for p, r in manifest.skipped if r == reason)
            skipped.add_row(reason, str(n), example)
        tables.append(skipped)
    return tables


def _multilabel_table(manifest) -> Table:
    """Per label and split: positive images, and in brackets the uncertain and unmentioned ones."""
    from featcache.data.labels import tally

    counts = tally(manifest.labels, manifest.splits, manifest.classes)
    patients = manifest.patient_counts()
    splits = manifest.split_names
    table = Table(title=f"{manifest.root}  ({manifest.layout} layout, {len(manifest.classes)} labels)",
                  title_justify="left", caption="[dim]positive (uncertain, not mentioned)[/]")
    table.add_column("label")
    for split in splits:
        table.add_column(split, justify="right")
    for name in manifest.classes:
        table.add_row(name, *(f"{c['positive']:,} ({c['uncertain']:,}, {c['not mentioned']:,})"
                              for c in (counts[s][name] for s in splits)))
    images = [int(len(manifest.indices(s))) for s in splits]
    table.add_row("images", *(f"{n:,}" for n in images), style="bold")
    table.add_row("patients", *(f"{patients[s]:,}" for s in splits), style="dim")
    return table


def _class_table(manifest) -> Table:
    counts = manifest.counts()
    patients = manifest.patient_counts()
    table = Table(title=f"{manifest.root}  ({manifest.layout} layout)", title_justify="left")
    table.add_column("split")
    for cls in manifest.classes:
        table.add_column(cls, justify="right")
    table.add_column("total", justify="right", style="bold")
    table.add_column("patients", justify="right")
    for split, row in counts.items():
        table.add_row(split, *(f"{v:,}" for v in row), f"{sum(row):,}", f"{patients[split]:,}")
    totals = [sum(col) for col in zip(*counts.values())]
    table.add_row("total", *(f"{v:,}" for v in totals), f"{sum(totals):,}", f"{sum(patients.values()):,}",
                  style="dim")
    return table


def describe_validation(manifest) -> str:
    v = manifest.validation
    if v.get("source") == "carved from train":
        folded = f", after folding the {v['folded_val_images']}-image val/ folder into train" if v.get(
            "folded_val_images") else ""
        share = "of every label's positives, iterative stratification" if v.get("stratified") else "per class"
        return (f"validation: {v['images']:,} images carved from train by patient "
                f"({v['fraction']:.0%} {share}, split seed {v['seed']}{folded}); no patient is on both sides")
    if v.get("source") == "folder":
        return f"validation: the val/ folder ({v['images']:,} images)"
    if v.get("source") not in (None, "none"):
        return f"validation: the {v['source']} ({v['images']:,} images)"
    return "validation: none (no train split to carve it from)"


def patient_note(manifest) -> str:
    parts = [f"{n:,} from {source}" for source, n in sorted(manifest.patient_sources.items())]
    return "patient ids: " + ", ".join(parts)


def print_manifest(manifest, console) -> None:
    """Everything ``featcache scan`` shows about a manifest."""
    for table in manifest_tables(manifest):
        console.print(table)
    console.print(patient_note(manifest))
    if manifest.label_rules:
        rules = ", ".join(f"'{p}' -> {c}" for p, c in manifest.label_rules)
        console.print(f"labels from file names ({rules}; otherwise the folder)")
    console.print(describe_validation(manifest))


def metrics_table(metrics: dict) -> Table:
    splits = [s for s in ("val", "test") if s in metrics]
    has_ci = any("ci" in metrics[s] for s in splits)
    table = Table(caption="[dim]95% CI by patient bootstrap in brackets[/]" if has_ci else None)
    table.add_column("metric")
    for split in splits:
        table.add_column(split, justify="right")
    for key, label, fmt in METRIC_ROWS:
        table.add_row(label, *(_with_ci(metrics[s], key, fmt) for s in splits))
    return table


def per_class_table(metrics: dict, split: str) -> Table:
    table = Table(title=f"{split}, per class", title_justify="left")
    for col in ("class", "n", "AUROC", "sensitivity", "specificity", "precision", "F1"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, m in metrics[split]["per_class"].items():
        table.add_row(name, str(m["n"]), *("-" if m[k] is None else f"{m[k]:.3f}"
                                          for k in ("auroc", "sensitivity", "specificity", "precision", "f1")))
    return table


def comparison_table(rows: list[dict]) -> Table:
    """One row per fitted cache (see :func:`featcache.fit.comparison_row`)."""
    table = Table(title="fit-head comparison (selection on val; test touched once)", title_justify="left")
    for col in ("run", "backbone", "head", "val AUROC", "test AUROC [95% CI]", "sensitivity", "specificity",
                "fit s"):
        table.add_column(col, justify="left" if col in ("run", "backbone", "head") else "right")
    for r in rows:
        ci = r["test_auroc_ci"]
        test = "-" if r["test_auroc"] is None else f"{r['test_auroc']:.3f}" + (
            f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        table.add_row(r["run"], r["backbone"], f"{r['head']} (of {r['n_heads']})", f"{r['val_auroc']:.3f}", test,
                      *("-" if r[k] is None else f"{r[k]:.3f}" for k in ("test_sensitivity", "test_specificity")),
                      f"{r['fit_seconds']:.2f}")
    return table


def confusion_table(matrix, classes, split: str) -> Table:
    """Rows true, columns predicted."""
    table = Table(title=f"{split}: true \\ predicted", title_justify="left")
    table.add_column("")
    for cls in classes:
        table.add_column(cls, justify="right")
    for cls, row in zip(classes, matrix):
        table.add_row(cls, *(str(v) for v in row))
    return table


MULTILABEL_ROWS = (
    ("n", "images", "{:d}"),
    ("auroc", "AUROC, macro mean over labels", "{:.3f}"),
    ("micro_auroc", "AUROC, micro (labels pooled)", "{:.3f}"),
    ("competition_auroc", "AUROC, CheXpert competition five", "{:.3f}"),
    ("average_precision", "average precision, macro", "{:.3f}"),
    ("sensitivity", "sensitivity, macro", "{:.3f}"),
    ("specificity", "specificity, macro", "{:.3f}"),
    ("f1", "F1, macro", "{:.3f}"),
)


def per_label_table(metrics: dict, split: str) -> Table:
    """A multi-label split: each label's counts, threshold and metrics, with their CIs."""
    table = Table(title=f"{split}, per label (95% CI by patient bootstrap)", title_justify="left")
    for col in ("label", "n+", "n-", "threshold", "AUROC", "AP", "sensitivity", "specificity", "F1"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for name, m in metrics[split]["per_label"].items():
        table.add_row(name, str(m["n_positive"]), str(m["n_negative"]), f"{m['threshold']:.3f}",
                      *(_with_ci(m, k, "{:.3f}", "{:.2f}") for k in ("auroc", "average_precision", "sensitivity",
                                                                    "specificity", "f1")))
    return table


def multilabel_table(metrics: dict) -> Table:
    splits = [s for s in ("val", "test") if s in metrics]
    table = Table(caption="[dim]95% CI by patient bootstrap in brackets[/]")
    table.add_column("metric")
    for split in splits:
        table.add_column(split, justify="right")
    for key, label, fmt in MULTILABEL_ROWS:
        if any(key in metrics[s] for s in splits):
            table.add_row(label, *(_with_ci(metrics[s], key, fmt) for s in splits))
    return table


def metrics_renderables(metrics: dict) -> list:
    from rich.columns import Columns

    if metrics.get("task") == "multilabel":
        return [multilabel_table(metrics), per_label_table(metrics, "test" if "test" in metrics else "val")]

    splits = [s for s in ("val", "test") if s in metrics]
    confusions = [confusion_table(metrics[s]["confusion_matrix"], metrics["classes"], s) for s in splits]
    out = [metrics_table(metrics), Columns(confusions, padding=(0, 3))]
    if metrics["positive_class"] is None:
        out += [per_class_table(metrics, s) for s in splits]
    return out


def predictions_table(rows: list[dict]) -> Table:
    """``featcache predict``'s rows: image, class probabilities, the prediction and the rule that decided it."""
    from pathlib import Path

    table = Table()
    score_cols = [k for k in rows[0] if k.startswith("p_")] if rows else []
    for col in ("image", *(c[2:] for c in score_cols), "prediction", "decided by"):
        table.add_column(col, justify="left" if col in ("image", "prediction", "decided by") else "right")
    for r in rows:
        cells = [f"{r[c]:.3f}" if c in r else "-" for c in score_cols]
        if r["error"]:
            table.add_row(Path(r["path"]).name, *cells, f"[red]{r['error']}[/]", "")
            continue
        rule = ("argmax" if r["threshold_rule"] == "argmax" else
                f"p >= {float(r['threshold']):.3f} ({r['threshold_rule']})" if "threshold" in r else
                f"each label's threshold ({r['threshold_rule']})")
        table.add_row(Path(r["path"]).name, *cells, r["prediction"] or "none found", rule)
    return table
