"""Image fetch throughput: sequential baseline vs the concurrent pool, against a loopback HTTP server.

The server adds a fixed latency to every response (a stand-in for a CDN round trip). Both paths run the
full niteru.fetch pipeline (HTTP GET, sha256, decode/validate with load_rgb, write to a fresh
content-addressed cache), so the ratio measures the concurrency alone. Target: >= 20x at 64 concurrent.

    .venv/bin/python benchmarks/bench_fetch.py [--latency-ms 50] [--n 1024] [--n-seq 96] [--concurrency 64]

Prints a table and writes benchmarks/results/bench_fetch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image

from niteru.fetch import FetchOptions, fetch_images
from niteru.io import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def make_images(n: int, size: int = 64) -> list[bytes]:
    """n distinct small JPEGs (distinct bytes, so every one is a cache miss)."""
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (size, size), (i % 256, (i // 256) % 256, 128)).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def _serve_forever(images: list[bytes], latency_s: float, port_queue: "multiprocessing.Queue[int]") -> None:
    """A minimal asyncio HTTP/1.1 keep-alive server: GET /img/<i>.jpg answers images[i] after latency_s."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                await asyncio.sleep(latency_s)
                body = images[int(path.rsplit("/", 1)[-1].split(".")[0])]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                             % len(body) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        port_queue.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def serve(images: list[bytes], latency_s: float) -> tuple["multiprocessing.Process", str]:
    """The server runs in its own process, so it does not compete with the client for the GIL."""
    ctx = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue[int] = ctx.Queue()
    proc = ctx.Process(target=_serve_forever, args=(images, latency_s, ports), daemon=True)
    proc.start()
    return proc, f"http://127.0.0.1:{ports.get(timeout=60)}"


def measure(url: str, n: int, offset: int, concurrency: int) -> dict[str, float]:
    uris = [f"{url}/img/{offset + i}.jpg" for i in range(n)]
    opts = FetchOptions(concurrency=concurrency, per_host=concurrency, timeout_s=30, retries=0, progress=False)
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as cache:
        t0, c0 = time.perf_counter(), time.process_time()
        results = fetch_images(uris, Path(cache) / "images", opts)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    failed = sum(not r.ok for r in results)
    if failed:
        raise RuntimeError(f"{failed} of {n} fetches failed: {next(r.error for r in results if not r.ok)}")
    return {"images": n, "concurrency": concurrency, "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 1), "client_cpu_ms_per_image": round(cpu / n * 1000, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-ms", type=float, default=50.0, help="server latency per request")
    ap.add_argument("--n", type=int, default=1024, help="images fetched by the concurrent path")
    ap.add_argument("--n-seq", type=int, default=96, help="images fetched by the sequential baseline")
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    images = make_images(args.n + args.n_seq)
    server, url = serve(images, args.latency_ms / 1000)
    try:
        measure(url, 8, 0, 8)  # warm up imports, the thread pools and the server
        sequential = measure(url, args.n_seq, 0, 1)
        concurrent = measure(url, args.n, args.n_seq, args.concurrency)
    finally:
        server.terminate()
        server.join(10)
    speedup = concurrent["images_per_s"] / sequential["images_per_s"]
    ideal = args.concurrency * sequential["images_per_s"]
    report = {
        "benchmark": "fetch", "latency_ms": args.latency_ms, "sequential": sequential, "concurrent": concurrent,
        "speedup": round(speedup, 1), "target_speedup": 20, "meets_target": speedup >= 20,
        "efficiency_vs_ideal": round(concurrent["images_per_s"] / ideal, 3),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_1m": os.getloadavg()[0]},
    }
    print(f"{'path':<12} {'images':>7} {'conc':>5} {'seconds':>8} {'img/s':>8} {'cpu ms/img':>11}")
    for name, r in (("sequential", sequential), ("concurrent", concurrent)):
        print(f"{name:<12} {r['images']:>7} {r['concurrency']:>5} {r['seconds']:>8.2f} {r['images_per_s']:>8.1f} "
              f"{r['client_cpu_ms_per_image']:>11.2f}")
    print(f"speedup {speedup:.1f}x (target >= 20x) at {args.latency_ms:g} ms latency; "
          f"{report['efficiency_vs_ideal']:.0%} of the ideal {ideal:.0f} img/s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "bench_fetch.json", report)


if __name__ == "__main__":
    main()
