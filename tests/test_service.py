"""HTTP tests of the BentoML service through its ASGI app, on a model packaged from a real tiny run.

The run is the real chain on the demo catalog (16 products x 2 photos): extract -> detect (saliency) ->
embed (EfficientNet-Lite0, shipped ImageNet weights) -> index -> evaluate -> package (no bento build here;
tests/test_serve.py builds and serves the bento).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
BENTO_DIR = REPO / "bentos" / "niteru_search"


def packaged_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the chain once per test session (shared by test_service and test_serve through a marker file)."""
    base = tmp_path_factory.getbasetemp()
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    root = base / "niteru-packaged"
    marker = root / "packaged.json"
    if marker.exists():
        return json.loads(marker.read_text())
    from niteru import detect, embed, evaluate, extract, index, package

    run = root / "runs" / "r1"
    common = {"run_dir": str(run), "cache_dir": str(root / "runs" / "_cache")}
    extract.run(extract.ExtractConfig(**common, source="demo:16x2"))
    detect.run(detect.DetectConfig(**common, num_workers=0))
    embed.run(embed.EmbedConfig(**common, num_workers=0, batch_size=32), progress=False)
    index.run(index.IndexConfig(**common, n_trees=10, in_stock_only=False))
    evaluate.run(evaluate.EvaluateConfig(**common, compare_run="none", n_queries=32, sweep_n_trees=[10],
                                         sweep_search_k=[-1]))
    result = package.run(package.PackageConfig(**common, build_bento=False))
    info = {"run_dir": str(run), "model_tag": result.model_tag,
            "model_path": package._model_path(result.model_tag)}
    marker.write_text(json.dumps(info))
    return info


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return packaged_run(tmp_path_factory)


@pytest.fixture(scope="module")
def availability_file(packaged: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("avail") / "availability.parquet"
    table = pd.read_parquet(Path(packaged["model_path"]) / "availability.parquet")
    table["in_stock"] = True
    table.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def client(packaged: dict[str, Any], availability_file: Path):
    import bentoml
    from starlette.testclient import TestClient

    os.environ.update(NITERU_MODEL_TAG=packaged["model_tag"], NITERU_AVAILABILITY=str(availability_file),
                      NITERU_MAX_UPLOAD_MB="1", NITERU_BATCHING="1")
    try:
        svc = bentoml.load(str(BENTO_DIR))
        with TestClient(svc.to_asgi()) as test_client:
            yield test_client
    finally:
        for key in ("NITERU_MODEL_TAG", "NITERU_AVAILABILITY", "NITERU_MAX_UPLOAD_MB", "NITERU_BATCHING"):
            os.environ.pop(key, None)


@pytest.fixture(scope="module")
def catalog(packaged: dict[str, Any]) -> pd.DataFrame:
    return pd.read_parquet(Path(packaged["model_path"]) / "index" / "idmap.parquet")


def upload(client, data: bytes, content_type: str = "image/jpeg", **params: Any):
    form = {key: str(value) for key, value in params.items()}
    return client.post("/search_by_image", files={"image": ("query.jpg", data, content_type)}, data=form)


def write_availability(path: Path, table: pd.DataFrame, bump_s: float) -> None:
    table.to_parquet(path)
    stamp = time.time() + bump_s
    os.utime(path, (stamp, stamp))


# ----------------------------------------------------------------------------------------- health
def test_health_and_info(client, packaged: dict[str, Any], catalog: pd.DataFrame) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    info = client.post("/info", json={}).json()
    assert info["model_tag"] == packaged["model_tag"]
    assert info["n_items"] == len(catalog) == 32
    assert info["categories"] == sorted(catalog["category"].unique())
    assert info["run_id"] == "r1" and info["batching"] is True


# ----------------------------------------------------------------------------------------- search
def test_search_by_image_finds_the_product(client, catalog: pd.DataFrame) -> None:
    for row in catalog.head(6).itertuples():
        data = Path(row.image_path).read_bytes()
        body = upload(client, data, k=5, in_stock_only="false").json()
        assert len(body["items"]) == 1  # crop policy "largest": one item per photo
        item = body["items"][0]
        assert item["box"]["method"] in ("saliency", "whole")
        results = item["results"]
        assert len(results) == 5 and len({r["product_id"] for r in results}) == 5
        # the query photo is in the catalog: same crop, same preprocessing -> cosine 1
        assert results[0]["product_id"] == row.product_id
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-3)
        assert results[0]["metadata"]["category"] == row.category
        assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    again = upload(client, Path(catalog["image_path"].iat[0]).read_bytes(), k=5, in_stock_only="false").json()
    assert again["cached"] is True and again["items"][0]["results"][0]["product_id"] == catalog["product_id"].iat[0]


