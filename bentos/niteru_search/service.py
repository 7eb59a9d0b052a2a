"""niteru similar-item search service (BentoML 1.4).

Serves one packaged niteru model (``niteru.package``): embedder + detector + Annoy index + id map.

APIs (typed signatures below are the OpenAPI schema; ``/docs`` shows it):

* ``POST /search_by_image``       multipart upload -> detect -> crop -> embed -> ANN -> filter -> top-k per item
* ``POST /search_by_product``     similar items for a catalog product id (its stored vector, no image work)
* ``POST /embed_crops``           batchable embedding of image crops (adaptive batching); ``/search_by_image``
  shares BentoML's adaptive batching dispatcher in-process, so concurrent image queries share forward passes
* ``POST /refresh_availability``  reload the availability table now (optionally upsert rows)
* ``POST /info``                  model tag, run id, index size, categories, availability version
* BentoML's own ``/livez``, ``/readyz`` (ready once the model is loaded) and ``/metrics`` (Prometheus)

Bad input answers 4xx with ``{"error": message, "code": code}``: never a 500.

Environment: ``NITERU_MODEL_TAG`` (default ``niteru:latest``), ``NITERU_AVAILABILITY`` (Parquet with
product_id, in_stock[, price, removed]; reloaded when its mtime changes; default: the packaged
snapshot), ``NITERU_BATCHING`` (1/0), ``NITERU_CACHE_SIZE`` (LRU entries, 0 = off),
``NITERU_REDIS_URL`` (shared response cache), ``NITERU_DEVICE``, ``NITERU_RUNTIME`` (CPU inference:
auto/torch/openvino), ``NITERU_MAX_UPLOAD_MB``, ``NITERU_MAX_PIXELS``, ``NITERU_MAX_ITEMS``, ``NITERU_TORCH_THREADS``, ``NITERU_CPU_SLOTS`` (concurrent
CPU-heavy steps, default 1), ``NITERU_BATCH_MAX_LATENCY_MS``, ``NITERU_WORKERS`` (server processes, default 1).
"""

import asyncio
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any, Optional

import bentoml
import numpy as np
from bentoml.validators import ContentType
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

log = logging.getLogger("niteru.service")

MODEL_TAG = os.environ.get("NITERU_MODEL_TAG", "niteru:latest")
MAX_K = 100
MAX_UPLOAD_BYTES = int(float(os.environ.get("NITERU_MAX_UPLOAD_MB", "20")) * 2**20)
MAX_PIXELS = int(os.environ.get("NITERU_MAX_PIXELS", str(40_000_000)))
MAX_ITEMS = int(os.environ.get("NITERU_MAX_ITEMS", "5"))
#: Query crops are downscaled to at most this many pixels on their long side before embedding (the same in
#: the batched and the direct path, so both give identical vectors); the embedder resizes further itself.
CROP_MAX_SIDE = 512
BATCH_MAX_SIZE = 16
#: Upper bound on queueing + inference for one batched call. BentoML's dispatcher answers 503 to calls it predicts
#: cannot finish within it, so it is generous: on a busy 2-core CPU one forward pass can take a second.
BATCH_MAX_LATENCY_MS = int(os.environ.get("NITERU_BATCH_MAX_LATENCY_MS", "15000"))


# ------------------------------------------------------------------------------------------ schema
class Product(BaseModel):
    product_id: str
    crop_index: int
    score: float = Field(description="cosine similarity")
    metadata: dict[str, Any]


class DetectedItem(BaseModel):
    box: dict[str, Any] = Field(description="x0, y0, x1, y1 in pixels of the uploaded image, score, label, method")
    results: list[Product]


class ImageSearchResponse(BaseModel):
    items: list[DetectedItem]
    model_tag: str
    cached: bool = False
    took_ms: float = 0.0


class SimilarResponse(BaseModel):
    product_id: str
    results: list[Product]
    model_tag: str
    cached: bool = False
    took_ms: float = 0.0


class AvailabilityRow(BaseModel):
    product_id: str
    in_stock: Optional[bool] = None
    price: Optional[float] = Field(None, ge=0)
    removed: Optional[bool] = None


class AvailabilityStatus(BaseModel):
    version: int
    n_products: int
    source: Optional[str]
    loaded_at: float
    updated: int = 0


class ServiceInfo(BaseModel):
    model_tag: str
    run_id: Optional[str]
    model_id: str
    n_items: int
    categories: list[str]
    crop_policy: str
    batching: bool
    availability: AvailabilityStatus


