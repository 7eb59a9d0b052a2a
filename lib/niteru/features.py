"""Content-addressed feature store: computed item features are never computed twice.

A feature is keyed by ``(image sha256, crop box, model)``: the model is the folder
(``<cache>/features/<model key>/``, the key derived from the feature model id, which includes the weights
hash), the image and box are the row key (:func:`item_key`). Features are appended as shards, each a pair
``part-<id>.npy`` (float32 ``[n, dim]``) + ``part-<id>.parquet`` (``key``, ``row``), written atomically with the
Parquet file last, so a shard is visible only once complete. Several processes (embed shards) may write into
the same store at once: shard names are unique.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from niteru.errors import ConfigError
from niteru.io import read_json, write_json_atomic, write_npy_atomic, write_parquet_atomic

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
META = "store.json"
BOX_DECIMALS = 1  # boxes equal to 0.1 px share features


def item_key(image_sha256: str, box: Sequence[float]) -> str:
    """Row key of one crop of one image (the model is the store's folder)."""
    x0, y0, x1, y1 = (round(float(v), BOX_DECIMALS) for v in box)
    text = f"{image_sha256}|{x0:.1f},{y0:.1f},{x1:.1f},{y1:.1f}"
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:40]


def model_key(model_id: str) -> str:
    """File-system-safe folder name for a model id (readable prefix + hash of the full id)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id)[:80]
    return f"{safe}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"


class FeatureStore:
    """Features of one model, under ``<root>/<model_key(model_id)>``."""

    def __init__(self, root: str | Path, model_id: str, dim: int):
        self.model_id = model_id
        self.dim = int(dim)
        self.path = Path(root) / model_key(model_id)
        self.path.mkdir(parents=True, exist_ok=True)
        meta_path = self.path / META
        if meta_path.exists():
            meta = read_json(meta_path)
            if meta.get("model_id") != model_id or int(meta.get("dim", -1)) != self.dim:
                raise ConfigError(f"feature store {self.path} belongs to model {meta.get('model_id')!r} "
                                  f"(dim {meta.get('dim')}), not {model_id!r} (dim {dim}); delete the folder")
        else:
            write_json_atomic(meta_path, {"model_id": model_id, "dim": self.dim, "created": time.time()})
        self._index: dict[str, tuple[str, int]] | None = None
        self._arrays: dict[str, np.ndarray] = {}

    @classmethod
    def under(cls, cache_path: Path, model_id: str, dim: int) -> "FeatureStore":
        """The store of ``model_id`` in a run's shared cache (``<cache>/features/``)."""
        return cls(Path(cache_path) / FEATURES_DIR, model_id, dim)

    # ------------------------------------------------------------------ reading
    def _load_index(self) -> dict[str, tuple[str, int]]:
        if self._index is None:
            import pyarrow.parquet as pq

            index: dict[str, tuple[str, int]] = {}
            for part in sorted(self.path.glob("part-*.parquet")):
                table = pq.read_table(part, columns=["key", "row"])
                for key, row in zip(table.column("key").to_pylist(), table.column("row").to_pylist()):
                    index[key] = (part.stem, int(row))
            self._index = index
        return self._index

    def __len__(self) -> int:
        return len(self._load_index())

    def contains(self, keys: Sequence[str]) -> np.ndarray:
        index = self._load_index()
        return np.fromiter((k in index for k in keys), dtype=bool, count=len(keys))

    def _array(self, shard: str) -> np.ndarray:
        if shard not in self._arrays:
            self._arrays[shard] = np.load(self.path / f"{shard}.npy", mmap_mode="r")
        return self._arrays[shard]

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """Features of ``keys`` in order, float32 ``[len(keys), dim]``; every key must be present."""
        index = self._load_index()
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        missing = [k for k in keys if k not in index]
        if missing:
            raise KeyError(f"{len(missing)} key(s) not in feature store {self.path}, e.g. {missing[0]}")
        for i, key in enumerate(keys):
            shard, row = index[key]
            out[i] = self._array(shard)[row]
        return out

    # ------------------------------------------------------------------ writing
    def put(self, keys: Sequence[str], vectors: np.ndarray) -> Path | None:
        """Append one shard holding ``vectors`` for ``keys``; returns its Parquet path (None if empty)."""
        import pyarrow as pa

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(keys), self.dim):
            raise ValueError(f"expected vectors of shape ({len(keys)}, {self.dim}), got {vectors.shape}")
        if not len(keys):
            return None
        if not np.isfinite(vectors).all():
            raise ValueError("refusing to store non-finite features (NaN/inf): check the model and its inputs")
        name = f"part-{time.time_ns():020d}-{secrets.token_hex(4)}"
        write_npy_atomic(self.path / f"{name}.npy", vectors)
        table = pa.table({"key": pa.array(list(keys), pa.string()), "row": pa.array(range(len(keys)), pa.int32())})
        parquet = write_parquet_atomic(self.path / f"{name}.parquet", table)
        if self._index is not None:
            for row, key in enumerate(keys):
                self._index[key] = (name, row)
        return parquet
