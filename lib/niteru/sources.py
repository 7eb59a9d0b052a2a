"""Catalog sources: where the extract stage reads the product table from.

One logical query, several back ends, chosen by the ``source`` string:

============================  =====================================================================
``demo`` / ``demo:16x2``       the synthetic demo catalog (:func:`niteru.demo.ensure_demo_catalog`);
                               also ``demo:n=20,v=2,seed=0,size=128``
``path/to/catalog.duckdb``     a DuckDB database file, table ``catalog`` (``file.duckdb#table`` picks another)
``path/to/*.parquet``          Parquet file(s) or a glob, read through DuckDB
``path/to/catalog.csv``        CSV file(s) or a glob, read through DuckDB (types auto-detected)
``path/to/folder``             a folder holding ``catalog.duckdb`` or ``catalog.parquet``; otherwise a
                               plain image folder with one sub-folder per category
``bigquery``                   Google BigQuery; project/dataset/table and credentials come from the
                               environment (``NITERU_BQ_*``, ``GOOGLE_APPLICATION_CREDENTIALS``), never
                               from notebook parameters
============================  =====================================================================

Filters (``categories``, ``limit``) are passed as query parameters, never formatted into SQL. Every back
end returns the same validated table (:func:`validate_catalog`): a wrong or missing column is a
:class:`~niteru.errors.SchemaError` naming the column.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from niteru.errors import ConfigError, SchemaError

log = logging.getLogger(__name__)

#: Required columns and the arrow type each is normalised to.
REQUIRED_COLUMNS: dict[str, pa.DataType] = {
    "product_id": pa.string(),
    "image_uri": pa.string(),
    "category": pa.string(),
    "brand": pa.string(),
    "price": pa.float64(),
    "in_stock": pa.bool_(),
    "updated_at": pa.timestamp("us", tz="UTC"),
}
#: Optional ground-truth / label columns (nullable strings); absent ones become all-null.
OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "group_id": pa.string(),
    "color": pa.string(),
    "pattern": pa.string(),
    "title": pa.string(),
}
#: Columns that may not hold nulls.
NON_NULL_COLUMNS = ("product_id", "image_uri", "category", "in_stock")
CATALOG_SCHEMA = pa.schema([
    pa.field(name, dtype, nullable=name not in NON_NULL_COLUMNS)
    for name, dtype in {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.items()
])
CATALOG_COLUMNS = tuple(CATALOG_SCHEMA.names)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_TABLE = "catalog"
CATALOG_FILES = ("catalog.duckdb", "catalog.parquet")

# BigQuery settings come from the environment only.
ENV_BQ_PROJECT = "NITERU_BQ_PROJECT"
ENV_BQ_DATASET = "NITERU_BQ_DATASET"
ENV_BQ_TABLE = "NITERU_BQ_TABLE"
ENV_BQ_LOCATION = "NITERU_BQ_LOCATION"
ENV_BQ_ENDPOINT = "NITERU_BQ_API_ENDPOINT"
ENV_BQ_PAGE_SIZE = "NITERU_BQ_PAGE_SIZE"
_BQ_IDENT = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+){0,2}$")


# ------------------------------------------------------------------------------------------ the query
@dataclass(frozen=True)
class CatalogQuery:
    """The filters of the logical catalog query (sent as query parameters)."""

    categories: tuple[str, ...] = ()
    limit: int = 0  # 0 = no limit

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ConfigError(f"limit must be >= 0 (0 = all products), got {self.limit}")


def catalog_sql(table_ref: str, query: CatalogQuery, dialect: str) -> tuple[str, dict[str, Any]]:
    """The one logical catalog query in the given dialect (``duckdb`` or ``bigquery``) and its parameters.

    ``table_ref`` is an already validated/quoted identifier; all values travel as parameters.
    """
    p = "$" if dialect == "duckdb" else "@"
    where = []
    params: dict[str, Any] = {}
    if query.categories:
        params["categories"] = list(query.categories)
        where.append(f"list_contains({p}categories, category)" if dialect == "duckdb"
                     else f"category IN UNNEST({p}categories)")
    sql = f"SELECT * FROM {table_ref}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY product_id"
    if query.limit:
        params["limit"] = int(query.limit)
        sql += f" LIMIT {p}limit"
    return sql, params


# ------------------------------------------------------------------------------------- source specs
@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``source`` string."""

    kind: str  # demo | duckdb | parquet | csv | folder | bigquery
    location: str = ""
    table: str = DEFAULT_TABLE
    options: Mapping[str, int] = field(default_factory=dict)