# ------------------------------------------------------------------------------------------ errors
class RequestError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(exc: Exception) -> JSONResponse:
    """Map a user-facing exception to a 4xx JSON body; anything unexpected is re-raised (a real 500)."""
    from niteru.errors import BadImageError, ConfigError
    from niteru.search import UnknownCategoryError, UnknownProductError

    if isinstance(exc, RequestError):
        status, code, message = exc.status, exc.code, exc.message
    elif isinstance(exc, UnknownProductError):
        status, code, message = 404, "unknown_product", str(exc)
    elif isinstance(exc, UnknownCategoryError):
        status, code, message = 400, "unknown_category", str(exc)
    elif isinstance(exc, BadImageError):
        text = str(exc)
        if "pixels, over the limit" in text or "decompression bomb" in text:
            status, code = 413, "image_too_large"
        elif "not a recognised image format" in text or "is empty" in text:
            status, code = 415, "not_an_image"
        else:
            status, code = 400, "corrupt_image"
        message = text.replace("image <bytes>", "the uploaded image").replace("<bytes>", "the uploaded file")
    elif isinstance(exc, ConfigError):
        status, code, message = 400, "bad_parameter", str(exc)
    else:
        raise exc
    return JSONResponse({"error": message, "code": code}, status_code=status)


# ------------------------------------------------------------------------------------------ caches
class ResponseCache:
    """Thread-safe in-process LRU of JSON-able responses; ``maxsize=0`` disables it."""

    def __init__(self, maxsize: int = 1024):
        self.maxsize = maxsize
        self._data: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> Optional[dict[str, Any]]:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def set(self, key: str, value: dict[str, Any]) -> None:
        if self.maxsize <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)


class RedisCache(ResponseCache):
    """Shared cache across workers/replicas (``NITERU_REDIS_URL``); falls back to a miss on Redis errors."""

    def __init__(self, url: str, ttl_s: int = 3600):
        super().__init__(maxsize=0)
        try:
            import redis
        except ImportError as exc:
            raise RuntimeError("NITERU_REDIS_URL is set but the 'redis' package is not installed: "
                               "pip install redis, or unset NITERU_REDIS_URL") from exc
        self._redis = redis.Redis.from_url(url, socket_timeout=0.2)
        self.ttl_s = ttl_s

    def get(self, key: str) -> Optional[dict[str, Any]]:
        try:
            raw = self._redis.get("niteru:" + key)
        except Exception as exc:  # a cache outage must never fail a query
            log.warning("redis get failed: %s", exc)
            return None
        if raw is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(raw)

    def set(self, key: str, value: dict[str, Any]) -> None:
        try:
            self._redis.set("niteru:" + key, json.dumps(value), ex=self.ttl_s)
        except Exception as exc:
            log.warning("redis set failed: %s", exc)


def make_cache() -> ResponseCache:
    url = os.environ.get("NITERU_REDIS_URL")
    if url:
        return RedisCache(url)
    return ResponseCache(int(os.environ.get("NITERU_CACHE_SIZE", "1024")))


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


