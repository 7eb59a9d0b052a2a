"""Benchmark the index: Annoy vs exact search at 100k x 256, per-category strategy, and real embeddings.

Run: ``.venv/bin/python benchmarks/bench_index.py [--part all|synthetic|real] [--n 100000] [--dim 256]``

1. Synthetic clustered vectors (n x dim, L2-normalised): build time of Annoy (1 thread = byte-identical,
   all cores) and of exact search (nothing to build), then recall@10 (held-out queries, against exact) and
   single-query QPS for exact search and for Annoy across ``search_k``.
2. Selective category filters (the per-category sub-index decision): for categories holding 0.5 %, 2 % and
   10 % of the items, recall@10 and latency of (a) over-fetching the global index, (b) an exact scan of the
   category's rows, (c) a dedicated per-category Annoy index.
3. Real embeddings of ../shared/datasets/clothing-small (``niteru.embed``'s default embedder, vectors cached
   in benchmarks/results/): the smallest ``search_k`` reaching recall@10 >= 0.95 for several ``n_trees``.

Prints tables and writes benchmarks/results/bench_index_synthetic.json and bench_index_real.json.

BLAS runs single-threaded unless OPENBLAS_NUM_THREADS is set: Annoy answers one query on one core, and a
multi-threaded BLAS on a busy 2-core machine makes a single 100k x 256 mat-vec 10-20x slower (threads spin
against each other). A service scales queries across workers instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy is imported; see the docstring

import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from niteru.index import build_annoy, exact_knn  # noqa: E402
from niteru.io import write_json_atomic  # noqa: E402

log = logging.getLogger("bench_index")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATASET = HERE.parent.parent / "shared" / "datasets" / "clothing-small" / "train"
K = 10


def clustered(n: int, dim: int, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Catalog-like vectors: cluster centres with spread; returns (L2-normalised vectors, cluster labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    labels = rng.integers(0, n_clusters, n)
    x = centres[labels] + 1.0 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def recall(got: list[list[int]] | np.ndarray, truth: np.ndarray, k: int = K) -> float:
    return float(np.mean([len(set(list(g)[:k]) & set(t[:k].tolist())) / k for g, t in zip(got, truth)]))


def annoy_queries(index, queries: np.ndarray, k: int, search_k: int) -> tuple[list[list[int]], float]:
    lists = [q.tolist() for q in queries]
    t = time.perf_counter()
    got = [index.get_nns_by_vector(q, k, search_k=search_k) for q in lists]
    return got, len(lists) / (time.perf_counter() - t)


def exact_single_qps(queries: np.ndarray, vectors: np.ndarray, k: int) -> float:
    t = time.perf_counter()
    for q in queries:
        exact_knn(q[None, :], vectors, k)
    return len(queries) / (time.perf_counter() - t)


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


# ------------------------------------------------------------------------------------------- 1. ann vs exact
def bench_ann_vs_exact(n: int, dim: int, n_trees: int, n_queries: int, seed: int) -> dict:
    vectors, labels = clustered(n + n_queries, dim, n_clusters=max(10, n // 100), seed=seed)
    queries, vectors, labels = vectors[:n_queries], vectors[n_queries:], labels[n_queries:]
    truth, _ = exact_knn(queries, vectors, K)
    t = time.perf_counter()
    exact_knn(queries, vectors, K)
    exact_batch_qps = n_queries / (time.perf_counter() - t)
    builds = {}
    index = None
    for n_jobs in (1, -1):
        t = time.perf_counter()
        idx = build_annoy(vectors, n_trees, seed, n_jobs=n_jobs)
        builds[n_jobs] = time.perf_counter() - t
        if index is None:
            index = idx
        else:
            idx.unload()
    rows = [{"method": "exact (batched matmul)", "search_k": None, "build_s": 0.0, "recall@10": 1.0,
             "qps": exact_batch_qps},
            {"method": "exact (one query at a time)", "search_k": None, "build_s": 0.0, "recall@10": 1.0,
             "qps": exact_single_qps(queries[:100], vectors, K)}]
    for search_k in (-1, 1000, 2000, 5000, 10000, 20000, 50000):
        got, qps = annoy_queries(index, queries, K, search_k)
        rows.append({"method": f"annoy {n_trees} trees", "search_k": search_k if search_k > 0 else K * n_trees,
                     "build_s": builds[-1], "recall@10": recall(got, truth), "qps": qps})
    index.unload()
    return {"n": n, "dim": dim, "n_trees": n_trees, "n_queries": n_queries,
            "build_s_1_thread": builds[1], "build_s_all_cores": builds[-1], "rows": rows,
            "_vectors": vectors, "_labels": labels, "_queries": queries}


# ------------------------------------------------------------------------------------------- 2. categories
def bench_categories(vectors: np.ndarray, queries: np.ndarray, n_trees: int, seed: int) -> list[dict]:
    """Recall@10 within a category and latency for three strategies, for several category sizes."""
    n = len(vectors)
    rng = np.random.default_rng(seed)
    index = build_annoy(vectors, n_trees, seed, n_jobs=-1)
    rows = []
    for frac in (0.005, 0.02, 0.10):
        members = np.sort(rng.choice(n, int(n * frac), replace=False))
        mask = np.zeros(n, dtype=bool)
        mask[members] = True
        sub = np.ascontiguousarray(vectors[members])
        truth_local, _ = exact_knn(queries, sub, K)
        truth = members[truth_local]
        # (a) over-fetch the global index (what a filter on the global index costs)
        fetch = int(np.ceil(K / frac * 1.5)) + 1
        t = time.perf_counter()
        got_a = []
        for q in queries:
            ids = index.get_nns_by_vector(q.tolist(), fetch, search_k=fetch * n_trees // 4)
            got_a.append([i for i in ids if mask[i]][:K])
        lat_a = (time.perf_counter() - t) / len(queries)
        # (b) exact scan of the category's rows (gather included, as LoadedIndex.query_subset does it)
        t = time.perf_counter()
        got_b = [members[exact_knn(q[None, :], vectors[members], K)[0][0]] for q in queries]
        lat_b = (time.perf_counter() - t) / len(queries)
        # (c) a per-category annoy index
        t = time.perf_counter()
        cat_index = build_annoy(sub, n_trees, seed, n_jobs=-1)
        build_c = time.perf_counter() - t
        got_c_local, qps_c = annoy_queries(cat_index, queries, K, -1)
        cat_index.unload()
        got_c = [members[g] for g in got_c_local]
        rows += [
            {"category_share": frac, "n_in_category": int(mask.sum()), "strategy": f"global over-fetch {fetch}",
             "recall@10": recall(got_a, truth), "ms_per_query": lat_a * 1e3, "extra_build_s": 0.0},
            {"category_share": frac, "n_in_category": int(mask.sum()), "strategy": "exact scan of category",
             "recall@10": recall(got_b, truth), "ms_per_query": lat_b * 1e3, "extra_build_s": 0.0},
            {"category_share": frac, "n_in_category": int(mask.sum()), "strategy": "per-category annoy",
             "recall@10": recall(got_c, truth), "ms_per_query": 1e3 / qps_c, "extra_build_s": build_c},
        ]
    index.unload()
    return rows


# ------------------------------------------------------------------------------------------- 3. real data
def real_embeddings(dataset: Path, batch_size: int) -> tuple[np.ndarray, list[str], str]:
    """Embed every clothing-small photo with niteru.embed's default embedder; cached per model id."""
    from tqdm.auto import tqdm

    from niteru.embed import build_embedder
    from niteru.images import load_rgb

    paths = sorted(dataset.rglob("*.jpg"))
    embedder = build_embedder(device="cpu")
    cache = RESULTS / f"clothing_small_{embedder.model_id}_{len(paths)}.npz"
    if cache.exists():
        data = np.load(cache)
        return data["vectors"], data["labels"].tolist(), embedder.model_id
    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc="embed clothing-small"):
        images = [load_rgb(p) for p in paths[start:start + batch_size]]
        chunks.append(embedder.embed(images, batch_size=batch_size))
    vectors = np.concatenate(chunks).astype(np.float32)
    labels = [p.parent.name for p in paths]
    from niteru.io import atomic_path

    with atomic_path(cache, suffix=".npz") as tmp:
        np.savez(tmp, vectors=vectors, labels=np.asarray(labels))
    return vectors, labels, embedder.model_id


