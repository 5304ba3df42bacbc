"""Command line: parsing only; each subcommand unpacks its flags into one library call.

Nothing heavy is imported here, so ``featcache --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys

from featcache import __version__
from featcache.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every other user mistake
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _backbone_names() -> str:
    from featcache.backbones import REGISTRY

    return ", ".join(REGISTRY)


def _add_scan_flags(p: argparse.ArgumentParser) -> None:
    from featcache.manifest import DEFAULT_MIN_VAL, DEFAULT_VAL_FRACTION

    g = p.add_argument_group("scanning the data folder")
    g.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="share of each class's train images carved out as validation, whole patients only "
                        "(default %(default)s)")
    g.add_argument("--min-val", type=int, default=DEFAULT_MIN_VAL,
                   help="a val/ folder smaller than this is folded into train and val is carved instead "
                        "(default %(default)s; Kaggle's has 16)")
    g.add_argument("--patient-regex", default=None,
                   help="regex applied to file stems; group 'patient' (or group 1) is the patient id "
                        "(default: Kermany names, else the file stem)")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", default=None,
                   help="read this command's settings from the [COMMAND] table of a TOML file; "
                        "flags given here override it")


def _add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the validation split and random init with --weights none (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="featcache", description="Frozen-backbone feature caches and linear heads for chest X-rays.")
    parser.add_argument("--version", action="version", version=f"featcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("scan", help="list a data folder: images per split and class, patients, skipped files",
                       description="Walk DATA once and print images per split x class, patients and skipped files.")
    p.add_argument("data", metavar="DATA", nargs="?", help="DATA/{train,val,test}/CLASS/* or DATA/CLASS/*")
    _add_config(p)
    p.add_argument("--out", default=None, metavar="MANIFEST.json", help="also write the manifest as JSON")
    _add_scan_flags(p)
    _add_seed(p)
    p.set_defaults(func=_cmd_scan)

    p = sub.add_parser("extract", help="run a frozen backbone over every image once and cache the features",
                       description="decode -> frozen backbone -> HDF5 feature cache.")
    p.add_argument("data", metavar="DATA", nargs="?", help="the data folder (as for scan)")
    p.add_argument("--out", metavar="CACHE.h5", help="the cache to write (required)")
    _add_config(p)
    p.add_argument("--backbone", default="resnet18", help=f"one of: {_backbone_names()} (default %(default)s)")
    p.add_argument("--weights", default="imagenet", metavar="imagenet|none|PATH",
                   help="torchvision ImageNet weights, seeded random init, or a state_dict file (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backend", default="auto", metavar="auto|torchvision|dali", help="decode backend (default auto)")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda", help="(default auto: cuda when present)")
    p.add_argument("--workers", type=int, default=None, help="decode worker processes (default: half the cores)")
    p.add_argument("--dtype", default="float32", metavar="float32|float16", help="stored feature type")
    p.add_argument("--overwrite", action="store_true", help="replace a cache made from different inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scan_flags(p)
    _add_seed(p)
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("fit-head", help="train a linear head on a cache and report clinical metrics",
                       description="Fit a head on cached features; choose hyperparameters and the threshold "
                                   "on validation; report validation and test.")
    p.add_argument("cache", metavar="CACHE.h5", nargs="?", help="a cache written by featcache extract")
    p.add_argument("--out", metavar="RUN_DIR", help="where metrics.json, head.pt and the plots go (required)")
    _add_config(p)
    p.add_argument("--heads", default="logistic", metavar="logistic", help="head type (default %(default)s)")
    p.add_argument("--C", type=float, default=None, help="inverse L2 strength (default: chosen on val from a grid)")
    p.add_argument("--class-weight", default="none", metavar="none|balanced")
    p.add_argument("--threshold", default="0.5", metavar="0.5|youden|f1",
                   help="decision threshold on the positive-class probability, fixed or chosen on val "
                        "(default %(default)s)")
    p.set_defaults(func=_cmd_fit_head)

    p = sub.add_parser("demo", help="scan, extract and fit a head on the embedded 400-image subset",
                       description="The whole fixed-feature-extractor path on a small real subset shipped "
                                   "with featcache.")
    p.add_argument("--out", default="runs/demo", metavar="DIR")
    p.add_argument("--weights", default="auto", metavar="auto|imagenet|none|PATH",
                   help="auto: ImageNet when available, else random init (said loudly)")
    p.add_argument("--data", default=None, help="another data folder instead of the embedded subset")
    p.set_defaults(func=_cmd_demo)
    return parser


def _require(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) is None:
            flag = name.upper() if name in ("data", "cache") else f"--{name}"
            raise UserError(f"{flag} is required (on the command line, or as {name} in the --config table)")


def _scan_options(args) -> dict:
    return {"val_fraction": args.val_fraction, "min_val": args.min_val, "patient_regex": args.patient_regex}


def _print_manifest(manifest) -> None:
    from featcache.console import get_console
    from featcache.tables import print_manifest

    print_manifest(manifest, get_console())


def _cmd_scan(args) -> int:
    from featcache.manifest import scan

    _require(args, "data")
    manifest = scan(args.data, seed=args.seed, **_scan_options(args))
    _print_manifest(manifest)
    if args.out:
        manifest.save(args.out)
        print(f"manifest written to {args.out}")
    return 0


def _cmd_extract(args) -> int:
    from featcache.extract import extract
    from featcache.manifest import scan

    _require(args, "data", "out")
    manifest = scan(args.data, seed=args.seed, **_scan_options(args))
    _print_manifest(manifest)
    extract(args.data, args.out, backbone=args.backbone, weights=args.weights, batch_size=args.batch_size,
            backend=args.backend, device=args.device, workers=args.workers, seed=args.seed,
            overwrite=args.overwrite, dtype=args.dtype, manifest=manifest, progress=not args.no_progress)
    return 0


def _cmd_fit_head(args) -> int:
    from featcache.heads import fit_head

    _require(args, "cache", "out")
    metrics = fit_head(args.cache, args.out, heads=args.heads, C=args.C, class_weight=args.class_weight,
                       threshold=args.threshold)
    _print_metrics(metrics, args.out)
    return 0


def _print_metrics(metrics: dict, out) -> None:
    from featcache.console import get_console
    from featcache.tables import metrics_renderables

    sel = metrics["selected"]
    console = get_console()
    console.print(f"[bold]{metrics['backbone']}[/] ({metrics['weights']}) + logistic head: C={sel['C']:g}, "
                  f"class weight {sel['class_weight']}, threshold {metrics['threshold']:.3f} "
                  f"({metrics['threshold_rule']}), positive class {metrics['positive_class']}")
    for renderable in metrics_renderables(metrics):
        console.print(renderable)
    console.print(f"fitted in {metrics['fit_seconds']:.2f} s; metrics.json, head.pt, roc.png and "
                  f"confusion_matrix.png in {out}")


def _cmd_demo(args) -> int:
    from featcache.demo import run_demo

    metrics, out = run_demo(args.out, weights=args.weights, data=args.data)
    _print_metrics(metrics, out)
    return 0


def _reparse_with_config(parser: argparse.ArgumentParser, args, argv):
    """Parse again with the config's ``[command]`` table as defaults, so flags still win."""
    from featcache.config import load_table

    sub = _subparser(parser, args.command)
    valid = {a.dest for a in sub._actions if a.dest not in ("help", "config")}
    sub.set_defaults(**load_table(args.config, args.command, valid))
    return parser.parse_args(argv)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if getattr(args, "config", None):
            args = _reparse_with_config(parser, args, argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return int(exc.code or 0)
    except UserError as exc:
        sys.stderr.write(f"featcache {args.command}: error: {exc}\n")
        return 2
    try:
        return args.func(args)
    except UserError as exc:
        sys.stderr.write(f"featcache {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"featcache {args.command}: interrupted\n")
        return 130


def entry() -> None:
    sys.exit(main())
