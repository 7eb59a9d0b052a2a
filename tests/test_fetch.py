"""niteru.fetch against a loopback HTTP server serving good, slow, flaky, missing, corrupt and hostile images."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from niteru.fetch import FetchOptions, ImageCache, fetch_images, gcs_media_url, uri_scheme
from niteru.io import sha256_bytes

from loopback import LoopbackServer, QuietHandler


# ------------------------------------------------------------------------------------------ fixtures
def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height pixels."""
    data = _encode(Image.new("L", (1, 1)), "PNG")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    return data[:8] + patched + data[8 + len(patched):]


def _exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (40, 20), (200, 20, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return _encode(img, "JPEG", exif=exif)


GOOD = _encode(Image.new("RGB", (32, 24), (10, 120, 200)), "JPEG", quality=90)
FILES: dict[str, tuple[bytes, str]] = {
    "/good.jpg": (GOOD, "image/jpeg"),
    "/rgba.png": (_encode(Image.new("RGBA", (16, 16), (255, 0, 0, 0)), "PNG"), "image/png"),
    "/cmyk.jpg": (_encode(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG"), "image/jpeg"),
    "/gray.png": (_encode(Image.new("L", (20, 10), 128), "PNG"), "image/png"),
    "/palette.gif": (_encode(Image.new("P", (12, 12), 3), "GIF"), "image/gif"),
    "/rotated.jpg": (_exif_rotated_jpeg(), "image/jpeg"),
    "/corrupt.jpg": (GOOD[: len(GOOD) // 2], "image/jpeg"),
    "/page.html": (b"<html><body>not an image</body></html>", "text/html"),
    "/bomb.png": (_bomb_png(), "image/png"),  # PIL's own bomb check refuses it
    "/bomb72.png": (_bomb_png(9_000, 8_000), "image/png"),  # 72 MP: under PIL's check, over our 64 MP cap
    "/huge.jpg": (GOOD + b"\0" * 300_000, "image/jpeg"),
    "/download/storage/v1/b/shop-images/o/catalog%2Fa.jpg": (GOOD, "image/jpeg"),
}


class ImageServer:
    """Loopback-only HTTP server; counts hits and the largest number of requests in flight."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay: dict[str, float] = {"/slow.jpg": 3.0}
        self.flaky_left = 2  # /flaky.jpg fails with 503 this many times, then works
        self._lock = threading.Lock()
        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.hits[path] += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._respond(path)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _respond(self, path: str) -> None:
                time.sleep(server.delay.get(path, 0.0))
                if path.startswith("/paced/"):
                    time.sleep(0.3)
                    body, ctype = GOOD, "image/jpeg"
                elif path == "/flaky.jpg":
                    with server._lock:
                        fail = server.flaky_left > 0
                        server.flaky_left -= 1
                    if fail:
                        return self.send_body(503, b"busy", "text/plain")
                    body, ctype = GOOD, "image/jpeg"
                elif path in FILES:
                    body, ctype = FILES[path]
                elif path == "/slow.jpg":
                    body, ctype = GOOD, "image/jpeg"
                else:
                    return self.send_body(404, b"not found", "text/plain")
                self.send_body(200, body, ctype)

        self.server = LoopbackServer(Handler)
        self.url = self.server.url

    def __enter__(self) -> "ImageServer":
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


@pytest.fixture()
def server() -> Iterator[ImageServer]:
    with ImageServer() as srv:
        yield srv


FAST = FetchOptions(concurrency=8, per_host=8, timeout_s=0.6, retries=2, backoff_s=0.01, max_backoff_s=0.05,
                    max_bytes=200_000, progress=False)


def _by_path(server: ImageServer, results: list) -> dict[str, object]:
    return {r.uri.removeprefix(server.url): r for r in results}


# ------------------------------------------------------------------------------------------ tests
def test_http_mixed_batch_records_each_failure_and_normalises_images(server: ImageServer, tmp_path: Path) -> None:
    paths = ["/good.jpg", "/rgba.png", "/cmyk.jpg", "/gray.png", "/palette.gif", "/rotated.jpg", "/flaky.jpg",
             "/missing.jpg", "/slow.jpg", "/corrupt.jpg", "/page.html", "/bomb.png", "/bomb72.png", "/huge.jpg"]
    t0 = time.perf_counter()
    results = fetch_images([server.url + p for p in paths], tmp_path / "images", FAST)
    elapsed = time.perf_counter() - t0
    got = _by_path(server, results)

    ok = {p: (r.width, r.height) for p, r in got.items() if r.ok}
    assert ok == {"/good.jpg": (32, 24), "/rgba.png": (16, 16), "/cmyk.jpg": (16, 12), "/gray.png": (20, 10),
                  "/palette.gif": (12, 12), "/rotated.jpg": (20, 40), "/flaky.jpg": (32, 24)}
    kinds = {p: r.error_kind for p, r in got.items() if not r.ok}
    assert kinds == {"/missing.jpg": "not_found", "/slow.jpg": "timeout", "/corrupt.jpg": "bad_image",
                     "/page.html": "bad_image", "/bomb.png": "bad_image", "/bomb72.png": "bad_image",
                     "/huge.jpg": "too_large"}
    assert "decompression bomb" in got["/bomb.png"].error
    assert "72,000,000 pixels, over the limit of 64,000,000" in got["/bomb72.png"].error
    assert "not a recognised image format" in got["/page.html"].error
    assert "HTTP 404" in got["/missing.jpg"].error
    # transient failures are retried (flaky recovers on its 3rd attempt, slow uses every attempt);
    # permanent ones are tried once
    assert got["/flaky.jpg"].attempts == 3 and server.hits["/flaky.jpg"] == 3
    assert got["/slow.jpg"].attempts == 3
    assert server.hits["/missing.jpg"] == 1 and server.hits["/corrupt.jpg"] == 1 and server.hits["/bomb.png"] == 1
    assert elapsed < 2 * 3 * 0.6 + 1.5  # the slow item's attempts are bounded by timeout_s
    # content-addressed cache: path is <root>/<sha[:2]>/<sha> and holds exactly the served bytes
    good = got["/good.jpg"]
    assert good.sha256 == sha256_bytes(GOOD)
    assert Path(good.path) == (tmp_path / "images" / good.sha256[:2] / good.sha256).resolve()
    assert Path(good.path).read_bytes() == GOOD
    assert got["/flaky.jpg"].sha256 == good.sha256  # same bytes, same blob


def test_cache_means_no_refetch_and_versions_invalidate(server: ImageServer, tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "images")
    uris = [server.url + p for p in ("/good.jpg", "/gray.png", "/missing.jpg")]
    first = fetch_images(uris, cache, FAST, versions=["v1", "v1", "v1"])
    assert [r.ok for r in first] == [True, True, False] and not any(r.cached for r in first)
    hits = sum(server.hits.values())

    second = fetch_images(uris, cache, FAST, versions=["v1", "v1", "v1"])
    assert [r.cached for r in second] == [True, True, False]  # failures are never cached: retried next run
    assert [r.sha256 for r in second] == [r.sha256 for r in first]
    assert sum(server.hits.values()) == hits + 1  # only /missing.jpg was requested again

    third = fetch_images(uris[:1], cache, FAST, versions=["v2"])  # the catalog says the row changed
    assert third[0].ok and not third[0].cached and server.hits["/good.jpg"] == 2


def test_duplicate_uris_are_fetched_once(server: ImageServer, tmp_path: Path) -> None:
    uri = server.url + "/good.jpg"
    results = fetch_images([uri] * 5, tmp_path / "images", FAST)
    assert len(results) == 5 and all(r.ok for r in results)
    assert server.hits["/good.jpg"] == 1


def test_pool_is_bounded_per_host_and_really_concurrent(server: ImageServer, tmp_path: Path) -> None:
    uris = [f"{server.url}/paced/{i}.jpg" for i in range(9)]
    opts = FetchOptions(concurrency=16, per_host=3, timeout_s=5, retries=0, progress=False)
    t0 = time.perf_counter()
    results = fetch_images(uris, tmp_path / "images", opts)
    elapsed = time.perf_counter() - t0
    assert all(r.ok for r in results)
    assert server.max_in_flight == 3  # never more than per_host, and it did reach it
    assert 0.85 < elapsed < 2.5  # 9 requests x 0.3 s in waves of 3 ~ 0.9 s (sequential would be 2.7 s)


def test_local_paths_and_file_uris_with_edit_detection(tmp_path: Path) -> None:
    img_dir = tmp_path / "photos"
    img_dir.mkdir()
    a, b = img_dir / "a.jpg", img_dir / "b c.png"
    a.write_bytes(GOOD)
    b.write_bytes(FILES["/gray.png"][0])
    uris = [str(a), b.as_uri(), str(img_dir / "absent.jpg"), str(img_dir)]
    cache = tmp_path / "cache"
    results = fetch_images(uris, cache, FAST)
    assert [r.status for r in results] == ["ok", "ok", "failed", "failed"]
    assert [r.error_kind for r in results[2:]] == ["not_found", "not_found"]
    assert (results[1].width, results[1].height) == (20, 10)
    assert uri_scheme(b.as_uri()) == "file" and uri_scheme(str(a)) == "file"

    again = fetch_images(uris[:2], cache, FAST)
    assert [r.cached for r in again] == [True, True]
    # an edited local file is read again even though its catalog row did not change
    time.sleep(0.01)
    a.write_bytes(FILES["/rotated.jpg"][0])
    edited = fetch_images(uris[:1], cache, FAST)
    assert not edited[0].cached and edited[0].sha256 == sha256_bytes(FILES["/rotated.jpg"][0])


def test_gs_uris_go_to_the_storage_endpoint(server: ImageServer, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    assert gcs_media_url("gs://shop-images/catalog/a.jpg") == (
        f"{server.url}/download/storage/v1/b/shop-images/o/catalog%2Fa.jpg?alt=media")
    results = fetch_images(["gs://shop-images/catalog/a.jpg", "gs://shop-images/catalog/nope.jpg"],
                           tmp_path / "images", FAST)
    assert results[0].ok and results[0].sha256 == sha256_bytes(GOOD)
    assert results[1].error_kind == "not_found"


def test_runs_inside_a_running_event_loop(server: ImageServer, tmp_path: Path) -> None:
    """Notebook kernels run an asyncio loop; fetch_images must still work synchronously there."""
    import asyncio

    async def inside() -> list:
        return fetch_images([server.url + "/good.jpg"], tmp_path / "images", FAST)

    results = asyncio.run(inside())
    assert results[0].ok


@pytest.mark.parametrize("bad", [dict(concurrency=0), dict(per_host=0), dict(timeout_s=0), dict(retries=-1)])
def test_bad_options_are_rejected(bad: dict[str, object]) -> None:
    from niteru.errors import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        FetchOptions(**bad)  # type: ignore[arg-type]

