"""featcache run CONFIG.toml: every step of a comparison, then the report.

A config names the data, lists runs of two kinds, and may add a zoo::

    title = "..."
    data = "chest_xray"          # relative paths are read from the working directory
    format = "folder"            # optional: csv, nih, chexpert or mimic, with path_col, label_col,
                                 # label_cols, patient_col, split_col, root, views as their flags
    out = "runs/homework"
    weights = "imagenet"         # or "none", or a state_dict path
    max_images = 600             # optional: a stratified subset of train, the same images for every run
    subsample_all = false        # true: max_images subsamples val and test too (quick looks only)
    split_seed = 0               # seeds the carved validation split (seed seeds init and shuffles)
    seeds = [0, 1, 2]            # optional: repeat every run once per seed; the report shows mean and sd
    positive_class = "PNEUMONIA" # optional: the class scored as positive (two classes)
    uncertain = "ignore"         # optional, multi-label sets: ignore, ones or zeros; unmentioned = "negative"

    [zoo]                        # Task A: rank backbones on this data (featcache zoo), into OUT/zoo
    backbones = ["resnet18", "tv:efficientnet_b0", "timm:resnet18"]
    heads = "sweep"

    [[fixed]]                    # Task C: features cached once, heads trained on the cache
    backbone = "resnet50"
    heads = "sweep"
    # pool = "cls+mean"          # hf: vision transformers: cls, mean or cls+mean, as extract --pool

    [[finetune]]                 # Task B: one AMP training loop
    backbone = "resnet18"
    epochs = 10
    freeze_backbone = false

    [curve]                      # label efficiency (featcache curve) of the [[fixed]] runs' caches, into OUT/curve
    fractions = [0.01, 0.1, 1.0] # or per_class_shots = [1, 4, 16]
    repeats = 5
    heads = "sweep"

A config may hold only a ``[zoo]`` table. The ``[curve]`` runs on the
caches of the ``[[fixed]]`` runs (of the first seed), with the config's
seed, device, bootstrap and positive_class, and adds its section to the
report. The zoo runs with the config's
top-level settings (data, weights, max_images, subsample_all, split_seed,
the first of its seeds, backend, device, batch_size, bootstrap,
label_from_name, positive_class); ``featcache zoo --config`` reads the same
table. Every step is resumable (caches and fine-tuning runs pick up where they
stopped), so rerunning a config after a crash or an edit redoes only what
changed.
"""

from __future__ import annotations

import os
from pathlib import Path

from featcache.backbones.registry import file_word, with_pool
from featcache.backbones.weights import WeightsRef
from featcache.errors import UserError
from featcache.curve import DEFAULT_REPEATS, DEFAULT_RESAMPLES
from featcache.options import EXTRACT, FINETUNE, HEAD

TOP_KEYS = {"title": str, "data": str, "out": str, "weights": str, "max_images": int, "subsample_all": bool,
            "seed": int, "seeds": list, "split_seed": int, "backend": str, "device": str, "batch_size": int,
            "bootstrap": int, "label_from_name": list, "positive_class": str, "uncertain": str,
            "unmentioned": str}
# The label source (see featcache.data.sources): data is then a CSV file or a dataset folder.
SOURCE_KEYS = {"format": str, "path_col": str, "label_col": str, "label_cols": str, "patient_col": str,
               "split_col": str, "root": str, "views": str}
FIXED_KEYS = {"backbone": str, "pool": str, "heads": str, "class_weight": str, "threshold": str, "C": float,
              "epochs": int, "sampler": str}
FINETUNE_KEYS = {"backbone": str, "pool": str, "epochs": int, "lr": float, "batch_size": int, "amp": str,
                 "freeze_backbone": bool, "augment": str, "hflip": bool, "class_weight": str, "early_stop": int,
                 "compile": bool, "threshold": str, "recipe": str}
ZOO_KEYS = {"backbones": list, "heads": str}
CURVE_KEYS = {"fractions": list, "per_class_shots": list, "repeats": int, "heads": str, "epochs": int}


