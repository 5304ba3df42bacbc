"""Command line: parsing only; each subcommand unpacks its flags into one library call.

Nothing heavy is imported here, so ``featcache --help`` is instant.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from featcache import __version__
from featcache.errors import UserError
from featcache.options import EXTRACT, FINETUNE, HEAD


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every other user mistake
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _number(kind, test, words: str):
    """An argparse type: ``kind`` of the text, refused (one line, exit 2) unless ``test`` holds."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {words}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {words}")
        return value

    parse.__name__ = words  # argparse names the type in its messages
    return parse


_count = _number(int, lambda v: v >= 0, "a whole number of 0 or more")
_positive_int = _number(int, lambda v: v >= 1, "a whole number of 1 or more")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
_probability = _number(float, lambda v: 0.0 <= v <= 1.0, "a number between 0 and 1")


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")


def _head_kinds() -> dict:
    """The head kinds by --heads name (featcache.heads imports numpy, not torch or scikit-learn)."""
    from featcache.heads import HEADS

    return HEADS


def _backbone_names() -> str:
    from featcache.backbones.registry import backbone_names

    return backbone_names()


def _backends() -> str:
    from featcache.decode import BACKENDS

    return "|".join(BACKENDS)


def _add_scan_flags(p: argparse.ArgumentParser) -> None:
    from featcache.data.manifest import DEFAULT_MIN_VAL, DEFAULT_VAL_FRACTION

    g = p.add_argument_group("scanning the data folder")
    g.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="share of each class's train images carved out as validation, whole patients only "
                        "(default %(default)s)")
    g.add_argument("--min-val", type=_count, default=DEFAULT_MIN_VAL,
                   help="a val/ folder smaller than this is folded into train and val is carved instead "
                        "(default %(default)s; Kaggle's has 16)")
    g.add_argument("--patient-regex", default=None,
                   help="regex applied to file stems; group 'patient' (or group 1) is the patient id "
                        "(default: Kermany names, else the file stem)")
    g.add_argument("--label-from-name", nargs="+", default=None, metavar="REGEX=CLASS",
                   help="label files by name instead of folder: the first REGEX found in the file name gives "
                        "the class; preset kermany-3class = _bacteria_=BACTERIA _virus_=VIRUS")
    g.add_argument("--split-seed", type=_count, default=0,
                   help="seeds the carved validation split only, so --seed can change without moving it "
                        "(default %(default)s)")
    _add_label_source_flags(p)


def _add_label_source_flags(p: argparse.ArgumentParser) -> None:
    from featcache.data.sources import DEFAULT_FORMAT, format_names

    g = p.add_argument_group("label sources (--format)")
    g.add_argument("--format", default=DEFAULT_FORMAT, metavar=format_names(),
                   help="how DATA lists images and labels: folder (DATA/{train,val,test}/CLASS/*), csv (DATA is a "
                        "CSV file), nih, chexpert, mimic (DATA is the dataset folder as downloaded) "
                        "(default %(default)s)")
    g.add_argument("--path-col", default=None, metavar="COLUMN", help="csv: the image path column (default path)")
    g.add_argument("--label-col", default=None, metavar="COLUMN",
                   help="csv: one class name per row, or names joined by | for multi-label (default label)")
    g.add_argument("--label-cols", default=None, metavar="A,B,...",
                   help="csv: one column per label holding 1, 0, -1 (uncertain) or blank (not mentioned)")
    g.add_argument("--patient-col", default=None, metavar="COLUMN",
                   help="csv: patient ids (default: from file names, as for folders)")
    g.add_argument("--split-col", default=None, metavar="COLUMN",
                   help="csv: train, val or test per row (default: every row in split all)")
    g.add_argument("--root", default=None, metavar="DIR", help="csv: the folder paths are relative to "
                                                               "(default: the CSV's folder)")
    g.add_argument("--views", default="all", metavar="frontal|lateral|all|PA,AP,...",
                   help="nih, chexpert, mimic: keep these views only (default %(default)s)")


def _add_model(p: argparse.ArgumentParser, defaults, weights_help: str | None = None) -> None:
    """--backbone, --pool and --weights, for the commands that build a backbone."""
    p.add_argument("--backbone", default=defaults.backbone, help=f"one of: {_backbone_names()} (default %(default)s)")
    _add_pool(p, "hf: vision transformers: the CLS token, the mean of the patch tokens, or both concatenated "
                 "(DINOv2's linear-eval input, twice the dimension); part of the backbone's name, "
                 "hf:REPO#pool=mean, which may also be written directly (default cls)")
    p.add_argument("--weights", default=defaults.weights, metavar="imagenet|none|PATH",
                   help=weights_help or "torchvision ImageNet weights, seeded random init (none or none:seed=N), "
                                        "or a state_dict file (default %(default)s)")


# --pool beside --backbones (zoo, models), where names of several families mix.
LIST_POOL_HELP = ("how the hf: vision transformers among them pool their tokens, as extract --pool; a name's own "
                  "#pool= suffix wins, other families keep their own features (default cls)")


def _add_pool(p: argparse.ArgumentParser, help: str) -> None:
    from featcache.backbones.registry import POOLS

    p.add_argument("--pool", default=None, choices=POOLS, metavar="|".join(POOLS), help=help)


