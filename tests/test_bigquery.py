"""The BigQuery catalog source against a loopback server speaking the BigQuery v2 REST shape.

The real google-cloud-bigquery client is pointed at the server with ``client_options.api_endpoint`` and
anonymous credentials (via NITERU_BQ_API_ENDPOINT). The server implements jobs.insert, jobs.query,
jobs.get and jobs.getQueryResults with page tokens, and applies the query *parameters* it receives, so
the test proves filters travel as parameters and that the client pages through the result.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from niteru.errors import ConfigError, SchemaError
from niteru.sources import BigQuerySettings, CatalogQuery, read_catalog

from loopback import LoopbackServer, QuietHandler

BASE = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
SCHEMA = [
    {"name": "product_id", "type": "STRING", "mode": "NULLABLE"},
    {"name": "image_uri", "type": "STRING", "mode": "NULLABLE"},
    {"name": "category", "type": "STRING", "mode": "NULLABLE"},
    {"name": "brand", "type": "STRING", "mode": "NULLABLE"},
    {"name": "price", "type": "FLOAT", "mode": "NULLABLE"},
    {"name": "in_stock", "type": "BOOLEAN", "mode": "NULLABLE"},
    {"name": "updated_at", "type": "TIMESTAMP", "mode": "NULLABLE"},
    {"name": "group_id", "type": "STRING", "mode": "NULLABLE"},
]


def make_rows(n: int) -> list[dict[str, Any]]:
    cats = ("dress", "shoes", "hat")
    return [{
        "product_id": f"SKU{i:04d}", "image_uri": f"gs://shop/img/{i}.jpg", "category": cats[i % 3],
        "brand": "Kumo" if i % 2 else "Mori", "price": 10.5 + i, "in_stock": i % 4 != 0,
        "updated_at": BASE + dt.timedelta(hours=i), "group_id": f"G{i // 2}",
    } for i in range(n)]


class FakeBigQuery:
    """Just enough of https://bigquery.googleapis.com/bigquery/v2 for the python client's query path."""

    def __init__(self, rows: list[dict[str, Any]], schema: list[dict[str, str]] = SCHEMA) -> None:
        self.rows = rows
        self.schema = schema
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        self.queries: list[dict[str, Any]] = []
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                self._dispatch("POST", body)

            def do_GET(self) -> None:  # noqa: N802
                self._dispatch("GET", {})

            def _dispatch(self, method: str, body: dict[str, Any]) -> None:
                url = urlsplit(self.path)
                qs = parse_qs(url.query)
                fake.requests.append((method, url.path, qs))
                parts = url.path.strip("/").split("/")  # bigquery v2 projects <p> jobs|queries [id]
                try:
                    assert parts[:3] == ["bigquery", "v2", "projects"], url.path
                    project, kind, rest = parts[3], parts[4], parts[5:]
                    if method == "POST" and kind == "jobs" and not rest:
                        payload = fake.insert_job(project, body)
                    elif method == "POST" and kind == "queries" and not rest:
                        payload = fake.query(project, body, qs)
                    elif method == "GET" and kind == "jobs" and rest:
                        payload = fake.jobs[rest[0]]
                    elif method == "GET" and kind == "queries" and rest:
                        payload = fake.results(project, rest[0], qs)
                    else:
                        return self._send(404, {"error": {"code": 404, "message": f"no route {method} {url.path}"}})
                except KeyError as exc:
                    return self._send(404, {"error": {"code": 404, "message": f"not found: {exc}"}})
                self._send(200, payload)

            def _send(self, code: int, payload: dict[str, Any]) -> None:
                self.send_body(code, json.dumps(payload).encode(), "application/json")

        self.server = LoopbackServer(Handler)
        self.url = self.server.url

    # -------------------------------------------------------------- the API
    def insert_job(self, project: str, body: dict[str, Any]) -> dict[str, Any]:
        ref = {"projectId": project, "jobId": body.get("jobReference", {}).get("jobId") or f"job{len(self.jobs)}",
               "location": body.get("jobReference", {}).get("location") or "US"}
        self._run(ref["jobId"], body["configuration"]["query"])
        job = {"kind": "bigquery#job", "id": f"{project}:{ref['location']}.{ref['jobId']}", "jobReference": ref,
               "configuration": body["configuration"], "status": {"state": "DONE"},
               "statistics": {"creationTime": "1700000000000", "startTime": "1700000000001",
                              "endTime": "1700000000002", "query": {"totalBytesProcessed": "0"}}}
        self.jobs[ref["jobId"]] = job
        return job

    def query(self, project: str, body: dict[str, Any], qs: dict[str, list[str]]) -> dict[str, Any]:
        job_id = f"q{len(self.jobs)}"
        self._run(job_id, body)
        self.jobs[job_id] = {"kind": "bigquery#job", "jobReference": {"projectId": project, "jobId": job_id,
                             "location": "US"}, "status": {"state": "DONE"}, "configuration": {"query": body}}
        return self.results(project, job_id, {"maxResults": [str(body.get("maxResults", 10_000))],
                                              **({"formatOptions.useInt64Timestamp": ["true"]}
                                                 if body.get("formatOptions", {}).get("useInt64Timestamp") else {})})

    def _run(self, job_id: str, query_cfg: dict[str, Any]) -> None:
        params = {p["name"]: p for p in query_cfg.get("queryParameters", [])}
        self.queries.append({"sql": query_cfg["query"], "params": params})
        rows = self.rows
        if "categories" in params:
            allowed = {v["value"] for v in params["categories"]["parameterValue"]["arrayValues"]}
            rows = [r for r in rows if r["category"] in allowed]
        rows = sorted(rows, key=lambda r: r["product_id"])
        if "limit" in params:
            rows = rows[: int(params["limit"]["parameterValue"]["value"])]
        self.jobs.setdefault("_results", {})[job_id] = rows

    def results(self, project: str, job_id: str, qs: dict[str, list[str]]) -> dict[str, Any]:
        rows = self.jobs["_results"][job_id]
        start = int(qs.get("pageToken", ["0"])[0])
        size = int(qs.get("maxResults", ["10000"])[0])
        page = rows[start:start + size]
        int64_ts = qs.get("formatOptions.useInt64Timestamp", ["false"])[0].lower() == "true"
        out: dict[str, Any] = {
            "kind": "bigquery#getQueryResultsResponse", "jobComplete": True,
            "jobReference": {"projectId": project, "jobId": job_id, "location": "US"},
            "schema": {"fields": self.schema}, "totalRows": str(len(rows)),
            "rows": [{"f": [{"v": self._cell(r[f["name"]], f["type"], int64_ts)} for f in self.schema]}
                     for r in page],
        }
        if start + size < len(rows):
            out["pageToken"] = str(start + size)
        return out

    @staticmethod
    def _cell(value: Any, typ: str, int64_ts: bool) -> str | None:
        if value is None:
            return None
        if typ == "TIMESTAMP":
            micros = int(value.timestamp() * 1_000_000)
            return str(micros) if int64_ts else f"{micros / 1e6:.6f}"
        if typ == "BOOLEAN":
            return "true" if value else "false"
        return str(value)

    def __enter__(self) -> "FakeBigQuery":
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


