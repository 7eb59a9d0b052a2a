"""Filtered search over a real index built by the index stage from synthetic clustered vectors."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from niteru.errors import ConfigError
from niteru.io import write_json_atomic, write_npy_atomic, write_parquet_atomic
from niteru.runs import write_stage_summary
from niteru.search import (
    Availability,
    Filters,
    SearchEngine,
    UnknownCategoryError,
    UnknownProductError,
)

DIM = 32
CATEGORIES = ["tops", "pants", "shoes", "bags"]


def make_run(run_dir: Path, n_products: int = 400, n_rare: int = 12, seed: int = 0) -> pd.DataFrame:
    """extract/ + embed/ folders: clustered vectors, 4 common categories + one rare one, some 2-crop products."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, DIM))
    pids = [f"p{i:04d}" for i in range(n_products)]
    categories = [("rare" if i < n_rare else CATEGORIES[i % len(CATEGORIES)]) for i in range(n_products)]
    catalog = pd.DataFrame({
        "product_id": pids,
        "image_uri": [f"file:///img/{p}.jpg" for p in pids],
        "category": categories,
        "brand": [f"brand{i % 7}" for i in range(n_products)],
        "price": np.round(rng.uniform(5, 200, n_products), 2),
        "in_stock": rng.random(n_products) < 0.7,
        "fetch_status": "ok",
    })
    rows, vecs = [], []
    for i, pid in enumerate(pids):
        for crop in range(2 if i % 5 == 0 else 1):
            rows.append({"product_id": pid, "crop_index": crop, "image_sha256": f"sha{i}",
                         "x0": 0.0, "y0": 0.0, "x1": 10.0, "y1": 10.0})
            vecs.append(centers[i % 8] + 0.6 * rng.normal(size=DIM))
    vectors = np.asarray(vecs, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    extract, embed = run_dir / "extract", run_dir / "embed"
    write_parquet_atomic(extract / "catalog.parquet", catalog)
    write_stage_summary(extract)
    write_npy_atomic(embed / "vectors.npy", vectors)
    write_parquet_atomic(embed / "items.parquet", pd.DataFrame(rows))
    write_json_atomic(embed / "model.json", {"model_id": "synthetic-32", "dim": DIM})
    write_stage_summary(embed)
    return catalog


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    from niteru.index import IndexConfig, load_index, run

    run_dir = tmp_path_factory.mktemp("search") / "run1"
    catalog = make_run(run_dir)
    run(IndexConfig(run_dir=str(run_dir), n_trees=10, in_stock_only=False))
    return load_index(run_dir / "index"), catalog


def exact_top(index, query: np.ndarray, k: int, ok: np.ndarray) -> list[str]:
    """Brute-force reference: best crop per product among rows passing ``ok``."""
    sims = index.vectors() @ (query / np.linalg.norm(query))
    seen: list[str] = []
    for row in np.argsort(-sims, kind="stable"):
        pid = index.idmap["product_id"].iat[row]
        if ok[row] and pid not in seen:
            seen.append(pid)
        if len(seen) == k:
            break
    return seen


def test_self_query_and_dedup(built) -> None:
    index, _ = built
    engine = SearchEngine(index)
    rows = index.idmap.index[index.idmap["in_stock"]].to_numpy()[:20]
    for row in rows:
        hits = engine.by_vector(index.vector(row), k=10)
        assert hits[0].product_id == index.idmap["product_id"].iat[row]
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert len({h.product_id for h in hits}) == len(hits) == 10
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        assert all(h.metadata["in_stock"] for h in hits)


def test_matches_exact_filtered_neighbours(built) -> None:
    index, _ = built
    engine = SearchEngine(index, exact_threshold=0)  # force the ANN + over-fetch path
    rng = np.random.default_rng(1)
    filters = Filters(category="tops", max_price=120.0)
    idm = index.idmap
    ok = ((idm["category"] == "tops") & (idm["price"] <= 120.0) & idm["in_stock"]).to_numpy()
    overlaps = []
    for _ in range(20):
        query = rng.normal(size=DIM).astype(np.float32)
        hits = engine.by_vector(query, k=10, filters=filters)
        assert len(hits) == 10
        assert all(h.metadata["category"] == "tops" and h.metadata["price"] <= 120.0 and h.metadata["in_stock"]
                   for h in hits)
        overlaps.append(len({h.product_id for h in hits} & set(exact_top(index, query, 10, ok))) / 10)
    assert np.mean(overlaps) >= 0.9


@pytest.mark.parametrize("exact_threshold", [0, 2048])
def test_selective_filter_still_returns_k(built, exact_threshold: int) -> None:
    index, catalog = built
    engine = SearchEngine(index, exact_threshold=exact_threshold)
    rare = catalog[catalog["category"] == "rare"]
    query = index.vector(int(index.idmap.index[index.idmap["category"] == "tops"][0]))
    hits = engine.by_vector(query, k=10, filters=Filters(category="rare", in_stock_only=False))
    assert len(hits) == 10  # 12 rare products exist among 400: ~3 % selectivity
    assert {h.metadata["category"] for h in hits} == {"rare"}
    ok = (index.idmap["category"] == "rare").to_numpy()
    assert [h.product_id for h in hits] == exact_top(index, query, 10, ok)
    # fewer matches than k: all of them, nothing else
    n_rare_in_stock = int(rare["in_stock"].sum())
    hits = engine.by_vector(query, k=50, filters=Filters(category="rare"))
    assert len(hits) == n_rare_in_stock
    # an empty price window returns nothing rather than failing
    assert engine.by_vector(query, k=5, filters=Filters(min_price=1000.0)) == []


def test_by_product_excludes_itself(built) -> None:
    index, _ = built
    engine = SearchEngine(index)
    pid = index.idmap.loc[index.idmap["in_stock"], "product_id"].iat[3]
    hits = engine.by_product(pid, k=5, filters=Filters(in_stock_only=False))
    assert len(hits) == 5 and pid not in {h.product_id for h in hits}
    with pytest.raises(UnknownProductError, match="nope"):
        engine.by_product("nope", k=5)


def test_bad_filters_are_clear_errors(built) -> None:
    index, _ = built
    engine = SearchEngine(index)
    with pytest.raises(UnknownCategoryError, match="'hats'.*bags, pants, rare, shoes, tops"):
        engine.by_vector(index.vector(0), k=3, filters=Filters(category="hats"))
    with pytest.raises(ConfigError, match="min_price"):
        Filters(min_price=10, max_price=5)
    with pytest.raises(ConfigError, match="min_price"):
        Filters(min_price=-1)
    with pytest.raises(ConfigError, match="k must be"):
        engine.by_vector(index.vector(0), k=0)


def _write_availability(path: Path, table: pd.DataFrame, bump: int) -> None:
    write_parquet_atomic(path, table)
    stamp = time.time() + bump  # make the mtime change visible even on coarse clocks
    os.utime(path, (stamp, stamp))


def test_availability_refresh_while_serving(built, tmp_path: Path) -> None:
    index, catalog = built
    path = tmp_path / "availability.parquet"
    table = catalog[["product_id", "in_stock", "price"]].copy()
    table["in_stock"] = True
    _write_availability(path, table, bump=0)
    engine = SearchEngine(index, Availability.from_parquet(path, check_interval_s=0.0))
    target = index.idmap["product_id"].iat[0]
    query = index.vector(0)
    assert engine.by_vector(query, k=5)[0].product_id == target

    # 1) out of stock: hidden by default, visible with in_stock_only=False, new price shown
    table.loc[table["product_id"] == target, ["in_stock", "price"]] = [False, 1.5]
    _write_availability(path, table, bump=10)
    assert target not in {h.product_id for h in engine.by_vector(query, k=20)}
    top = engine.by_vector(query, k=5, filters=Filters(in_stock_only=False))[0]
    assert top.product_id == target and top.metadata["price"] == 1.5 and top.metadata["in_stock"] is False
    assert engine.by_vector(query, k=5, filters=Filters(in_stock_only=False, max_price=2.0))[0].product_id == target

    # 2) removed from the snapshot: never returned, and unknown as a query product
    _write_availability(path, table[table["product_id"] != target], bump=20)
    for filters in (Filters(), Filters(in_stock_only=False)):
        assert target not in {h.product_id for h in engine.by_vector(query, k=50, filters=filters)}
    with pytest.raises(UnknownProductError, match="removed"):
        engine.by_product(target, k=3)

    # 3) in-memory updates (the service's refresh API) and a broken file keeps the last good table
    version = engine.availability.version
    engine.availability.update([{"product_id": target, "in_stock": True, "price": 9.0, "removed": False}])
    assert engine.availability.version == version + 1
    assert engine.by_vector(query, k=1)[0].product_id == target
    path.write_bytes(b"not parquet")
    os.utime(path, (time.time() + 30, time.time() + 30))
    assert engine.availability.maybe_refresh() is False
    assert engine.by_vector(query, k=1)[0].product_id == target
