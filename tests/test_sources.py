"""Catalog sources: DuckDB file, Parquet, CSV, image folder, demo; schema validation naming the column."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from niteru.errors import ConfigError, SchemaError
from niteru.sources import CATALOG_SCHEMA, CatalogQuery, parse_source, read_catalog, validate_catalog

DATASET = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "clothing-small" / "train"


def catalog_frame(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame({
        "product_id": [f"p{i}" for i in range(n)],
        "image_uri": [f"/img/{i}.jpg" for i in range(n)],
        "category": ["dress" if i % 2 else "hat" for i in range(n)],
        "brand": ["Mori"] * n,
        "price": [float(10 + i) for i in range(n)],
        "in_stock": [i != 3 for i in range(n)],
        "updated_at": pd.to_datetime([dt.datetime(2026, 1, 1 + i) for i in range(n)], utc=True),
        "color": ["red"] * n,
        "internal_note": ["x"] * n,  # extra columns are dropped
    })


def write_duckdb(frame: pd.DataFrame, path: Path, table: str = "catalog") -> Path:
    con = duckdb.connect(str(path))
    con.register("frame", frame)
    con.execute(f"CREATE TABLE {table} AS SELECT * FROM frame")
    con.close()
    return path


def test_duckdb_parquet_and_csv_sources_give_the_same_validated_table(tmp_path: Path) -> None:
    frame = catalog_frame()
    db = write_duckdb(frame, tmp_path / "shop.duckdb")
    frame.to_parquet(tmp_path / "catalog.parquet")
    csv_frame = frame.assign(updated_at=frame["updated_at"].dt.strftime("%Y-%m-%d %H:%M:%S"))
    csv_frame.to_csv(tmp_path / "catalog.csv", index=False)
    tables = {src: read_catalog(src, tmp_path) for src in (str(db), str(tmp_path / "catalog.parquet"),
                                                          str(tmp_path / "catalog.csv"), str(tmp_path))}
    for src, table in tables.items():
        assert table.schema == CATALOG_SCHEMA, src
        assert table.column("product_id").to_pylist() == [f"p{i}" for i in range(6)], src
        assert table.column("in_stock").to_pylist() == [True, True, True, False, True, True], src
        assert table.column("updated_at").to_pylist()[1] == dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc), src
        assert table.column("color").to_pylist() == ["red"] * 6 and table.column("title").null_count == 6, src
    first = next(iter(tables.values()))
    assert all(t.equals(first) for t in tables.values())


def test_query_filters_are_parameters_and_applied(tmp_path: Path) -> None:
    db = write_duckdb(catalog_frame(10), tmp_path / "shop.duckdb", table="items")
    table = read_catalog(f"{db}#items", tmp_path, CatalogQuery(categories=("dress",), limit=3))
    assert table.column("product_id").to_pylist() == ["p1", "p3", "p5"]
    with pytest.raises(ConfigError, match="has no table 'catalog'"):
        read_catalog(str(db), tmp_path)
    with pytest.raises(ConfigError, match="limit must be >= 0"):
        CatalogQuery(limit=-1)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda f: f.drop(columns=["image_uri"]), r"missing required column\(s\) \['image_uri'\]"),
    (lambda f: f.assign(price=["cheap"] * len(f)), "column 'price' has type string, expected a number"),
    (lambda f: f.assign(in_stock=[1] * len(f)), "column 'in_stock' has type int64, expected a boolean"),
    (lambda f: f.assign(updated_at=["yesterday"] * len(f)), "column 'updated_at' has type string, expected a timestamp"),
    (lambda f: f.assign(category=[None] + ["x"] * (len(f) - 1)), "column 'category' has 1 null value"),
    (lambda f: f.assign(product_id=["p0"] * len(f)), "column 'product_id' must be unique; duplicated ids include \\['p0'\\]"),
])
def test_schema_errors_name_the_column(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    mutate(catalog_frame()).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match=message):
        read_catalog(str(tmp_path / "bad.parquet"), tmp_path)


def test_integer_ids_naive_timestamps_and_dates_are_normalised() -> None:
    raw = pa.table({
        "product_id": pa.array([7, 8], pa.int64()), "image_uri": ["a", "b"], "category": ["c", "c"],
        "brand": [None, "B"], "price": pa.array([3, 4], pa.int32()), "in_stock": [True, False],
        "updated_at": pa.array([dt.date(2026, 5, 1), dt.date(2026, 5, 2)], pa.date32()),
    })
    table = validate_catalog(raw, "test")
    assert table.column("product_id").to_pylist() == ["7", "8"]
    assert table.column("price").to_pylist() == [3.0, 4.0]
    assert table.column("updated_at").to_pylist()[0] == dt.datetime(2026, 5, 1, tzinfo=dt.timezone.utc)
    naive = raw.set_column(6, "updated_at", pa.array([dt.datetime(2026, 5, 1, 12)] * 2, pa.timestamp("ms")))
    assert validate_catalog(naive).column("updated_at").to_pylist()[0] == dt.datetime(2026, 5, 1, 12, tzinfo=dt.timezone.utc)


def test_image_folder_source(tmp_path: Path) -> None:
    for cat, n in (("hat", 2), ("shoes", 3)):
        (tmp_path / "ds" / cat).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / "ds" / cat / f"{cat}{i}.jpg")
    (tmp_path / "ds" / "shoes" / "notes.txt").write_text("not an image")
    table = read_catalog(str(tmp_path / "ds"), tmp_path)
    assert table.column("product_id").to_pylist() == ["hat/hat0", "hat/hat1", "shoes/shoes0", "shoes/shoes1", "shoes/shoes2"]
    assert table.column("category").to_pylist() == ["hat", "hat", "shoes", "shoes", "shoes"]
    assert Path(table.column("image_uri")[0].as_py()) == (tmp_path / "ds" / "hat" / "hat0.jpg").resolve()
    assert all(table.column("in_stock").to_pylist())
    only_shoes = read_catalog(str(tmp_path / "ds"), tmp_path, CatalogQuery(categories=("shoes",), limit=2))
    assert only_shoes.column("product_id").to_pylist() == ["shoes/shoes0", "shoes/shoes1"]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ConfigError, match="has no images"):
        read_catalog(str(tmp_path / "empty"), tmp_path)


def test_demo_source_uses_the_shared_cache(tmp_path: Path) -> None:
    table = read_catalog("demo:n=3,v=2,size=64", tmp_path / "_cache")
    assert table.num_rows == 6 and table.column("group_id").to_pylist() == ["P00000", "P00000", "P00001",
                                                                           "P00001", "P00002", "P00002"]
    assert all(Path(u).is_file() and str(tmp_path / "_cache" / "demo") in u for u in table.column("image_uri").to_pylist())


def test_parse_source_errors_are_actionable(tmp_path: Path) -> None:
    assert parse_source("demo").kind == "demo" and parse_source("bigquery").kind == "bigquery"
    assert parse_source("demo:n=5,v=1").options == {"n_products": 5, "variants": 1}
    assert parse_source("demo:16x2,seed=3").options == {"n_products": 16, "variants": 2, "seed": 3}
    with pytest.raises(ConfigError, match="bad demo option"):
        parse_source("demo:products=5")
    with pytest.raises(ConfigError, match="nothing exists at"):
        parse_source(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="remote catalogs are read through 'bigquery'"):
        parse_source("s3://bucket/catalog.parquet")
    with pytest.raises(ConfigError, match="source is empty"):
        parse_source(" ")


@pytest.mark.dataset
@pytest.mark.skipif(not DATASET.is_dir(), reason="../shared/datasets/clothing-small is absent")
def test_clothing_small_reads_as_an_image_folder(tmp_path: Path) -> None:
    table = read_catalog(str(DATASET), tmp_path)
    assert table.num_rows == 3068
    assert sorted(set(table.column("category").to_pylist())) == [
        "dress", "hat", "longsleeve", "outwear", "pants", "shirt", "shoes", "shorts", "skirt", "t-shirt"]