_DEMO_KEYS = {"n": "n_products", "n_products": "n_products", "v": "variants", "variants": "variants",
              "seed": "seed", "size": "image_size", "image_size": "image_size"}


def parse_source(spec: str) -> SourceSpec:
    """Parse a ``source`` string (see the module docstring); a clear error for anything unknown."""
    text = (spec or "").strip()
    if not text:
        raise ConfigError("source is empty: use 'demo', 'bigquery' or a path to a DuckDB/Parquet/CSV file or folder")
    lower = text.lower()
    if lower == "demo" or lower.startswith("demo:"):
        return SourceSpec("demo", options=_parse_demo_options(text[5:]))
    if lower in ("bigquery", "bq"):
        return SourceSpec("bigquery")
    if "://" in text and not lower.startswith("file://"):
        raise ConfigError(f"source {text!r}: remote catalogs are read through 'bigquery'; "
                          "other sources must be local paths (DuckDB/Parquet/CSV file, glob or folder)")
    path_text = text[7:] if lower.startswith("file://") else text
    table = DEFAULT_TABLE
    if "#" in path_text:
        path_text, table = path_text.rsplit("#", 1)
    path = Path(path_text).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".duckdb", ".db"):
        return SourceSpec("duckdb", str(path.resolve()), table=table)
    if suffix == ".parquet":
        return SourceSpec("parquet", _abs_pattern(path))
    if suffix in (".csv", ".tsv") or path.name.lower().endswith((".csv.gz", ".tsv.gz")):
        return SourceSpec("csv", _abs_pattern(path))
    if path.is_dir():
        for name in CATALOG_FILES:
            if (path / name).is_file():
                return parse_source(str(path / name) + (f"#{table}" if name.endswith(".duckdb") else ""))
        return SourceSpec("folder", str(path.resolve()))
    raise ConfigError(
        f"source {text!r} is not 'demo', 'bigquery', an existing folder, or a .duckdb/.parquet/.csv path"
        + ("" if path.exists() else f" (nothing exists at {path.resolve()})")
    )


def _abs_pattern(path: Path) -> str:
    return str(path if path.is_absolute() else Path.cwd() / path)


def _parse_demo_options(text: str) -> dict[str, int]:
    options: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        shorthand = re.fullmatch(r"(\d+)(?:x(\d+))?", part)  # "16x2": 16 products x 2 photos
        if shorthand:
            options["n_products"] = int(shorthand.group(1))
            if shorthand.group(2):
                options["variants"] = int(shorthand.group(2))
            continue
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in _DEMO_KEYS or not value.strip().isdigit():
            raise ConfigError(f"bad demo option {part!r}: use e.g. 'demo:16x2' (products x photos) or "
                              "'demo:n=20,v=2,seed=0,size=128' "
                              f"(keys: {', '.join(sorted(_DEMO_KEYS))})")
        options[_DEMO_KEYS[key.strip()]] = int(value)
    return options


