"""What ``extract --aug-views K`` costs against the plain extraction of the same images.

Extracts a stratified subset of the shared Kermany set (``--max-images`` per
split, val and test subsampled too) twice with the same backbone and
settings, plain and with K augmented views of each train image, each into a
fresh cache, and prints both wall times, their ratio, and the ratio against
the goal: at most (K + 1) x the plain time x 1.1. Only train images get
views, so the work added is K x the train share of the images; the bound for
that work, (1 + K x train share) x 1.1, is printed too. The decode of each
image is shared by its views (they are augmented from its decoded crop).

    python bench/views.py [--data DATA] [--max-images 64] [--views 4] [--augment light] [--backbone resnet18]
                          [--workers 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featcache.cache.h5 import FeatureCache  # noqa: E402
from featcache.extract import extract  # noqa: E402


def timed(data: str, out: Path, args, **views) -> dict:
    summary = extract(data, out, backbone=args.backbone, weights="none", batch_size=args.batch_size,
                      workers=args.workers, max_images=args.max_images, subsample_all=True, progress=False, **views)
    cache = FeatureCache.open(out)
    return {"seconds": summary["seconds"], "rows": summary["rows"], "images": summary["images"],
            "train_images": len(cache.rows("train")), "stages": summary["stages"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray_224"))
    p.add_argument("--max-images", type=int, default=64)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--augment", default="light")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain = timed(args.data, Path(tmp) / "plain.h5", args)
        views = timed(args.data, Path(tmp) / "views.h5", args, aug_views=args.views, augment=args.augment)
    share = views["train_images"] / views["images"]
    ratio = views["seconds"] / plain["seconds"]
    goal, work_goal = (args.views + 1) * 1.1, (1 + args.views * share) * 1.1
    result = {"backbone": args.backbone, "views": args.views, "augment": args.augment, "images": views["images"],
              "train_images": views["train_images"], "plain_seconds": plain["seconds"],
              "views_seconds": views["seconds"], "rows": views["rows"], "ratio": ratio, "goal": goal,
              "work_goal": work_goal, "augment_seconds": views["stages"].get("augment"),
              "forward_seconds": {"plain": plain["stages"]["forward"], "views": views["stages"]["forward"]}}
    print(f"{args.backbone}, {views['images']} images ({views['train_images']} train), K = {args.views} "
          f"({args.augment}): plain {plain['seconds']:.1f} s, with views {views['seconds']:.1f} s "
          f"({views['rows']} rows); ratio {ratio:.2f}x against the goal {goal:.2f}x ((K + 1) x 1.1) and "
          f"{work_goal:.2f}x for the work added ((1 + K x train share {share:.2f}) x 1.1); augmenting took "
          f"{views['stages'].get('augment', 0):.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ratio <= goal else 1


if __name__ == "__main__":
    sys.exit(main())