def _backbone(args) -> str:
    """--backbone pooled as --pool says: the one name its caches, runs and predict know it by."""
    from featcache.backbones.registry import with_pool

    return with_pool(args.backbone, args.pool)


def _backbones(args) -> list[str]:
    """--backbones with --pool applied to the hf: encoders among them that name no pool of their own."""
    from featcache.backbones.registry import POOL_MARK, poolable, with_pool

    return [with_pool(name, args.pool) if poolable(name) and POOL_MARK not in name else name
            for name in args.backbones or ()]


def _add_device(p: argparse.ArgumentParser, default: str = "auto", help: str = "(default auto: cuda when present)"):
    p.add_argument("--device", type=_device, default=default, metavar="auto|cpu|cuda", help=help)


def _add_decode(p: argparse.ArgumentParser, defaults, backend_help: str, workers_help: str) -> None:
    """--backend and --workers: how images are decoded."""
    p.add_argument("--backend", default=defaults.backend, metavar=_backends(), help=backend_help)
    p.add_argument("--workers", type=_count, default=defaults.workers, help=workers_help)


def _add_subset(p: argparse.ArgumentParser, default=None, what: str = "a stratified subset of N train images "
                "(classes in proportion); val and test stay whole") -> None:
    p.add_argument("--max-images", type=_positive_int, default=default, metavar="N", help=what)
    p.add_argument("--subsample-all", action="store_true",
                   help="--max-images subsamples every split, val and test too (quick benchmarks)")


def _add_bootstrap(p: argparse.ArgumentParser, default: int, help: str) -> None:
    p.add_argument("--bootstrap", type=_count, default=default, metavar="N", help=help)


def _add_run_flags(p: argparse.ArgumentParser, nproc_help: str, overwrite_help: str) -> None:
    """--overwrite, --nproc and --no-progress: how a long-running command runs."""
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--nproc", type=_positive_int, default=1, help=nproc_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_label_policies(p: argparse.ArgumentParser, defaults):
    """--uncertain and --unmentioned (how multi-label labels as read become targets), in a group returned
    for the command's other multi-label flags."""
    g = p.add_argument_group("multi-label sets")
    g.add_argument("--uncertain", default=defaults.uncertain, metavar="ignore|ones|zeros",
                   help="uncertain labels (-1): left out of loss and metrics, or taken as positive or negative "
                        "(CheXpert's U-Ignore, U-Ones, U-Zeros) (default %(default)s)")
    g.add_argument("--unmentioned", default=defaults.unmentioned, metavar="negative|ignore",
                   help="labels not mentioned (blank): negative, or left out (default %(default)s)")
    return g


def _add_positive_class(p: argparse.ArgumentParser, default) -> None:
    from featcache.options import DEFAULT_POSITIVE_CLASS

    p.add_argument("--positive-class", default=default, metavar="CLASS",
                   help=f"two classes: the one scored as positive (AUROC, sensitivity, threshold) (default "
                        f"{DEFAULT_POSITIVE_CLASS} when present, else the last class)")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", default=None,
                   help="read this command's settings from the [COMMAND] table of a TOML file; "
                        "flags given here override it")