# -------------------------------------------------------------------------------------- reading
def read_catalog(source: str, cache_dir: Path, query: CatalogQuery | None = None,
                 bigquery_client: Any = None) -> pa.Table:
    """Read and validate the catalog named by ``source``; returns a table with :data:`CATALOG_SCHEMA`."""
    query = query or CatalogQuery()
    spec = parse_source(source)
    if spec.kind == "demo":
        from niteru.demo import ensure_demo_catalog

        folder = ensure_demo_catalog(Path(cache_dir), **spec.options)
        raw = read_duckdb_query(f"read_parquet({_sql_str(str(folder / 'catalog.parquet'))})", query)
        origin = f"demo catalog {folder}"
    elif spec.kind == "duckdb":
        raw = read_duckdb_file(Path(spec.location), spec.table, query)
        origin = f"DuckDB table {spec.table!r} in {spec.location}"
    elif spec.kind == "parquet":
        raw = read_duckdb_query(f"read_parquet({_sql_str(spec.location)})", query, spec.location)
        origin = f"Parquet {spec.location}"
    elif spec.kind == "csv":
        raw = read_duckdb_query(f"read_csv_auto({_sql_str(spec.location)})", query, spec.location)
        origin = f"CSV {spec.location}"
    elif spec.kind == "folder":
        raw = apply_query(read_image_folder(Path(spec.location)), query)
        origin = f"image folder {spec.location}"
    elif spec.kind == "bigquery":
        settings = BigQuerySettings.from_env()
        raw = read_bigquery(settings, query, client=bigquery_client)
        origin = f"BigQuery table {settings.table_id}"
    else:  # pragma: no cover - parse_source only returns the kinds above
        raise ConfigError(f"unsupported source kind {spec.kind!r}")
    table = validate_catalog(raw, origin)
    log.info("read %d products from %s", table.num_rows, origin)
    return table


def _sql_str(text: str) -> str:
    """A SQL string literal for a *file path* (DuckDB table functions take no parameters for paths)."""
    return "'" + text.replace("'", "''") + "'"


def read_duckdb_query(relation: str, query: CatalogQuery, pattern: str | None = None) -> pa.Table:
    """Run the catalog query over a DuckDB relation (``read_parquet(...)`` etc.) in memory."""
    import duckdb

    sql, params = catalog_sql(relation, query, "duckdb")
    con = duckdb.connect()
    try:
        return con.sql(sql, params=params or None).to_arrow_table()
    except duckdb.IOException as exc:
        raise ConfigError(f"cannot read catalog {pattern or relation}: {exc}") from None
    except duckdb.BinderException as exc:
        raise SchemaError(f"catalog {pattern or relation} cannot be queried: {exc} "
                          f"(required columns: {', '.join(REQUIRED_COLUMNS)})") from None
    finally:
        con.close()


def read_duckdb_file(path: Path, table: str, query: CatalogQuery) -> pa.Table:
    import duckdb

    if not path.is_file():
        raise ConfigError(f"DuckDB catalog {path} does not exist")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", table):
        raise ConfigError(f"bad table name {table!r} in source (letters, digits and _ only, optionally schema.table)")
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = {r[0] for r in con.sql("SELECT table_name FROM information_schema.tables").fetchall()}
        if table.split(".")[-1] not in tables:
            raise ConfigError(f"DuckDB catalog {path} has no table {table!r} (tables: {sorted(tables)}); "
                              f"use '{path}#<table>'")
        sql, params = catalog_sql('"' + table.replace(".", '"."') + '"', query, "duckdb")
        try:
            return con.sql(sql, params=params or None).to_arrow_table()
        except duckdb.BinderException as exc:
            raise SchemaError(f"DuckDB table {table!r} in {path} cannot be queried: {exc}") from None
    finally:
        con.close()


def apply_query(table: pa.Table, query: CatalogQuery) -> pa.Table:
    """The catalog query over an in-memory table (used by the image-folder source)."""
    import duckdb

    con = duckdb.connect()
    try:
        con.register("items", table)
        sql, params = catalog_sql("items", query, "duckdb")
        return con.sql(sql, params=params or None).to_arrow_table()
    finally:
        con.close()