def label_quality(vectors: np.ndarray, labels: list[str], seed: int, n_queries: int = 500) -> list[dict]:
    """Category precision@10 / mAP@10 of the embeddings themselves (exact neighbours), per category."""
    import pandas as pd

    from niteru.evaluate import label_metrics, per_category_table

    idmap = pd.DataFrame({"ann_id": np.arange(len(vectors)), "product_id": [f"img{i}" for i in range(len(vectors))],
                          "category": labels})
    q = np.sort(np.random.default_rng(seed).choice(len(vectors), min(n_queries, len(vectors)), replace=False))
    ids, _ = exact_knn(vectors[q], vectors, K + 1)
    per_query = label_metrics(idmap, q, list(ids), K)
    per_query["ann_recall@10"] = 1.0
    table_ = per_category_table(idmap, per_query, K).drop(columns=["ann_recall@10"])
    overall = {"category": "ALL", "n_products": len(vectors), "n_queries": len(q),
               f"precision@{K}": float(per_query["precision"].mean()), f"map@{K}": float(per_query["ap"].mean())}
    return table_.to_dict(orient="records") + [overall]


def bench_real(vectors: np.ndarray, seed: int, n_queries: int = 300, target: float = 0.95) -> dict:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(vectors))
    queries, base = vectors[order[:n_queries]], vectors[order[n_queries:]]
    truth, _ = exact_knn(queries, base, K)
    rows, needed = [], {}
    for n_trees in (5, 10, 25, 50, 100):
        index = build_annoy(base, n_trees, seed, n_jobs=-1)
        for search_k in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000):
            got, qps = annoy_queries(index, queries, K, search_k)
            r = recall(got, truth)
            rows.append({"n_trees": n_trees, "search_k": search_k, "recall@10": r, "qps": qps})
            if r >= target and n_trees not in needed:
                needed[n_trees] = search_k
        index.unload()
    return {"n_items": int(len(base)), "n_queries": n_queries, "dim": int(vectors.shape[1]), "target": target,
            "search_k_needed": needed, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n-trees", type=int, default=50)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--part", choices=("all", "synthetic", "real"), default="all",
                        help="synthetic = parts 1 and 2, real = part 3 (clothing-small)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads for embedding; 0 = default")
    parser.add_argument("--pca", type=int, default=256, help="also sweep the real vectors PCA-reduced to this dim")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "synthetic"):
        run_synthetic(args)
    if args.part in ("all", "real"):
        run_real(args)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "load_avg": os.getloadavg()}


