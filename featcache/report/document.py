"""featcache report: runs in, a Markdown and a self-contained HTML report out.

The report is built as a list of blocks (headings, paragraphs, tables,
images) and written twice: Markdown with PNG files beside it, and one HTML
file with the same PNGs embedded, to mail or attach as it is.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
import re
from pathlib import Path

import numpy as np


from featcache import __version__
from featcache.backbones.weights import WeightsRef
from featcache.errors import UserError
from featcache.eval import rundir
from featcache.eval.metrics import positive_class_index

STRATEGY_ORDER = {"fit-head": 0, "finetune": 1}


def load_run(path: str | os.PathLike) -> dict:
    """One run folder as the report reads it: metrics.json, run.json (and history.json, predictions.csv
    when there), its kind and its cache (None when not found: the analyses that read it are skipped,
    saying so), from :class:`featcache.eval.rundir.RunRecord`."""
    record = rundir.load_run(path)
    metrics, run, kind = record.metrics, record.run, record.kind
    return {"name": record.name, "folder": record.folder, "record": record, "metrics": metrics, "run": run,
            "history": record.history, "cache": record.cache,
            "kind": kind, "backbone": metrics.get("backbone"),
            "strategy": run.get("strategy") or kind,
            "predictions": record.predictions_path}


LEADERBOARD = "leaderboard.json"
# The leaderboard fields the report formats as figures: each a number or null (intervals: two numbers or null).
ZOO_NUMBERS = ("rank", "test_auroc", "difference_to_first", "sensitivity", "specificity", "feature_dim", "params_m",
               "gmacs", "extract_images_per_second", "cache_mb")
ZOO_INTERVALS = ("test_auroc_ci", "difference_to_first_ci")


def is_zoo_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``featcache zoo`` output folder (it holds leaderboard.json)."""
    return (Path(path) / LEADERBOARD).is_file()


def load_zoo(path: str | os.PathLike) -> dict:
    """A zoo folder as the report reads it: the leaderboard's rows in rank order (by validation AUROC), and
    the weights and data of its runs (read from the first run folder found, beside the leaderboard first)."""
    folder = Path(path)
    try:
        board = json.loads((folder / LEADERBOARD).read_text())
        rows = board["rows"]
        usable = board.get("ranked_by") == "val_auroc" and bool(rows) and all(
            isinstance(r.get("backbone"), str) and isinstance(r.get("val_auroc"), (int, float)) for r in rows)
    except (ValueError, KeyError, TypeError, AttributeError):
        usable = False
    if not usable:
        raise UserError(f"{folder / LEADERBOARD} is not a featcache zoo leaderboard; rerun featcache zoo into "
                        f"{folder}")
    for i, r in enumerate(rows, 1):
        _check_zoo_row(folder / LEADERBOARD, i, r)
    rows = sorted(rows, key=lambda r: r.get("rank") or 0)
    if choose_backbone(rows)["chosen"] != rows[0]["backbone"]:  # its differences to #1 would be to another
        raise UserError(f"{folder / LEADERBOARD} is not ranked by validation AUROC; rerun featcache zoo")
    record = next((rundir.RunRecord(c) for r in rows if r.get("run")
                   for c in (folder / "runs" / Path(r["run"]).name, Path(r["run"]))
                   if (c / rundir.METRICS).is_file()), None)
    metrics, run = (record.metrics, record.run) if record else ({}, {})
    return {"folder": folder, "rows": rows, "weights": metrics.get("weights"), "data_root": run.get("data_root"),
            "n_train": metrics.get("n_train"), "n_val": (metrics.get("val") or {}).get("n"),
            "n_test": (metrics.get("test") or {}).get("n"), "head": (metrics.get("selected") or {}).get("head"),
            "n_heads": metrics.get("n_heads"), "plot": folder / "leaderboard.png"}


CURVE = "curve.json"