def read_image_folder(root: Path) -> pa.Table:
    """A catalog from a folder with one sub-folder of images per category.

    ``product_id`` is ``<category>/<file stem>``; brand is empty, price unknown (NaN), every item in stock,
    ``updated_at`` the file's modification time.
    """
    rows: dict[str, list[Any]] = {k: [] for k in ("product_id", "image_uri", "category", "brand", "price",
                                                  "in_stock", "updated_at", "group_id")}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for img in sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            pid = f"{sub.name}/{img.stem}"
            rows["product_id"].append(pid)
            rows["image_uri"].append(str(img.resolve()))
            rows["category"].append(sub.name)
            rows["brand"].append("")
            rows["price"].append(float("nan"))
            rows["in_stock"].append(True)
            rows["updated_at"].append(dt.datetime.fromtimestamp(img.stat().st_mtime, dt.timezone.utc))
            rows["group_id"].append(pid)
    if not rows["product_id"]:
        raise ConfigError(
            f"image folder {root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its sub-folders; "
            "point source at the folder whose sub-folders are the categories (e.g. <dataset>/train)"
        )
    schema = pa.schema([(k, REQUIRED_COLUMNS.get(k, pa.string())) for k in rows])
    return pa.table(rows, schema=schema)


# -------------------------------------------------------------------------------------- BigQuery
@dataclass(frozen=True)
class BigQuerySettings:
    """Where the BigQuery catalog lives, read from the environment (never from notebook parameters)."""

    project: str
    table_id: str  # project.dataset.table
    location: str | None = None
    api_endpoint: str | None = None
    page_size: int = 10_000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "BigQuerySettings":
        env = os.environ if env is None else env
        table = env.get(ENV_BQ_TABLE, "").strip()
        project = env.get(ENV_BQ_PROJECT, "").strip()
        dataset = env.get(ENV_BQ_DATASET, "").strip()
        if not table:
            raise ConfigError(f"source='bigquery' needs {ENV_BQ_TABLE} (table, dataset.table or "
                              f"project.dataset.table) and {ENV_BQ_PROJECT} in the environment")
        parts = table.split(".")
        if len(parts) == 1:
            if not dataset:
                raise ConfigError(f"{ENV_BQ_TABLE}={table!r} names no dataset: set {ENV_BQ_DATASET} or use dataset.table")
            parts = [dataset, *parts]
        if len(parts) == 2:
            if not project:
                raise ConfigError(f"{ENV_BQ_TABLE}={table!r} names no project: set {ENV_BQ_PROJECT}")
            parts = [project, *parts]
        table_id = ".".join(parts)
        if not _BQ_IDENT.fullmatch(table_id):
            raise ConfigError(f"{ENV_BQ_TABLE} gives an invalid table id {table_id!r} (project.dataset.table)")
        page = env.get(ENV_BQ_PAGE_SIZE, "").strip()
        if page and not page.isdigit():
            raise ConfigError(f"{ENV_BQ_PAGE_SIZE} must be a positive integer (got {page!r})")
        return cls(project=project or parts[0], table_id=table_id, location=env.get(ENV_BQ_LOCATION) or None,
                   api_endpoint=env.get(ENV_BQ_ENDPOINT) or None, page_size=int(page) if page else 10_000)


def bigquery_client(settings: BigQuerySettings) -> Any:
    """A BigQuery client; credentials from ``GOOGLE_APPLICATION_CREDENTIALS`` / application default.

    With a custom API endpoint (an emulator) and no credentials file, anonymous credentials are used.
    """
    from google.cloud import bigquery

    kwargs: dict[str, Any] = {"project": settings.project, "location": settings.location}
    if settings.api_endpoint:
        kwargs["client_options"] = {"api_endpoint": settings.api_endpoint}
        if not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            from google.auth.credentials import AnonymousCredentials

            kwargs["credentials"] = AnonymousCredentials()
    return bigquery.Client(**kwargs)


