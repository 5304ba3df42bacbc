"""kNN and MLP probes at cache speed: the exact kNN search two ways, and the probes against the linear sweep.

1. The kNN grid (every k of 1..200 x temperature x class weight) on
   generated features, 100,000 x 768 train rows and 20,000 queries by
   default, as ``--heads knn`` computes it: one exact search at the largest k,
   then every smaller k and temperature from those neighbours. The search
   is timed two ways, featcache's blocks of torch matmul + topk
   (featcache.heads.knn.nearest) and faiss-cpu's ``IndexFlatIP`` (when
   installed), and the two neighbour lists are compared. Each is one cold
   run (the figure is minutes of BLAS, warm-up matters little); the peak
   similarity block of the torch search is printed beside the N x N it
   never builds.
2. With ``--cache CACHE.h5``: ``fit-head --heads sweep|knn|mlp`` on that
   cache, each in this process: fit seconds, the head chosen on validation,
   val AUROC and test AUROC with its patient-bootstrap CI.
3. With ``--neardup-rows N``: the report's near-duplicate check
   (featcache.report.analysis.near_duplicates, the same exact search) on a
   generated N x ``--neardup-dim`` cache, 90 % train, 5 % val, 5 % test, two
   images per patient, ``PLANTED`` train images copied into test under
   patients of their own. The check runs in a child process under
   featcache.runtime.peak: its seconds and peak resident memory, beside the
   N x N float32 matrix it never holds.

    python bench/probes.py [--train 100000] [--queries 20000] [--dim 768] [--cache CACHE.h5]
                           [--neardup-rows 200000 [--neardup-dim 512] [--skip-knn]] [--json OUT]

The generated features are two classes of Gaussian clusters (64 cluster
centres, rows near their centre), so neighbours carry label information and
the votes are not ties.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = 64
SPREAD = 0.6
SIBLING = 0.3  # a patient's second image: its first plus this much noise per dimension
PLANTED = 10
NEARDUP_BLOCK = 10_000


def generated(n_train: int, n_queries: int, dim: int, seed: int = 0):
    """(train X, train y, query X, query y): rows around ``CLUSTERS`` centres, each centre one class."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, dim)).astype(np.float32)
    centre_class = rng.integers(0, 2, CLUSTERS)

    def rows(n):
        c = rng.integers(0, CLUSTERS, n)
        noise = rng.standard_normal((n, dim), dtype=np.float32) * SPREAD
        y = np.where(rng.random(n) < 0.1, 1 - centre_class[c], centre_class[c])  # 10 % label noise
        return centres[c] + noise, y

    X, y = rows(n_train)
    Q, yq = rows(n_queries)
    return X, y, Q, yq


def faiss_nearest(train, queries, k: int):
    """faiss-cpu's exact inner-product search on the same unit rows: (similarities, indices) as torch tensors."""
    import faiss
    import torch

    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train.numpy())
    sims, found = index.search(queries.numpy(), k)
    return torch.from_numpy(sims), torch.from_numpy(found)


def interleaved_search(train, queries, k: int, sides: dict, step: int) -> dict:
    """Each side's search over the same slices of ``step`` queries, taking turns which goes first:
    (seconds of each slice, (sims, index)).

    This machine is shared; a neighbour's job that starts mid-run slows
    whichever side runs then, so the sides alternate slice by slice and meet
    the same load, and the median of the per-slice ratios is little moved by
    a burst.
    """
    import torch

    seconds = {name: [] for name in sides}
    found = {name: [] for name in sides}
    for i, lo in enumerate(range(0, len(queries), step)):
        names = list(sides) if i % 2 == 0 else list(reversed(sides))
        for name in names:
            start = time.perf_counter()
            found[name].append(sides[name](train, queries[lo : lo + step], k))
            seconds[name].append(time.perf_counter() - start)
    return {name: (seconds[name], tuple(torch.cat(parts) for parts in zip(*found[name]))) for name in sides}


def knn_grid(sims, index, y, yq) -> dict:
    """The rest of the --heads knn grid from neighbours at the largest k: votes of every k, T and class weighting,
    each scored on the queries' labels; the seconds and the head chosen."""
    import numpy as np

    from featcache.fit import select, selection_score
    from featcache.heads import knn
    from featcache.heads.base import CLASS_WEIGHTS, class_weight_vector

    start = time.perf_counter()
    neighbour_targets = knn.one_hot(y, 2)[index.numpy()]
    candidates = []
    for cw in CLASS_WEIGHTS:
        weights = None if cw == "none" else class_weight_vector(np.asarray(y), 2, cw)
        for temperature in knn.TEMPERATURES:
            probs = knn.vote_probabilities(sims, neighbour_targets, knn.K_GRID, temperature, weights)
            candidates += [{"name": f"k_{k}_T_{temperature:g}_cw_{cw}", "val_auroc": selection_score(yq, p, 1),
                            "rank": (k, temperature, cw == "none")} for k, p in zip(knn.K_GRID, probs)]
    best = select(candidates)
    return {"seconds": time.perf_counter() - start, "n_heads": len(candidates), "selected": best["name"],
            "auroc": best["val_auroc"]}


