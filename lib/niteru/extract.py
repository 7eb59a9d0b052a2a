"""Stage 1, extract: catalog snapshot, daily diff and image fetching.

Reads the catalog named by ``source`` (:mod:`niteru.sources`), compares it with the previous successful
run's snapshot, fetches every image into the shared content-addressed cache (:mod:`niteru.fetch`) and
writes, in ``<run>/extract/``:

* ``catalog.parquet``: the active snapshot (removed products are absent, sold-out ones have
  ``in_stock = False``) plus fetch results; downstream stages use the rows with ``fetch_status == "ok"``.
* ``diff.parquet``: ``product_id``, ``change`` (new / changed / removed / availability / unchanged) and the
  image hashes before and after, so later stages process only new/changed images.
* ``failures.parquet``: one row per failed fetch with its reason.
* ``stage.json``: counts (total, new, changed, removed, availability, unchanged, fetched, cached, failed).

The stage fails (after writing the tables, before ``stage.json``) when more than ``max_failure_rate`` of the
images cannot be fetched; re-running with ``retry_failed=True`` fetches only the failed items again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from niteru import runs
from niteru.config import StageConfig
from niteru.errors import ConfigError, SchemaError, StageError
from niteru.fetch import STATUS_OK, FetchOptions, ImageCache, fetch_images
from niteru.images import DEFAULT_MAX_PIXELS
from niteru.io import write_parquet_atomic
from niteru.sources import CATALOG_COLUMNS, CATALOG_SCHEMA, CatalogQuery, read_catalog

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.parquet"
DIFF_FILE = "diff.parquet"
FAILURES_FILE = "failures.parquet"

NEW, CHANGED, REMOVED, AVAILABILITY, UNCHANGED = "new", "changed", "removed", "availability", "unchanged"
CHANGES = (NEW, CHANGED, REMOVED, AVAILABILITY, UNCHANGED)
#: Columns whose change alone does not touch the image (reported as ``metadata_changed``).
METADATA_COLUMNS = ("category", "brand", "price", "group_id", "color", "pattern", "title")

FETCH_SCHEMA = pa.schema([
    ("image_sha256", pa.string()), ("image_path", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
    ("fetch_status", pa.string()), ("fetch_error", pa.string()),
])
OUTPUT_SCHEMA = pa.schema(list(CATALOG_SCHEMA) + list(FETCH_SCHEMA))
DIFF_SCHEMA = pa.schema([
    ("product_id", pa.string()), ("change", pa.string()), ("in_stock", pa.bool_()),
    ("image_sha256", pa.string()), ("previous_image_sha256", pa.string()), ("metadata_changed", pa.bool_()),
])
FAILURES_SCHEMA = pa.schema([
    ("product_id", pa.string()), ("image_uri", pa.string()), ("error_kind", pa.string()),
    ("error", pa.string()), ("attempts", pa.int64()),
])


class ExtractConfig(StageConfig):
    """Parameters of the extract stage (BigQuery location and credentials come from the environment)."""

    stage: ClassVar[str] = "extract"

    source: str = Field("demo:16x2", description="demo[:<products>x<photos>], bigquery, or a DuckDB/Parquet/CSV "
                                                 "file or folder (see niteru.sources)")
    categories: list[str] = Field([], description="only these categories ([] = all)")
    limit: int = Field(0, ge=0, description="at most this many products, by product_id (0 = all)")
    previous_run: str = Field("", description="run id or folder to diff against; '' = latest successful run")
    retry_failed: bool = Field(False, description="re-fetch only the items that failed in this run's extract")
    concurrency: int = Field(64, ge=1, description="images fetched at the same time")
    per_host: int = Field(16, ge=1, description="concurrent requests per host")
    timeout_s: float = Field(20.0, gt=0, description="time limit per fetch attempt, seconds")
    retries: int = Field(3, ge=0, description="extra attempts for transient failures (timeouts, 429, 5xx)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="refuse images with more pixels (bombs)")
    max_failure_rate: float = Field(0.05, ge=0, le=1, description="fail the stage above this fetch failure rate")

    def fetch_options(self) -> FetchOptions:
        return FetchOptions(concurrency=self.concurrency, per_host=self.per_host, timeout_s=self.timeout_s,
                            retries=self.retries, max_pixels=self.max_pixels)


@dataclass
class ExtractResult:
    stage_dir: Path
    catalog: pd.DataFrame
    diff: pd.DataFrame
    failures: pd.DataFrame
    counts: dict[str, int]
    metrics: dict[str, float]
    previous_run: Path | None


# ------------------------------------------------------------------------------------------- stage
def run(cfg: ExtractConfig) -> ExtractResult:
    """Snapshot the catalog, fetch its images, diff against the previous run; write ``extract/``."""
    out = cfg.stage_dir()
    (out / runs.STAGE_SUMMARY).unlink(missing_ok=True)  # the summary marks completion; written last
    previous_dir = resolve_previous_run(cfg)
    previous = load_snapshot(previous_dir / "extract") if previous_dir else None
    if previous_dir:
        log.info("diffing against the snapshot of %s", previous_dir)

    if cfg.retry_failed:
        snapshot = load_snapshot(out, what="retry_failed=True needs this run's earlier extract output")
        todo = (snapshot["fetch_status"] != STATUS_OK).to_numpy()
        log.info("retry_failed: re-fetching %d failed item(s), keeping %d", int(todo.sum()), int((~todo).sum()))
    else:
        query = CatalogQuery(categories=tuple(cfg.categories), limit=cfg.limit)
        snapshot = read_catalog(cfg.source, cfg.cache_path, query).to_pandas()
        todo = np.ones(len(snapshot), dtype=bool)

    t0 = time.perf_counter()
    cache = ImageCache(cfg.cache_path / "images")
    try:
        catalog, failures, fetched, cached = attach_fetch_results(snapshot, todo, cache, cfg.fetch_options())
    finally:
        cache.close()
    fetch_s = time.perf_counter() - t0
    diff = compute_diff(catalog, previous)

    write_parquet_atomic(out / CATALOG_FILE, to_arrow(catalog, OUTPUT_SCHEMA))
    write_parquet_atomic(out / DIFF_FILE, to_arrow(diff, DIFF_SCHEMA))
    write_parquet_atomic(out / FAILURES_FILE, to_arrow(failures, FAILURES_SCHEMA))

    total = len(catalog)
    failed = int((catalog["fetch_status"] != STATUS_OK).sum())
    counts = {"total": total, **{c: int((diff["change"] == c).sum()) for c in CHANGES},
              "fetched": fetched, "cached": cached, "failed": failed}
    metrics = {
        "failure_rate": round(failed / total, 6) if total else 0.0,
        "fetch_seconds": round(fetch_s, 3),
        "fetch_images_per_s": round(fetched / fetch_s, 2) if fetch_s > 0 and fetched else 0.0,
        "metadata_changed": int(diff["metadata_changed"].sum()),
        "in_stock": int(catalog["in_stock"].sum()),
    }
    log.info("extract: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    check_failure_rate(failed, total, cfg.max_failure_rate, out)
    runs.write_stage_summary(
        out, metrics=metrics, counts=counts, source=cfg.source,
        previous_run=str(previous_dir) if previous_dir else None, retry_failed=cfg.retry_failed,
        failure_kinds={str(k): int(v) for k, v in failures["error_kind"].value_counts().items()},
    )
    return ExtractResult(out, catalog, diff, failures, counts, metrics, previous_dir)


def check_failure_rate(failed: int, total: int, max_rate: float, stage_dir: Path) -> None:
    if total == 0:
        raise StageError("extract: the catalog query returned no products; check source/categories/limit")
    rate = failed / total
    if rate > max_rate:
        raise StageError(
            f"extract: {failed} of {total} images ({rate:.1%}) could not be fetched, over max_failure_rate="
            f"{max_rate:g}. Reasons are in {stage_dir / FAILURES_FILE}; fix them and re-run with "
            "retry_failed=True to fetch only the failed items again (or raise max_failure_rate)"
        )


# ------------------------------------------------------------------------------------ previous run
def resolve_previous_run(cfg: ExtractConfig) -> Path | None:
    """The run to diff against: ``previous_run`` (id or folder) or the latest successful one."""
    if cfg.previous_run:
        candidate = Path(cfg.previous_run).expanduser()
        if not candidate.is_absolute() and not candidate.exists():
            candidate = cfg.run_path.parent / cfg.previous_run
        candidate = candidate.resolve()
        if not (candidate / "extract" / CATALOG_FILE).is_file():
            raise ConfigError(f"previous_run={cfg.previous_run!r}: {candidate / 'extract' / CATALOG_FILE} does not "
                              "exist; give a run id from the same runs folder or a run folder path, or ''")
        if candidate == cfg.run_path:
            raise ConfigError(f"previous_run={cfg.previous_run!r} is this run itself")
        return candidate
    found = runs.previous_successful_run(cfg.run_path, source=cfg.source, stage="extract")
    if found is not None and not (found / "extract" / CATALOG_FILE).is_file():
        log.warning("previous run %s has no extract/%s; treating every product as new", found, CATALOG_FILE)
        return None
    return found


def load_snapshot(extract_dir: Path, what: str = "the previous snapshot") -> pd.DataFrame:
    path = extract_dir / CATALOG_FILE
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist")
    frame = pd.read_parquet(path)
    missing = [c for c in ("product_id", "image_uri", "in_stock", *FETCH_SCHEMA.names) if c not in frame.columns]
    if missing:
        raise SchemaError(f"{path} lacks column(s) {missing}; it was not written by this extract stage")
    return frame


# ------------------------------------------------------------------------------------------ fetch
def attach_fetch_results(snapshot: pd.DataFrame, todo: np.ndarray, cache: ImageCache,
                         options: FetchOptions) -> tuple[pd.DataFrame, pd.DataFrame, int, int]:
    """Fetch the images of the ``todo`` rows.

    Returns (catalog with fetch columns sorted by product id, failures table, fetched, cached). Rows not in
    ``todo`` keep the fetch columns they already have (and count as cached).
    """
    catalog = snapshot[list(CATALOG_COLUMNS)].copy().reset_index(drop=True)
    for name in FETCH_SCHEMA.names:
        catalog[name] = snapshot[name].astype(object).to_numpy() if name in snapshot.columns else None
    rows = np.flatnonzero(todo)
    uris = catalog["image_uri"].iloc[rows].tolist()
    versions = [None if pd.isna(t) else pd.Timestamp(t).isoformat() for t in catalog["updated_at"].iloc[rows]]
    results = fetch_images(uris, cache, options, versions=versions)
    cols = {name: np.array(catalog[name].to_numpy(dtype=object), dtype=object) for name in FETCH_SCHEMA.names}
    for row, res in zip(rows, results):
        cols["image_sha256"][row] = res.sha256
        cols["image_path"][row] = res.path
        cols["width"][row] = res.width
        cols["height"][row] = res.height
        cols["fetch_status"][row] = res.status
        cols["fetch_error"][row] = None if res.ok else f"{res.error_kind}: {res.error}"
    for name, values in cols.items():
        catalog[name] = values
    failed_rows = [(row, res) for row, res in zip(rows, results) if not res.ok]
    failures = pd.DataFrame({
        "product_id": [catalog.at[row, "product_id"] for row, _ in failed_rows],
        "image_uri": [res.uri for _, res in failed_rows],
        "error_kind": [res.error_kind for _, res in failed_rows],
        "error": [res.error for _, res in failed_rows],
        "attempts": np.array([res.attempts for _, res in failed_rows], dtype=np.int64),
    }).sort_values("product_id", kind="stable").reset_index(drop=True)
    fetched = sum(1 for r in results if r.ok and not r.cached)
    kept_ok = int((~todo & (catalog["fetch_status"] == STATUS_OK).to_numpy()).sum())
    cached = sum(1 for r in results if r.ok and r.cached) + kept_ok
    catalog = catalog.sort_values("product_id", kind="stable").reset_index(drop=True)
    return catalog, failures, fetched, cached


# -------------------------------------------------------------------------------------------- diff
def compute_diff(current: pd.DataFrame, previous: pd.DataFrame | None) -> pd.DataFrame:
    """Classify every product of both snapshots, sorted by product id.

    * ``new``: only in ``current``; ``removed``: only in ``previous``;
    * ``changed``: the image URI or the image content (sha256; null when unfetchable) differs;
    * ``availability``: same image, ``in_stock`` flipped;
    * ``unchanged``: same image and availability (``metadata_changed`` flags price/brand/... edits).
    """
    cur = current.set_index("product_id", drop=False)
    if previous is None or previous.empty:
        prev = pd.DataFrame(columns=["product_id", "image_uri", "image_sha256", "in_stock", *METADATA_COLUMNS])
    else:
        prev = previous.set_index("product_id", drop=False)
    both = cur.index.intersection(prev.index)
    new_ids = cur.index.difference(prev.index)
    removed_ids = prev.index.difference(cur.index)

    c, p = cur.loc[both], prev.loc[both]
    image_changed = _differs(c["image_uri"], p["image_uri"]) | _differs(c["image_sha256"], p["image_sha256"])
    avail_changed = _differs(c["in_stock"], p["in_stock"])
    meta = np.zeros(len(both), dtype=bool)
    for col in METADATA_COLUMNS:
        if col in c.columns and col in p.columns:
            meta |= _differs(c[col], p[col])
    change = np.where(image_changed, CHANGED, np.where(avail_changed, AVAILABILITY, UNCHANGED))

    parts = [
        pd.DataFrame({"product_id": both.to_numpy(), "change": change, "in_stock": c["in_stock"].to_numpy(),
                      "image_sha256": c["image_sha256"].to_numpy(), "previous_image_sha256": p["image_sha256"].to_numpy(),
                      "metadata_changed": meta}),
        pd.DataFrame({"product_id": new_ids.to_numpy(), "change": NEW, "in_stock": cur.loc[new_ids, "in_stock"].to_numpy(),
                      "image_sha256": cur.loc[new_ids, "image_sha256"].to_numpy(), "previous_image_sha256": None,
                      "metadata_changed": False}),
        pd.DataFrame({"product_id": removed_ids.to_numpy(), "change": REMOVED, "in_stock": None, "image_sha256": None,
                      "previous_image_sha256": prev.loc[removed_ids, "image_sha256"].to_numpy(),
                      "metadata_changed": False}),
    ]
    diff = pd.concat([part.astype(object) for part in parts if len(part)], ignore_index=True) if len(
        both) + len(new_ids) + len(removed_ids) else pd.DataFrame(columns=DIFF_SCHEMA.names)
    return diff.sort_values("product_id", kind="stable").reset_index(drop=True)


def _differs(a: pd.Series, b: pd.Series) -> np.ndarray:
    """Element-wise "not equal", where two missing values (None/NaN/NaT) count as equal."""
    a_na, b_na = a.isna().to_numpy(), b.isna().to_numpy()
    eq = np.asarray(a.to_numpy(dtype=object) == b.to_numpy(dtype=object), dtype=bool)
    same = (a_na & b_na) | (~a_na & ~b_na & eq)
    return ~same


def to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """A frame as an arrow table with exactly ``schema`` (the artifact contract)."""
    arrays = []
    for f in schema:
        values = frame[f.name].astype(object).where(frame[f.name].notna(), None).tolist() if len(frame) else []
        arrays.append(pa.array(values, type=f.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema)
