"""Concurrent, cached, validated image fetching.

* URIs: local paths, ``file://``, ``http(s)://`` (aiohttp, the engine of fsspec's HTTP file system),
  ``gs://`` (the GCS JSON API over the same session, with
  application-default credentials when available; ``STORAGE_EMULATOR_HOST`` points it at an emulator) and
  any other fsspec protocol that is installed.
* A bounded pool (``concurrency``) with a per-host limit, a time limit per attempt, and retries with
  exponential backoff and full jitter (tenacity) for transient failures (timeouts, connection errors,
  HTTP 429/5xx). 404s, oversized downloads and undecodable images are not retried.
* A content-addressed cache: bytes live at ``<cache>/<sha[:2]>/<sha256>``; a record per
  ``(uri, version)`` in ``<cache>/uris.sqlite`` remembers which content a URI had, so an image already
  fetched is never fetched again (the version is the catalog row's ``updated_at``, plus mtime and size
  for local files, so an edited image *is* fetched again). The record index is a SQLite file.
* Every image is decoded with :func:`niteru.images.load_rgb` (EXIF orientation, any mode to RGB, pixel
  cap); anything bad becomes a per-item failure with a reason, never an exception.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import sqlite3
import ssl
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

from niteru.errors import BadImageError, ConfigError
from niteru.images import DEFAULT_MAX_PIXELS, load_rgb
from niteru.io import sha256_bytes, write_bytes_atomic

log = logging.getLogger(__name__)

T = TypeVar("T")

STATUS_OK = "ok"
STATUS_FAILED = "failed"
LOCAL_HOST = "<local>"
GCS_ENDPOINT = "https://storage.googleapis.com"
USER_AGENT = "niteru-fetch/1 (+https://github.com/niteru)"
_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class FetchOptions:
    """How to fetch. Defaults suit a production catalog over HTTP."""

    concurrency: int = 64
    per_host: int = 16
    timeout_s: float = 20.0
    retries: int = 3  # extra attempts after the first, for transient failures only
    backoff_s: float = 0.5  # first backoff; exponential with full jitter
    max_backoff_s: float = 10.0
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_workers: int = 0  # 0 = min(4, cpu count)
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("concurrency", "per_host", "max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"fetch option {name} must be >= 1 (got {getattr(self, name)})")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ConfigError(f"fetch options need timeout_s > 0, retries >= 0, backoff_s >= 0 "
                              f"(got {self.timeout_s}, {self.retries}, {self.backoff_s})")


@dataclass(frozen=True)
class FetchResult:
    """The outcome for one URI."""

    uri: str
    status: str  # ok | failed
    sha256: str | None = None
    path: str | None = None  # absolute path of the cached bytes
    width: int | None = None
    height: int | None = None
    error: str | None = None  # the reason, for a person
    error_kind: str | None = None  # not_found, http_<code>, timeout, connection, too_large, bad_image, ...
    cached: bool = False  # served from the cache without fetching
    attempts: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


class FetchError(Exception):
    """A failed attempt; ``transient`` ones are retried."""

    def __init__(self, kind: str, message: str, transient: bool = False):
        super().__init__(message)
        self.kind = kind
        self.transient = transient


# ------------------------------------------------------------------------------------------- cache
class ImageCache:
    """Content-addressed image bytes plus an index of what each (uri, version) resolved to.

    Bytes live at ``<root>/<sha[:2]>/<sha256>`` (written atomically). The URI index is a SQLite table in
    ``<root>/uris.sqlite`` (WAL mode, safe across threads and processes); records are written after their
    bytes and committed in batches, so a record never points at missing bytes.
    """

    INDEX_FILE = "uris.sqlite"
    BATCH = 256

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()  # once, so blob paths are absolute without syscalls
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, ...]] = []

    def blob_path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    @staticmethod
    def record_key(uri: str, version: str | None) -> str:
        return sha256_bytes(f"{uri}\0{version or ''}".encode())

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.root.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.root / self.INDEX_FILE, timeout=60, check_same_thread=False,
                                 isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS uris (key TEXT PRIMARY KEY, uri TEXT NOT NULL, version TEXT, "
                       "sha256 TEXT NOT NULL, width INTEGER, height INTEGER, bytes INTEGER, fetched_at REAL)")
            self._db = db
        return self._db

    def lookup(self, uri: str, version: str | None) -> dict[str, Any] | None:
        """The cached record for this URI and version, if its bytes are still in the cache."""
        with self._lock:
            row = self._conn().execute("SELECT sha256, width, height FROM uris WHERE key = ?",
                                       (self.record_key(uri, version),)).fetchone()
        if row is None or not self.blob_path(row[0]).is_file():
            return None
        return {"sha256": row[0], "width": row[1], "height": row[2]}

    def store(self, uri: str, version: str | None, data: bytes, width: int, height: int) -> tuple[str, Path]:
        """Store the bytes (atomically, once per content) and queue the URI record."""
        sha = sha256_bytes(data)
        blob = self.blob_path(sha)
        if not blob.is_file():
            write_bytes_atomic(blob, data)
        with self._lock:
            self._pending.append((self.record_key(uri, version), uri, version, sha, width, height, len(data),
                                  time.time()))
            if len(self._pending) >= self.BATCH:
                self._flush_locked()
        return sha, blob

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO uris VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self._pending)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._pending.clear()

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            if self._db is not None:
                self._db.close()
                self._db = None


# ------------------------------------------------------------------------------------------ helpers
def uri_scheme(uri: str) -> str:
    """``file`` for local paths and file:// URIs, else the lower-case URI scheme."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def local_path(uri: str) -> Path:
    if uri.lower().startswith("file://"):
        return Path(unquote(urlsplit(uri).path))
    return Path(uri).expanduser()