def knn_bench(n_train: int, n_queries: int, dim: int) -> dict:
    import torch

    from featcache.heads import knn
    from featcache.heads.sweep import busy_cores

    X, y, Q, yq = generated(n_train, n_queries, dim)
    print(f"kNN grid: {n_train:,} x {dim} train rows, {n_queries:,} queries, k in {list(knn.K_GRID)}, "
          f"T in {list(knn.TEMPERATURES)}, class weight none|balanced; torch threads {torch.get_num_threads()}")
    block = knn.block_rows(n_train)
    print(f"  torch blocks: {block} queries x {n_train:,} train = {block * n_train * 4 / 2**20:.0f} MiB of "
          f"similarities at a time (queries x train whole: {n_queries * n_train * 4 / 2**30:.1f} GiB; "
          f"train x train: {n_train * n_train * 4 / 2**30:.1f} GiB)")
    sides = {"torch": knn.nearest}
    try:
        import faiss

        sides["faiss"] = faiss_nearest
        print(f"  faiss-cpu {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads")
    except ImportError:
        print("  faiss-cpu is not installed: torch only (pip install faiss-cpu to compare)")
    busy_before = busy_cores()
    start = time.perf_counter()
    train, queries = knn.l2_rows(X), knn.l2_rows(Q)
    normalise = time.perf_counter() - start
    searched = interleaved_search(train, queries, max(knn.K_GRID), sides, step=block)  # one torch block a turn
    grid = knn_grid(*searched["torch"][1], y, yq)
    print(f"  cores kept busy by other processes: {busy_before} before, {busy_cores()} after; searches interleaved "
          f"in slices of {block:,} queries")
    results = {}
    for name, (slices, _) in searched.items():
        total = normalise + sum(slices) + grid["seconds"]
        results[name] = {"seconds": total, "search_seconds": sum(slices), "slice_seconds": slices}
        print(f"  {name:6s} {total:6.1f} s for the grid: normalise {normalise:.1f} s, search {sum(slices):.1f} s, "
              f"votes and scores of {grid['n_heads']} heads {grid['seconds']:.1f} s")
    print(f"  chosen {grid['selected']}, val AUROC {grid['auroc']:.4f}")
    if "faiss" in searched:
        same = (searched["torch"][1][1] == searched["faiss"][1][1]).float().mean().item()
        ratios = [f / t for f, t in zip(searched["faiss"][0], searched["torch"][0])]
        print(f"  same neighbour at the same rank: {same:.2%} (the rest: near-ties in another summation order); "
              f"faiss / torch search time {sum(searched['faiss'][0]) / sum(searched['torch'][0]):.2f} in all, "
              f"median of the slices {statistics.median(ratios):.2f} (from {min(ratios):.2f} to {max(ratios):.2f})")
        results["same_neighbour"] = same
        results["faiss_over_torch_slices"] = ratios
    results["grid"] = grid
    return results


def probes_on_cache(cache: str) -> list[dict]:
    from featcache.fit import fit_head

    rows = []
    print(f"fit-head on {cache}:")
    with tempfile.TemporaryDirectory() as tmp:
        for heads in ("sweep", "knn", "mlp"):
            m = fit_head(cache, Path(tmp) / heads, heads=heads, device="cpu")
            test = m.get("test", {})
            ci = test.get("ci", {}).get("auroc") or [float("nan")] * 2
            rows.append({"heads": heads, "fit_seconds": m["fit_seconds"], "n_heads": m["n_heads"],
                         "selected": m["selected"], "val_auroc": m["val"]["auroc"],
                         "test_auroc": test.get("auroc"), "test_auroc_ci": ci})
            epoch = f" (epoch {m['selected']['epoch']} of {m['selected']['epochs_run']})" if "epoch" in m["selected"] \
                else ""
            print(f"  {heads:6s} {m['fit_seconds']:6.1f} s  {m['n_heads']:3d} heads, chosen {m['selected']['name']}{epoch}: "
                  f"val AUROC {m['val']['auroc']:.4f}, test AUROC {test.get('auroc', float('nan')):.4f} "
                  f"[{ci[0]:.3f}, {ci[1]:.3f}]")
    return rows