def is_curve_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``featcache curve`` output folder (it holds curve.json)."""
    return (Path(path) / CURVE).is_file()


def load_curve(path: str | os.PathLike) -> dict:
    """A curve folder as the report reads it: its settings, and per cache and point the summary over repeats,
    made again from the points (so a curve stopped part-way is read as far as it went)."""
    from featcache.curve import summarize

    folder = Path(path)
    try:
        record = json.loads((folder / CURVE).read_text())
        settings, summary = record["settings"], summarize(record["points"])
        usable = settings["mode"] in ("fraction", "shots") and bool(summary)
    except (ValueError, KeyError, TypeError, AttributeError):
        usable = False
    if not usable:
        raise UserError(f"{folder / CURVE} is not a featcache curve output with points; rerun featcache curve into "
                        f"{folder}")
    return {"folder": folder, "settings": settings, "summary": summary}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_zoo_row(path: Path, i: int, row: dict) -> None:
    """Refuse a hand-edited field the report would format as a figure (``"0.66"``, a string, for 0.66)."""
    for key in ZOO_NUMBERS + ZOO_INTERVALS:
        value = row.get(key)
        ok = value is None or (_is_number(value) if key in ZOO_NUMBERS else
                               isinstance(value, list) and len(value) == 2 and all(map(_is_number, value)))
        if not ok:
            expected = "a number" if key in ZOO_NUMBERS else "two numbers [low, high]"
            raise UserError(f"{path}, row {i} of rows ({row.get('backbone')}), field {key!r}: {value!r} is not "
                            f"{expected} or null; rerun featcache zoo or correct it")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ci(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    ci = metrics.get("ci", {}).get(key)
    if value is None:
        return "-"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def weights_words(weights: str | None) -> str:
    """A weights id in words; random init says so plainly, because its numbers mean something else."""
    if not weights:
        return "not recorded"
    try:
        return WeightsRef.from_id(weights).words()
    except UserError:
        return weights


def is_random_init(weights: str | None) -> bool:
    try:
        return bool(weights) and WeightsRef.from_id(weights).is_random
    except UserError:
        return False


LAYOUT_WORDS = {"splits": "folders: split/class", "flat": "folders: class only"}


def provenance(runs: list[dict]) -> list[dict]:
    """Per run: backbone, weights, data, images per split and class, validation carve, version, device."""
    rows = []
    for r in runs:
        info, metrics = r["run"], r["metrics"]
        classes = metrics.get("classes", [])
        counts = info.get("counts") or {}
        for split in ("val", "test"):  # runs written before counts were recorded: the confusion matrices
            cm = metrics.get(split, {}).get("confusion_matrix")
            if split not in counts and cm:
                counts[split] = {c: int(sum(row)) for c, row in zip(classes, cm)}
        validation = info.get("validation") or {}
        carve = (f"{validation.get('source')}" + (f", {validation['fraction']:.0%} of train by patient, split seed "
                                                  f"{validation.get('seed')}" if "fraction" in validation else "")
                 if validation else "not recorded")
        rows.append({"run": r["name"], "backbone": r["backbone"], "weights": metrics.get("weights"),
                     "weights_words": weights_words(metrics.get("weights")),
                     "random_init": is_random_init(metrics.get("weights")),
                     "data_root": info.get("data_root") and (
                         f"{info['data_root']} ({LAYOUT_WORDS.get(info.get('layout'), 'layout not recorded')})"),
                     "counts": counts, "n_train": metrics.get("n_train"),
                     "validation": carve, "featcache_version": info.get("featcache_version"),
                     "device": _device_words(info.get("device"))})
    return rows


def _device_words(device) -> str | None:
    if isinstance(device, dict):  # fit-head: where the cache was extracted, and where the heads were fitted
        return ", ".join(f"{k} {v}" for k, v in device.items() if v)
    return device


def _counts_words(counts: dict, n_train) -> str:
    parts = [f"train {n_train:,}"] if n_train and "train" not in counts else []
    for split, per_class in counts.items():
        parts.append(f"{split} {sum(per_class.values()):,} (" + ", ".join(f"{c} {n:,}" for c, n in per_class.items())
                     + ")")
    return "; ".join(parts) or "-"


# What each --heads kind fits, in the words of the "how it was trained" table.
HEAD_WORDS = {"logistic": "logistic regression (scikit-learn, C from a grid)",
              "sweep": "linear heads (lr x weight decay x class weight x normalization)",
              "knn": "cosine kNN votes (k x temperature x class weight)",
              "mlp": "one-hidden-layer MLP probes (width x weight decay x lr, early stop)"}


def recipe_words(run: dict) -> str:
    """What trains and how, in a few words: featcache's frozen mode and the tutorial's recipe differ."""
    if run["kind"] != "finetune":
        metrics = run["metrics"]
        return (f"{HEAD_WORDS.get((metrics.get('selected') or {}).get('head'), 'linear head')} on cached features, "
                f"best of {metrics.get('n_heads', 1)} on val: {(metrics.get('selected') or {}).get('name', '-')}")
    settings = run["run"].get("settings") or {}
    if settings.get("recipe") == "tutorial":
        return ("tutorial recipe: head only, backbone BatchNorm in train mode, SGD lr 0.001 momentum 0.9, "
                "StepLR 7/0.1, batch 4, best epoch by val accuracy")
    if settings.get("freeze_backbone"):
        return ("featcache frozen: head only, backbone BatchNorm fixed, BatchNorm1d standardiser, AdamW + cosine, "
                "best epoch by val AUROC")
    return "full fine-tuning: every weight, AdamW + cosine, best epoch by val AUROC"


def task_d_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        test = r["metrics"].get("test", {})
        classes = r["metrics"].get("classes") or []
        positive = (positive_class_index(classes, r["metrics"].get("positive_class"))
                    if len(classes) == 2 else None)
        rows.append({
            "positive_class": None if positive is None else classes[positive],
            "negative_class": None if positive is None else classes[1 - positive],
            "run": r["name"], "backbone": r["backbone"], "strategy": r["strategy"], "recipe": recipe_words(r),
            "random_init": is_random_init(r["metrics"].get("weights")),
            "weights": r["metrics"].get("weights"),
            "test_accuracy": test.get("accuracy"), "test_auroc": test.get("auroc"),
            "test_auroc_text": _ci(test, "auroc"),
            "precision": test.get("precision"), "sensitivity": test.get("sensitivity"),
            "specificity": test.get("specificity"), "f1": test.get("f1"),
            "wall_seconds": r["run"].get("wall_seconds"), "images_per_second": r["run"].get("images_per_second"),
            "peak_memory_mb": r["run"].get("peak_memory_mb"), "val_auroc": r["metrics"]["val"]["auroc"],
            "n_train": r["metrics"].get("n_train"), "n_test": test.get("n"), "test_set": test_set_key(r),
            **_cost(r["run"]),
        })
    return rows


SEED_SUFFIX = re.compile(r"^(?P<group>.+)-seed(?P<seed>\d+)$")
SEED_METRICS = ("val_auroc", "test_auroc", "test_accuracy", "sensitivity", "specificity", "wall_seconds")


def seed_groups(rows: list[dict]) -> list[dict]:
    """Runs named ``NAME-seedN`` (``run`` with ``seeds = [...]``) summarised per NAME: mean and sd over seeds."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        m = SEED_SUFFIX.match(r["run"])
        if m:
            groups.setdefault(m["group"], []).append(r)
    out = []
    for name, members in groups.items():
        if len(members) < 2:
            continue
        summary = {"group": name, "seeds": sorted(int(SEED_SUFFIX.match(r["run"])["seed"]) for r in members)}
        for key in SEED_METRICS:
            values = [r[key] for r in members if r[key] is not None]
            summary[key] = ({"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)), "n": len(values)}
                            if len(values) >= 2 else None)
        out.append(summary)
    return out


def _mean_sd(value: dict | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value['mean']:.{digits}f} ± {value['sd']:.{digits}f}"


def test_set_key(run: dict) -> str:
    """What identifies a test set in a run's records: its data folder and its images per class."""
    test = run["metrics"].get("test") or {}
    counts = [int(sum(row)) for row in test.get("confusion_matrix", [])]
    return f"{run['run'].get('data_root') or '?'}: {test.get('n')} images {counts}"


def _cost(info: dict) -> dict:
    """A run's costs from run.json (absent in runs written by older versions: None)."""
    split, params = info.get("time_split") or {}, info.get("parameters") or {}
    return {"trainable_parameters": params.get("trainable"), "total_parameters": params.get("total"),
            "checkpoint_mb": info["checkpoint_bytes"] / 2**20 if info.get("checkpoint_bytes") else None,
            "extract_seconds": split.get("extract"), "fit_seconds": split.get("fit"),
            "train_seconds": split.get("train"),
            "peak_host_mb": info.get("peak_host_mb"), "peak_gpu_mb": info.get("peak_gpu_mb"),
            "inference_ms": (info.get("inference") or {}).get("ms_per_image")}


def _millions(n) -> str | None:
    return None if n is None else f"{n / 1e6:,.2f} M" if n >= 100_000 else f"{n:,}"


def _choose(candidates: list[dict], by: str) -> dict | None:
    """The candidate with the highest ``by`` (a validation figure); ties go to the first in report order."""
    scored = [c for c in candidates if c.get(by) is not None]
    return max(scored, key=lambda c: c[by]) if scored else None


# Strategies that train only a new head on a frozen backbone: Task C (fixed feature extractor), whether
# the features come from the cache or from a forward pass every epoch.
FROZEN_STRATEGIES = ("finetune-frozen", "finetune-tutorial-recipe")


def is_fixed_feature(strategy: str) -> bool:
    return strategy.startswith("cached features") or strategy in FROZEN_STRATEGIES


def times(ratio: float) -> str:
    """"3.2x" for clear differences, "about the same" within 10 %: never "1.0x the time"."""
    return "about the same" if 0.9 <= ratio <= 1.1 else f"{ratio:.1f}x"


def choose_runs(rows: list[dict]) -> dict:
    """Which run the report puts forward, overall and per strategy, each chosen by validation AUROC.

    Nothing here reads a test figure: permuting the test labels leaves every choice as it is.
    """
    choices = {}
    groups = {"best_run": rows,
              "best_fixed_feature_run": [r for r in rows if is_fixed_feature(r["strategy"])],
              "best_finetune_run": [r for r in rows if not is_fixed_feature(r["strategy"])]}
    for name, members in groups.items():
        chosen = _choose(members, "val_auroc")
        if chosen is not None:
            choices[name] = {"chosen": chosen["run"], "by": "val_auroc", "value": chosen["val_auroc"]}
    return choices


def verdict(rows: list[dict], choices: dict) -> str:
    """A short paragraph, generated from the numbers, on which strategy wins on which axis.

    "Best" always means best on validation; the test figures of those runs are then reported as they are.
    """
    by_name = {r["run"]: r for r in rows}
    if "best_run" not in choices:
        return "No run has a validation AUROC, so no run can be put forward."
    best = by_name[choices["best_run"]["chosen"]]
    test_words = (f"its test AUROC is {best['test_auroc']:.3f}" if best["test_auroc"] is not None
                  else "it has no test split")
    parts = [f"By validation AUROC the best run is {best['run']} ({best['strategy']}, {best['backbone']}, val "
             f"AUROC {best['val_auroc']:.3f}); {test_words}."]
    timed = [r for r in rows if r["wall_seconds"]]
    if len(timed) >= 2:
        fastest = min(timed, key=lambda r: r["wall_seconds"])
        parts.append(f"The fastest is {fastest['run']} at {fastest['wall_seconds']:.0f} s (val AUROC "
                     f"{fastest['val_auroc']:.3f}).")
        if fastest is not best and best["wall_seconds"]:
            ratio = best["wall_seconds"] / fastest["wall_seconds"]
            took = ("about the same time as the fastest" if times(ratio) == "about the same"
                    else f"{times(ratio)} the fastest one's time")
            parts.append(f"The best run took {took} for {best['val_auroc'] - fastest['val_auroc']:+.3f} val AUROC.")
    if "best_fixed_feature_run" in choices and "best_finetune_run" in choices:
        c = by_name[choices["best_fixed_feature_run"]["chosen"]]
        t = by_name[choices["best_finetune_run"]["chosen"]]
        parts.append(_cached_vs_tuned(c, t))
    scored = [r for r in rows if r["specificity"] is not None]
    low_spec = [r for r in scored if r["specificity"] < 0.7]
    if low_spec:
        negative, positive = low_spec[0].get("negative_class"), low_spec[0].get("positive_class")
        called = (f"they call many {negative} images {positive}" if negative and positive
                  else "they call many negative images positive")
        parts.append(f"{len(low_spec)} of {len(scored)} runs keep test specificity below 0.70 at their threshold: "
                     f"{called} (see the threshold and class-balance analysis below).")
    return " ".join(parts)


def choose_backbone(rows: list[dict]) -> dict:
    """The zoo's choice: the backbone ranked first by validation AUROC (ties by name, as the zoo ranks).

    Nothing here reads a test figure: permuting the test labels leaves the choice as it is.
    """
    from featcache.zoo import rank

    chosen = rank([dict(r) for r in rows])[0]
    return {"chosen": chosen["backbone"], "by": "val_auroc", "value": chosen["val_auroc"]}


def _difference(r: dict) -> str:
    ci = r["difference_to_first_ci"]
    return f"{r['backbone']} {r['difference_to_first']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _names(rows: list[dict]) -> str:
    names = [r["backbone"] for r in rows]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _zoo_auroc(rows: list[dict]) -> str:
    """What a leaderboard ranks by, in words: a multi-label zoo's AUROCs are means over its labels."""
    from featcache.zoo import multilabel_board

    return "mean AUROC" if multilabel_board(rows) else "AUROC"


def zoo_sentence(rows: list[dict]) -> str:
    """The backbone ranked first on validation, in words, and whether its test lead over each other backbone
    is beyond noise: the paired 95% CI of the test AUROC difference (other minus first) decides, nothing else.

    ``rows`` are the leaderboard's, in rank order.
    """
    first = rows[0]
    auroc = _zoo_auroc(rows)
    ci = first.get("test_auroc_ci")
    test = ("it has no test split" if first.get("test_auroc") is None else
            f"test {auroc} {first['test_auroc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    parts = [f"Ranked first on validation: {first['backbone']} (val {auroc} {first['val_auroc']:.3f}; {test})."]
    others = rows[1:]
    if not others:
        return parts[0] + " It is the only backbone, so there is nothing to compare it with."
    paired = [r for r in others if r.get("difference_to_first_ci")]
    behind = [r for r in paired if r["difference_to_first_ci"][1] < 0]
    ahead = [r for r in paired if r["difference_to_first_ci"][0] > 0]
    level = [r for r in paired if r not in behind and r not in ahead]
    unpaired = [r for r in others if r not in paired]
    if behind:
        parts.append(f"Its test lead over {'every other backbone' if len(behind) == len(others) else _names(behind)} "
                     f"is beyond noise: the paired patient-bootstrap 95% CI of the test {auroc} difference to it lies "
                     f"below 0 ({'; '.join(map(_difference, behind))}).")
    if level:
        parts.append(f"Against {_names(level)} the interval includes 0 ({'; '.join(map(_difference, level))}): "
                     "on this test set the difference is within noise, so the test does not separate them.")
    if ahead:
        parts.append(f"{_names(ahead)} {'scores' if len(ahead) == 1 else 'score'} higher on test beyond noise "
                     f"({'; '.join(map(_difference, ahead))}); the choice stays with validation, and a test set "
                     "that disagrees with it this clearly is worth a look (a shift between validation and test, "
                     "or too few validation images to rank on).")
    if unpaired:
        parts.append(f"For {_names(unpaired)} there is no paired interval (no test split, no test images shared "
                     "with the first, or too few resamples with both classes).")
    return " ".join(parts)


def summary(facts: dict) -> list[str]:
    """What a command prints after writing a report: the zoo's sentence, the verdict on the runs and the curves'
    sentences."""
    curves = [text for c in facts.get("curves", []) for text in c["sentences"]]
    return [text for text in ((facts.get("zoo") or {}).get("sentence"), facts.get("verdict"), *curves) if text]


def _cached_vs_tuned(c: dict, t: dict) -> str:
    """The best fixed-feature run against the best fine-tuning run (both chosen on validation)."""
    def test(r):
        return "no test split" if r["test_auroc"] is None else f"test AUROC {r['test_auroc']:.3f}"

    text = (f"Best fixed feature extractor (Task C) by validation ({c['run']}): val AUROC {c['val_auroc']:.3f}, "
            f"{test(c)}; best full fine-tuning (Task B) ({t['run']}): val AUROC {t['val_auroc']:.3f}, {test(t)}.")
    if c["wall_seconds"] and t["wall_seconds"]:
        ratio = t["wall_seconds"] / c["wall_seconds"]
        speed = ("the two took about the same time" if 0.9 <= ratio <= 1.1 else
                 f"the cache was {ratio:.1f}x faster" if ratio > 1 else f"fine-tuning took {1 / ratio:.1f}x less time")
        text += (f" They took {c['wall_seconds']:.0f} s and {t['wall_seconds']:.0f} s: {speed}; every further head "
                 "on the cache costs seconds, not another pass over the images.")
    if c["n_train"] and t["n_train"] and max(c["n_train"], t["n_train"]) > 1.2 * min(c["n_train"], t["n_train"]):
        text += (f" Note that they trained on different numbers of images ({c['n_train']:,} and "
                 f"{t['n_train']:,}); compare their times with that in mind.")
    return text


# A cell that holds a figure ("0.828 [0.704, 0.927]", "11.18 M", "1,026", "-"): right-aligned in HTML.
NUMBER_CELL = re.compile(r"[-+]?[\d,.]+(%| M| ± [\d.]+)?( \[[-+\d., ]+\])?|-")


class _Doc:
    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list]):
        self.blocks.append(("table", headers, [[_fmt(c) for c in row] for row in rows]))

    def img(self, path: Path, caption: str):
        self.blocks.append(("img", Path(path), caption))

    def markdown(self, out: Path) -> str:
        lines = []
        for block in self.blocks:
            if block[0] == "h":
                lines += ["#" * block[1] + " " + block[2], ""]
            elif block[0] == "p":
                lines += [block[1], ""]
            elif block[0] == "table":
                headers, rows = block[1], block[2]
                lines.append("| " + " | ".join(headers) + " |")
                lines.append("|" + "---|" * len(headers))
                lines += ["| " + " | ".join(row) + " |" for row in rows]
                lines.append("")
            else:
                lines += [f"![{block[2]}]({os.path.relpath(block[1], out)})", f"*{block[2]}*", ""]
        return "\n".join(lines)

    def html(self, title: str) -> str:
        body = []
        for block in self.blocks:
            if block[0] == "h":
                body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif block[0] == "p":
                body.append(f"<p>{html.escape(block[1])}</p>")
            elif block[0] == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td{' class=n' if NUMBER_CELL.fullmatch(c) else ''}>"
                                                f"{html.escape(c)}</td>" for c in row) + "</tr>"
                               for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            else:
                data = base64.b64encode(block[1].read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block[2])}">'
                            f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
                 # Wide tables (paths, a dozen cost columns) wrap inside the page instead of overflowing it.
                 "table{border-collapse:collapse;margin:1em 0;font-size:0.85em;max-width:100%}"
                 "th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;overflow-wrap:anywhere}"
                 # Numbers right-aligned, words left; headers break between words only.
                 "th{background:#f3f3f3;overflow-wrap:normal}td{text-align:left}td.n{text-align:right}"
                 "img{max-width:100%}figcaption{color:#555;font-size:0.85em}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def build_report(run_dirs: list[str], out: str | os.PathLike, *, title: str = "featcache report",
                 analyses: bool = True, pdf: bool = False) -> dict:
    """Write report.md, report.html and the plots into ``out``; returns the numbers shown.

    The report is built in a scratch folder beside ``out`` and moved into place whole, so a failure
    never leaves a half-written report; an earlier report in ``out`` is replaced, any other folder refused.
    """
    import shutil
    import tempfile

    if not run_dirs:
        raise UserError("give at least one run folder (or a featcache zoo or curve folder)")
    zoo_dirs = [d for d in run_dirs if is_zoo_folder(d)]
    if len(zoo_dirs) > 1:
        raise UserError(f"give one featcache zoo folder per report, got {len(zoo_dirs)}: "
                        + ", ".join(map(str, zoo_dirs)))
    zoo = load_zoo(zoo_dirs[0]) if zoo_dirs else None
    curve_dirs = [d for d in run_dirs if d not in zoo_dirs and is_curve_folder(d)]
    curves = [load_curve(d) for d in curve_dirs]
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "report.json").is_file())):
        raise UserError(f"--out {out} exists and is not a featcache report folder; give a new or empty folder")
    from featcache.runtime.outputs import output_folder

    output_folder(out)
    runs = sorted((load_run(d) for d in run_dirs if d not in zoo_dirs and d not in curve_dirs),
                  key=lambda r: (STRATEGY_ORDER.get(r["kind"], 9), r["name"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(scratch, 0o777 & ~mask)  # a folder like any other, not mkdtemp's private one
    try:
        facts = _write_report(runs, zoo, curves, scratch, title, analyses, pdf)
        if out.exists():
            old = scratch.with_name(scratch.name.replace(".partial-", ".old-"))
            out.rename(old)
            scratch.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            scratch.rename(out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return facts


def _write_report(runs: list[dict], zoo: dict | None, curves: list[dict], out: Path, title: str, analyses: bool,
                  pdf: bool) -> dict:
    doc, facts = _Doc(), {"runs": [r["name"] for r in runs], "choices": {}}
    doc.h(1, title)
    roots = sorted({r["run"].get("data_root") for r in runs if r["run"].get("data_root")}
                   | ({zoo["data_root"]} if zoo and zoo["data_root"] else set()))
    source = " and ".join(([f"{len(runs)} runs"] if runs else [])
                          + ([f"a zoo of {len(zoo['rows'])} backbones"] if zoo else [])
                          + ([f"{len(curves)} label-efficiency curve{'s' if len(curves) > 1 else ''}"]
                             if curves else []))
    doc.p(f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by featcache {__version__} from "
          f"{source}; data: {', '.join(roots) or 'not recorded'}. Every number below is measured; "
          "choices were made on the validation split and the test split was touched once per run.")
    multilabel = [r["name"] for r in runs if r["metrics"].get("task") == "multilabel"]
    if multilabel and (len(multilabel) < len(runs) or zoo):
        raise UserError(f"{', '.join(multilabel)}: multi-label {'run' if len(multilabel) == 1 else 'runs'}; "
                        "report multi-label runs together, apart from single-label runs and zoos")
    if multilabel:
        _multilabel_sections(doc, runs, out, facts)
    elif runs:
        _runs_sections(doc, runs, zoo, out, facts, analyses, curves)
    elif zoo:
        _zoo_section(doc, zoo, out, facts)
    if curves and not (runs and not multilabel):  # the runs' sections place the curves before Task E
        _curve_sections(doc, curves, out, facts)

    (out / "report.md").write_text(doc.markdown(out))
    (out / "report.html").write_text(doc.html(title))
    if pdf:
        from featcache.report.pdf import write_pdf

        write_pdf(doc.blocks, out / "report.pdf", title)
    (out / "report.json").write_text(json.dumps(facts, indent=2, default=str) + "\n")
    return facts


def _runs_sections(doc: _Doc, runs: list[dict], zoo: dict | None, out: Path, facts: dict, analyses: bool,
                   curves: list[dict]) -> None:
    """Provenance, the zoo's Task A when there is one, Task D, per run, label efficiency, and Task E."""
    from featcache.report import analysis
    from featcache.report.plots import plot_auroc_vs_time

    facts["provenance"] = provenance(runs)
    random_runs = [p["run"] for p in facts["provenance"] if p["random_init"]]
    if random_runs:
        doc.p(f"RANDOM INIT: {len(random_runs)} of {len(runs)} runs ({', '.join(random_runs)}) start from randomly "
              "initialised weights, not pretrained ones. Their numbers show what the pipeline does, not what "
              "transfer learning from a pretrained encoder achieves.")
    doc.h(2, "Provenance")
    doc.table(["run", "backbone", "weights", "data", "images per split and class", "validation split",
               "featcache", "device"],
              [[p["run"], p["backbone"], p["weights_words"], p["data_root"], _counts_words(p["counts"], p["n_train"]),
                p["validation"], p["featcache_version"], p["device"]] for p in facts["provenance"]])
    if zoo:
        _zoo_section(doc, zoo, out, facts)

    rows = task_d_rows(runs)
    facts["task_d"] = rows
    facts["warnings"] = analysis.run_warnings(runs)
    if facts["warnings"]:
        doc.h(2, "Warnings")
        doc.p("Computed from the runs below; each is a reason to read their numbers with care.")
        doc.table(["run", "warning", "detail"], [[w["run"], w["kind"], w["text"]] for w in facts["warnings"]])
    doc.h(2, "Task D: fine-tuning against a fixed feature extractor")
    test_sets = list(dict.fromkeys(r["test_set"] for r in rows))
    if len(test_sets) > 1:
        doc.p(f"These runs were tested on {len(test_sets)} different test sets; their test figures are shown in "
              "one table per test set and are not comparable across tables.")
    for key in test_sets:
        members = [r for r in rows if r["test_set"] == key]
        if len(test_sets) > 1:
            doc.p(f"Test set {key}:")
        doc.table(["run", "backbone", "strategy", "train images", "test n", "test accuracy", "test AUROC [95% CI]",
                   "precision", "sensitivity", "specificity", "F1"],
                  [[r["run"], r["backbone"] + (" (random init)" if r["random_init"] else ""), r["strategy"],
                    r["n_train"], r["n_test"], r["test_accuracy"], r["test_auroc_text"], r["precision"],
                    r["sensitivity"], r["specificity"], r["f1"]] for r in members])
    facts["seed_groups"] = seed_groups(rows)
    if facts["seed_groups"]:
        doc.p("Runs repeated over seeds, mean ± sd (sample sd) over the seeds:")
        doc.table(["runs", "seeds", "val AUROC", "test AUROC", "test accuracy", "sensitivity", "specificity",
                   "wall s"],
                  [[g["group"], ", ".join(map(str, g["seeds"])), *(_mean_sd(g[k]) for k in SEED_METRICS[:-1]),
                    _mean_sd(g["wall_seconds"], 0)] for g in facts["seed_groups"]])
    doc.table(["run", "trainable params", "total params", "checkpoint MB", "extract s", "fit s", "train s",
               "wall s", "images/s", "peak host MB", "peak GPU MB", "inference ms/image"],
              [[r["run"], _millions(r["trainable_parameters"]), _millions(r["total_parameters"]),
                _num(r["checkpoint_mb"], 2), _num(r["extract_seconds"], 1), _num(r["fit_seconds"], 2),
                _num(r["train_seconds"], 0), _num(r["wall_seconds"], 0), _num(r["images_per_second"], 1),
                _num(r["peak_host_mb"] or r["peak_memory_mb"], 0), _num(r["peak_gpu_mb"], 0),
                _num(r["inference_ms"], 1)] for r in rows])
    facts["choices"].update(choose_runs(rows))
    facts["verdict"] = verdict(rows, facts["choices"])
    doc.p(facts["verdict"])
    doc.table(["run", "how it was trained"], [[r["run"], r["recipe"]] for r in rows])
    _b_vs_c(doc, runs, facts)
    doc.p("Wall time of a cached-feature run is its extraction plus its head fit; the extraction is paid once per "
          "backbone, and every further head costs only the fit. images/s is extraction speed for cached runs and "
          "training speed for fine-tuning. Inference ms/image is decode + forward per image at the run's batch "
          "size (extraction for cached runs, the test pass for fine-tuned ones); peak host memory is the "
          "process's resident set, peak GPU memory what torch allocated on the GPU (blank on a CPU).")
    if any(r["wall_seconds"] and r["test_auroc"] is not None for r in rows):
        plot_auroc_vs_time(rows, out / "auroc_vs_time.png")
        doc.img(out / "auroc_vs_time.png", "test AUROC against wall time, one point per run")
    _backbone_costs(doc, runs)
    _per_run(doc, runs, out, facts)
    _curve_sections(doc, curves, out, facts)

    doc.h(2, "Task E: why test performance disappoints")
    _learning_curves(doc, runs, out, facts)
    ablation = analysis.augmentation_ablation(runs)
    facts["augmentation"] = ablation
    if ablation:
        doc.h(3, "Augmentation ablation")
        doc.table(["backbone", "mode", "augment", "val AUROC", "test AUROC", "test accuracy", "overfitting"],
                  [[a["backbone"], a["mode"], a["augment"], a["val_auroc"], a["test_auroc"], a["test_accuracy"],
                    "yes" if a["overfitting"] else "no"] for a in ablation])
    cached = [r for r in runs if r["kind"] == "fit-head" and r["cache"]]
    if analyses and cached:
        _views_ablation(doc, cached, facts)
        _cache_analyses(doc, cached[0], out, facts)
    elif analyses:
        lost = [r["name"] for r in runs if r["kind"] == "fit-head"]
        doc.p(f"The feature cache of {', '.join(lost)} was not found where run.json says nor beside the run "
              "folder, so class balance, train/test shift and leakage checks are left out." if lost else
              "Class balance, train/test shift and leakage checks read a feature cache: add a fit-head run.")
    _worst_errors(doc, runs, out, facts)
    facts["recommendations"] = analysis.recommendations(facts)
    if facts["recommendations"]:
        doc.h(3, "What to try next")
        doc.table(["finding", "try"], [[r["finding"], r["try"]] for r in facts["recommendations"]])


def multilabel_rows(runs: list[dict]) -> list[dict]:
    """Per multi-label run: how it was fitted and its test (else validation) means over labels, with CIs."""
    rows = []
    for r in runs:
        metrics = r["metrics"]
        split = "test" if "test" in metrics else "val"
        m = metrics[split]
        policy = metrics.get("policy") or {}
        rows.append({
            "run": r["name"], "backbone": r["backbone"], "weights": weights_words(metrics.get("weights")),
            "strategy": r["strategy"], "selected": metrics["selected"]["name"], "split": split, "n": m["n"],
            "uncertain": policy.get("uncertain"), "unmentioned": policy.get("unmentioned"),
            "labels_source": (metrics.get("labels") or {}).get("source"),
            "threshold_rule": metrics.get("threshold_rule"), "val_auroc": metrics["val"]["auroc"],
            **{key: m.get(key) for key in ("auroc", "micro_auroc", "competition_auroc", "average_precision",
                                            "sensitivity", "specificity", "f1")},
            **{f"{key}_text": _ci(m, key) for key in ("auroc", "micro_auroc", "competition_auroc")},
            "per_label": {name: {"auroc": v["auroc"], "ci": (v.get("ci") or {}).get("auroc"),
                                 "n_positive": v["n_positive"], "n_negative": v["n_negative"]}
                          for name, v in m["per_label"].items()},
        })
    return rows


def _multilabel_sections(doc: _Doc, runs: list[dict], out: Path, facts: dict) -> None:
    """Multi-label runs: how each was fitted (policy, labels), the means over labels with patient CIs, each
    label's AUROC side by side, and each run's per-label ROC grid."""
    rows = multilabel_rows(runs)
    facts["multilabel"] = rows
    random_runs = [r["name"] for r in runs if is_random_init(r["metrics"].get("weights"))]
    if random_runs:
        doc.p(f"RANDOM INIT: {', '.join(random_runs)} start from randomly initialised weights, not pretrained "
              "ones. Their numbers show what the pipeline does, not what transfer learning achieves.")
    doc.h(2, "Multi-label runs")
    doc.p("Every label is scored on the images where it is known under the run's policy for uncertain and "
          "unmentioned labels; the head (or epoch) was chosen by mean validation AUROC over labels and each "
          "label's threshold on validation. Intervals are 95% patient-bootstrap intervals.")
    doc.table(["run", "backbone", "weights", "strategy", "chosen", "uncertain", "not mentioned", "labels from",
               "thresholds"],
              [[r["run"], r["backbone"], r["weights"], r["strategy"], r["selected"], r["uncertain"],
                r["unmentioned"], r["labels_source"] or "the cache", r["threshold_rule"]] for r in rows])
    doc.table(["run", "split", "n", "val AUROC", "AUROC, macro [95% CI]", "AUROC, micro", "competition five",
               "AP, macro", "sensitivity", "specificity", "F1"],
              [[r["run"], r["split"], r["n"], r["val_auroc"], r["auroc_text"], r["micro_auroc_text"],
                r["competition_auroc_text"], r["average_precision"], r["sensitivity"], r["specificity"], r["f1"]]
               for r in rows])
    if len({(r["uncertain"], r["unmentioned"], r["labels_source"]) for r in rows}) > 1:
        doc.p("These runs differ in their labels or in the policy that turned them into targets, so each was "
              "scored on its own targets (see each label's positives and negatives below): their figures are "
              "not measured on one test set and differences between them are not a like-for-like comparison.")
    labels = list(dict.fromkeys(name for r in rows for name in r["per_label"]))
    doc.h(3, "AUROC per label")
    doc.table(["label", *(f"{r['run']} ({r['split']})" for r in rows)],
              [[name, *(_with_ci(r["per_label"][name]["auroc"], r["per_label"][name]["ci"])
                        + f" ({r['per_label'][name]['n_positive']}+/{r['per_label'][name]['n_negative']}-)"
                        if name in r["per_label"] else "-" for r in rows)] for name in labels])
    for r in runs:
        picture = r["record"].plot_path("roc_grid")
        if picture.is_file():
            target = out / f"roc_grid_{r['name']}.png"
            target.write_bytes(picture.read_bytes())
            doc.img(target, f"{r['name']}: ROC per label, each label's operating point marked")


def _zoo_section(doc: _Doc, zoo: dict, out: Path, facts: dict) -> None:
    """Task A: the zoo's leaderboard (ranked by validation), its plot, and the choice in words."""
    rows = zoo["rows"]
    facts["choices"]["zoo"] = choose_backbone(rows)
    sentence = zoo_sentence(rows)
    auroc = _zoo_auroc(rows)
    facts["zoo"] = {"folder": str(zoo["folder"]), "weights": zoo["weights"], "data_root": zoo["data_root"],
                    "rows": rows, "sentence": sentence}
    doc.h(2, "Task A: which backbone for this data")
    sizes = ", ".join(f"{split} {n:,}" for split, n in (("train", zoo["n_train"]), ("val", zoo["n_val"]),
                                                         ("test", zoo["n_test"])) if n)
    head = (f" ({zoo['head']}" + (f", the best of {zoo['n_heads']} on validation" if (zoo["n_heads"] or 1) > 1
                                   else "") + ")") if zoo["head"] else ""
    doc.p(f"featcache zoo ({zoo['folder']}): {len(rows)} backbones, each extracted once and fitted with the same "
          f"head{head}, on {zoo['data_root'] or 'data not recorded'} ({sizes or 'split sizes not recorded'}), weights: "
          f"{weights_words(zoo['weights'])}. Ranked by validation {auroc}; test {auroc} is reported with its "
          f"patient-bootstrap 95% CI and never used to rank. The difference to #1 is this backbone's test {auroc} "
          "minus #1's on the same test images, with a paired patient-bootstrap 95% CI.")
    if is_random_init(zoo["weights"]):
        doc.p("RANDOM INIT: every backbone in the zoo starts from randomly initialised weights, not pretrained "
              "ones. The ranking shows what the pipeline does, not which pretrained encoder suits this data.")
    doc.table(["#", "backbone", f"val {auroc}", f"test {auroc} [95% CI]", "test diff. to #1 [95% CI]", "sensitivity",
               "specificity", "feature dim", "params (M)", "GMACs", "extract images/s", "cache MB"],
              [[r["rank"], r["backbone"], r["val_auroc"], _with_ci(r.get("test_auroc"), r.get("test_auroc_ci")),
                _with_ci(r.get("difference_to_first"), r.get("difference_to_first_ci"), signed=True),
                r.get("sensitivity"), r.get("specificity"), r.get("feature_dim"), _num(r.get("params_m"), 1),
                _num(r.get("gmacs"), 2), _num(r.get("extract_images_per_second"), 1), _num(r.get("cache_mb"), 1)]
               for r in rows])
    if zoo["plot"].is_file():
        target = out / "zoo_leaderboard.png"
        target.write_bytes(zoo["plot"].read_bytes())
        doc.img(target, "zoo: test AUROC (95% CI) against extraction cost; ranked by validation, test not used")
    doc.p(sentence)


def _with_ci(value, ci, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if value is None:
        return "-"
    return f"{value:{sign}.3f}" + (f" [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]" if ci else "")


def _num(value, digits: int) -> str | None:
    """A figure with ``digits`` decimals and thousands separators (7.6 images/s, not 7.600)."""
    return None if value is None else f"{float(value):,.{digits}f}"


def _backbone_costs(doc: _Doc, runs: list[dict]) -> None:
    from featcache.backbones.registry import REGISTRY, backbone_facts

    names = sorted({r["backbone"] for r in runs if r["backbone"] in REGISTRY})
    if not names:
        return
    doc.h(3, "Backbones used")
    doc.table(["backbone", "parameters (M)", "GMACs", "ImageNet top-1", "feature dim"],
              [[f["name"], f["params_m"], f["gflops"], f["imagenet_top1"], f["feature_dim"]]
               for f in (backbone_facts(n) for n in names)])


def b_vs_c_sentence(c_name: str, b_name: str, cmp: dict) -> str:
    """The paired comparison in words; the verdict follows the interval and the p-value, nothing else."""
    ci = cmp["auroc_difference_ci"]
    text = (f"On the {cmp['n']:,} test images both runs scored ({cmp['patients']:,} patients), test AUROC of "
            f"{c_name} minus {b_name} is {cmp['auroc_difference']:+.3f}")
    if ci is None:
        text += " (too few resamples with both classes for an interval)."
    else:
        if ci[0] > 0:
            verdict = f"{c_name} (Task C) has the higher AUROC"
        elif ci[1] < 0:
            verdict = f"{b_name} (Task B) has the higher AUROC"
        else:
            verdict = "the interval includes 0: this test set cannot tell their AUROCs apart"
        text += (f", 95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}] by paired bootstrap over {cmp['unit']}s "
                 f"({cmp['resamples']} resamples): {verdict}.")
    p = cmp["mcnemar_p"]
    text += (f" At their own thresholds, {cmp['only_a_right']} images are right only for {c_name} and "
             f"{cmp['only_b_right']} only for {b_name} (accuracy {cmp['accuracy_a']:.3f} vs {cmp['accuracy_b']:.3f}); "
             f"McNemar's exact test p = {p:.3g}"
             + (", a difference in accuracy at the 5% level." if p < 0.05 else ", no significant difference in "
                                                                                 "accuracy at the 5% level."))
    return text


def _b_vs_c(doc: _Doc, runs: list[dict], facts: dict) -> None:
    """Task D's question with statistics: the best Task C run against the best Task B run, both chosen on
    validation, compared image by image on the test split."""
    from featcache.report import analysis

    choices = facts["choices"]
    if "best_fixed_feature_run" not in choices or "best_finetune_run" not in choices:
        return
    by_name = {r["name"]: r for r in runs}
    c, b = by_name[choices["best_fixed_feature_run"]["chosen"]], by_name[choices["best_finetune_run"]["chosen"]]
    if not (c["predictions"] and b["predictions"]):
        return
    cmp = analysis.paired_comparison(analysis.read_predictions(c["predictions"]),
                                     analysis.read_predictions(b["predictions"]), c["metrics"]["classes"],
                                     threshold_a=c["metrics"].get("threshold"),
                                     threshold_b=b["metrics"].get("threshold"),
                                     positive_class=c["metrics"].get("positive_class"))
    if cmp is None:
        return
    facts["b_vs_c"] = {"c": c["name"], "b": b["name"], **cmp}
    doc.h(3, "B vs C, decided with statistics")
    doc.p(b_vs_c_sentence(c["name"], b["name"], cmp))


def _per_run(doc: _Doc, runs: list[dict], out: Path, facts: dict) -> None:
    """Each run's test (else validation) confusion matrix, as an image and a table, and its
    per-class classification report."""
    from featcache.report import analysis

    facts["per_run"] = {}
    doc.h(2, "Per run: confusion matrix and classification report")
    for r in runs:
        split = "test" if r["metrics"].get("test") else "val"
        cm = r["metrics"].get(split, {}).get("confusion_matrix")
        if not cm:
            continue
        classes = r["metrics"]["classes"]
        report = analysis.classification_report(cm, classes)
        facts["per_run"][r["name"]] = {"split": split, "confusion_matrix": cm, "classification_report": report}
        thr = r["metrics"].get("threshold")
        decision = f"threshold {thr:.3f}" if thr is not None else "argmax"
        doc.h(3, f"{r['name']} ({split}, {decision})")
        picture = r["record"].plot_path("confusion_matrix")
        if picture.is_file():
            target = out / f"confusion_matrix_{r['name']}.png"
            target.write_bytes(picture.read_bytes())
            doc.img(target, f"{r['name']}: {split} confusion matrix")
        doc.table(["true / predicted", *classes], [[c, *row] for c, row in zip(classes, cm)])
        doc.table(["", "precision", "recall", "F1", "support"],
                  [[k, report[k]["precision"], report[k]["recall"], report[k]["f1-score"], report[k]["support"]]
                   for k in (*classes, "macro avg", "weighted avg")]
                  + [["accuracy", None, None, report["accuracy"], report["macro avg"]["support"]]])


def _learning_curves(doc: _Doc, runs: list[dict], out: Path, facts: dict) -> None:
    from featcache.report import analysis

    tuned = [r for r in runs if r["history"]]
    facts["overfitting"] = {}
    if not tuned:
        doc.p("No fine-tuning run, so no learning curves.")
        return
    doc.h(3, "Learning curves and overfitting")
    rows = []
    for r in tuned:
        verdict = analysis.overfitting(r["history"])
        r["overfitting"] = verdict
        facts["overfitting"][r["name"]] = verdict
        last = r["history"][-1]
        rows.append([r["name"], len(r["history"]), verdict["best_epoch"], last["train_accuracy"],
                     last["val_accuracy"], last["train_loss"], last["val_loss"],
                     ("OVERFITTING: " if verdict["flag"] else "") + verdict["reason"]])
        curve = r["record"].plot_path("learning_curve")
        if curve.is_file():
            target = out / f"learning_curve_{r['name']}.png"
            target.write_bytes(curve.read_bytes())
            doc.img(target, f"{r['name']}: train and validation per epoch")
    doc.table(["run", "epochs", "best epoch", "train acc", "val acc", "train loss", "val loss", "verdict"], rows)


IMBALANCED_SHARE = 0.6  # a train split whose largest class holds this share or more is imbalanced


def weighting_sentence(backbone: str, train_counts: dict, effects: list[dict], chosen: dict,
                       positive: str | None) -> str:
    """What class weighting and the threshold rule do, in words that the numbers beside them bear out."""
    base = effects[0]
    parts = []
    total = sum(train_counts.values())
    if total and positive in train_counts:
        majority = max(train_counts, key=train_counts.get)
        share = train_counts[majority] / total
        parts.append(f"Train is {share:.0%} {majority}.")
        # Recall of each side at the plain head's threshold 0.5 on test: positive = sensitivity.
        minority_recall, majority_recall = ((base["test_specificity"], base["test_sensitivity"])
                                            if majority == positive else
                                            (base["test_sensitivity"], base["test_specificity"]))
        if share >= IMBALANCED_SHARE and minority_recall < majority_recall:
            parts.append(f"With {backbone} features a plain head at threshold 0.5 leans to that majority class: "
                         f"test recall {majority_recall:.3f} for {majority} against {minority_recall:.3f} for the "
                         "other class.")
    words = f"{chosen['class_weight']} class weighting with the {chosen['threshold_rule']} threshold"
    if chosen is base:
        parts.append(f"Chosen by validation balanced accuracy ({chosen['val_balanced_accuracy']:.3f}), the plain "
                     f"head (no class weighting, threshold 0.5) is already the best of the four; its test balanced "
                     f"accuracy is {base['test_balanced_accuracy']:.3f}.")
    elif f"{chosen['test_balanced_accuracy']:.3f}" == f"{base['test_balanced_accuracy']:.3f}":
        parts.append(f"Chosen by validation balanced accuracy ({chosen['val_balanced_accuracy']:.3f}), {words} "
                     f"gives test balanced accuracy {chosen['test_balanced_accuracy']:.3f}, no change from the "
                     "plain head.")
    else:
        parts.append(f"Chosen by validation balanced accuracy ({chosen['val_balanced_accuracy']:.3f}), {words} "
                     f"gives test balanced accuracy {chosen['test_balanced_accuracy']:.3f}, against "
                     f"{base['test_balanced_accuracy']:.3f} for the plain head.")
    return " ".join(parts)


def _views_ablation(doc: _Doc, runs: list[dict], facts: dict) -> None:
    """0 against K augmented views, for each fit-head run on a cache with views (once per cache).

    Fitted from the one views cache (its view 0 is the plain cache, row for row), so no second extraction
    is needed and nothing but the views differs: same backbone, decode, val and test rows, head kind.
    """
    from featcache.cache.h5 import FeatureCache
    from featcache.report import analysis

    seen, rows = set(), []
    for run in runs:
        if run["cache"] in seen or run["metrics"].get("task") == "multilabel":
            continue
        seen.add(run["cache"])
        cache = FeatureCache.open(run["cache"])
        found = analysis.views_ablation(cache, run["metrics"]["selected"]["head"],
                                        positive_class=run["metrics"].get("positive_class"),
                                        seed=run["metrics"].get("seed") or 0)
        augment = cache.fingerprint_inputs.get("views", {}).get("augment")
        rows += [{"run": run["name"], "backbone": run["backbone"], "augment": augment, **r} for r in found]
    if not rows:
        return
    facts["augmented_views"] = rows
    doc.h(3, "Augmented views in the cache")
    doc.p("The same head kind fitted on the plain train images, then on them and their augmented views "
          "(extract --aug-views); each chose its head on the plain validation images and was tested once on the "
          "plain test images. Task E's augmentation question for a fixed feature extractor, at cache speed.")
    doc.table(["run", "backbone", "augment", "augmented views", "train images", "train rows", "head", "val AUROC",
               "test AUROC [95% CI]"],
              [[r["run"], r["backbone"], r["augment"], r["augmented_views"], r["train_images"], r["train_rows"],
                r["head"], _fmt(r["val_auroc"]), _with_ci(r["test_auroc"], r["test_auroc_ci"])] for r in rows])


def _cache_analyses(doc: _Doc, run: dict, out: Path, facts: dict) -> None:
    from featcache.report import analysis
    from featcache.cache.h5 import FeatureCache

    cache = FeatureCache.open(run["cache"])
    classes = cache.classes
    balance = analysis.class_balance(cache)
    facts["class_balance"] = balance
    doc.h(3, "Class balance, class weighting and the threshold")
    doc.table(["split", *classes, "total", *(f"% {c}" for c in classes)],
              [[s, *(counts[c] for c in classes), sum(counts.values()),
                *(f"{100 * counts[c] / max(sum(counts.values()), 1):.1f}%" for c in classes)]
               for s, counts in balance.items()])
    effects = analysis.weighting_and_threshold(cache, C=run["metrics"]["selected"].get("C") or 0.1,
                                               positive_class=run["metrics"].get("positive_class"))
    facts["weighting_threshold"] = effects
    if effects:
        doc.table(["class weight", "threshold", "value", "val sens.", "val spec.", "val bal. acc.", "test sens.",
                   "test spec.", "test bal. acc."],
                  [[e["class_weight"], e["threshold_rule"], e["threshold"], e["val_sensitivity"],
                    e["val_specificity"], e["val_balanced_accuracy"], e["test_sensitivity"], e["test_specificity"],
                    e["test_balanced_accuracy"]] for e in effects])
        chosen = _choose(effects, "val_balanced_accuracy")
        facts["choices"]["class_weight_and_threshold"] = {
            "chosen": f"class weight {chosen['class_weight']}, threshold {chosen['threshold_rule']}",
            "by": "val_balanced_accuracy", "value": chosen["val_balanced_accuracy"]}
        doc.p(weighting_sentence(run["backbone"], balance.get("train", {}), effects, chosen,
                                 run["metrics"].get("positive_class")))
    shift = analysis.domain_shift(cache)
    facts["domain_shift"] = shift
    if shift:
        doc.h(3, "Train/test shift")
        level = ("no measurable shift" if shift["auroc"] < 0.55 else "a mild shift" if shift["auroc"] < 0.7
                 else "a strong shift")
        doc.p(f"A classifier trained to tell test images from train+val images on the {run['backbone']} "
              f"embeddings reaches AUROC {shift['auroc']:.3f} (5-fold, grouped by patient; 0.5 means it cannot "
              f"tell them apart): {level}. Differences between train and test acquisition are one reason "
              "validation numbers overstate test numbers.")
    _leakage(doc, cache, out, facts)


def _leakage(doc: _Doc, cache, out: Path, facts: dict) -> None:
    """Byte-identical files across splits, and near duplicates: every val and test image's nearest image of
    the earlier splits, counted above a threshold learnt from within-patient pairs of train and val."""
    from featcache.report import analysis
    from featcache.report.plots import plot_pair_thumbnails

    dup = analysis.near_duplicates(cache)
    plain = cache.read("paths", "splits", plain=True)
    exact = analysis.exact_duplicates(cache.attrs.get("data_root", ""), plain["paths"], plain["splits"])
    facts["near_duplicates"] = dup
    facts["exact_duplicates"] = exact
    facts["choices"]["near_duplicate_threshold"] = {"chosen": f"cosine {dup['threshold']:.4f}", "by": dup["rule"],
                                                    "value": dup["threshold"]}
    doc.h(3, "Leakage: duplicates across splits")
    doc.p(f"Byte-identical files in different splits: {len(exact)}. Near duplicates: each validation image is "
          "searched against train, each test image against train and against validation (the exact nearest "
          "neighbour by cosine of the embeddings standardized with train statistics, the kNN head's search). "
          f"The threshold is {dup['rule']}: {dup['threshold']:.4f}; a pair above it is more alike than most "
          "images of one patient are to each other. Patients never straddle train and validation (the split is "
          "grouped by patient). The closest cross-split pairs are shown for a human to judge.")
    doc.table(["split pair", "images searched", "nearest at or above the threshold", "median nearest cosine",
               "largest"],
              [[pair, dup["images"][pair], f"{n:,} ({100 * n / max(dup['images'][pair], 1):.1f}%)",
                dup["nearest_quantiles"][pair][0.5], dup["nearest_quantiles"][pair][1.0]]
               for pair, n in dup["pairs_above"].items()])
    if dup["closest"]:
        doc.table(["split pair", "image", "its nearest in the other split", "cosine", "same patient id"],
                  [[p["splits"], p["b"], p["a"], p["cosine"], "yes" if p["same_patient"] else "no"]
                   for p in dup["closest"]])
        plot_pair_thumbnails(cache.attrs.get("data_root", ""), dup["closest"][:6], out / "closest_pairs.png")
        doc.img(out / "closest_pairs.png", "closest cross-split pairs by embedding (cosine above each pair)")


def _interval(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"


def _percent(value: float) -> str:
    return f"{100 * value:g}%"


def curve_sentence(name: str, rows: list[dict], mode: str) -> str:
    """One cache's smallest point against its largest, in words: whether their test AUROCs differ beyond noise.

    Each point's interval spans its repeats' patient-bootstrap 95% CIs;
    intervals apart say beyond noise, overlapping ones say this test set
    cannot tell the points apart. The intervals decide, nothing else.
    """
    scored = [r for r in rows if r["test_auroc"] is not None]
    if len(scored) < 2:
        return f"{name}: fewer than two points have a test AUROC, so there is nothing to compare."
    low, high = scored[0], scored[-1]

    def words(r):
        amount = f"{_percent(r['value'])} of train" if mode == "fraction" else f"{r['value']:g} images per class"
        ci = r.get("test_auroc_ci_span")
        return (f"{amount} ({r['train_images']:,.0f} images) test AUROC {r['test_auroc']:.3f}"
                + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))

    text = f"{name}: with {words(low)}; with {words(high)}."
    a, b = low.get("test_auroc_ci_span"), high.get("test_auroc_ci_span")
    if not (a and b):
        return text + (" Without intervals (the curve ran with --bootstrap 0) the report cannot say whether the "
                       "two differ beyond noise.")
    if a[1] < b[0] or b[1] < a[0]:
        better = "largest" if a[1] < b[0] else "smallest"
        return text + f" The intervals do not overlap: the {better} point's test AUROC is higher beyond noise."
    return text + (" The intervals overlap: on this test set the difference between the two is within noise "
                   "(more labels may still help; this test cannot show it).")


def _curve_sections(doc: _Doc, curves: list[dict], out: Path, facts: dict) -> None:
    """Each ``featcache curve`` folder: its points as a table and a plot, and a sentence per cache on whether its
    smallest and largest points differ beyond noise."""
    from featcache.report.plots import plot_curve

    facts["curves"] = []
    for i, curve in enumerate(curves, 1):
        settings, summary = curve["settings"], curve["summary"]
        mode = settings["mode"]
        doc.h(2, "Label efficiency" + (f" ({i} of {len(curves)})" if len(curves) > 1 else ""))
        drawn = ("whole patients, that fraction of each class's images" if mode == "fraction"
                 else "that many images per class, from distinct patients first")
        doc.p(f"featcache curve ({curve['folder']}): {settings['heads']} heads fitted on subsets of train ({drawn}), "
              f"{settings['repeats']} repeat{'s' if settings['repeats'] > 1 else ''} per point; each head was chosen "
              "on the whole validation split and test never chose anything. Test AUROC is the mean ± sd over "
              "repeats; its interval spans the repeats' patient-bootstrap 95% CIs (lowest low to highest high).")
        doc.table(["cache", "fraction of train" if mode == "fraction" else "images per class", "train images",
                   "patients", "val AUROC", "test AUROC ± sd", "test AUROC 95% CI"],
                  [[r["cache"], _percent(r["value"]) if mode == "fraction" else f"{r['value']:g}",
                    _num(r["train_images"], 0), _num(r["train_patients"], 0), r["val_auroc"],
                    "-" if r["test_auroc"] is None else f"{r['test_auroc']:.3f} ± {r['test_auroc_sd']:.3f}",
                    _interval(r["test_auroc_ci_span"])] for r in summary])
        picture = out / ("curve.png" if len(curves) == 1 else f"curve_{i}.png")
        plot_curve(summary, picture, mode=mode)
        doc.img(picture, "test AUROC (mean ± sd over repeats) against training images; heads chosen on validation")
        sentences = [curve_sentence(name, [r for r in summary if r["cache"] == name], mode)
                     for name in dict.fromkeys(r["cache"] for r in summary)]
        for sentence in sentences:
            doc.p(sentence)
        facts["curves"].append({"folder": str(curve["folder"]), "settings": settings, "summary": summary,
                                "sentences": sentences})


def _worst_errors(doc: _Doc, runs: list[dict], out: Path, facts: dict) -> None:
    from featcache.report import analysis
    from featcache.report.plots import plot_error_thumbnails

    scored = [r for r in runs if r["predictions"] and r["metrics"].get("test", {}).get("auroc") is not None]
    if not scored:
        return
    best = max(scored, key=lambda r: r["metrics"]["val"]["auroc"])  # chosen on validation, as every choice here
    facts["choices"]["worst_errors_run"] = {"chosen": best["name"], "by": "val_auroc",
                                            "value": best["metrics"]["val"]["auroc"]}
    root = best["run"].get("data_root")
    errors = analysis.worst_errors(analysis.read_predictions(best["predictions"]), best["metrics"]["classes"])
    facts["worst_errors"] = {"run": best["name"], "errors": errors}
    doc.h(3, f"Worst test errors of {best['name']}")
    doc.p("Per true class, the wrong predictions made with the most confidence; look for labelling errors, "
          "devices, text markers or cropping that the model may be keying on.")
    if root and any(errors.values()):
        plot_error_thumbnails(root, errors, out / "worst_errors.png")
        doc.img(out / "worst_errors.png", "most confident test errors, one row per true class")
