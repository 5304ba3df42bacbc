"""The embedded default: a 400-image real subset and the whole path run on it."""

from __future__ import annotations

from pathlib import Path


DEMO_DATA = Path(__file__).resolve().parent / "chest_xray_mini"
DEMO_BACKBONE = "resnet18"


def _pick_weights(weights: str, console) -> str:
    """``auto`` means ImageNet when it can be had, else a loud random init."""
    if weights != "auto":
        return weights
    from featcache.backbones.registry import auto_weights

    ref, why = auto_weights(DEMO_BACKBONE)
    if why is None:
        return ref.cli_value
    console.rule("[bold yellow]no ImageNet weights")
    console.print(f"[bold yellow]{why}")
    console.print("[bold yellow]Continuing with --weights none: a RANDOMLY INITIALISED resnet18. "
                  "Numbers below are a random-feature baseline, not transfer learning.")
    console.rule(style="yellow")
    return ref.cli_value


def _file_word(weights: str) -> str:
    from featcache.backbones.weights import WeightsRef

    ref = WeightsRef.parse(weights)
    return "file" if ref.kind == "file" else ref.short


def run_demo(out: str, *, weights: str = "auto", data: str | None = None) -> tuple[dict, Path]:
    """scan -> extract -> fit-head on ``data`` (the embedded subset by default)."""
    from featcache.runtime.console import get_console
    from featcache.extract import extract
    from featcache.fit import fit_head
    from featcache.data.manifest import scan
    from featcache.runtime.tables import print_manifest

    console = get_console()
    data = Path(data) if data else DEMO_DATA
    out = Path(out)
    console.rule("[bold]1. scan")
    manifest = scan(data)
    print_manifest(manifest, console)
    weights = _pick_weights(weights, console)
    console.rule("[bold]2. extract")
    cache = out / f"{DEMO_BACKBONE}-{_file_word(weights)}.h5"
    extract(data, cache, backbone=DEMO_BACKBONE, weights=weights, manifest=manifest)
    console.rule("[bold]3. fit-head")
    run_dir = out / "logistic"
    metrics = fit_head(cache, run_dir)
    return metrics, run_dir