def host_of(uri: str) -> str:
    scheme = uri_scheme(uri)
    if scheme == "file":
        return LOCAL_HOST
    if scheme == "gs":
        return "gs"
    return urlsplit(uri).netloc.lower()


def gcs_media_url(uri: str, endpoint: str | None = None) -> str:
    """The JSON-API media URL of a ``gs://bucket/object`` URI."""
    parts = urlsplit(uri)
    bucket, obj = parts.netloc, parts.path.lstrip("/")
    if not bucket or not obj:
        raise FetchError("bad_uri", f"{uri!r} is not a gs://bucket/object URI")
    base = (endpoint or os.environ.get("STORAGE_EMULATOR_HOST") or GCS_ENDPOINT).rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    return f"{base}/download/storage/v1/b/{quote(bucket, safe='')}/o/{quote(obj, safe='')}?alt=media"


def cache_version(uri: str, version: str | None) -> str | None:
    """The version a cache record is keyed on: the row's version, plus mtime/size for local files."""
    if uri_scheme(uri) != "file":
        return version
    try:
        st = local_path(uri).stat()
    except OSError:
        return None  # missing file: never a cache hit (the record lookup fails on the blob check anyway)
    return f"{version or ''}|{st.st_mtime_ns}|{st.st_size}"


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion, also from inside a running event loop (Jupyter kernels)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="niteru-fetch") as pool:
        return pool.submit(asyncio.run, coro).result()


# ------------------------------------------------------------------------------------------ fetching
def fetch_images(uris: Sequence[str], cache: ImageCache | str | os.PathLike[str],
                 options: FetchOptions | None = None,
                 versions: Sequence[str | None] | None = None) -> list[FetchResult]:
    """Fetch, validate and cache every URI; one :class:`FetchResult` per input, in input order.

    ``versions`` (e.g. each row's ``updated_at``) decides cache validity: the same URI with the same
    version is served from the cache. Duplicate (uri, version) pairs are fetched once.
    """
    options = options or FetchOptions()
    owned = not isinstance(cache, ImageCache)
    cache = ImageCache(cache) if owned else cache
    if versions is not None and len(versions) != len(uris):
        raise ValueError(f"versions has {len(versions)} entries for {len(uris)} uris")
    keys = [(u, versions[i] if versions is not None else None) for i, u in enumerate(uris)]
    unique = list(dict.fromkeys(keys))
    if not unique:
        return []
    try:
        results = run_sync(_fetch_all(unique, cache, options))
    finally:
        if owned:
            cache.close()
    by_key = dict(zip(unique, results))
    return [by_key[k] for k in keys]