def neardup_cache(path: Path, n_rows: int, dim: int, seed: int = 0) -> Path:
    """A cache of ``n_rows`` generated rows (two per patient), written in blocks; test starts with copies of
    the first ``PLANTED`` train rows."""
    import numpy as np

    from featcache.cache.h5 import write_cache

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, dim)).astype(np.float32)
    n_rows -= n_rows % 2
    n_val = n_test = (n_rows // 20) // 2 * 2
    splits = np.array(["train"] * (n_rows - n_val - n_test) + ["val"] * n_val + ["test"] * n_test)
    first_test = n_rows - n_test
    patients = [f"p{i // 2}" for i in range(n_rows)]
    patients[first_test : first_test + PLANTED] = [f"copy{i}" for i in range(PLANTED)]
    planted = {}

    def blocks():
        for lo in range(0, n_rows, NEARDUP_BLOCK):
            n = min(NEARDUP_BLOCK, n_rows - lo) // 2
            base = centres[rng.integers(0, CLUSTERS, n)] + SPREAD * rng.standard_normal((n, dim), dtype=np.float32)
            block = np.stack([base, base + SIBLING * rng.standard_normal((n, dim), dtype=np.float32)], 1)
            block = block.reshape(-1, dim)
            if lo == 0:
                planted["rows"] = block[:PLANTED].copy()
            if lo <= first_test < lo + len(block):
                block[first_test - lo : first_test - lo + PLANTED] = planted["rows"]
            yield block

    return write_cache(path, blocks=blocks(), n_rows=n_rows, feature_dim=dim, labels=np.arange(n_rows) % 2,
                       paths=[f"{s}/NORMAL/{i}.png" for i, s in enumerate(splits)], splits=splits, patients=patients,
                       attrs={"classes": ["NORMAL", "PNEUMONIA"], "backbone": "generated", "weights": "none:seed=0",
                              "fingerprint": "0" * 64, "fingerprint_inputs": {}})


NEARDUP_CHECK = """
import json, sys, time
from featcache.cache.h5 import FeatureCache
from featcache.report.analysis import near_duplicates
start = time.perf_counter()
dup = near_duplicates(FeatureCache.open(sys.argv[1]))
print(json.dumps({"seconds": time.perf_counter() - start, **{k: dup[k] for k in ("threshold", "rule", "pairs_above")},
                  "closest": [p["cosine"] for p in dup["closest"][:3]]}))
"""


def neardup_bench(n_rows: int, dim: int) -> dict:
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cache = neardup_cache(Path(tmp) / "neardup.h5", n_rows, dim)
        print(f"near duplicates: {n_rows:,} x {dim} generated rows ({n_rows * dim * 4 / 2**20:,.0f} MiB of float32 "
              f"features, written in {time.perf_counter() - start:.1f} s), {PLANTED} train images copied into test; "
              f"an N x N float32 matrix would be {n_rows * n_rows * 4 / 2**30:,.0f} GiB")
        proc = subprocess.run([sys.executable, "-m", "featcache.runtime.peak", sys.executable, "-c", NEARDUP_CHECK,
                               str(cache)], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or len(lines) < 2 or lines[-1].split()[-1] != "0":
        raise SystemExit(f"the near-duplicate check failed:\n{proc.stdout}\n{proc.stderr}")
    facts = json.loads(lines[-2])
    _, wall, peak_mb, _ = lines[-1].split()
    facts.update(wall_seconds=float(wall), peak_mb=float(peak_mb))
    print(f"  {facts['seconds']:.1f} s for the check ({facts['wall_seconds']:.1f} s with start-up), peak resident "
          f"memory {facts['peak_mb']:,.0f} MB; threshold {facts['threshold']:.4f} ({facts['rule']})")
    print(f"  nearest pairs at or above it: {facts['pairs_above']}; closest cosines {facts['closest']}")
    return facts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--cache", help="also fit sweep, knn and mlp heads on this cache")
    parser.add_argument("--neardup-rows", type=int, help="also time the report's near-duplicate check on this "
                                                         "many generated rows")
    parser.add_argument("--neardup-dim", type=int, default=512)
    parser.add_argument("--skip-knn", action="store_true", help="leave out the kNN grid (part 1)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    facts = {} if args.skip_knn else {"knn": knn_bench(args.train, args.queries, args.dim)}
    if args.neardup_rows:
        facts["near_duplicates"] = neardup_bench(args.neardup_rows, args.neardup_dim)
    if args.cache:
        facts["cache"] = probes_on_cache(args.cache)
    if args.json:
        Path(args.json).write_text(json.dumps(facts, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