# ------------------------------------------------------------------------------------------ service
@bentoml.service(
    name="niteru_search",
    workers=int(os.environ.get("NITERU_WORKERS", "1")),
    threads=1,
    traffic={"timeout": 60, "max_concurrency": 256},
    resources={"cpu": "2"},
)
class NiteruSearch:
    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        import torch

        from niteru.package import load_bundle
        from niteru.search import Availability, SearchEngine

        threads = int(os.environ.get("NITERU_TORCH_THREADS", "0")) or (os.cpu_count() or 1)
        torch.set_num_threads(threads)
        stored = self.model
        self.model_tag = str(stored.tag)
        self.bundle = load_bundle(stored.path, device=os.environ.get("NITERU_DEVICE", "cpu"),
                                  runtime=os.environ.get("NITERU_RUNTIME", "auto"))
        source = os.environ.get("NITERU_AVAILABILITY") or str(self.bundle.availability_path)
        self.availability = Availability.from_parquet(source, complete=True, check_interval_s=1.0)
        self.engine = SearchEngine(self.bundle.index, self.availability)
        self.engine.warm()
        self.bundle.embedder.warmup()  # compile the inference runtime now, not on the first image query
        self.search_k = self.bundle.manifest.get("search_k")
        self.batching = _env_flag("NITERU_BATCHING", True)
        self.cache = make_cache()
        # Concurrent image queries share forward passes through BentoML's adaptive batching dispatcher (the
        # one behind @bentoml.api(batchable=True), used in-process here: no HTTP round trip, no re-encoding).
        from bentoml._internal.marshal.dispatcher import CorkDispatcher

        self._dispatcher = CorkDispatcher(max_latency_in_ms=BATCH_MAX_LATENCY_MS, max_batch_size=BATCH_MAX_SIZE,
                                          fallback=_overloaded, get_batch_size=len, batch_dim=(0, 0))
        self._batched = self._dispatcher(self._embed_batches)
        # CPU-heavy steps (decode+detect, embedding passes) run one at a time: each already uses every core
        # through torch's intra-op threads, and overlapping them only makes both slower.
        self._cpu = asyncio.Semaphore(int(os.environ.get("NITERU_CPU_SLOTS", "1")))
        self._ready = True
        log.info("niteru search ready: model %s, %d items, batching=%s", self.model_tag, self.engine.n_items,
                 self.batching)

    def __is_ready__(self) -> bool:
        return getattr(self, "_ready", False)

    # ------------------------------------------------------------------ batchable embedding
    @bentoml.api(batchable=True, max_batch_size=BATCH_MAX_SIZE, max_latency_ms=BATCH_MAX_LATENCY_MS)
    def embed_crops(self, crops: list[Annotated[Path, ContentType("image/*")]]) -> np.ndarray:
        """L2-normalised embeddings of image crops (one row per crop); batched across concurrent calls."""
        from niteru.errors import BadImageError
        from niteru.images import load_rgb

        images = []
        for path in crops:
            try:
                images.append(load_rgb(Path(path).read_bytes(), max_pixels=MAX_PIXELS))
            except BadImageError as exc:
                raise bentoml.exceptions.InvalidArgument(f"crop {Path(path).name}: {exc}") from None
        if not images:
            return np.zeros((0, self.bundle.embedder.dim), dtype=np.float32)
        return np.asarray(self.bundle.embedder.embed(images), dtype=np.float32)

    # ------------------------------------------------------------------ search by image
    @bentoml.api(route="/search_by_image")
    async def search_by_image(
        self,
        image: Annotated[Path, ContentType("image/*")],
        k: Annotated[int, Field(ge=1, le=MAX_K, description="results per detected item")] = 10,
        category: Optional[str] = None,
        min_price: Annotated[Optional[float], Field(ge=0)] = None,
        max_price: Annotated[Optional[float], Field(ge=0)] = None,
        in_stock_only: bool = True,
    ) -> ImageSearchResponse:
        """Upload a photo; get the top-k similar catalog products for every item detected in it."""
        t0 = time.perf_counter()
        try:
            data = self._read_upload(Path(image))
            filters = self._filters(category, min_price, max_price, in_stock_only)
            key = self._cache_key("img", hashlib.sha256(data).hexdigest(), k, filters)
            cached = self.cache.get(key)
            if cached is not None:
                return ImageSearchResponse(**{**cached, "cached": True, "took_ms": _ms(t0)})
            async with self._cpu:
                boxes, crops = await asyncio.to_thread(self._detect_and_crop, data)
            vectors = await self._embed(crops)
            items = []
            for box, vector in zip(boxes, vectors):
                hits = self.engine.by_vector(vector, k, filters, search_k=self.search_k)
                items.append({"box": box, "results": [_product(h) for h in hits]})
            body = {"items": items, "model_tag": self.model_tag}
            self.cache.set(key, body)
            return ImageSearchResponse(**body, cached=False, took_ms=_ms(t0))
        except Exception as exc:
            return error_response(exc)

    # ------------------------------------------------------------------ search by product id
    @bentoml.api(route="/search_by_product")
    async def search_by_product(
        self,
        product_id: Annotated[str, Field(min_length=1, max_length=512)],
        k: Annotated[int, Field(ge=1, le=MAX_K)] = 10,
        category: Optional[str] = None,
        min_price: Annotated[Optional[float], Field(ge=0)] = None,
        max_price: Annotated[Optional[float], Field(ge=0)] = None,
        in_stock_only: bool = True,
    ) -> SimilarResponse:
        """Catalog products most similar to ``product_id`` (from its stored vector)."""
        t0 = time.perf_counter()
        try:
            filters = self._filters(category, min_price, max_price, in_stock_only)
            key = self._cache_key("pid", product_id, k, filters)
            cached = self.cache.get(key)
            if cached is not None:
                return SimilarResponse(**{**cached, "cached": True, "took_ms": _ms(t0)})
            hits = self.engine.by_product(product_id, k, filters, search_k=self.search_k)
            body = {"product_id": product_id, "results": [_product(h) for h in hits], "model_tag": self.model_tag}
            self.cache.set(key, body)
            return SimilarResponse(**body, cached=False, took_ms=_ms(t0))
        except Exception as exc:
            return error_response(exc)

    # ------------------------------------------------------------------ operations
    @bentoml.api(route="/refresh_availability")
    def refresh_availability(self, updates: Optional[list[AvailabilityRow]] = None) -> AvailabilityStatus:
        """Reload the availability table from its file now; optionally upsert rows in memory."""
        try:
            self.availability.refresh(force=True)
            n = 0
            if updates:
                n = self.availability.update([u.model_dump(exclude_none=True) for u in updates])
            return self._availability_status(updated=n)
        except Exception as exc:
            from niteru.errors import NiteruError

            if isinstance(exc, (NiteruError, OSError, ValueError)):
                return JSONResponse({"error": f"availability refresh failed: {exc}", "code": "refresh_failed"},
                                    status_code=409)
            raise

    @bentoml.api(route="/info")
    def info(self) -> ServiceInfo:
        """Which model and index this replica serves (use it to verify a swap)."""
        manifest = self.bundle.manifest
        return ServiceInfo(model_tag=self.model_tag, run_id=manifest.get("run_id"), model_id=manifest["model_id"],
                           n_items=self.engine.n_items, categories=sorted(self.engine.categories),
                           crop_policy=self.bundle.crop_policy, batching=self.batching,
                           availability=self._availability_status())

    # ------------------------------------------------------------------ helpers
    def _availability_status(self, updated: int = 0) -> AvailabilityStatus:
        av = self.availability
        return AvailabilityStatus(version=av.version, n_products=len(av), source=str(av.path) if av.path else None,
                                  loaded_at=av.loaded_at, updated=updated)

    def _filters(self, category: Optional[str], min_price: Optional[float], max_price: Optional[float],
                 in_stock_only: bool) -> Any:
        from niteru.search import Filters, UnknownCategoryError

        self.availability.maybe_refresh()  # before the cache key is built: it includes the table version
        filters = Filters(category=category or None, min_price=min_price, max_price=max_price,
                          in_stock_only=in_stock_only)
        if filters.category is not None and filters.category not in self.engine.categories:
            raise UnknownCategoryError(f"unknown category {filters.category!r}; known categories: "
                                       f"{', '.join(sorted(self.engine.categories))}")
        return filters

    def _cache_key(self, kind: str, subject: str, k: int, filters: Any) -> str:
        params = json.dumps([kind, subject, k, list(filters.key()), self.availability.version, self.model_tag,
                             self.search_k])
        return hashlib.sha256(params.encode()).hexdigest()

    def _read_upload(self, path: Path) -> bytes:
        size = path.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            raise RequestError(413, "upload_too_large", f"the upload is {size / 2**20:.1f} MiB; the limit is "
                               f"{MAX_UPLOAD_BYTES / 2**20:.0f} MiB: send a smaller JPEG/PNG")
        if size == 0:
            raise RequestError(415, "not_an_image", "the uploaded file is empty: send a JPEG/PNG/WebP image")
        return path.read_bytes()

    def _detect_and_crop(self, data: bytes) -> tuple[list[dict[str, Any]], list[Any]]:
        from niteru.detect import crop, select_crops
        from niteru.images import load_rgb

        image = load_rgb(data, max_pixels=MAX_PIXELS)
        found = self.bundle.detector.detect([image])[0]
        boxes = select_crops(found, self.bundle.crop_policy, self.bundle.min_score, image.size)[:MAX_ITEMS]
        crops = [_shrink(crop(image, b)) for b in boxes]
        return [b.as_dict() for b in boxes], crops

    async def _embed(self, crops: list[Any]) -> np.ndarray:
        if self.batching:
            return await self._batched(crops)
        async with self._cpu:
            return await asyncio.to_thread(self.bundle.embedder.embed, crops)

    async def _embed_batches(self, batches: Any) -> list[np.ndarray]:
        """Dispatcher callback: one forward pass for the crops of every waiting request."""
        flat = [image for crops in batches for image in crops]
        async with self._cpu:
            vectors = await asyncio.to_thread(self.bundle.embedder.embed, flat)
        out, start = [], 0
        for crops in batches:
            out.append(vectors[start:start + len(crops)])
            start += len(crops)
        return out


def _overloaded() -> Any:
    raise bentoml.exceptions.ServiceUnavailable("the embedding queue is full; retry shortly")


def _shrink(image: Any) -> Any:
    from PIL import Image

    width, height = image.size
    scale = CROP_MAX_SIDE / max(width, height)
    if scale >= 1:
        return image
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)


def _product(hit: Any) -> dict[str, Any]:
    score = hit.score if math.isfinite(hit.score) else 0.0
    return {"product_id": hit.product_id, "crop_index": hit.crop_index, "score": round(score, 6),
            "metadata": hit.metadata}


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)
