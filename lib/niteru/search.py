"""Filtered similar-item search over a loaded Annoy index.

:class:`SearchEngine` answers "items like this vector / this product" with business filters
(:class:`Filters`: category, price range, in-stock only) applied *after* the approximate
nearest-neighbour search. Because a selective filter can reject most ANN candidates, the engine
over-fetches adaptively: it asks Annoy for ``k / selectivity`` candidates (times a safety factor),
grows the request geometrically while too few survive, and falls back to an exact scan of the
filtered subset when that subset is small or the ANN candidates run out. A filter that matches at
least ``k`` products therefore always returns ``k`` results.

Availability (in stock, current price, removed) changes faster than the index is rebuilt, so it
lives in a separate :class:`Availability` table that can be swapped while serving: reloaded from its
Parquet file when the file's mtime changes, or updated through :meth:`Availability.update`.
Products absent from a full availability snapshot, or flagged ``removed``, are never returned.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import pandas as pd

from niteru.errors import ConfigError, NiteruError, SchemaError

log = logging.getLogger(__name__)

#: Columns copied from the id map into every hit's metadata (when present).
METADATA_COLUMNS = (
    "product_id", "group_id", "category", "brand", "price", "in_stock", "color", "pattern", "title",
    "image_uri", "updated_at",
)


class UnknownProductError(NiteruError, LookupError):
    """The product id is not in the index (or was removed from the catalog)."""


class UnknownCategoryError(ConfigError):
    """The category filter names a category the index does not contain."""


class IndexLike(Protocol):
    """What the engine needs from :class:`niteru.index.LoadedIndex`."""

    idmap: pd.DataFrame

    def query(self, vector: np.ndarray, k: int, search_k: int | None = None) -> tuple[np.ndarray, np.ndarray]: ...

    def vector(self, ann_id: int) -> np.ndarray: ...


class Hit(NamedTuple):
    product_id: str
    crop_index: int
    score: float  # cosine similarity in [-1, 1]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Filters:
    """Business filters applied to search results. ``None`` means "no constraint"."""

    category: str | None = None
    min_price: float | None = None
    max_price: float | None = None
    in_stock_only: bool = True

    def __post_init__(self) -> None:
        for name in ("min_price", "max_price"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ConfigError(f"{name} must be a finite number >= 0 (got {value!r})")
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise ConfigError(f"min_price ({self.min_price}) is greater than max_price ({self.max_price})")
        if self.category is not None and not str(self.category).strip():
            raise ConfigError("category must be a non-empty string or omitted")

    def key(self) -> tuple[Any, ...]:
        return (self.category, self.min_price, self.max_price, self.in_stock_only)


# ----------------------------------------------------------------------------------- availability
AVAILABILITY_COLUMNS = ("product_id", "in_stock")


class Availability:
    """Refreshable in-stock / price / removed table keyed by ``product_id``.

    ``table`` needs ``product_id`` and ``in_stock``; ``price`` (float) and ``removed`` (bool) are
    optional. With ``complete=True`` (a full catalog snapshot such as ``extract/catalog.parquet``)
    products missing from the table count as removed. ``version`` increases on every change so
    callers can key caches on it. Thread-safe: readers get an immutable snapshot.
    """

    def __init__(self, table: pd.DataFrame, complete: bool = True, path: str | os.PathLike[str] | None = None,
                 check_interval_s: float = 1.0):
        self.complete = complete
        self.path = Path(path) if path is not None else None
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._table = _normalise_availability(table, source=str(path or "<table>"))
        self._mtime = self._stat_mtime()
        self._last_check = time.monotonic()
        self.version = 1
        self.loaded_at = time.time()

    @classmethod
    def from_parquet(cls, path: str | os.PathLike[str], complete: bool = True,
                     check_interval_s: float = 1.0) -> "Availability":
        return cls(_read_availability(Path(path)), complete=complete, path=path, check_interval_s=check_interval_s)

    @property
    def table(self) -> pd.DataFrame:
        return self._table

    def __len__(self) -> int:
        return len(self._table)

    def _stat_mtime(self) -> float | None:
        if self.path is None:
            return None
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def maybe_refresh(self) -> bool:
        """Reload from the file if its mtime changed; checks at most every ``check_interval_s``."""
        if self.path is None or time.monotonic() - self._last_check < self.check_interval_s:
            return False
        return self.refresh(force=False)

    def refresh(self, force: bool = True) -> bool:
        """Reload the table from its Parquet file (``force`` even when the mtime is unchanged).

        A file that cannot be read leaves the current table in place (logged), so a half-copied
        upload never empties the catalog. Returns whether the table changed.
        """
        if self.path is None:
            return False
        self._last_check = time.monotonic()
        mtime = self._stat_mtime()
        if not force and mtime == self._mtime:
            return False
        try:
            table = _read_availability(self.path)
        except (OSError, SchemaError, ValueError) as exc:
            log.error("availability refresh from %s failed, keeping version %d: %s", self.path, self.version, exc)
            if force:
                raise
            return False
        with self._lock:
            self._table = table
            self._mtime = mtime
            self.version += 1
            self.loaded_at = time.time()
        log.info("availability reloaded from %s: %d products (version %d)", self.path, len(table), self.version)
        return True

    def update(self, rows: pd.DataFrame | Sequence[Mapping[str, Any]]) -> int:
        """Upsert rows (``product_id`` plus any of ``in_stock``, ``price``, ``removed``) in memory."""
        frame = pd.DataFrame(list(rows)) if not isinstance(rows, pd.DataFrame) else rows
        if "product_id" not in frame.columns:
            raise SchemaError("availability update needs a 'product_id' column")
        if frame.empty:
            return 0
        with self._lock:
            current = self._table.set_index("product_id")
            upd = frame.assign(product_id=frame["product_id"].astype(str)).set_index("product_id")
            new_ids = upd.index.difference(current.index)
            merged = pd.concat([current, pd.DataFrame(index=new_ids, columns=current.columns)])
            for col in upd.columns:
                if col not in merged.columns:
                    raise SchemaError(f"availability update has unknown column {col!r} "
                                      f"(allowed: product_id, in_stock, price, removed)")
                merged.loc[upd.index, col] = upd[col].to_numpy()
            table = _normalise_availability(merged.rename_axis("product_id").reset_index(), source="<update>")
            self._table = table
            self.version += 1
            self.loaded_at = time.time()
        return len(frame)


def _read_availability(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise ConfigError(f"availability table {path} does not exist; point NITERU_AVAILABILITY at a Parquet "
                          f"file with columns product_id, in_stock[, price, removed]")
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    columns = [c for c in ("product_id", "in_stock", "price", "removed") if c in names]
    return _normalise_availability(pd.read_parquet(path, columns=columns), source=str(path))


def _normalise_availability(table: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [c for c in AVAILABILITY_COLUMNS if c not in table.columns]
    if missing:
        raise SchemaError(f"availability table {source} lacks column(s) {missing}; "
                          f"it needs product_id, in_stock and optionally price, removed")
    out = pd.DataFrame({"product_id": table["product_id"].astype(str).to_numpy()})
    out["in_stock"] = table["in_stock"].fillna(False).astype(bool).to_numpy()
    out["price"] = (pd.to_numeric(table["price"], errors="coerce").astype("float64").to_numpy()
                    if "price" in table.columns else np.nan)
    out["removed"] = (table["removed"].fillna(False).astype(bool).to_numpy()
                      if "removed" in table.columns else False)
    return out.drop_duplicates("product_id", keep="last").reset_index(drop=True)


def availability_from_idmap(idmap: pd.DataFrame) -> Availability:
    """The availability recorded in the index's id map (the snapshot at indexing time)."""
    cols = [c for c in ("product_id", "in_stock", "price") if c in idmap.columns]
    table = idmap[cols].drop_duplicates("product_id")
    if "in_stock" not in table.columns:
        table = table.assign(in_stock=True)
    return Availability(table, complete=True)


