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

    python bench/probes.py [--train 100000] [--queries 20000] [--dim 768] [--cache CACHE.h5] [--json OUT]

The generated features are two classes of Gaussian clusters (64 cluster
centres, rows near their centre), so neighbours carry label information and
the votes are not ties.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = 64
SPREAD = 0.6


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


def knn_grid(X, y, Q, yq, search) -> dict:
    """The whole --heads knn grid with ``search`` as the neighbour search: seconds per stage and the choice."""
    import numpy as np

    from featcache.fit import select, selection_score
    from featcache.heads import knn

    start = time.perf_counter()
    train, queries = knn.l2_rows(X), knn.l2_rows(Q)
    normalised = time.perf_counter()
    ks = list(knn.K_GRID)
    sims, index = search(train, queries, max(ks))
    searched = time.perf_counter()
    neighbour_targets = knn.one_hot(y, 2)[index.numpy()]
    candidates = []
    for cw in knn.CLASS_WEIGHTS:
        weights = None if cw == "none" else knn.class_weight_vector(np.asarray(y), 2, cw)
        for temperature in knn.TEMPERATURES:
            probs = knn.vote_probabilities(sims, neighbour_targets, ks, temperature, weights)
            candidates += [{"name": f"k_{k}_T_{temperature:g}_cw_{cw}", "val_auroc": selection_score(yq, p, 1),
                            "rank": (k, temperature, cw == "none")} for k, p in zip(ks, probs)]
    done = time.perf_counter()
    best = select(candidates)
    return {"seconds": done - start, "normalise_seconds": normalised - start, "search_seconds": searched - normalised,
            "votes_and_scores_seconds": done - searched, "n_heads": len(candidates), "selected": best["name"],
            "auroc": best["val_auroc"], "index": index}


def knn_bench(n_train: int, n_queries: int, dim: int) -> dict:
    import torch

    from featcache.heads import knn

    X, y, Q, yq = generated(n_train, n_queries, dim)
    print(f"kNN grid: {n_train:,} x {dim} train rows, {n_queries:,} queries, k in {list(knn.K_GRID)}, "
          f"T in {list(knn.TEMPERATURES)}, class weight none|balanced; torch threads {torch.get_num_threads()}")
    block = knn.block_rows(n_train)
    print(f"  torch blocks: {block} queries x {n_train:,} train = {block * n_train * 4 / 2**20:.0f} MiB of "
          f"similarities at a time (queries x train whole: {n_queries * n_train * 4 / 2**30:.1f} GiB; "
          f"train x train: {n_train * n_train * 4 / 2**30:.1f} GiB)")
    results = {}
    sides = [("torch", knn.nearest)]
    try:
        import faiss

        sides.append(("faiss", faiss_nearest))
        print(f"  faiss-cpu {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads")
    except ImportError:
        print("  faiss-cpu is not installed: torch only (pip install faiss-cpu to compare)")
    for name, search in sides:
        r = knn_grid(X, y, Q, yq, search)
        results[name] = r
        print(f"  {name:6s} {r['seconds']:7.1f} s  (search {r['search_seconds']:.1f} s, votes and scores of "
              f"{r['n_heads']} heads {r['votes_and_scores_seconds']:.1f} s); chosen {r['selected']}, "
              f"val AUROC {r['auroc']:.4f}")
    if "faiss" in results:
        same = (results["torch"]["index"] == results["faiss"]["index"]).float().mean().item()
        ratio = results["faiss"]["seconds"] / results["torch"]["seconds"]
        print(f"  same neighbour at the same rank: {same:.2%} (the rest: float ties and rounding); "
              f"faiss / torch time {ratio:.2f}")
    for r in results.values():
        r.pop("index")
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
                         "selected": m["selected"]["name"], "val_auroc": m["val"]["auroc"],
                         "test_auroc": test.get("auroc"), "test_auroc_ci": ci})
            print(f"  {heads:6s} {m['fit_seconds']:6.1f} s  {m['n_heads']:3d} heads, chosen {m['selected']['name']}: "
                  f"val AUROC {m['val']['auroc']:.4f}, test AUROC {test.get('auroc', float('nan')):.4f} "
                  f"[{ci[0]:.3f}, {ci[1]:.3f}]")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--cache", help="also fit sweep, knn and mlp heads on this cache")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    facts = {"knn": knn_bench(args.train, args.queries, args.dim)}
    if args.cache:
        facts["cache"] = probes_on_cache(args.cache)
    if args.json:
        Path(args.json).write_text(json.dumps(facts, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