def _add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=_count, default=0,
                   help="seeds random init (--weights none), shuffling and subsets; the validation split has "
                        "--split-seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="featcache", description="Frozen-backbone feature caches and linear heads for chest X-rays.")
    parser.add_argument("--version", action="version", version=f"featcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("scan", help="list a data folder: images per split and class, patients, skipped files",
                       description="Walk DATA once and print images per split x class, patients and skipped files.")
    p.add_argument("data", metavar="DATA", nargs="?", help="DATA/{train,val,test}/CLASS/* or DATA/CLASS/*; with "
                                                           "--format, a CSV file or a dataset folder")
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
    _add_model(p, EXTRACT)
    p.add_argument("--batch-size", type=_positive_int, default=EXTRACT.batch_size)
    _add_decode(p, EXTRACT, backend_help="decode backend (default auto: DALI on a GPU; on CPU, PIL reduced-scale "
                                         "decode for full-size JPEGs, else torchvision)",
                workers_help="decode worker processes (default: half the cores)")
    _add_device(p, EXTRACT.device)
    p.add_argument("--dtype", default=EXTRACT.dtype, metavar="float32|float16", help="stored feature type")
    p.add_argument("--amp", default=EXTRACT.amp, metavar="off|auto|bf16|fp16",
                   help="run the backbone under autocast: about 2x faster on CPUs with native bf16 and on GPUs; "
                        "features differ slightly, so it is part of the cache fingerprint (default off)")
    p.add_argument("--hw-decoder-load", type=float, default=EXTRACT.hw_decoder_load, metavar="F",
                   help="DALI on A100/H100-class GPUs: share of JPEGs for the hardware decoder (default 0.65)")
    p.add_argument("--compression", default=EXTRACT.compression, metavar="none|gzip|lzf",
                   help="HDF5 compression of features")
    p.add_argument("--aug-views", type=_count, default=EXTRACT.aug_views, metavar="K",
                   help="also cache K augmented views of each train image (val and test stay plain), seeded per "
                        "image and view; fit-head and curve train on every view (default 0)")
    p.add_argument("--augment", default=EXTRACT.augment, metavar="light|strong",
                   help="the augmentation of the --aug-views, as finetune --augment (default none)")
    p.add_argument("--wait", action="store_true", help="queue behind another extract writing the same cache "
                                                       "instead of exiting")
    _add_run_flags(p, nproc_help="local worker processes, launched with torchrun (one per GPU on a GPU node)",
                   overwrite_help="replace a cache made from different inputs")
    _add_subset(p, EXTRACT.max_images, "a stratified subset of N train images; val and test stay whole (as "
                                       "finetune --max-images, same seed: same images)")
    p.add_argument("--chunk-rows", type=_positive_int, default=EXTRACT.chunk_rows,
                   help="rows committed together; a crash loses at most one chunk per process (default 1024)")
    _add_scan_flags(p)
    _add_seed(p)
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("fit-head", help="train linear heads on caches and report clinical metrics",
                       description="Fit heads on cached features; choose the head and the threshold on "
                                   "validation; report validation and test with patient-bootstrap CIs. "
                                   "Several caches: one run folder each under --out and a comparison table.")
    p.add_argument("cache", metavar="CACHE.h5", nargs="*", help="one or more caches written by featcache extract")
    p.add_argument("--out", metavar="RUN_DIR", help="where metrics.json, head.pt and the plots go (required)")
    _add_config(p)
    kinds = _head_kinds()
    p.add_argument("--heads", default=HEAD.heads, metavar="|".join(kinds),
                   help="; ".join(f"{name}: {kind.help}" for name, kind in kinds.items())
                        + " (default %(default)s)")
    p.add_argument("--C", type=_positive_float, default=HEAD.C,
                   help="logistic: inverse L2 strength (default: chosen on val)")
    p.add_argument("--class-weight", default=HEAD.class_weight, metavar="none|balanced",
                   help="default: none for logistic and mlp, both (a grid axis) for sweep and knn")
    p.add_argument("--threshold", default=HEAD.threshold, metavar="0.5|youden|f1",
                   help="two classes: decision threshold on the positive-class probability, fixed or chosen "
                        "on val; multi-label: one per label, by the same rule (default %(default)s)")
    p.add_argument("--target-sensitivity", type=_probability, default=HEAD.target_sensitivity, metavar="S",
                   help="instead: the highest threshold reaching this validation sensitivity, e.g. 0.95")
    p.add_argument("--sampler", default=HEAD.sampler, metavar="shuffle|balanced",
                   help="sweep minibatches: plain shuffling, or classes drawn equally often")
    p.add_argument("--epochs", type=_positive_int, default=HEAD.epochs,
                   help="sweep epochs; mlp: the most, each head stopped early on val (default %(default)s)")
    _add_device(p, HEAD.device, help="where the sweep and mlp train")
    _add_bootstrap(p, HEAD.n_resamples, "patient-bootstrap resamples for 95%% CIs; 0 turns them off "
                                        "(default %(default)s)")
    p.add_argument("--seed", type=_count, default=HEAD.seed, help="seeds the sweep's minibatches and the bootstrap")
    _add_positive_class(p, HEAD.positive_class)
    g = _add_label_policies(p, HEAD)
    g.add_argument("--labels", default=HEAD.labels, metavar="SOURCE",
                   help="fit on this label source's labels instead of the cache's (read as --format says, "
                        "matched to the cache's rows by path; rows without a label are dropped)")
    _add_label_source_flags(p)
    p.set_defaults(func=_cmd_fit_head)

    p = sub.add_parser("curve", help="label-efficiency curves: test AUROC against training images, from caches",
                       description="For each fraction (or images per class) and repeat: a seeded subset of the "
                                   "training patients, the head sweep fitted on it and chosen on the whole "
                                   "validation split, test AUROC with its patient-bootstrap CI. Resumable: each "
                                   "point is saved to curve.json as it finishes. Multi-label caches: subsets "
                                   "stratified over every label, heads chosen by mean validation AUROC, mean test "
                                   "AUROC over labels.")
    p.add_argument("cache", metavar="CACHE.h5", nargs="*", help="one or more caches written by featcache extract")
    p.add_argument("--out", metavar="DIR", help="curve.json, curve.csv and curve.png go here (required)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fractions", type=_positive_float, nargs="+", default=None, metavar="F",
                   help="fractions of each class's training images, whole patients "
                        "(default 0.01 0.02 0.05 0.1 0.25 0.5 1)")
    g.add_argument("--per-class-shots", type=_positive_int, nargs="+", default=None, metavar="N",
                   help="instead: N training images per class, from distinct patients where possible "
                        "(multi-label: at least N positives of every label, and a negative of each)")
    p.add_argument("--repeats", type=_positive_int, default=5, help="subsets drawn per point (default %(default)s)")
    p.add_argument("--heads", default="sweep", metavar="|".join(kinds),
                   help="head kind fitted at each point (default %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=HEAD.epochs, help="sweep epochs (default %(default)s)")
    _add_device(p, HEAD.device, help="where the sweep and mlp train")
    _add_bootstrap(p, 200, "patient-bootstrap resamples for each point's test CI; 0 turns them off "
                           "(default %(default)s)")
    p.add_argument("--seed", type=_count, default=HEAD.seed,
                   help="repeat r draws its subsets with seed + r; also seeds the sweep and the bootstrap")
    _add_positive_class(p, HEAD.positive_class)
    _add_label_policies(p, HEAD)
    p.add_argument("--overwrite", action="store_true", help="replace a curve.json in DIR made with other settings")
    p.set_defaults(func=_cmd_curve)

    p = sub.add_parser("finetune", help="train every weight (or a new head on a frozen backbone) in one AMP loop",
                       description="Fine-tune a backbone on DATA (same manifest and validation split as extract); "
                                   "keep the best epoch by validation AUROC; report val and test like fit-head.")
    p.add_argument("data", metavar="DATA", nargs="?")
    p.add_argument("--out", metavar="RUN_DIR", help="where checkpoints, history and metrics go (required)")
    _add_config(p)
    _add_model(p, FINETUNE)
    p.add_argument("--recipe", default=FINETUNE.recipe, metavar="featcache|tutorial",
                   help="featcache: AdamW + cosine (frozen mode: BatchNorm statistics fixed, features standardized "
                        "by a BatchNorm1d); tutorial: the PyTorch transfer-learning tutorial's fixed feature "
                        "extractor (SGD momentum 0.9, StepLR 7/0.1 per epoch, batch 4, RandomResizedCrop + flip, "
                        "BatchNorm in train mode, best epoch by val accuracy, 25 epochs) (default %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=FINETUNE.epochs,
                   help="(default 10; 25 with --recipe tutorial)")
    p.add_argument("--lr", type=_positive_float, default=FINETUNE.lr,
                   help="learning rate (default 3e-4; 1e-3 when frozen or with --recipe tutorial)")
    p.add_argument("--batch-size", type=_positive_int, default=FINETUNE.batch_size,
                   help="(default 32; 4 with --recipe tutorial)")
    p.add_argument("--amp", default=FINETUNE.amp, metavar="auto|bf16|fp16|off",
                   help="mixed precision (auto: bf16 where supported, fp16 with loss scaling on older GPUs)")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="train only a new head; the backbone still runs forward every epoch")
    p.add_argument("--augment", default=FINETUNE.augment, metavar="none|light|strong|tutorial",
                   help="small rotations, shifts, scalings, brightness/contrast; no flips (default light); "
                        "tutorial: RandomResizedCrop + horizontal flip (the default with --recipe tutorial)")
    p.add_argument("--hflip", action="store_true", help="also flip horizontally (moves the heart: off by default)")
    p.add_argument("--class-weight", default=FINETUNE.class_weight, metavar="none|balanced")
    p.add_argument("--early-stop", type=_positive_int, default=FINETUNE.early_stop, metavar="PATIENCE",
                   help="stop after this many epochs without a better validation AUROC")
    _add_subset(p, FINETUNE.max_images)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threshold", default=FINETUNE.threshold, metavar="0.5|youden|f1", help="as for fit-head")
    _add_device(p, FINETUNE.device)
    _add_decode(p, FINETUNE, backend_help="decode and augment with DALI (on the GPU with a GPU; auto there), PIL or "
                                          "torchvision", workers_help="decode worker processes (default: half the cores)")
    _add_bootstrap(p, FINETUNE.n_resamples, "CI resamples for the final metrics")
    _add_run_flags(p, nproc_help="DDP processes launched with torchrun",
                   overwrite_help="replace a run with other settings in RUN_DIR")
    _add_positive_class(p, FINETUNE.positive_class)
    _add_label_policies(p, FINETUNE)
    _add_scan_flags(p)
    _add_seed(p)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("zoo", help="rank backbones on your data: extract each, fit the head sweep, leaderboard "
                                   "by validation with test CIs and cost (Task A)",
                       description="Extract every backbone (resumable; a matching cache is reused), fit the head "
                                   "sweep on each, and rank them by validation AUROC, never by test: test AUROC "
                                   "with its patient-bootstrap CI, the paired CI of each test difference to the "
                                   "first, parameters, GMACs, extraction speed and cache size.")
    p.add_argument("data", metavar="DATA", nargs="?")
    p.add_argument("--out", metavar="DIR", help="caches/, runs/ and leaderboard.{json,csv,png} go here (required)")
    _add_config(p)
    p.add_argument("--backbones", nargs="+", default=None, metavar="NAME",
                   help=f"backbones to compare: {_backbone_names()}")
    _add_pool(p, LIST_POOL_HELP)
    p.add_argument("--weights", default=EXTRACT.weights, metavar="imagenet|none|PATH",
                   help="the same for every backbone (default %(default)s)")
    p.add_argument("--heads", default="sweep", metavar="|".join(_head_kinds()),
                   help="head fitted on each cache (default %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=EXTRACT.batch_size)
    _add_decode(p, EXTRACT, backend_help="decode backend, as for extract",
                workers_help="decode worker processes (default: half the cores)")
    _add_device(p, EXTRACT.device)
    _add_subset(p, EXTRACT.max_images)
    _add_bootstrap(p, HEAD.n_resamples, "patient-bootstrap resamples for the CIs (default %(default)s)")
    _add_positive_class(p, HEAD.positive_class)
    _add_label_policies(p, HEAD)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a backbone's cache made from other inputs (data, subset, preprocessing) in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scan_flags(p)
    _add_seed(p)
    p.set_defaults(func=_cmd_zoo)

    p = sub.add_parser("report", help="Markdown and HTML report ranking a zoo's backbones (Task A), comparing "
                                      "runs (Task D) and explaining test results (Task E)",
                       description="Compare fit-head and finetune runs; analyse class balance, thresholds, "
                                   "train/test shift, leakage, overfitting and the worst errors. A featcache zoo "
                                   "folder among them adds Task A: its leaderboard and the backbone ranked first "
                                   "on validation; a featcache curve folder adds label efficiency.")
    p.add_argument("runs", metavar="RUN_DIR", nargs="+",
                   help="fit-head and finetune run folders, at most one featcache zoo folder (it holds "
                        "leaderboard.json) and featcache curve folders (they hold curve.json)")
    p.add_argument("--out", required=True, metavar="REPORT_DIR")
    p.add_argument("--title", default="featcache report")
    p.add_argument("--pdf", action="store_true", help="also write report.pdf (for hand-ins that must be PDF)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("run", help="run every step of a TOML comparison config, then write the report",
                       description="Extract, fit heads, fine-tune and report, as a config lists them "
                                   "(see configs/). Every step resumes where it stopped.")
    p.add_argument("config_file", metavar="CONFIG.toml")
    p.add_argument("--weights", default=None, metavar="imagenet|none|PATH",
                   help="override the config's weights (offline: none)")
    p.add_argument("--data", default=None, help="override the config's data folder")
    p.add_argument("--out", default=None, help="override the config's output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace caches and fine-tuning runs in OUT made from other inputs (e.g. after editing "
                        "max_images or data) instead of stopping at them")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("models", help="backbones: parameters, GFLOPs, ImageNet top-1, measured speed",
                       description="Task A: each backbone's cost from torchvision's metadata, and its forward "
                                   "images/s and peak memory measured on this machine (and its GPU).")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--backbones", nargs="+", default=None, metavar="NAME",
                   help="any backbone names (tv:..., timm:...; default: the four short names)")
    _add_pool(p, LIST_POOL_HELP)
    p.add_argument("--no-measure", action="store_true", help="no speed measurement (metadata and counts only)")
    p.add_argument("--json", default=None, metavar="OUT.json")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("bench", help="stage speeds and the cache vs tutorial vs fine-tuning comparison",
                       description="Measure decode, forward, extract (with its time breakdown), fit-head and "
                                   "training steps, then the same images three ways: featcache extract + heads, "
                                   "the classic tutorial's frozen-backbone training, and full fine-tuning.")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--backbone", default="resnet18")
    _add_pool(p, "hf: vision transformers: cls, mean or cls+mean, as extract --pool (default cls)")
    p.add_argument("--max-images", type=int, default=600,
                   help="stratified subset of N train images, val and test whole (default %(default)s; 0: all)")
    p.add_argument("--subsample-all", action="store_true",
                   help="--max-images subsamples every split, val and test too, on every side")
    p.add_argument("--epochs", type=int, default=25,
                   help="epochs of the trained approaches (default %(default)s, the PyTorch tutorial's)")
    p.add_argument("--weights", default="auto", metavar="auto|imagenet|none",
                   help="compare's starting weights, the same on every side (default auto: ImageNet when it "
                        "can be had, else seeded random init)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="patient-bootstrap resamples of every compare side's test CI (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--amp", default=FINETUNE.amp, metavar="auto|bf16|fp16|off",
                   help="compare: fine-tuning's precision, and a second featcache extract + sweep row in it when "
                        "it is not fp32 (the fp32 row is always there; the tutorial runs in fp32, as written; "
                        "default %(default)s)")
    p.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                   help="decode forward extract fit-head finetune-step compare (default: all)")
    p.add_argument("--json", default=None, metavar="OUT.json")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep caches and runs here")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("synth", help="generate X-ray-like full-size JPEGs for throughput work",
                       description="Deterministic grayscale chest-X-ray-like JPEGs (1-3 MP, Kermany names and "
                                   "patient ids, PNEUMONIA with opacity patches) in OUT/{train,test}/CLASS/.")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--n", type=_positive_int, required=True, help="number of images")
    p.add_argument("--seed", type=_count, default=0)
    p.add_argument("--workers", type=_count, default=None, help="processes (default: every core)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("inspect", help="what a cache holds: backbone, weights, rows per split and class, progress",
                       description="Describe a cache (or the progress of an extraction into it).")
    p.add_argument("cache", metavar="CACHE.h5")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("predict", help="apply a fitted run (backbone + head) to images; CSV out",
                       description="Scores per class and the thresholded label for each image, with the "
                                   "backbone and head of a fit-head run.")
    p.add_argument("run", metavar="RUN_DIR", help="a folder written by featcache fit-head or finetune")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", metavar="PREDICTIONS.csv", default=None,
                   help="CSV to write (default: a new RUN_DIR/predict-DATE-TIME.csv; never the run's own files)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="the backbone weights file, when the one recorded in the run has moved")
    p.add_argument("--batch-size", type=_positive_int, default=EXTRACT.batch_size)
    _add_device(p)
    p.set_defaults(func=_cmd_predict)

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
    rules = [args.label_from_name] if isinstance(args.label_from_name, str) else args.label_from_name
    return {"val_fraction": args.val_fraction, "min_val": args.min_val, "patient_regex": args.patient_regex,
            "label_from_name": rules, "split_seed": args.split_seed, "format": args.format,
            "path_col": args.path_col, "label_col": args.label_col, "label_cols": args.label_cols,
            "patient_col": args.patient_col, "split_col": args.split_col, "root": args.root, "views": args.views}