def read_bigquery(settings: BigQuerySettings, query: CatalogQuery, client: Any = None) -> pa.Table:
    """Run the catalog query on BigQuery with query parameters; pages through the result."""
    from google.cloud import bigquery

    client = client or bigquery_client(settings)
    sql, params = catalog_sql(f"`{settings.table_id}`", query, "bigquery")
    qparams: list[Any] = []
    if "categories" in params:
        qparams.append(bigquery.ArrayQueryParameter("categories", "STRING", params["categories"]))
    if "limit" in params:
        qparams.append(bigquery.ScalarQueryParameter("limit", "INT64", params["limit"]))
    job = client.query(sql, job_config=bigquery.QueryJobConfig(query_parameters=qparams), location=settings.location)
    rows = job.result(page_size=settings.page_size)
    return rows.to_arrow(create_bqstorage_client=False, progress_bar_type=None)


# -------------------------------------------------------------------------------------- validation
def validate_catalog(table: pa.Table, origin: str = "catalog") -> pa.Table:
    """Check and normalise a raw catalog table to :data:`CATALOG_SCHEMA`.

    Raises :class:`SchemaError` naming the missing/mistyped column, null required values or duplicate
    product ids. Integer ids are accepted (cast to string); naive timestamps are taken as UTC; extra
    columns are dropped.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise SchemaError(f"{origin} is missing required column(s) {missing}; it has {table.column_names}. "
                          f"Required: {', '.join(REQUIRED_COLUMNS)}")
    columns: list[pa.Array] = []
    for name, target in zip(CATALOG_SCHEMA.names, CATALOG_SCHEMA.types):
        if name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, target))
            continue
        columns.append(_normalise_column(table.column(name), name, target, origin))
    out = pa.Table.from_arrays(columns, schema=CATALOG_SCHEMA)
    extra = [c for c in table.column_names if c not in CATALOG_COLUMNS]
    if extra:
        log.info("%s: ignoring extra column(s) %s", origin, extra)
    for name in NON_NULL_COLUMNS:
        nulls = out.column(name).null_count
        if nulls:
            raise SchemaError(f"{origin}: column '{name}' has {nulls} null value(s); every product needs a {name}")
    empty = pc.sum(pc.equal(pc.utf8_length(out.column("product_id")), 0)).as_py() or 0
    if empty:
        raise SchemaError(f"{origin}: column 'product_id' has {empty} empty value(s)")
    ids = out.column("product_id")
    if pc.count_distinct(ids).as_py() != out.num_rows:
        counts = pc.value_counts(ids)
        dupes = [v["values"].as_py() for v in counts if v["counts"].as_py() > 1][:5]
        raise SchemaError(f"{origin}: column 'product_id' must be unique; duplicated ids include {dupes}")
    return out


def _normalise_column(col: pa.ChunkedArray, name: str, target: pa.DataType, origin: str) -> pa.ChunkedArray:
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    bad = SchemaError(f"{origin}: column '{name}' has type {t}, expected {_describe(target)}")
    if pa.types.is_null(t):
        return pa.chunked_array([pa.nulls(len(col), target)])
    if target == pa.string():
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
            return col.cast(pa.string())
        if name in ("product_id", "group_id") and pa.types.is_integer(t):
            return col.cast(pa.string())
        raise bad
    if target == pa.float64():
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            return col.cast(pa.float64())
        raise bad
    if target == pa.bool_():
        if pa.types.is_boolean(t):
            return col
        raise bad
    if pa.types.is_timestamp(target):
        if pa.types.is_timestamp(t):
            if t.tz is None:
                col = pc.assume_timezone(col, "UTC")
            return col.cast(target)
        if pa.types.is_date(t):
            return pc.assume_timezone(col.cast(pa.timestamp("us")), "UTC").cast(target)
        raise bad
    raise bad  # pragma: no cover


def _describe(t: pa.DataType) -> str:
    if t == pa.string():
        return "a string"
    if t == pa.float64():
        return "a number"
    if t == pa.bool_():
        return "a boolean"
    return "a timestamp (or date)"

