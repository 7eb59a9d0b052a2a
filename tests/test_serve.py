"""Integration: build the bento offline, `bentoml serve` it on a loopback port, query it, load it, stop it."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from niteru import package
from test_service import BENTO_DIR, packaged_run  # tests/ is on sys.path (pytest rootdir import)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return packaged_run(tmp_path_factory)


def serve(target: str, tmp_path: Path, cwd: Path | None = None, **env: str):
    port = package.free_port()
    env = {"BENTOML_HOME": os.environ["BENTOML_HOME"], "NITERU_TORCH_THREADS": "2", **env}
    proc = package.start_server(target, port, env=env, cwd=cwd, log_path=tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        package.wait_ready(url, proc, timeout_s=240)
    except Exception:
        package.stop_server(proc)
        raise AssertionError((tmp_path / "serve.log").read_text()[-3000:]) from None
    return proc, url


def test_build_serve_query_and_load(packaged: dict[str, Any], tmp_path: Path) -> None:
    bento_tag = package.build_bento(BENTO_DIR, packaged["model_tag"])
    assert bento_tag.startswith("niteru_search:")
    catalog = pd.read_parquet(Path(packaged["model_path"]) / "index" / "idmap.parquet")
    proc, url = serve(bento_tag, tmp_path)  # from the built bento: the model tag is pinned inside it
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            info = client.post("/info", json={}).json()
            assert info["model_tag"] == packaged["model_tag"] and info["n_items"] == len(catalog)
            pid = catalog["product_id"].iat[0]
            hits = client.post("/search_by_product", json={"product_id": pid, "k": 5, "in_stock_only": False}).json()["results"]
            assert len(hits) == 5 and pid not in {h["product_id"] for h in hits}
            jpeg = Path(catalog["image_path"].iat[3]).read_bytes()
            body = client.post("/search_by_image", files={"image": ("q.jpg", jpeg, "image/jpeg")},
                               data={"k": "3", "in_stock_only": "false"}).json()
            assert body["items"][0]["results"][0]["product_id"] == catalog["product_id"].iat[3]
            assert client.post("/search_by_product", json={"product_id": "missing"}).status_code == 404
            assert client.post("/search_by_image", files={"image": ("q.jpg", b"nope", "image/jpeg")}).status_code == 415

            # bounded concurrent load, loopback only: 96 mixed requests, 12 in flight, zero errors allowed
            def one(i: int) -> int:
                if i % 4 == 0:
                    path = catalog["image_path"].iat[i % len(catalog)]
                    resp = client.post("/search_by_image", files={"image": ("q.jpg", Path(path).read_bytes(), "image/jpeg")},
                                       data={"k": "5"})
                else:
                    resp = client.post("/search_by_product", json={"product_id": catalog["product_id"].iat[i % len(catalog)],
                                                         "k": 10, "in_stock_only": bool(i % 2)})
                return resp.status_code

            with concurrent.futures.ThreadPoolExecutor(12) as pool:
                codes = list(pool.map(one, range(96)))
            assert codes.count(200) == 96, sorted(set(codes))

            metrics = client.get("/metrics").text
            assert "bentoml_service_request_total" in metrics and 'endpoint="/search_by_product"' in metrics
    finally:
        assert package.stop_server(proc) is not None
    assert proc.poll() is not None


def test_serve_from_source_folder(packaged: dict[str, Any], tmp_path: Path) -> None:
    proc, url = serve(".", tmp_path, cwd=BENTO_DIR, NITERU_MODEL_TAG=packaged["model_tag"], NITERU_BATCHING="0")
    try:
        info = httpx.post(f"{url}/info", json={}, timeout=30).json()
        assert info["model_tag"] == packaged["model_tag"] and info["batching"] is False
    finally:
        package.stop_server(proc)


def test_rolling_swap_loses_no_requests(packaged: dict[str, Any], tmp_path: Path) -> None:
    """docs/serving.md's swap: start the new server, wait ready, switch traffic, SIGTERM the old one while
    requests are still in flight on it. Every request must succeed (loopback only, bounded)."""
    import threading
    import time

    catalog = pd.read_parquet(Path(packaged["model_path"]) / "index" / "idmap.parquet")
    jpeg = Path(catalog["image_path"].iat[1]).read_bytes()
    for name in ("old", "new"):
        (tmp_path / name).mkdir()
    old_proc, old_url = serve(".", tmp_path / "old", cwd=BENTO_DIR, NITERU_MODEL_TAG=packaged["model_tag"])
    target = {"url": old_url}
    codes: list[tuple[str, int]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        with httpx.Client(timeout=60) as client:
            deadline = time.monotonic() + 180
            for n in range(5000):  # bounded in count and time; runs until the swap is done
                if stop.is_set() or time.monotonic() > deadline:
                    return
                url = target["url"]
                try:
                    if (i + n) % 2:
                        resp = client.post(f"{url}/search_by_image", files={"image": ("q.jpg", jpeg, "image/jpeg")},
                                           data={"k": "5"})
                    else:
                        resp = client.post(f"{url}/search_by_product", json={"product_id": catalog["product_id"].iat[n % len(catalog)], "k": 5})
                    code = resp.status_code
                except httpx.HTTPError as exc:
                    code = -1
                    print("request error", type(exc).__name__, exc)
                with lock:
                    codes.append((url, code))

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    new_proc = None
    try:
        time.sleep(2.0)
        new_proc, new_url = serve(".", tmp_path / "new", cwd=BENTO_DIR, NITERU_MODEL_TAG=packaged["model_tag"])
        target["url"] = new_url  # the load balancer switches; requests already sent to the old server are in flight
        assert package.stop_server(old_proc) is not None  # SIGTERM: finish in-flight requests, then exit
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        if new_proc is not None:
            package.stop_server(new_proc)
        package.stop_server(old_proc)
    on_old = [c for u, c in codes if u == old_url]
    on_new = [c for u, c in codes if u != old_url]
    assert on_old and on_new, (len(on_old), len(on_new))
    assert all(c == 200 for _, c in codes), sorted({c for _, c in codes})