def _label_source_options(args) -> dict:
    """fit-head's --format and its flags, which say how --labels is read (and mean nothing without it)."""
    from featcache.data.sources import DEFAULT_FORMAT, SCAN_DEFAULTS

    options = {"format": args.format, **{k: getattr(args, k) for k in ("path_col", "label_col", "label_cols",
                                                                      "patient_col", "split_col", "root", "views")}}
    if args.labels is None:
        stray = [k for k, v in options.items() if v != (DEFAULT_FORMAT if k == "format" else SCAN_DEFAULTS[k])]
        if stray:
            raise UserError(f"{', '.join('--' + k.replace('_', '-') for k in stray)} "
                            f"{'says' if len(stray) == 1 else 'say'} how --labels is read; give --labels SOURCE")
    return options


def _print_manifest(manifest) -> None:
    from featcache.runtime.console import get_console
    from featcache.runtime.tables import print_manifest

    print_manifest(manifest, get_console())


def _cmd_scan(args) -> int:
    from featcache.data.sources import read_manifest

    _require(args, "data")
    if args.out:
        _json_output(args.out, "--out")
    manifest = read_manifest(args.data, **_scan_options(args))
    _print_manifest(manifest)
    if args.out:
        manifest.save(args.out)
        print(f"manifest written to {args.out}")
    return 0


