"""Index stage: build the Annoy index over the embeddings, with an id map and a sidecar.

Inputs (upstream folders of the run): ``embed/vectors.npy`` + ``embed/items.parquet`` + ``embed/model.json``
and ``extract/catalog.parquet``. Outputs in ``index/``:

* ``index.ann``: Annoy, ``angular`` metric on L2-normalised float32 vectors, dense ids ``0..n-1``.
* ``idmap.parquet``: ``ann_id`` (0..n-1), ``product_id``, ``crop_index``, ``embed_row`` (row in
  ``embed/vectors.npy``), the crop box, and the catalog metadata (category, brand, price, in_stock,
  image_uri, image_path, ... and the optional label columns group_id/color/pattern/title).
* ``vectors.npy``: the indexed vectors in ``ann_id`` order (float32, L2-normalised); loaded with mmap for
  exact search over small filtered subsets (see below).
* ``index.json``: the sidecar (dim, metric, n_trees, search_k, n_items, seed, model_id, source run id,
  sha256 of every artifact and input).

Determinism: ``set_seed`` is called before any ``add_item``. With ``n_jobs=1`` the same inputs give a
byte-identical ``index.ann``. With ``n_jobs>1`` annoy builds the same trees (each thread has its own seeded
generator and a fixed tree quota) so every query returns the same neighbours, but threads allocate node ids
in a racy order, so the file bytes differ between builds. The default is ``n_jobs=1`` so that the manifest
checksums of a rebuild are reproducible; set ``n_jobs=-1`` for large catalogs (about 2x faster on 2 cores).

Per-category sub-indexes (decision, measured by ``benchmarks/bench_index.py`` part 2): not built. On 100k x
256 (50 trees, one BLAS thread, a heavily loaded 2-core machine), for a filter holding 0.5 % / 2 % / 10 % of
the items: an exact scan of the matching rows of ``vectors.npy`` (:meth:`LoadedIndex.query_subset`) took
0.4 / 2.4 / 23 ms with recall@10 = 1.0; a dedicated per-category Annoy forest took 0.15 / 0.5 / 0.8 ms but
reached only 0.95 / 0.63 / 0.73 recall@10 at its default search_k (and costs build time, disk, and files to keep
consistent per category); over-fetching the global index took 25 / 12 / 5 ms at 0.68 / 0.48 / 0.83.
So: exact scan when the filtered subset is small (a few thousand items), global over-fetch otherwise, which
is what :class:`niteru.search.SearchEngine` does (its exact threshold and adaptive over-fetch).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from niteru.config import StageConfig
from niteru.errors import ConfigError, SchemaError
from niteru.io import atomic_path, read_json, sha256_file, write_json_atomic, write_npy_atomic, write_parquet_atomic
from niteru.runs import write_stage_summary

if TYPE_CHECKING:  # heavy or optional imports stay lazy
    import pandas as pd
    from annoy import AnnoyIndex

log = logging.getLogger(__name__)

METRIC = "angular"
INDEX_FILE = "index.ann"
SIDECAR_FILE = "index.json"
IDMAP_FILE = "idmap.parquet"
VECTORS_FILE = "vectors.npy"
SIDECAR_SCHEMA = 1

#: Catalog columns copied into the id map when present (label columns are optional).
CATALOG_COLUMNS = (
    "category", "brand", "price", "in_stock", "image_uri", "image_path", "updated_at", "width", "height",
    "group_id", "color", "pattern", "title",
)
ITEM_COLUMNS = ("product_id", "crop_index", "image_sha256", "x0", "y0", "x1", "y1")


class IndexMismatchError(ConfigError):
    """The index on disk does not belong to the model (or vectors) it is being used with."""


class IndexConfig(StageConfig):
    """Parameters of the index stage (the notebook's ``parameters`` cell mirrors these)."""

    stage = "index"

    n_trees: int = Field(50, ge=1, description="Annoy trees: more = better recall, bigger index, slower build")
    search_k: int = Field(-1, ge=-1, description="default nodes inspected per query; -1 = annoy default (k * n_trees)")
    n_jobs: int = Field(1, description="build threads; 1 = byte-identical index file, -1 = all cores")
    on_disk: bool = Field(False, description="build straight into the file (for catalogs larger than RAM)")
    in_stock_only: bool = Field(True, description="index only in-stock products")


@dataclass(frozen=True)
class IndexResult:
    """What :func:`run` produced."""

    index_dir: Path
    sidecar: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- building
def normalize_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise rows as float32; return ``(normalised, valid_mask)`` (invalid = NaN/inf/zero rows)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise SchemaError(f"vectors must be a 2-D array [n, d], got shape {vectors.shape}")
    finite = np.isfinite(vectors).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0.0), axis=1)
    valid = finite & (norms > 1e-12)
    out = np.zeros_like(vectors)
    out[valid] = vectors[valid] / norms[valid, None]
    return out, valid