@pytest.fixture()
def bq_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("NITERU_BQ_PROJECT", "retail-prod")
    monkeypatch.setenv("NITERU_BQ_DATASET", "catalog")
    monkeypatch.setenv("NITERU_BQ_TABLE", "products")
    monkeypatch.setenv("NITERU_BQ_PAGE_SIZE", "4")
    yield monkeypatch


def test_bigquery_source_pages_through_results_with_typed_columns(bq_env: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    rows = make_rows(10)
    with FakeBigQuery(rows) as fake:
        bq_env.setenv("NITERU_BQ_API_ENDPOINT", fake.url)
        table = read_catalog("bigquery", tmp_path)
    assert table.num_rows == 10
    frame = table.to_pandas()
    assert list(frame["product_id"]) == [r["product_id"] for r in rows]
    assert frame["price"].tolist() == [r["price"] for r in rows]
    assert frame["in_stock"].tolist() == [r["in_stock"] for r in rows]
    assert [t.to_pydatetime() for t in frame["updated_at"]] == [r["updated_at"] for r in rows]
    assert str(table.schema.field("updated_at").type) == "timestamp[us, tz=UTC]"
    assert frame["color"].isna().all()  # optional column absent in the warehouse table
    # the SQL names the table from the environment; 10 rows at page size 4 = 3 pages, fetched by token
    assert fake.queries[0]["sql"] == "SELECT * FROM `retail-prod.catalog.products` ORDER BY product_id"
    tokens = [qs.get("pageToken", [None])[0] for m, p, qs in fake.requests if m == "GET" and "/queries/" in p
              and qs.get("maxResults", ["0"])[0] != "0"]
    assert tokens[-2:] == ["4", "8"]


def test_bigquery_filters_travel_as_query_parameters(bq_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with FakeBigQuery(make_rows(30)) as fake:
        bq_env.setenv("NITERU_BQ_API_ENDPOINT", fake.url)
        table = read_catalog("bq", tmp_path, CatalogQuery(categories=("dress", "hat"), limit=7))
    frame = table.to_pandas()
    assert len(frame) == 7 and set(frame["category"]) == {"dress", "hat"}
    assert list(frame["product_id"]) == sorted(frame["product_id"])
    sent = fake.queries[0]
    assert "dress" not in sent["sql"] and "7" not in sent["sql"]  # never formatted into the SQL
    assert "@categories" in sent["sql"] and "@limit" in sent["sql"]
    cats = sent["params"]["categories"]
    assert cats["parameterType"] == {"type": "ARRAY", "arrayType": {"type": "STRING"}}
    assert [v["value"] for v in cats["parameterValue"]["arrayValues"]] == ["dress", "hat"]
    assert sent["params"]["limit"]["parameterValue"]["value"] == "7"


def test_bigquery_schema_errors_name_the_column(bq_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    schema = [dict(f, type="STRING") if f["name"] == "price" else f for f in SCHEMA]
    with FakeBigQuery(make_rows(3), schema) as fake:
        bq_env.setenv("NITERU_BQ_API_ENDPOINT", fake.url)
        with pytest.raises(SchemaError, match="column 'price' has type string, expected a number"):
            read_catalog("bigquery", tmp_path)
    without = [f for f in SCHEMA if f["name"] != "in_stock"]
    with FakeBigQuery(make_rows(3), without) as fake:
        bq_env.setenv("NITERU_BQ_API_ENDPOINT", fake.url)
        with pytest.raises(SchemaError, match=r"missing required column\(s\) \['in_stock'\]"):
            read_catalog("bigquery", tmp_path)


def test_bigquery_settings_come_from_the_environment() -> None:
    env = {"NITERU_BQ_PROJECT": "billing", "NITERU_BQ_TABLE": "data-proj.shop.items", "NITERU_BQ_LOCATION": "EU"}
    s = BigQuerySettings.from_env(env)
    assert (s.project, s.table_id, s.location, s.api_endpoint) == ("billing", "data-proj.shop.items", "EU", None)
    with pytest.raises(ConfigError, match="NITERU_BQ_TABLE"):
        BigQuerySettings.from_env({})
    with pytest.raises(ConfigError, match="NITERU_BQ_DATASET"):
        BigQuerySettings.from_env({"NITERU_BQ_PROJECT": "p", "NITERU_BQ_TABLE": "items"})
    with pytest.raises(ConfigError, match="invalid table id"):
        BigQuerySettings.from_env({"NITERU_BQ_TABLE": "p.d.items`; DROP TABLE x"})