def _extract_kwargs(args) -> dict:
    return dict(backbone=_backbone(args), weights=args.weights, batch_size=args.batch_size, backend=args.backend,
                device=args.device, workers=args.workers, seed=args.seed, overwrite=args.overwrite, dtype=args.dtype,
                compression=args.compression, chunk_rows=args.chunk_rows, wait=args.wait, max_images=args.max_images,
                subsample_all=args.subsample_all,
                hw_decoder_load=args.hw_decoder_load, amp=args.amp, aug_views=args.aug_views,
                augment=args.augment, progress=not args.no_progress)


def _cmd_extract(args) -> int:
    import os

    from featcache.data.sources import read_manifest

    _require(args, "data", "out")
    from pathlib import Path

    from featcache.extract import validate_options

    validate_options(Path(args.out), _backbone(args), args.dtype, args.compression, args.chunk_rows)  # before the scan
    manifest = read_manifest(args.data, **_scan_options(args)).limit(args.max_images, args.seed,
                                                                    subsample_all=args.subsample_all)
    if os.environ.get("RANK", "0") == "0":
        _print_manifest(manifest)
    from featcache.extract import extract, launch

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(args.out, nproc=args.nproc, argv=args.argv, manifest=manifest,
                      backbone=_backbone(args), weights=args.weights, seed=args.seed, device=args.device,
                      backend=args.backend, dtype=args.dtype, amp=args.amp, wait=args.wait,
                      overwrite=args.overwrite, aug_views=args.aug_views, augment=args.augment)
    extract(args.data, args.out, manifest=manifest, **_extract_kwargs(args))
    return 0