def _check(table: dict, allowed: dict, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown setting {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")
    for key, kind in allowed.items():
        if key in table and not isinstance(table[key], kind) and not (kind is float and isinstance(table[key], int)):
            raise UserError(f"{where}: {key} must be a {kind.__name__}, got {table[key]!r}")


def read_config(path: str | os.PathLike) -> dict:
    """The config as a dict, checked: unknown keys and wrong types are user errors."""
    from featcache.runtime.config import read_toml

    file = Path(path)
    config = read_toml(file)
    runs = {"fixed": config.pop("fixed", []), "finetune": config.pop("finetune", [])}
    zoo = config.pop("zoo", None)
    curve = config.pop("curve", None)
    _check(config, {**TOP_KEYS, **SOURCE_KEYS}, str(file))
    if zoo is not None:
        _check_zoo(zoo, file)
    if curve is not None:
        if not isinstance(curve, dict):
            raise UserError(f"{file}: write one [curve] table (fractions = [...]), not [[curve]]")
        _check(curve, CURVE_KEYS, f"{file} [curve]")
        if not runs["fixed"]:
            raise UserError(f"{file} [curve]: the curve is drawn on the caches of the [[fixed]] runs; add one")
    for kind, allowed in (("fixed", FIXED_KEYS), ("finetune", FINETUNE_KEYS)):
        if not isinstance(runs[kind], list):
            raise UserError(f"{file}: write [[{kind}]] tables, one per run")
        for i, table in enumerate(runs[kind]):
            _check(table, allowed, f"{file} [[{kind}]] #{i + 1}")
            if "backbone" not in table:
                raise UserError(f"{file} [[{kind}]] #{i + 1}: backbone is required")
            table["backbone"] = with_pool(table["backbone"], table.pop("pool", None))  # one name from here on
    if not runs["fixed"] and not runs["finetune"] and zoo is None:
        raise UserError(f"{file} lists no runs: add [[fixed]] or [[finetune]] tables, or a [zoo] table")
    if "data" not in config:
        raise UserError(f"{file}: data (the chest X-ray folder) is required")
    return {**config, **runs, "zoo": zoo, "curve": curve}


def _check_zoo(zoo, file: Path) -> None:
    """The [zoo] table: backbones (names) and heads; every other setting is the config's top-level one."""
    where = f"{file} [zoo]"
    if not isinstance(zoo, dict):
        raise UserError(f"{file}: write one [zoo] table (backbones = [...]), not [[zoo]]")
    top = sorted(k for k in zoo if k.replace("-", "_") in {**TOP_KEYS, **SOURCE_KEYS})
    if top:
        raise UserError(f"{where}: {', '.join(top)} is set at the top of the config, for every run and the zoo "
                        "alike; move it above the tables")
    _check(zoo, ZOO_KEYS, where)
    backbones = zoo.get("backbones")
    if not backbones or not all(isinstance(b, str) for b in backbones):
        raise UserError(f"{where}: backbones must be a list of one or more backbone names, got {backbones!r}")


def zoo_settings(path: str | os.PathLike) -> dict:
    """The top-level settings of the run config at ``path`` that its ``[zoo]`` runs with, named as
    ``featcache zoo``'s flags: data, weights, subset, seed (the first of ``seeds``), decode, label source...;
    ``out`` becomes ``OUT/zoo``, where `featcache run` puts the zoo."""
    from featcache.runtime.config import read_toml

    config = read_toml(Path(path))
    known = {k: v for k, v in config.items() if k in {**TOP_KEYS, **SOURCE_KEYS}}
    _check(known, {**TOP_KEYS, **SOURCE_KEYS}, str(path))
    settings = {k: v for k, v in known.items() if k not in ("title", "seeds")}
    if config.get("seeds"):
        settings["seed"] = config["seeds"][0]
    if "out" in settings:
        settings["out"] = str(Path(settings["out"]) / "zoo")
    return settings


def run_config(path: str | os.PathLike, *, weights: str | None = None, data: str | None = None,
               out: str | None = None, overwrite: bool = False) -> dict:
    """Run every step of the config at ``path``; returns the report's numbers."""
    from featcache.backbones.registry import get_entry
    from featcache.runtime.console import get_console
    from featcache.curve import curve
    from featcache.extract import extract
    from featcache.finetune import finetune
    from featcache.fit import fit_head
    from featcache.heads import HEADS
    from featcache.report.document import build_report, summary
    from featcache.zoo import zoo

    config = read_config(path)
    zoo_table = config["zoo"] or {"backbones": []}
    for name in (*(t["backbone"] for t in (*config["fixed"], *config["finetune"])), *zoo_table["backbones"]):
        get_entry(name)  # every name is checked before the first long step
    for name, table in (("zoo", zoo_table), ("curve", config["curve"] or {})):
        if table.get("heads", "sweep") not in HEADS:
            raise UserError(f"{path} [{name}]: heads takes {', '.join(HEADS)}, got {table['heads']!r}")
    console = get_console()
    data = data or config["data"]
    weights = weights or config.get("weights", EXTRACT.weights)
    out = Path(out or config.get("out", "runs/" + Path(path).stem))
    seeds = config.get("seeds") or [config.get("seed", 0)]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in seeds):
        raise UserError(f"{path}: seeds must be a list of integers, got {seeds!r}")
    repeated = len(seeds) > 1
    scan_options = {"label_from_name": config.get("label_from_name"), "split_seed": config.get("split_seed", 0),
                    **{key: config[key] for key in SOURCE_KEYS if key in config}}
    # Multi-label sets: how uncertain and unmentioned labels become targets, for every run of the config.
    policy = {"uncertain": config.get("uncertain", HEAD.uncertain),
              "unmentioned": config.get("unmentioned", HEAD.unmentioned)}
    run_dirs, caches = [], []
    if config["zoo"]:
        console.rule(f"[bold]zoo: {len(zoo_table['backbones'])} backbones")
        # One leaderboard, with the first seed: the zoo compares backbones, the seeds repeat the runs below.
        zoo(data, out / "zoo", backbones=zoo_table["backbones"], weights=weights,
            heads=zoo_table.get("heads", "sweep"), seed=seeds[0], max_images=config.get("max_images"),
            subsample_all=config.get("subsample_all", False),
            batch_size=config.get("batch_size", EXTRACT.batch_size), backend=config.get("backend", EXTRACT.backend),
            device=config.get("device", EXTRACT.device), n_resamples=config.get("bootstrap", HEAD.n_resamples),
            positive_class=config.get("positive_class"), **policy, scan_options=scan_options, overwrite=overwrite)
        run_dirs.append(out / "zoo")
    for seed in seeds:
        tag = f"-seed{seed}" if repeated else ""  # the report shows mean and sd over runs named NAME-seedN
        common = {"seed": seed, "max_images": config.get("max_images"),
                  "subsample_all": config.get("subsample_all", False)}
        for i, fixed in enumerate(config["fixed"]):
            backbone = fixed["backbone"]
            # The seed changes a random-init backbone, so its cache; pretrained features are shared.
            cache_tag = tag if WeightsRef.parse(weights).is_random else ""
            cache = out / "caches" / f"{file_word(backbone)}-{WeightsRef.parse(weights).file_tag}{cache_tag}.h5"
            console.rule(f"[bold]fixed feature extractor {i + 1}/{len(config['fixed'])}: {backbone}"
                         + (f", seed {seed}" if repeated else ""))
            extract(data, cache, backbone=backbone, weights=weights,
                    batch_size=config.get("batch_size", EXTRACT.batch_size),
                    backend=config.get("backend", EXTRACT.backend), device=config.get("device", EXTRACT.device),
                    scan_options=scan_options, overwrite=overwrite, **common)
            heads = fixed.get("heads", "sweep")
            if seed == seeds[0] and cache not in caches:
                caches.append(cache)
            run_dir = out / "runs" / f"{file_word(backbone)}-{heads}{tag}"
            metrics = fit_head(cache, run_dir, heads=heads, C=fixed.get("C"), class_weight=fixed.get("class_weight"),
                               threshold=fixed.get("threshold", HEAD.threshold),
                               epochs=fixed.get("epochs", HEAD.epochs),
                               sampler=fixed.get("sampler", HEAD.sampler), device=config.get("device", HEAD.device),
                               n_resamples=config.get("bootstrap", HEAD.n_resamples), seed=seed,
                               positive_class=config.get("positive_class"), **policy)
            console.print(f"{run_dir.name}: val AUROC {metrics['val']['auroc']:.3f}, test AUROC "
                          f"{metrics.get('test', {}).get('auroc') or float('nan'):.3f}")
            run_dirs.append(run_dir)
        for i, tune in enumerate(config["finetune"]):
            backbone = tune["backbone"]
            mode = "frozen" if tune.get("freeze_backbone") or tune.get("recipe") == "tutorial" else "full"
            augment = tune.get("augment", "tutorial" if tune.get("recipe") == "tutorial" else "light")
            recipe = "-tutorial-recipe" if tune.get("recipe") == "tutorial" else ""
            run_dir = out / "runs" / f"{file_word(backbone)}-finetune-{mode}-{augment}{recipe}{tag}"
            console.rule(f"[bold]fine-tuning {i + 1}/{len(config['finetune'])}: {backbone}, {mode}, augment {augment}"
                         + (f", seed {seed}" if repeated else ""))
            options = {k: v for k, v in tune.items() if k not in ("backbone",)}
            if tune.get("recipe") != "tutorial":  # the tutorial's recipe keeps its own batch of 4
                options.setdefault("batch_size", config.get("batch_size", EXTRACT.batch_size))
            finetune(data, run_dir, backbone=backbone, weights=weights,
                     device=config.get("device", FINETUNE.device),
                     n_resamples=config.get("bootstrap", FINETUNE.n_resamples),
                     positive_class=config.get("positive_class"), scan_options=scan_options, overwrite=overwrite,
                     **options, **common, **policy)
            run_dirs.append(run_dir)
    if config["curve"]:
        table = config["curve"]
        console.rule(f"[bold]label efficiency: {len(caches)} cache{'s' if len(caches) > 1 else ''}")
        curve([str(c) for c in caches], out / "curve", fractions=table.get("fractions"),
              shots=table.get("per_class_shots"), repeats=table.get("repeats", DEFAULT_REPEATS),
              heads=table.get("heads", "sweep"), epochs=table.get("epochs", HEAD.epochs),
              device=config.get("device", HEAD.device), n_resamples=config.get("bootstrap", DEFAULT_RESAMPLES),
              seed=seeds[0], positive_class=config.get("positive_class"), overwrite=overwrite)
        run_dirs.append(out / "curve")
    console.rule("[bold]report")
    facts = build_report([str(d) for d in run_dirs], out / "report",
                         title=config.get("title", f"featcache: {Path(path).stem}"))
    for line in summary(facts):
        console.print(line)
    console.print(f"report: {out / 'report' / 'report.html'} (and report.md)")
    return facts
