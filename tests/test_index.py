"""Index stage: determinism, recall against exact search, sidecar checks, on tiny synthetic upstream folders."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from niteru import index as nindex
from niteru.errors import ConfigError, SchemaError
from niteru.io import sha256_file, write_json_atomic, write_npy_atomic, write_parquet_atomic
from niteru.runs import write_stage_summary

MODEL_ID = "synthetic-clusters-v1"


def clustered_vectors(n_categories: int, groups_per_category: int, variants: int, dim: int, seed: int,
                      spread: float = 0.35, jitter: float = 0.08) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L2-normalised vectors: category centres, product (group) centres around them, photo variants."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_categories, dim))
    vecs, cats, groups = [], [], []
    for c in range(n_categories):
        for g in range(groups_per_category):
            product = centres[c] + spread * rng.standard_normal(dim)
            for _ in range(variants):
                vecs.append(product + jitter * rng.standard_normal(dim))
                cats.append(c)
                groups.append(c * groups_per_category + g)
    v = np.asarray(vecs, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True), np.asarray(cats), np.asarray(groups)


def write_upstream(run_dir: Path, n_categories: int = 4, groups_per_category: int = 6, variants: int = 2,
                   dim: int = 16, seed: int = 0, out_of_stock: tuple[int, ...] = (1, 7),
                   model_id: str = MODEL_ID, vectors: np.ndarray | None = None) -> pd.DataFrame:
    """Write extract/ and embed/ as the upstream stages would (docs/architecture.md); return the catalog."""
    vecs, cats, groups = clustered_vectors(n_categories, groups_per_category, variants, dim, seed)
    if vectors is not None:
        vecs = vectors
    n = len(vecs)
    product_ids = [f"P{g:04d}-v{i % variants}" for i, g in enumerate(groups)]
    sha = [f"{i:064x}" for i in range(n)]
    catalog = pd.DataFrame({
        "product_id": product_ids,
        "image_uri": [f"/img/{p}.jpg" for p in product_ids],
        "category": [f"cat{c}" for c in cats],
        "brand": ["Mori"] * n,
        "price": np.linspace(5, 100, n),
        "in_stock": [i not in out_of_stock for i in range(n)],
        "updated_at": pd.Timestamp(dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)),
        "group_id": [f"P{g:04d}" for g in groups],
        "color": ["red"] * n, "pattern": ["solid"] * n, "title": product_ids,
        "image_sha256": sha, "image_path": [f"/cache/{s}" for s in sha],
        "width": 64, "height": 64, "fetch_status": "ok", "fetch_error": None,
    })
    items = pd.DataFrame({"product_id": product_ids, "crop_index": 0, "image_sha256": sha,
                          "x0": 0.0, "y0": 0.0, "x1": 64.0, "y1": 64.0})
    write_parquet_atomic(run_dir / "extract" / "catalog.parquet", catalog)
    write_stage_summary(run_dir / "extract", counts={"n_products": n})
    write_npy_atomic(run_dir / "embed" / "vectors.npy", np.asarray(vecs, dtype=np.float32))
    write_parquet_atomic(run_dir / "embed" / "items.parquet", items)
    write_json_atomic(run_dir / "embed" / "model.json", {"model_id": model_id, "backbone": "synthetic", "dim": dim})
    write_stage_summary(run_dir / "embed", counts={"n_items": n})
    return catalog


def build(run_dir: Path, **params) -> nindex.IndexResult:
    return nindex.run(nindex.IndexConfig(run_dir=str(run_dir), **params))


# ---------------------------------------------------------------------------------------------- stage
def test_run_writes_dense_index_idmap_and_sidecar(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r1"
    catalog = write_upstream(run)
    res = build(run, n_trees=10)
    meta = json.loads((run / "index" / "index.json").read_text())
    in_stock = int(catalog["in_stock"].sum())
    assert in_stock == len(catalog) - 2
    assert meta["n_items"] == in_stock == res.counts["n_items"]
    assert (meta["dim"], meta["metric"], meta["n_trees"], meta["seed"]) == (16, "angular", 10, 0)
    assert meta["model_id"] == MODEL_ID and meta["source_run_id"] == "r1"
    assert meta["sha256"]["index.ann"] == sha256_file(run / "index" / "index.ann")
    assert set(meta["inputs"]) == {"embed/vectors.npy", "embed/items.parquet", "embed/model.json",
                                   "extract/catalog.parquet"}
    assert (run / "index" / "stage.json").exists()

    loaded = nindex.load_index(run / "index", expected_model_id=MODEL_ID, verify_checksums=True)
    idmap = loaded.idmap
    assert idmap["ann_id"].tolist() == list(range(in_stock))
    assert not set(idmap["product_id"]) & set(catalog.loc[~catalog["in_stock"], "product_id"])
    for col in ("category", "brand", "price", "in_stock", "image_uri", "image_path", "group_id", "embed_row"):
        assert col in idmap.columns
    vectors = np.load(run / "embed" / "vectors.npy")
    row = idmap.iloc[5]
    ids, sims = loaded.query(vectors[row["embed_row"]], k=3)
    assert ids[0] == 5 and sims[0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(sims) <= 1e-6)
    np.testing.assert_allclose(loaded.vector(5), vectors[row["embed_row"]], atol=1e-6)
    loaded.unload()


def test_in_stock_only_false_indexes_everything(tmp_path: Path) -> None:
    run = tmp_path / "r"
    catalog = write_upstream(run)
    assert build(run, n_trees=5, in_stock_only=False).counts["n_items"] == len(catalog)


def test_invalid_vectors_are_left_out_and_counted(tmp_path: Path) -> None:
    run = tmp_path / "r"
    vecs, _, _ = clustered_vectors(4, 6, 2, 16, 0)
    vecs[3] = np.nan
    vecs[4] = 0.0
    write_upstream(run, vectors=vecs, out_of_stock=())
    res = build(run, n_trees=5)
    assert res.counts["n_invalid_vectors"] == 2
    assert res.counts["n_items"] == len(vecs) - 2


# ---------------------------------------------------------------------------------------------- determinism
def test_same_inputs_give_byte_identical_index(tmp_path: Path) -> None:
    digests = []
    for name in ("a", "b"):
        run = tmp_path / name
        write_upstream(run, n_categories=6, groups_per_category=20)
        build(run, n_trees=8, seed=3)
        digests.append(sha256_file(run / "index" / "index.ann"))
    assert digests[0] == digests[1]
    write_upstream(tmp_path / "c", n_categories=6, groups_per_category=20)
    build(tmp_path / "c", n_trees=8, seed=4)
    assert sha256_file(tmp_path / "c" / "index" / "index.ann") != digests[0]


def test_on_disk_build_equals_in_memory_build(tmp_path: Path) -> None:
    for name, on_disk in (("mem", False), ("disk", True)):
        write_upstream(tmp_path / name, n_categories=5, groups_per_category=10)
        build(tmp_path / name, n_trees=6, on_disk=on_disk)
    assert sha256_file(tmp_path / "mem" / "index" / "index.ann") == sha256_file(tmp_path / "disk" / "index" / "index.ann")
    assert not list((tmp_path / "disk" / "index").glob(".*.tmp*"))


def test_multithreaded_build_returns_the_same_neighbours() -> None:
    vecs, _, _ = clustered_vectors(10, 100, 2, 24, seed=1)
    queries = vecs[::37]
    results = []
    for _ in range(2):
        ann = nindex.build_annoy(vecs, n_trees=10, seed=7, n_jobs=2)
        results.append([tuple(ann.get_nns_by_vector(q.tolist(), 10, search_k=200)) for q in queries])
        ann.unload()
    assert results[0] == results[1]


# ---------------------------------------------------------------------------------------------- recall
def test_exact_knn_matches_brute_force_and_breaks_ties_by_id() -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((300, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[10] = v[20]  # a tie
    ids, sims = nindex.exact_knn(v[:50], v, k=5, batch_size=16)
    full = v[:50] @ v.T
    np.testing.assert_array_equal(ids[:, 0][[10, 20]], [10, 10])
    for q in range(50):
        np.testing.assert_allclose(sims[q], np.sort(full[q])[::-1][:5], rtol=1e-5)


def test_annoy_recall_against_exact_on_clustered_vectors() -> None:
    vecs, _, _ = clustered_vectors(20, 100, 2, 32, seed=2, spread=0.5, jitter=0.2)  # 4,000 x 32
    rng = np.random.default_rng(0)
    q = vecs[rng.choice(len(vecs), 200, replace=False)] + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact, _ = nindex.exact_knn(q, vecs, 10)
    ann = nindex.build_annoy(vecs, n_trees=20, seed=0, n_jobs=1)

    def recall(search_k: int) -> float:
        got = [set(ann.get_nns_by_vector(x.tolist(), 10, search_k=search_k)) for x in q]
        return float(np.mean([len(g & set(e)) / 10 for g, e in zip(got, exact)]))

    low, default, high = recall(20), recall(-1), recall(5000)
    assert high >= 0.99
    assert default >= 0.85
    assert low < high  # the knob does something
    ann.unload()


def test_query_subset_is_exact_within_the_subset(tmp_path: Path) -> None:
    run = tmp_path / "r"
    write_upstream(run, n_categories=5, groups_per_category=10)
    build(run, n_trees=5)
    loaded = nindex.load_index(run / "index")
    subset = loaded.idmap.index[loaded.idmap["category"] == "cat2"].to_numpy()
    query = loaded.vector(int(subset[3]))
    ids, sims = loaded.query_subset(query, 5, subset)
    assert ids[0] == subset[3] and set(ids) <= set(subset)
    expected = np.sort(loaded.vectors()[subset] @ query)[::-1][:5]
    np.testing.assert_allclose(sims, expected, rtol=1e-5)
    loaded.unload()


# ---------------------------------------------------------------------------------------------- mismatch
def test_loading_with_another_model_is_a_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "r"
    write_upstream(run)
    build(run, n_trees=4)
    with pytest.raises(nindex.IndexMismatchError, match=r"built with model 'synthetic-clusters-v1'.*'resnet50-x'"):
        nindex.load_index(run / "index", expected_model_id="resnet50-x")
    loaded = nindex.load_index(run / "index")
    with pytest.raises(SchemaError, match="dim 8 but index"):
        loaded.query(np.ones(8, dtype=np.float32), 3)
    loaded.unload()


def test_sidecar_that_does_not_match_the_files_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "r"
    write_upstream(run)
    build(run, n_trees=4)
    side = run / "index" / "index.json"
    meta = json.loads(side.read_text())
    write_json_atomic(side, {**meta, "n_items": meta["n_items"] + 1})
    with pytest.raises(nindex.IndexMismatchError, match="does not match its sidecar"):
        nindex.load_index(run / "index")
    write_json_atomic(side, meta)
    (run / "index" / "idmap.parquet").write_bytes((run / "index" / "idmap.parquet").read_bytes() + b"x")
    with pytest.raises(nindex.IndexMismatchError, match="sha256"):
        nindex.load_index(run / "index", verify_checksums=True)


def test_missing_upstream_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run the 'embed' notebook first"):
        build(tmp_path / "empty")