def _cmd_fit_head(args) -> int:
    from featcache.fit import fit_head, fit_heads

    caches = [args.cache] if isinstance(args.cache, str) else list(args.cache or [])
    if not caches:
        raise UserError("CACHE.h5 is required (on the command line, or as cache in the --config table)")
    _require(args, "out")
    options = dict(heads=args.heads, C=args.C, class_weight=args.class_weight, threshold=args.threshold,
                   target_sensitivity=args.target_sensitivity, sampler=args.sampler, epochs=args.epochs,
                   device=args.device, n_resamples=args.bootstrap, seed=args.seed,
                   positive_class=args.positive_class, uncertain=args.uncertain, unmentioned=args.unmentioned,
                   labels=args.labels, label_options=_label_source_options(args))
    if len(caches) == 1:
        _print_metrics(fit_head(caches[0], args.out, **options), args.out)
    else:
        _print_comparison(fit_heads(caches, args.out, **options), args.out)
    return 0


def _print_metrics(metrics: dict, out, files: str = "metrics.json, head.pt and plots (roc, pr, reliability, "
                                                    "confusion_matrix)") -> None:
    from featcache.runtime.console import get_console
    from featcache.runtime.tables import metrics_renderables

    sel = metrics["selected"]
    console = get_console()
    if metrics.get("task") == "multilabel":
        policy = metrics["policy"]
        decision = (f"a threshold per label ({metrics['threshold_rule']}); uncertain: {policy['uncertain']}, "
                    f"not mentioned: {policy['unmentioned']}")
        files = files.replace("roc, pr, reliability, confusion_matrix", "roc_grid")
    else:
        decision = (f"threshold {metrics['threshold']:.3f} ({metrics['threshold_rule']}), positive class "
                    f"{metrics['positive_class']}" if metrics["threshold"] is not None else "argmax decision")
    console.print(f"[bold]{metrics['backbone']}[/] ({metrics['weights']}): best of {metrics['n_heads']} "
                  f"{sel['head']} head{'s' if metrics['n_heads'] > 1 else ''} by val AUROC: [bold]{sel['name']}[/]; "
                  f"{decision}")
    for renderable in metrics_renderables(metrics):
        console.print(renderable)
    from featcache.fit import grid_edges

    for text in grid_edges(metrics):
        console.print(f"[yellow]head on the grid's edge:[/] {text}")
    console.print(f"fitted in {metrics['fit_seconds']:.2f} s; {files} in {out}")