# ----------------------------------------------------------------------------------------- engine
class _ItemState(NamedTuple):
    version: int
    active: np.ndarray  # bool [n]: product exists and is not removed
    in_stock: np.ndarray  # bool [n]
    price: np.ndarray  # float64 [n]


class SearchEngine:
    """Filtered top-k search over a :class:`niteru.index.LoadedIndex` (or anything :class:`IndexLike`).

    Results are deduplicated per product (its best-scoring crop), exclude removed products, and
    honour :class:`Filters`. ``exact_threshold``: a filter matching at most this many items is
    answered by an exact scan of the matching vectors (always complete, and faster than ANN there).
    """

    def __init__(self, index: IndexLike, availability: Availability | None = None, *,
                 overfetch: float = 2.0, exact_threshold: int = 2048, max_rounds: int = 4,
                 mask_cache_size: int = 64):
        idmap = index.idmap
        for col in ("product_id", "crop_index"):
            if col not in idmap.columns:
                raise SchemaError(f"index id map lacks column {col!r} (has {list(idmap.columns)})")
        self.index = index
        self.availability = availability if availability is not None else availability_from_idmap(idmap)
        self.overfetch = overfetch
        self.exact_threshold = exact_threshold
        self.max_rounds = max_rounds
        self.n_items = len(idmap)
        self._product_ids = idmap["product_id"].astype(str).to_numpy()
        self._crop_index = idmap["crop_index"].astype(int).to_numpy()
        self._categories = (idmap["category"].astype(str).to_numpy() if "category" in idmap.columns
                            else np.full(self.n_items, "", dtype=object))
        self._meta_cols = [c for c in METADATA_COLUMNS if c in idmap.columns]
        self._idmap = idmap
        order = np.argsort(self._product_ids, kind="stable")
        unique_ids, starts = np.unique(self._product_ids[order], return_index=True)
        self._rows_by_product: dict[str, np.ndarray] = dict(zip(unique_ids.tolist(), np.split(order, starts[1:])))
        self._meta_values = {c: [_plain(v) for v in idmap[c].tolist()] for c in self._meta_cols}
        self.crops_per_product = self.n_items / max(1, len(self._rows_by_product))
        self.categories: frozenset[str] = frozenset(self._categories.tolist()) - {""}
        self._vectors: np.ndarray | None = None
        self._vec_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._state: _ItemState | None = None
        self._masks: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._mask_cache_size = mask_cache_size

    # ------------------------------------------------------------------ state
    def _item_state(self) -> _ItemState:
        self.availability.maybe_refresh()
        version = self.availability.version
        state = self._state
        if state is not None and state.version == version:
            return state
        with self._state_lock:
            if self._state is not None and self._state.version == version:
                return self._state
            table = self.availability.table.set_index("product_id")
            pos = table.index.get_indexer(self._product_ids)
            known = pos >= 0
            safe = np.where(known, pos, 0)
            if self.availability.complete:
                active = known & ~table["removed"].to_numpy()[safe]
            else:
                active = ~(known & table["removed"].to_numpy()[safe])
            base_stock = (self._idmap["in_stock"].fillna(False).astype(bool).to_numpy()
                          if "in_stock" in self._idmap.columns else np.ones(self.n_items, dtype=bool))
            base_price = (pd.to_numeric(self._idmap["price"], errors="coerce").to_numpy(dtype="float64")
                          if "price" in self._idmap.columns else np.full(self.n_items, np.nan))
            in_stock = np.where(known, table["in_stock"].to_numpy()[safe], base_stock)
            avail_price = table["price"].to_numpy(dtype="float64")[safe]
            price = np.where(known & ~np.isnan(avail_price), avail_price, base_price)
            self._state = _ItemState(version, active, in_stock.astype(bool), price)
            self._masks.clear()
            return self._state

    def _mask(self, filters: Filters) -> np.ndarray:
        state = self._item_state()
        key = (state.version, *filters.key())
        cached = self._masks.get(key)
        if cached is not None:
            self._masks.move_to_end(key)
            return cached
        mask = state.active.copy()
        if filters.category is not None:
            if filters.category not in self.categories:
                raise UnknownCategoryError(
                    f"unknown category {filters.category!r}; known categories: {', '.join(sorted(self.categories))}")
            mask &= self._categories == filters.category
        if filters.in_stock_only:
            mask &= state.in_stock
        if filters.min_price is not None:
            mask &= state.price >= filters.min_price
        if filters.max_price is not None:
            mask &= state.price <= filters.max_price
        mask.setflags(write=False)
        self._masks[key] = mask
        if len(self._masks) > self._mask_cache_size:
            self._masks.popitem(last=False)
        return mask

    def vectors(self) -> np.ndarray:
        """All item vectors ``[n, d]`` (read from the index once, then kept in memory)."""
        if self._vectors is None:
            with self._vec_lock:
                if self._vectors is None and callable(getattr(self.index, "vectors", None)):
                    self._vectors = np.ascontiguousarray(self.index.vectors(), dtype=np.float32)
                if self._vectors is None:
                    vecs = np.stack([np.asarray(self.index.vector(i), dtype=np.float32) for i in range(self.n_items)]) \
                        if self.n_items else np.zeros((0, 0), dtype=np.float32)
                    self._vectors = vecs
        return self._vectors

    def warm(self) -> None:
        """Load availability state and the vector matrix now instead of on the first query."""
        self._item_state()
        self.vectors()

    # ------------------------------------------------------------------ queries
    def has_product(self, product_id: str) -> bool:
        return str(product_id) in self._rows_by_product

    def product_vector(self, product_id: str, crop_index: int | None = None) -> np.ndarray:
        """The stored vector of a product (its crop ``crop_index``, default its first crop)."""
        rows = self._rows_by_product.get(str(product_id))
        if rows is None:
            raise UnknownProductError(f"unknown product id {product_id!r}: it is not in the index")
        state = self._item_state()
        if not state.active[rows[0]]:
            raise UnknownProductError(f"product {product_id!r} was removed from the catalog")
        if crop_index is not None:
            match = rows[self._crop_index[rows] == crop_index]
            if match.size == 0:
                raise UnknownProductError(f"product {product_id!r} has no crop {crop_index} "
                                          f"(crops: {sorted(self._crop_index[rows].tolist())})")
            row = int(match[0])
        else:
            row = int(rows[np.argmin(self._crop_index[rows])])
        return np.asarray(self.index.vector(row), dtype=np.float32)

    def by_product(self, product_id: str, k: int, filters: Filters = Filters(),
                   search_k: int | None = None) -> list[Hit]:
        """Products most similar to ``product_id`` (itself excluded), from its stored vector."""
        vector = self.product_vector(product_id)
        return self.by_vector(vector, k, filters, search_k=search_k, exclude=(str(product_id),))

    def by_vector(self, vector: np.ndarray, k: int, filters: Filters = Filters(), search_k: int | None = None,
                  exclude: Iterable[str] = ()) -> list[Hit]:
        """Top-``k`` distinct products for ``vector`` that pass ``filters`` (best first)."""
        if k < 1:
            raise ConfigError(f"k must be >= 1 (got {k})")
        query = _normalise(vector)
        mask = self._mask(filters)
        exclude = frozenset(exclude)
        if exclude:
            mask = mask.copy()
            for pid in exclude:
                rows = self._rows_by_product.get(pid)
                if rows is not None:
                    mask[rows] = False
        n_ok = int(mask.sum())
        if n_ok == 0:
            return []
        if n_ok <= self.exact_threshold:
            return self._exact(query, k, mask)
        selectivity = n_ok / self.n_items
        fetch = min(self.n_items, math.ceil(k * self.crops_per_product * self.overfetch / selectivity) + 1)
        hits: list[Hit] = []
        for _ in range(self.max_rounds):
            ids, sims = self.index.query(query, fetch, search_k=search_k)
            hits = self._collect(np.asarray(ids, dtype=np.int64), np.asarray(sims, dtype=np.float32), mask, k)
            if len(hits) >= k or fetch >= self.n_items:
                break
            fetch = min(self.n_items, fetch * 4)
        if len(hits) < k:  # ANN ran out of candidates: finish exactly over the filtered subset
            log.debug("over-fetch gave %d/%d hits after fetching %d; exact scan of %d items", len(hits), k, fetch, n_ok)
            return self._exact(query, k, mask)
        return hits

    # ------------------------------------------------------------------ helpers
    def _exact(self, query: np.ndarray, k: int, mask: np.ndarray) -> list[Hit]:
        rows = np.flatnonzero(mask)
        sims = self.vectors()[rows] @ query
        order = np.argsort(-sims, kind="stable")
        return self._collect(rows[order], sims[order], None, k)

    def _collect(self, ids: np.ndarray, sims: np.ndarray, mask: np.ndarray | None, k: int) -> list[Hit]:
        state = self._state
        hits: list[Hit] = []
        seen: set[str] = set()
        for row, sim in zip(ids.tolist(), sims.tolist()):
            if mask is not None and not mask[row]:
                continue
            pid = self._product_ids[row]
            if pid in seen:
                continue
            seen.add(pid)
            hits.append(Hit(pid, int(self._crop_index[row]), float(sim), self._metadata(row, state)))
            if len(hits) == k:
                break
        return hits

    def _metadata(self, row: int, state: _ItemState | None) -> dict[str, Any]:
        meta = {c: values[row] for c, values in self._meta_values.items()}
        if state is not None:
            meta["in_stock"] = bool(state.in_stock[row])
            price = float(state.price[row])
            meta["price"] = None if math.isnan(price) else price
        return meta


def _normalise(vector: np.ndarray) -> np.ndarray:
    vec = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vec))
    if not math.isfinite(norm) or norm == 0.0:
        raise ConfigError("query vector is zero or not finite")
    return vec / norm


def _plain(value: Any) -> Any:
    """numpy/pandas scalars -> JSON-friendly Python values (NaN/NA -> None)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