def test_similar_by_product_id(client, catalog: pd.DataFrame) -> None:
    siblings_first = 0
    for row in catalog.itertuples():
        body = client.post("/search_by_product", json={"product_id": row.product_id, "k": 5, "in_stock_only": False}).json()
        ids = [r["product_id"] for r in body["results"]]
        assert row.product_id not in ids and len(ids) == 5
        siblings_first += catalog.set_index("product_id").loc[ids[0], "group_id"] == row.group_id
    # the other photo of the same garment is the nearest neighbour for most products
    assert siblings_first / len(catalog) >= 0.6


def test_filters(client, catalog: pd.DataFrame) -> None:
    pid = catalog["product_id"].iat[0]
    category = catalog["category"].value_counts().index[-1]  # the rarest category: a selective filter
    n_in_category = int((catalog["category"] == category).sum())
    body = client.post("/search_by_product", json={"product_id": pid, "k": 10, "category": category,
                                         "in_stock_only": False}).json()
    expected = n_in_category - int(catalog.loc[catalog["product_id"] == pid, "category"].iat[0] == category)
    assert len(body["results"]) == min(10, expected)
    assert {r["metadata"]["category"] for r in body["results"]} <= {category}
    lo, hi = np.percentile(catalog["price"], [25, 75])
    body = client.post("/search_by_product", json={"product_id": pid, "k": 20, "min_price": lo, "max_price": hi,
                                         "in_stock_only": False}).json()
    assert body["results"] and all(lo <= r["metadata"]["price"] <= hi for r in body["results"])
    n_window = int(((catalog["price"] >= lo) & (catalog["price"] <= hi) & (catalog["product_id"] != pid)).sum())
    assert len(body["results"]) == min(20, n_window)


def test_availability_refresh_without_restart(client, catalog: pd.DataFrame, availability_file: Path) -> None:
    table = pd.read_parquet(availability_file)
    target = catalog["product_id"].iat[1]
    query = {"product_id": catalog["product_id"].iat[0], "k": 31}
    assert target in {r["product_id"] for r in client.post("/search_by_product", json=query).json()["results"]}

    # out of stock -> hidden by default (file change picked up by mtime, no API call)
    table.loc[table["product_id"] == target, "in_stock"] = False
    write_availability(availability_file, table, bump_s=10)
    time.sleep(1.1)  # the service checks the file's mtime at most once a second
    ids = {r["product_id"] for r in client.post("/search_by_product", json=query).json()["results"]}
    assert target not in ids and len(ids) == 30
    assert target in {r["product_id"] for r in
                      client.post("/search_by_product", json={**query, "in_stock_only": False}).json()["results"]}

    # removed from the snapshot -> never returned, unknown as a query; reloaded through the API
    write_availability(availability_file, table[table["product_id"] != target], bump_s=20)
    status = client.post("/refresh_availability", json={}).json()
    assert status["n_products"] == len(table) - 1
    for filters in ({}, {"in_stock_only": False}):
        ids = {r["product_id"] for r in client.post("/search_by_product", json={**query, **filters}).json()["results"]}
        assert target not in ids
    resp = client.post("/search_by_product", json={"product_id": target})
    assert resp.status_code == 404 and "removed" in resp.json()["error"]

    # in-memory upsert through the API brings it back
    status = client.post("/refresh_availability",
                         json={"updates": [{"product_id": target, "in_stock": True, "removed": False}]}).json()
    assert status["updated"] == 1
    assert target in {r["product_id"] for r in client.post("/search_by_product", json=query).json()["results"]}
    write_availability(availability_file, table, bump_s=30)  # restore for other tests
    client.post("/refresh_availability", json={})


