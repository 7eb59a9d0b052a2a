from __future__ import annotations

import duckdb
import pandas as pd

from niteru.demo import CATEGORIES, ensure_demo_catalog, generate_demo_catalog
from niteru.io import sha256_file
from niteru.images import load_rgb


def test_demo_catalog_is_deterministic_and_complete(tmp_path):
    a = generate_demo_catalog(tmp_path / "a", n_products=8, variants=3, seed=7)
    b = generate_demo_catalog(tmp_path / "b", n_products=8, variants=3, seed=7)
    assert len(a) == 24 and a["product_id"].is_unique
    assert set(a["category"]) == set(CATEGORIES)
    assert (a.groupby("group_id").size() == 3).all()
    for ua, ub in zip(a["image_uri"], b["image_uri"]):
        assert sha256_file(ua) == sha256_file(ub)
    pd.testing.assert_frame_equal(a.drop(columns="image_uri"), b.drop(columns="image_uri"))
    # the variants of a product are different photos
    first = a[a["group_id"] == "P00000"]["image_uri"].tolist()
    assert len({sha256_file(u) for u in first}) == 3


def test_demo_catalog_files_readable(demo_catalog):
    frame = pd.read_parquet(demo_catalog / "catalog.parquet")
    with duckdb.connect(str(demo_catalog / "catalog.duckdb"), read_only=True) as con:
        from_db = con.execute("SELECT * FROM catalog ORDER BY product_id").df()
    assert list(from_db["product_id"]) == sorted(frame["product_id"])
    assert str(frame["updated_at"].dtype) == "datetime64[us, UTC]"
    img = load_rgb(frame["image_uri"].iloc[0])
    assert img.mode == "RGB" and img.size == (256, 256)


def test_ensure_demo_catalog_is_cached(tmp_path):
    first = ensure_demo_catalog(tmp_path, n_products=4, variants=2)
    stamp = (first / "catalog.parquet").stat().st_mtime_ns
    again = ensure_demo_catalog(tmp_path, n_products=4, variants=2)
    assert again == first and (again / "catalog.parquet").stat().st_mtime_ns == stamp
    frame = pd.read_parquet(first / "catalog.parquet")
    assert all(str(first) in uri for uri in frame["image_uri"])


def test_evolve_demo_catalog(demo_catalog, tmp_path):
    from niteru.demo import evolve_demo_catalog

    base = pd.read_parquet(demo_catalog / "catalog.parquet")
    day2 = evolve_demo_catalog(demo_catalog, tmp_path / "day2", day=1, removed=0.1, new=0.1, changed=0.1,
                               availability=0.1)
    merged = base.merge(day2, on="product_id", how="outer", suffixes=("_a", "_b"), indicator=True)
    assert (merged["_merge"] == "left_only").sum() == 3  # 10% of 32 rows removed
    assert (merged["_merge"] == "right_only").sum() == 3  # new products
    both = merged[merged["_merge"] == "both"]
    assert (both["image_uri_a"] != both["image_uri_b"]).sum() == 3
    assert (both["in_stock_a"] != both["in_stock_b"]).sum() == 3
    assert day2["product_id"].is_unique
    assert pd.read_parquet(tmp_path / "day2" / "catalog.parquet")["product_id"].tolist() == day2["product_id"].tolist()