def _http_session(options: FetchOptions) -> Any:
    """One aiohttp session (fsspec's HTTP engine) with a connection pool as large as the fetch pool.

    aiohttp costs ~0.3-0.9 ms of CPU per request where httpx costs 2-5 ms (benchmarks/bench_fetch.py on the
    2-core reference machine), and at 64 concurrent requests the client CPU is the bottleneck.
    """
    import aiohttp

    connector = aiohttp.TCPConnector(limit=options.concurrency, limit_per_host=options.per_host,
                                     ssl=_ssl_context(), ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, headers={"User-Agent": USER_AGENT},
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=options.timeout_s,
                                                               sock_read=options.timeout_s))


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """One certificate-verifying TLS context with certifi's CA bundle (the same on every machine)."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


async def _fetch_all(keys: list[tuple[str, str | None]], cache: ImageCache,
                     options: FetchOptions) -> list[FetchResult]:
    from tqdm.auto import tqdm

    loop = asyncio.get_running_loop()
    workers = options.decode_workers or min(4, os.cpu_count() or 1)
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="niteru-decode")
    quiet = {} if options.progress else {"disable": True}  # leave TQDM_DISABLE in charge otherwise
    bar = tqdm(total=len(keys), desc="fetch images", unit="img", mininterval=0.5, **quiet)
    try:
        # one pass over the cache first: a fully cached catalog costs no network and no scheduling
        found = await loop.run_in_executor(pool, lambda: [_lookup(cache, u, v) for u, v in keys])
        results: list[FetchResult | None] = [None] * len(keys)
        todo = []
        for i, ((uri, _), (key_version, record)) in enumerate(zip(keys, found)):
            if record is None:
                todo.append((i, uri, key_version))
            else:
                results[i] = FetchResult(uri, STATUS_OK, record["sha256"],
                                         str(cache.blob_path(record["sha256"])), record["width"],
                                         record["height"], cached=True)
        bar.update(len(keys) - len(todo))
        if todo:
            for i, result in zip((t[0] for t in todo), await _fetch_missing(todo, cache, options, pool, bar)):
                results[i] = result
        return [r for r in results if r is not None]
    finally:
        bar.close()
        await loop.run_in_executor(pool, cache.flush)
        pool.shutdown(wait=True)


async def _fetch_missing(todo: list[tuple[int, str, str | None]], cache: ImageCache, options: FetchOptions,
                         pool: concurrent.futures.Executor, bar: Any) -> list[FetchResult]:
    gate = asyncio.Semaphore(options.concurrency)
    host_gates: dict[str, asyncio.Semaphore] = {}
    needs_gcs_auth = any(uri_scheme(u) == "gs" for _, u, _ in todo) and not os.environ.get("STORAGE_EMULATOR_HOST")
    gcs_headers = await asyncio.to_thread(_gcs_auth_headers) if needs_gcs_auth else {}
    session = _http_session(options)
    failed = 0

    async def one(uri: str, key_version: str | None) -> FetchResult:
        nonlocal failed
        host = host_of(uri)
        host_gate = host_gates.setdefault(host, asyncio.Semaphore(
            options.concurrency if host == LOCAL_HOST else options.per_host))
        async with host_gate, gate:  # host first: a busy host must not hold the global slots
            result = await _fetch_one(uri, key_version, session, cache, options, pool, gcs_headers)
        failed += not result.ok
        bar.update(1)
        if failed:
            bar.set_postfix(failed=failed, refresh=False)
        return result

    try:
        return list(await asyncio.gather(*(one(uri, kv) for _, uri, kv in todo)))
    finally:
        await session.close()


async def _fetch_one(uri: str, key_version: str | None, session: Any, cache: ImageCache, options: FetchOptions,
                     pool: concurrent.futures.Executor, gcs_headers: dict[str, str]) -> FetchResult:
    """Fetch (with retries), validate and cache one URI; failures become a failed result."""
    from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    attempts = 0
    try:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(options.retries + 1),
            wait=wait_random_exponential(multiplier=options.backoff_s, max=options.max_backoff_s),
            retry=retry_if_exception(lambda e: isinstance(e, FetchError) and e.transient),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                attempts += 1
                data = await _read_once(uri, session, options, gcs_headers)
        sha, blob, width, height = await loop.run_in_executor(pool, _validate_and_store, cache, uri, key_version,
                                                              data, options.max_pixels)
    except FetchError as exc:
        return FetchResult(uri, STATUS_FAILED, error=str(exc), error_kind=exc.kind, attempts=attempts,
                           seconds=time.perf_counter() - t0)
    except Exception as exc:  # never fatal for the batch: record it for this item
        log.debug("unexpected error fetching %s", uri, exc_info=True)
        return FetchResult(uri, STATUS_FAILED, error=f"{type(exc).__name__}: {exc}", error_kind="error",
                           attempts=attempts, seconds=time.perf_counter() - t0)
    return FetchResult(uri, STATUS_OK, sha, str(blob), width, height, attempts=attempts,
                       seconds=time.perf_counter() - t0)


def _lookup(cache: ImageCache, uri: str, version: str | None) -> tuple[str | None, dict[str, Any] | None]:
    key_version = cache_version(uri, version)
    return key_version, cache.lookup(uri, key_version)


def _validate_and_store(cache: ImageCache, uri: str, key_version: str | None, data: bytes,
                        max_pixels: int) -> tuple[str, Path, int, int]:
    """Decode fully (the cache only ever holds usable images), then store bytes and the URI record."""
    try:
        width, height = load_rgb(data, max_pixels=max_pixels).size
    except BadImageError as exc:
        raise FetchError("bad_image", str(exc).replace("<bytes>", uri)) from None
    sha, blob = cache.store(uri, key_version, data, width, height)
    return sha, blob, width, height


async def _read_once(uri: str, session: Any, options: FetchOptions, gcs_headers: dict[str, str]) -> bytes:
    """One attempt at reading the bytes of ``uri`` within ``options.timeout_s``."""
    scheme = uri_scheme(uri)
    try:
        async with asyncio.timeout(options.timeout_s):
            if scheme == "file":
                return await asyncio.to_thread(_read_local, uri, options.max_bytes)
            if scheme in ("http", "https"):
                return await _read_http(session, uri, uri, options.max_bytes, {})
            if scheme == "gs":
                return await _read_http(session, gcs_media_url(uri), uri, options.max_bytes, gcs_headers)
            return await asyncio.to_thread(_read_fsspec, uri, options.max_bytes)
    except TimeoutError:
        raise FetchError("timeout", f"{uri}: no complete response within {options.timeout_s:g} s", True) from None


def _read_local(uri: str, max_bytes: int) -> bytes:
    path = local_path(uri)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FetchError("too_large", f"{path} is {size:,} bytes, over the {max_bytes:,}-byte limit")
        return path.read_bytes()
    except FileNotFoundError:
        raise FetchError("not_found", f"{path} does not exist") from None
    except IsADirectoryError:
        raise FetchError("not_found", f"{path} is a folder, not an image file") from None
    except PermissionError:
        raise FetchError("forbidden", f"{path} is not readable (permission denied)") from None


async def _read_http(session: Any, url: str, uri: str, max_bytes: int, headers: dict[str, str]) -> bytes:
    import aiohttp

    try:
        async with session.get(url, headers=headers) as response:
            if response.status != 200:
                code = response.status
                kind = "not_found" if code in (404, 410) else f"http_{code}"
                raise FetchError(kind, f"{uri}: HTTP {code} {response.reason or ''}".rstrip(), code in _TRANSIENT_HTTP)
            declared = response.content_length
            if declared is not None and declared > max_bytes:
                raise FetchError("too_large", f"{uri}: {declared:,} bytes, over the {max_bytes:,}-byte limit")
            chunks: list[bytes] = []
            total = 0
            async for chunk in response.content.iter_chunked(1 << 16):
                total += len(chunk)
                if total > max_bytes:
                    raise FetchError("too_large", f"{uri}: more than {max_bytes:,} bytes, over the limit")
                chunks.append(chunk)
            return b"".join(chunks)
    except (aiohttp.ServerTimeoutError, aiohttp.ConnectionTimeoutError) as exc:
        raise FetchError("timeout", f"{uri}: timed out ({type(exc).__name__})", True) from None
    except (aiohttp.InvalidURL, aiohttp.TooManyRedirects) as exc:
        raise FetchError("bad_uri", f"{uri}: {type(exc).__name__}: {exc}") from None
    except aiohttp.ClientError as exc:  # connection refused/reset, payload errors, ...
        raise FetchError("connection", f"{uri}: {type(exc).__name__}: {exc}", True) from None


def _read_fsspec(uri: str, max_bytes: int) -> bytes:
    import fsspec

    try:
        with fsspec.open(uri, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except (ImportError, ValueError) as exc:
        raise FetchError("unsupported", f"{uri}: cannot open this URI scheme ({exc})") from None
    except FileNotFoundError:
        raise FetchError("not_found", f"{uri} does not exist") from None
    except OSError as exc:
        raise FetchError("connection", f"{uri}: {exc}", True) from None
    if len(data) > max_bytes:
        raise FetchError("too_large", f"{uri}: more than {max_bytes:,} bytes, over the limit")
    return data


def _gcs_auth_headers() -> dict[str, str]:
    """A bearer token from application-default credentials, or no header (public objects)."""
    try:
        import google.auth
        import google.auth.transport.requests

        creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_only"])
        creds.refresh(google.auth.transport.requests.Request())
        return {"Authorization": f"Bearer {creds.token}"}
    except Exception as exc:  # no credentials configured: anonymous access to public buckets
        log.info("gs:// fetches go without credentials (%s)", type(exc).__name__)
        return {}


# ------------------------------------------------------------------------------------------ reporting
def failure_rows(results: Sequence[FetchResult]) -> list[dict[str, Any]]:
    """The failed results as plain rows (uri, error_kind, error, attempts)."""
    return [{k: v for k, v in asdict(r).items() if k in ("uri", "error_kind", "error", "attempts")}
            for r in results if not r.ok]