def test_concurrent_image_queries_batched(client, catalog: pd.DataFrame) -> None:
    paths = catalog["image_path"].tolist()[:12]
    # distinct query bytes (re-encoded) so the response cache cannot answer them
    from PIL import Image

    payloads = []
    for i, path in enumerate(paths):
        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, format="PNG")
        payloads.append((catalog["product_id"].iat[i], buf.getvalue()))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: upload(client, p[1], "image/png", k=3, in_stock_only="false"), payloads))
    assert [r.status_code for r in responses] == [200] * len(payloads)
    for (pid, _), resp in zip(payloads, responses):
        body = resp.json()
        assert body["cached"] is False
        assert body["items"][0]["results"][0]["product_id"] == pid


# ----------------------------------------------------------------------------------------- bad input
def _huge_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")  # 81 MP, a few KB
    return buf.getvalue()


BAD_UPLOADS = {
    "not_an_image": (lambda jpeg: b"this is not an image at all", "image/jpeg", 415, "not_an_image"),
    "empty": (lambda jpeg: b"", "image/jpeg", 415, "not_an_image"),
    "truncated": (lambda jpeg: jpeg[: len(jpeg) // 2], "image/jpeg", 400, "corrupt_image"),
    "huge_image": (lambda jpeg: _huge_png(), "image/png", 413, "image_too_large"),
    "huge_upload": (lambda jpeg: os.urandom(1_200_000), "image/jpeg", 413, "upload_too_large"),
    "wrong_content_type": (lambda jpeg: jpeg, "text/plain", 400, None),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_clear_4xx(client, catalog: pd.DataFrame, case: str) -> None:
    make, content_type, status, code = BAD_UPLOADS[case]
    jpeg = Path(catalog["image_path"].iat[0]).read_bytes()
    resp = upload(client, make(jpeg), content_type)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body, dict) and body["error"]
    if code:
        assert body["code"] == code
    if case == "wrong_content_type":
        assert "content type text/plain" in json.dumps(body)


@pytest.mark.parametrize("payload, status, needle", [
    ({"k": 0}, 400, "greater than or equal to 1"),
    ({"k": 101}, 400, "less than or equal to 100"),
    ({"k": "ten"}, 400, "valid integer"),
    ({"product_id": "no-such-product"}, 404, "unknown product id 'no-such-product'"),
    ({"category": "spacesuits"}, 400, "unknown category 'spacesuits'"),
    ({"min_price": 50, "max_price": 10}, 400, "greater than max_price"),
    ({"min_price": -5}, 400, "greater than or equal to 0"),
    ({"product_id": ""}, 400, "at least 1 character"),
])
def test_bad_parameters_are_clear_4xx(client, catalog: pd.DataFrame, payload: dict, status: int, needle: str) -> None:
    body = {"product_id": catalog["product_id"].iat[0], **payload}
    resp = client.post("/search_by_product", json=body)
    assert resp.status_code == status, resp.text
    assert needle in json.dumps(resp.json())


def test_malformed_requests_are_4xx(client, catalog: pd.DataFrame) -> None:
    jpeg = Path(catalog["image_path"].iat[0]).read_bytes()
    assert client.post("/search_by_image", json={"image": "not a file"}).status_code == 400
    assert client.post("/search_by_image", content=b"{broken", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/search_by_product", content=b"{broken", headers={"content-type": "application/json"}).status_code == 400
    resp = upload(client, jpeg, k=500)
    assert resp.status_code == 400 and "less than or equal to 100" in resp.text
    resp = upload(client, jpeg, category="spacesuits")
    assert resp.status_code == 400 and resp.json()["code"] == "unknown_category"