def _print_comparison(rows: list[dict], out) -> None:
    from featcache.runtime.console import get_console
    from featcache.runtime.tables import comparison_table

    console = get_console()
    console.print(comparison_table(rows))
    console.print(f"one run folder per cache and comparison.json in {out}")


def _cmd_curve(args) -> int:
    from featcache.curve import curve, table
    from featcache.runtime.console import get_console

    _require(args, "out")
    console = get_console()

    def shown(point):
        test = "-" if point["test_auroc"] is None else f"{point['test_auroc']:.3f}"
        console.print(f"{point['cache']} {point['mode']} {point['value']:g} repeat {point['repeat']}: "
                      f"{point['train_images']} images, val AUROC {point['val_auroc']:.3f}, test AUROC {test}")

    record = curve(args.cache, args.out, fractions=args.fractions, shots=args.per_class_shots, repeats=args.repeats,
                   heads=args.heads, epochs=args.epochs, device=args.device, n_resamples=args.bootstrap,
                   seed=args.seed, positive_class=args.positive_class, uncertain=args.uncertain,
                   unmentioned=args.unmentioned, overwrite=args.overwrite, progress=shown)
    console.print(table(record["summary"], multilabel=record["settings"].get("task") == "multilabel"))
    console.print(f"curve.json, curve.csv and curve.png written to {args.out}")
    return 0


def _cmd_finetune(args) -> int:
    import os

    from featcache.runtime import distributed

    _require(args, "data", "out")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from featcache.backbones.registry import get_entry

        get_entry(_backbone(args))  # the commonest mistakes fail here, once, before the launch
        from featcache.data.labels import check_policy
        from featcache.data.sources import read_manifest

        check_policy(args.uncertain, args.unmentioned)
        read_manifest(args.data, **_scan_options(args))
        return distributed.launch(args.nproc, distributed.strip_nproc(args.argv))
    from featcache.finetune import finetune

    metrics = finetune(args.data, args.out, backbone=_backbone(args), weights=args.weights, epochs=args.epochs,
                       lr=args.lr, batch_size=args.batch_size, amp=args.amp, freeze_backbone=args.freeze_backbone,
                       augment=args.augment, hflip=args.hflip, class_weight=args.class_weight,
                       early_stop=args.early_stop, recipe=args.recipe, max_images=args.max_images,
                       subsample_all=args.subsample_all, compile=args.compile,
                       seed=args.seed, threshold=args.threshold, device=args.device, backend=args.backend,
                       workers=args.workers, overwrite=args.overwrite, scan_options=_scan_options(args),
                       n_resamples=args.bootstrap, progress=not args.no_progress,
                       positive_class=args.positive_class, uncertain=args.uncertain, unmentioned=args.unmentioned)
    if metrics is not None:
        _print_metrics(metrics, args.out, files="best.pt, history.json, learning_curve.png, metrics.json and plots")
    return 0


def _cmd_zoo(args) -> int:
    from featcache.runtime.console import get_console
    from featcache.zoo import table, zoo

    _require(args, "data", "out")
    if not args.backbones:
        raise UserError("--backbones is required (on the command line, or as backbones in the --config table)")
    rows = zoo(args.data, args.out, backbones=_backbones(args), weights=args.weights, heads=args.heads,
               seed=args.seed, max_images=args.max_images, subsample_all=args.subsample_all,
               batch_size=args.batch_size, backend=args.backend, device=args.device, workers=args.workers,
               n_resamples=args.bootstrap, positive_class=args.positive_class, uncertain=args.uncertain,
               unmentioned=args.unmentioned, scan_options=_scan_options(args), progress=not args.no_progress,
               overwrite=args.overwrite)
    console = get_console()
    # Twelve columns: wider than 80 when the output is a file or a pipe, so a log keeps the table whole.
    width = console.width
    if not console.is_terminal:
        console.width = max(width, 180)
    try:
        console.print(table(rows))
    finally:
        console.width = width
    console.print(f"leaderboard.json, leaderboard.csv and leaderboard.png written to {args.out}")
    return 0


def _cmd_report(args) -> int:
    from featcache.runtime.console import get_console
    from featcache.report.document import build_report, summary

    facts = build_report(args.runs, args.out, title=args.title, pdf=args.pdf)
    console = get_console()
    for line in summary(facts):
        console.print(line)
    console.print(f"report.md, report.html (self-contained){', report.pdf' if args.pdf else ''} and plots in "
                  f"{args.out}")
    return 0