def run_synthetic(args: argparse.Namespace) -> None:
    out: dict = {"machine_at_start": machine()}
    print(f"\n== 1. annoy vs exact, {args.n:,} x {args.dim}, clustered, {args.queries} held-out queries ==")
    part1 = bench_ann_vs_exact(args.n, args.dim, args.n_trees, args.queries, args.seed)
    print(f"annoy build ({args.n_trees} trees): {part1['build_s_1_thread']:.2f} s on 1 thread (byte-identical), "
          f"{part1['build_s_all_cores']:.2f} s on all cores")
    print(table(part1["rows"], ["method", "search_k", "build_s", "recall@10", "qps"]))

    print("\n== 2. selective category filters (per-category sub-index decision) ==")
    cats = bench_categories(part1["_vectors"], part1["_queries"][:200], args.n_trees, args.seed)
    print(table(cats, ["category_share", "n_in_category", "strategy", "recall@10", "ms_per_query", "extra_build_s"]))
    out["ann_vs_exact"] = {k: v for k, v in part1.items() if not k.startswith("_")}
    out["categories"] = cats
    out["machine_at_end"] = machine()
    dest = RESULTS / "bench_index_synthetic.json"
    write_json_atomic(dest, out)
    print(f"\nwrote {dest} (load average at start {out['machine_at_start']['load_avg']}, "
          f"end {out['machine_at_end']['load_avg']})")


def run_real(args: argparse.Namespace) -> None:
    if not DATASET.is_dir():
        print(f"\n(clothing-small not found at {DATASET}; part 3 skipped)")
        return
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    print("\n== 3. real embeddings: clothing-small ==")
    out: dict = {"machine_at_start": machine()}
    vectors, labels, model_id = real_embeddings(DATASET, args.batch_size)
    real = bench_real(vectors, args.seed)
    real["model_id"] = model_id
    print(f"model {model_id}, {real['n_items']} items x {real['dim']}, {real['n_queries']} held-out queries")
    print(table(real["rows"], ["n_trees", "search_k", "recall@10", "qps"]))
    print(f"smallest search_k with recall@10 >= {real['target']}: {real['search_k_needed']}")
    print(f"(an angular annoy leaf holds up to dim + 2 = {real['dim'] + 2} items, so at this catalog size each tree "
          "has a handful of leaves and tiny search_k values already scan a large share of the catalog)")
    centred = vectors - vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    reduced = centred @ vt[:args.pca].T
    reduced = (reduced / np.linalg.norm(reduced, axis=1, keepdims=True)).astype(np.float32)
    pca = bench_real(reduced, args.seed)
    print(f"\nsame after PCA to {args.pca} dims (what embed's pca_dim does):")
    print(table(pca["rows"], ["n_trees", "search_k", "recall@10", "qps"]))
    print(f"smallest search_k with recall@10 >= {pca['target']}: {pca['search_k_needed']}")
    real["pca"] = {"dim": args.pca, **pca}
    quality = label_quality(vectors, labels, args.seed)
    print("\nembedding quality (exact neighbours, 500 queries, same category = relevant):")
    print(table(quality, ["category", "n_products", "n_queries", f"precision@{K}", f"map@{K}"]))
    real["label_quality"] = quality
    out["clothing_small"] = real
    out["machine_at_end"] = machine()
    dest = RESULTS / "bench_index_real.json"
    write_json_atomic(dest, out)
    print(f"\nwrote {dest}")


if __name__ == "__main__":
    main()