def build_annoy(vectors: np.ndarray, n_trees: int, seed: int, n_jobs: int = -1,
                on_disk_path: str | os.PathLike[str] | None = None) -> "AnnoyIndex":
    """Build an angular Annoy index over ``vectors`` (ids = row numbers ``0..n-1``).

    ``set_seed`` precedes every ``add_item``; with ``n_jobs=1`` the result is byte-identical for the same
    inputs. With ``on_disk_path`` the index is built directly into that file (annoy's ``on_disk_build``),
    which keeps memory flat for large catalogs; the returned index is then backed by that file.
    """
    from annoy import AnnoyIndex

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise SchemaError(f"cannot build an index from an array of shape {vectors.shape}: need [n>0, d]")
    if not np.isfinite(vectors).all():
        raise SchemaError("cannot build an index: vectors contain NaN or inf")
    n, dim = vectors.shape
    index = AnnoyIndex(dim, METRIC)
    index.set_seed(int(seed))
    if on_disk_path is not None:
        index.on_disk_build(str(on_disk_path))
    for i in range(n):
        index.add_item(i, vectors[i])
    index.build(int(n_trees), n_jobs=int(n_jobs))
    return index


def exact_knn(queries: np.ndarray, vectors: np.ndarray, k: int,
              batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` neighbours by cosine similarity (batched matrix product).

    Both arrays are expected L2-normalised. Returns ``(ids [q, k] int64, similarities [q, k] float32)``,
    best first; ties are broken by the lower id so the result is deterministic.
    """
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    vectors = np.asarray(vectors, dtype=np.float32)
    if queries.shape[1] != vectors.shape[1]:
        raise SchemaError(f"query dim {queries.shape[1]} != vector dim {vectors.shape[1]}")
    k = min(int(k), vectors.shape[0])
    ids = np.empty((queries.shape[0], k), dtype=np.int64)
    sims = np.empty((queries.shape[0], k), dtype=np.float32)
    for start in range(0, queries.shape[0], batch_size):
        block = queries[start:start + batch_size] @ vectors.T
        if k < block.shape[1]:
            part = np.argpartition(-block, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(block.shape[1]), block.shape).copy()
        part_sims = np.take_along_axis(block, part, axis=1)
        order = np.lexsort((part, -part_sims), axis=1)  # by similarity desc, then id asc
        ids[start:start + batch_size] = np.take_along_axis(part, order, axis=1)
        sims[start:start + batch_size] = np.take_along_axis(part_sims, order, axis=1)
    return ids, sims


def angular_to_cosine(distances: np.ndarray) -> np.ndarray:
    """Annoy's angular distance is ``sqrt(2 - 2 cos)``; map it back to cosine similarity."""
    d = np.asarray(distances, dtype=np.float32)
    return (1.0 - d * d / 2.0).astype(np.float32)


# ------------------------------------------------------------------------------------------- inputs
def read_model_id(model_json: dict[str, Any], path: Path) -> str:
    model_id = model_json.get("model_id") or model_json.get("id")
    if not model_id:
        raise SchemaError(f"{path} has no 'model_id': re-run the embed stage (it writes model.json)")
    return str(model_id)


def load_embeddings(embed_dir: Path) -> tuple[np.ndarray, "pd.DataFrame", dict[str, Any]]:
    """Read ``vectors.npy``, ``items.parquet`` and ``model.json``; check that rows line up."""
    import pandas as pd

    paths = {name: embed_dir / name for name in ("vectors.npy", "items.parquet", "model.json")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise SchemaError(f"embed output is incomplete, missing {missing}: re-run the embed stage")
    vectors = np.load(paths["vectors.npy"], mmap_mode="r")
    items = pd.read_parquet(paths["items.parquet"])
    model = read_json(paths["model.json"])
    lacking = [c for c in ("product_id", "crop_index") if c not in items.columns]
    if lacking:
        raise SchemaError(f"{paths['items.parquet']} lacks column(s) {lacking}")
    if vectors.ndim != 2 or vectors.shape[0] != len(items):
        raise SchemaError(f"{paths['vectors.npy']} has shape {vectors.shape} but {paths['items.parquet']} has "
                          f"{len(items)} rows: they must line up row for row; re-run the embed stage")
    dim = model.get("dim")
    if dim is not None and int(dim) != vectors.shape[1]:
        raise SchemaError(f"{paths['model.json']} says dim={dim} but vectors have {vectors.shape[1]} columns")
    return vectors, items, model


def load_catalog(extract_dir: Path) -> "pd.DataFrame":
    import pandas as pd

    path = extract_dir / "catalog.parquet"
    if not path.exists():
        raise SchemaError(f"{path} is missing: re-run the extract stage")
    catalog = pd.read_parquet(path)
    if "product_id" not in catalog.columns:
        raise SchemaError(f"{path} lacks the 'product_id' column")
    if "fetch_status" in catalog.columns:
        catalog = catalog[catalog["fetch_status"] == "ok"]
    if catalog["product_id"].duplicated().any():
        dupes = catalog.loc[catalog["product_id"].duplicated(), "product_id"].head(5).tolist()
        raise SchemaError(f"{path}: product_id must be unique, duplicated e.g. {dupes}")
    return catalog


def select_items(items: "pd.DataFrame", catalog: "pd.DataFrame", in_stock_only: bool) -> "pd.DataFrame":
    """Join embedded items with their catalog rows; keep the indexable ones, in embed order.

    Returns the joined frame with an ``embed_row`` column (row of ``vectors.npy``). Items of products that
    are not in the (fetched) catalog are dropped, and out-of-stock ones too when ``in_stock_only``.
    """
    item_cols = [c for c in ITEM_COLUMNS if c in items.columns]
    cat_cols = ["product_id"] + [c for c in CATALOG_COLUMNS if c in catalog.columns]
    left = items[item_cols].copy()
    left["embed_row"] = np.arange(len(items), dtype=np.int64)
    joined = left.merge(catalog[cat_cols], on="product_id", how="left", indicator=True, validate="many_to_one")
    orphans = int((joined["_merge"] != "both").sum())
    if orphans:
        log.warning("%d embedded item(s) have no fetched catalog row and are not indexed", orphans)
    joined = joined[joined["_merge"] == "both"].drop(columns="_merge")
    if in_stock_only:
        if "in_stock" not in joined.columns:
            raise SchemaError("in_stock_only=True but the catalog has no 'in_stock' column")
        joined = joined[joined["in_stock"].fillna(False).astype(bool)]
    return joined.sort_values("embed_row", kind="stable").reset_index(drop=True)


def expected_items(run_path: Path, in_stock_only: bool) -> "pd.DataFrame":
    """The items an index built from this run's upstream folders must hold (used by evaluate too)."""
    _, items, _ = load_embeddings(run_path / "embed")
    return select_items(items, load_catalog(run_path / "extract"), in_stock_only)


# ------------------------------------------------------------------------------------------- stage
def run(cfg: IndexConfig) -> IndexResult:
    """Build ``index/`` from the run's ``embed/`` and ``extract/`` folders."""
    t0 = time.perf_counter()
    embed_dir = cfg.upstream_dir("embed")
    extract_dir = cfg.upstream_dir("extract")
    vectors, items, model = load_embeddings(embed_dir)
    model_id = read_model_id(model, embed_dir / "model.json")
    joined = select_items(items, load_catalog(extract_dir), cfg.in_stock_only)
    normed, valid = normalize_rows(vectors[joined["embed_row"].to_numpy()])
    n_invalid = int((~valid).sum())
    if n_invalid:
        bad = joined.loc[~valid, "product_id"].head(5).tolist()
        log.warning("%d item(s) have NaN/inf/zero vectors and are left out of the index (e.g. %s)", n_invalid, bad)
    joined = joined[valid].reset_index(drop=True)
    normed = normed[valid]
    if len(joined) == 0:
        raise SchemaError(f"nothing to index: no embedded item of {embed_dir} is in the fetched catalog"
                          + (" and in stock" if cfg.in_stock_only else ""))
    idmap = joined.copy()
    idmap.insert(0, "ann_id", np.arange(len(idmap), dtype=np.int64))

    out = cfg.stage_dir()
    ann_path = out / INDEX_FILE
    t_build = time.perf_counter()
    with atomic_path(ann_path, suffix=".ann") as tmp:
        index = build_annoy(normed, cfg.n_trees, cfg.seed, cfg.n_jobs, on_disk_path=tmp if cfg.on_disk else None)
        if not cfg.on_disk:
            index.save(str(tmp))
        index.unload()
    build_s = time.perf_counter() - t_build
    write_parquet_atomic(out / IDMAP_FILE, idmap)
    write_npy_atomic(out / VECTORS_FILE, normed)

    sidecar = {
        "schema": SIDECAR_SCHEMA,
        "dim": int(normed.shape[1]),
        "metric": METRIC,
        "n_trees": cfg.n_trees,
        "search_k": cfg.search_k,
        "n_items": int(len(idmap)),
        "seed": cfg.seed,
        "n_jobs": cfg.n_jobs,
        "on_disk": cfg.on_disk,
        "in_stock_only": cfg.in_stock_only,
        "model_id": model_id,
        "source_run_id": cfg.run_id,
        "annoy_version": _annoy_version(),
        "build_seconds": round(build_s, 3),
        "sha256": {
            INDEX_FILE: sha256_file(ann_path),
            IDMAP_FILE: sha256_file(out / IDMAP_FILE),
            VECTORS_FILE: sha256_file(out / VECTORS_FILE),
        },
        "inputs": {
            "embed/vectors.npy": sha256_file(embed_dir / "vectors.npy"),
            "embed/items.parquet": sha256_file(embed_dir / "items.parquet"),
            "embed/model.json": sha256_file(embed_dir / "model.json"),
            "extract/catalog.parquet": sha256_file(extract_dir / "catalog.parquet"),
        },
    }
    write_json_atomic(out / SIDECAR_FILE, sidecar)
    metrics = {"build_seconds": round(build_s, 3), "index_mb": round(ann_path.stat().st_size / 2**20, 3)}
    counts = {
        "n_items": int(len(idmap)),
        "n_products": int(idmap["product_id"].nunique()),
        "n_embedded": int(len(items)),
        "n_invalid_vectors": n_invalid,
        "n_categories": int(idmap["category"].nunique()) if "category" in idmap.columns else 0,
    }
    log.info("index: %d items (dim %d, %d trees) built in %.2f s", len(idmap), normed.shape[1], cfg.n_trees, build_s)
    write_stage_summary(out, metrics=metrics, counts=counts, total_seconds=round(time.perf_counter() - t0, 3))
    return IndexResult(out, sidecar, metrics, counts)


def _annoy_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("annoy")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return None


# ------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedIndex:
    """An index folder opened for querying: the mmapped Annoy index, id map and sidecar."""

    annoy: "AnnoyIndex"
    idmap: "pd.DataFrame"
    meta: dict[str, Any]
    path: Path
    _vectors: np.ndarray | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def n_items(self) -> int:
        return int(self.meta["n_items"])

    @property
    def model_id(self) -> str:
        return str(self.meta["model_id"])

    @property
    def default_search_k(self) -> int:
        return int(self.meta.get("search_k", -1))

    def _check_vector(self, vector: np.ndarray) -> np.ndarray:
        vec = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vec.shape[0] != self.dim:
            raise SchemaError(f"query vector has dim {vec.shape[0]} but index {self.path} has dim {self.dim} "
                              f"(model {self.model_id})")
        if not np.isfinite(vec).all():
            raise SchemaError("query vector contains NaN or inf")
        return vec

    def query(self, vector: np.ndarray, k: int, search_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-``k``: ``(ann ids int64, cosine similarities float32)``, best first."""
        vec = self._check_vector(vector)
        sk = self.default_search_k if search_k is None else int(search_k)
        ids, dists = self.annoy.get_nns_by_vector(vec.tolist(), int(k), search_k=sk, include_distances=True)
        return np.asarray(ids, dtype=np.int64), angular_to_cosine(np.asarray(dists, dtype=np.float32))

    def vector(self, ann_id: int) -> np.ndarray:
        if not 0 <= int(ann_id) < self.n_items:
            raise IndexError(f"ann_id {ann_id} out of range 0..{self.n_items - 1}")
        return np.asarray(self.annoy.get_item_vector(int(ann_id)), dtype=np.float32)

    def vectors(self) -> np.ndarray:
        """All indexed vectors in ann_id order (mmapped ``vectors.npy``, read lazily)."""
        if self._vectors is None:
            self._vectors = np.load(self.path / VECTORS_FILE, mmap_mode="r")
        return self._vectors

    def query_subset(self, vector: np.ndarray, k: int, ann_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` among ``ann_ids`` only (for selective filters, e.g. one small category)."""
        vec = self._check_vector(vector)
        ann_ids = np.asarray(ann_ids, dtype=np.int64)
        if ann_ids.size == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        sub = np.asarray(self.vectors()[np.sort(ann_ids)])
        local, sims = exact_knn(vec[None, :], sub, k)
        return np.sort(ann_ids)[local[0]], sims[0]

    def unload(self) -> None:
        self.annoy.unload()


def load_index(index_dir: str | os.PathLike[str], expected_model_id: str | None = None, *,
               verify_checksums: bool = False) -> LoadedIndex:
    """Open an index folder with mmap (``prefault=False``) and check it against its sidecar.

    ``expected_model_id`` is the id of the embedder that will produce the query vectors (from its
    ``model.json``); a different id in the sidecar raises :class:`IndexMismatchError`. With
    ``verify_checksums`` the files are hashed and compared with the sidecar's sha256s.
    """
    import pandas as pd
    from annoy import AnnoyIndex

    folder = Path(index_dir)
    sidecar_path = folder / SIDECAR_FILE
    if not sidecar_path.exists():
        raise ConfigError(f"{folder} is not an index folder (no {SIDECAR_FILE}): run the index stage first")
    meta = read_json(sidecar_path)
    missing_keys = [k for k in ("dim", "metric", "n_items", "model_id") if k not in meta]
    if missing_keys:
        raise IndexMismatchError(f"{sidecar_path} lacks {missing_keys}: rebuild the index")
    if expected_model_id is not None and str(expected_model_id) != str(meta["model_id"]):
        raise IndexMismatchError(
            f"index {folder} was built with model {meta['model_id']!r} but the query model is "
            f"{expected_model_id!r}: rebuild the index with this model or load the matching model"
        )
    if meta["metric"] != METRIC:
        raise IndexMismatchError(f"{sidecar_path}: metric {meta['metric']!r} is not supported (expected {METRIC!r})")
    for name in (INDEX_FILE, IDMAP_FILE):
        if not (folder / name).exists():
            raise ConfigError(f"index folder {folder} is incomplete: {name} is missing; rebuild the index")
    if verify_checksums:
        for name, digest in meta.get("sha256", {}).items():
            if (folder / name).exists() and sha256_file(folder / name) != digest:
                raise IndexMismatchError(f"{folder / name} does not match the sha256 in {sidecar_path}: "
                                         f"the folder was modified after the build; rebuild the index")
    index = AnnoyIndex(int(meta["dim"]), METRIC)
    index.load(str(folder / INDEX_FILE), prefault=False)
    idmap = pd.read_parquet(folder / IDMAP_FILE)
    n = int(meta["n_items"])
    problems = []
    if index.get_n_items() != n:
        problems.append(f"{INDEX_FILE} holds {index.get_n_items()} items")
    if len(idmap) != n:
        problems.append(f"{IDMAP_FILE} has {len(idmap)} rows")
    elif not np.array_equal(idmap["ann_id"].to_numpy(), np.arange(n)):
        problems.append(f"{IDMAP_FILE} ann_id is not 0..{n - 1}")
    if index.f != int(meta["dim"]):  # pragma: no cover - annoy takes f from the constructor
        problems.append(f"dim {index.f}")
    if problems:
        index.unload()
        raise IndexMismatchError(f"index {folder} does not match its sidecar (n_items={n}): " + "; ".join(problems)
                                 + ": rebuild the index")
    return LoadedIndex(annoy=index, idmap=idmap, meta=meta, path=folder)


def describe(meta: dict[str, Any]) -> str:
    """One line about an index, for notebooks and logs."""
    return json.dumps({k: meta.get(k) for k in ("n_items", "dim", "n_trees", "search_k", "model_id")})