def _cmd_run(args) -> int:
    from featcache.run import run_config

    run_config(args.config_file, weights=args.weights, data=args.data, out=args.out, overwrite=args.overwrite)
    return 0


def _cmd_models(args) -> int:
    import json

    from featcache.runtime.console import get_console
    from featcache.backbones.costs import families_table, model_table, render

    if args.json:
        _json_output(args.json, "--json")
    console = get_console()
    console.print(families_table())
    rows = model_table(names=_backbones(args) or None, measure_speed=not args.no_measure, batch_size=args.batch_size,
                       progress=lambda text: console.print(f"[dim]{text}[/]"))
    console.print(render(rows, args.batch_size))
    if args.json:
        _json_output(args.json, "--json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _json_output(path: str, flag: str):
    """A JSON file to write at the end, checked (and its folder made) before the work."""
    from featcache.runtime.outputs import output_file

    out = output_file(path, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _cmd_bench(args) -> int:
    import json

    from featcache.bench import STAGES, render, run_bench
    from featcache.runtime.console import get_console

    facts = run_bench(args.data, backbone=_backbone(args), max_images=args.max_images or None, epochs=args.epochs,
                      batch_size=args.batch_size, stages=tuple(args.stages or STAGES), keep=args.keep,
                      subsample_all=args.subsample_all, weights=args.weights, n_resamples=args.bootstrap,
                      amp=args.amp)
    console = get_console()
    for renderable in render(facts):
        console.print(renderable)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(facts, f, indent=2)
    return 0


def _cmd_synth(args) -> int:
    from featcache.runtime.console import get_console
    from featcache.data.synth import synth

    result = synth(args.out, args.n, seed=args.seed, workers=args.workers)
    get_console().print(f"{result['images']:,} images ({result['bytes'] / 1e6:.0f} MB) in {result['out']}")
    return 0


def _cmd_inspect(args) -> int:
    import json

    from featcache.runtime.console import get_console
    from featcache.cache.describe import describe, render

    info = describe(args.cache)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for renderable in render(info):
            get_console().print(renderable)
    return 0


def _cmd_predict(args) -> int:
    from featcache.predict import default_output, predict
    from featcache.runtime.console import get_console
    from featcache.runtime.tables import predictions_table

    out = args.out or str(default_output(args.run))
    rows = predict(args.run, args.images, out_csv=out, weights=args.weights, batch_size=args.batch_size,
                   device=args.device)
    console = get_console()
    console.print(predictions_table(rows[:20]))
    failed = sum(1 for r in rows if r["error"])
    more = " (first 20 shown)" if len(rows) > 20 else ""
    console.print(f"{len(rows)} images{more}, {failed} could not be decoded; CSV written to {out}")
    return 0


def _cmd_demo(args) -> int:
    from featcache.data.demo import run_demo

    metrics, out = run_demo(args.out, weights=args.weights, data=args.data)
    _print_metrics(metrics, out)
    return 0


def _reparse_with_config(parser: argparse.ArgumentParser, args, argv):
    """Parse again with the config's ``[command]`` table as defaults, so flags still win."""
    from featcache.runtime.config import load_table

    sub = _subparser(parser, args.command)
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    table = load_table(args.config, args.command, set(actions))
    if args.command == "zoo":  # a run config's [zoo] runs with its top-level settings, as `featcache run` runs it
        from featcache.run import zoo_settings

        table = {**{k: v for k, v in zoo_settings(args.config).items() if k in actions}, **table}
    sub.set_defaults(**{key: _config_value(args.config, args.command, actions[key], value)
                        for key, value in table.items()})
    return parser.parse_args(argv)


def _config_value(path: str, command: str, action: argparse.Action, value):
    """A TOML setting checked and converted exactly as its flag would be (2.5 is no batch size)."""
    where = f"{path} [{command}] {action.dest.replace('_', '-')}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    values = value if isinstance(value, list) else [value]
    if action.nargs in (None, "?") and isinstance(value, list):
        raise UserError(f"{where}: expected one value, got a list")
    if any(isinstance(v, (dict, list)) for v in values):
        raise UserError(f"{where}: expected a plain value, got {value!r}")
    converted = []
    for v in values:
        text = str(v).lower() if isinstance(v, bool) else str(v)
        try:
            converted.append(action.type(text) if action.type else text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise UserError(f"{where}: {exc or repr(v) + ' is not valid'}") from None
    return converted if isinstance(value, list) else converted[0]


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv
        if args.command is None:
            parser.print_help()
            return 2
        if getattr(args, "config", None):
            args = _reparse_with_config(parser, args, argv)
            args.argv = argv
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return int(exc.code or 0)
    except UserError as exc:
        sys.stderr.write(f"featcache {args.command}: error: {exc}\n")
        return 2
    try:
        return args.func(args)
    except UserError as exc:
        sys.stderr.write(f"featcache {args.command}: error: {exc}\n")
        from featcache.runtime.distributed import note_user_error

        note_user_error(str(exc))
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"featcache {args.command}: interrupted\n")
        return 130


def entry() -> None:
    sys.exit(main())
