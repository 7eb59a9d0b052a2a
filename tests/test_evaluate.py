"""Evaluate stage: metrics on tiny clustered data, gates that fail on broken indexes, drift detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from niteru import evaluate as nevaluate
from niteru import index as nindex
from niteru.errors import GateFailed
from niteru.io import write_json_atomic, write_npy_atomic, write_parquet_atomic
from test_index import clustered_vectors, write_upstream  # tests/ is on sys.path (pytest rootdir import)


def evaluate(run: Path, **params) -> nevaluate.EvaluateResult:
    params.setdefault("sweep_n_trees", [2, 10])
    params.setdefault("sweep_search_k", [-1, 5, 1000])
    return nevaluate.run(nevaluate.EvaluateConfig(run_dir=str(run), **params))


def make_run(run: Path, n_trees: int = 10, **upstream) -> None:
    write_upstream(run, **upstream)
    nindex.run(nindex.IndexConfig(run_dir=str(run), n_trees=n_trees))


def write_manifest(run: Path, started_at: str, evaluate_status: str = "succeeded") -> None:
    write_json_atomic(run / "manifest.json", {
        "run_id": run.name, "status": "failed", "source": "synthetic", "started_at": started_at,
        "stages": {"index": {"status": "succeeded"}, "evaluate": {"status": evaluate_status}},
    })


def test_metrics_on_tiny_clustered_data(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r1"
    make_run(run, n_categories=4, groups_per_category=8)  # 64 photos, 62 in stock
    res = evaluate(run, n_queries=40, k=5)
    m = res.metrics
    assert res.passed and m["passed"]
    assert m["n_items"] == m["expected_items"] == 62
    assert m["recall@10"] == pytest.approx(1.0) and m["recall@50"] == pytest.approx(1.0)  # tiny -> exhaustive
    assert m["self_first_rate"] == 1.0 and m["duplicate_rate"] == 0.0
    assert m["precision@5"] >= 0.95  # well separated categories
    assert 0.95 <= m["map@5"] <= 1.0
    assert m["instance_recall@5"] >= 0.95  # the other photo of the same product is found
    assert {r["category"] for r in m["per_category"]} == {"cat0", "cat1", "cat2", "cat3"}
    assert sum(r["n_products"] for r in m["per_category"]) == 62
    assert len(m["sweep"]) == 2 * 3  # n_trees [2, 10] (10 = the built index) x 3 search_k values
    assert m["chosen"]["recall@10"] >= 0.95
    assert m["recommended_search_k"] == 5  # the cheapest search_k of the built forest that reaches 0.95
    assert m["latency"]["p50_ms"] > 0 and m["latency"]["qps"] > 0
    assert m["drift"] == {"previous_run": None}
    out = run / "evaluate"
    for name in ("metrics.json", "report.md", "report.html", "sweep_recall_latency.png", "latency_hist.png",
                 "per_category.png", "stage.json"):
        assert (out / name).exists(), name
    assert (out / "sweep_recall_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASSED" in (out / "report.md").read_text()
    summary = json.loads((out / "stage.json").read_text())
    assert summary["metrics"]["recall@10"] == pytest.approx(1.0)


def test_precision_drops_when_labels_disagree_with_vectors(tmp_path: Path) -> None:
    run = tmp_path / "r"
    make_run(run, n_categories=4, groups_per_category=8)
    catalog = pd.read_parquet(run / "extract" / "catalog.parquet")
    catalog["category"] = np.random.default_rng(0).permutation(catalog["category"].to_numpy())
    write_parquet_atomic(run / "extract" / "catalog.parquet", catalog)
    nindex.run(nindex.IndexConfig(run_dir=str(run), n_trees=10))
    m = evaluate(run, n_queries=60, k=5).metrics
    assert m["precision@5"] < 0.6  # shuffled labels: close to chance (0.25), far from 1.0
    with pytest.raises(GateFailed) as err:
        evaluate(run, n_queries=60, k=5, min_precision_at_k=0.8)
    assert err.value.check == "precision@5"


def test_gate_fails_on_an_index_missing_an_item(tmp_path: Path) -> None:
    run = tmp_path / "r"
    make_run(run)
    # break the index the way a buggy build would: drop the last item but keep files self-consistent
    idx = run / "index"
    loaded = nindex.load_index(idx)
    idmap = loaded.idmap.iloc[:-1]
    vectors = np.asarray(loaded.vectors())[:-1]
    dropped = loaded.idmap["product_id"].iloc[-1]
    meta = dict(loaded.meta, n_items=len(idmap))
    loaded.unload()
    ann = nindex.build_annoy(vectors, 10, 0, n_jobs=1)
    ann.save(str(idx / "index.ann"))
    ann.unload()
    write_parquet_atomic(idx / "idmap.parquet", idmap)
    write_npy_atomic(idx / "vectors.npy", vectors)
    write_json_atomic(idx / "index.json", meta)

    with pytest.raises(GateFailed) as err:
        evaluate(run)
    assert err.value.check == "item_count"
    assert dropped in str(err.value) and "report.html" in str(err.value)
    out = run / "evaluate"
    metrics = json.loads((out / "metrics.json").read_text())  # written before the gate fired
    assert metrics["passed"] is False
    failed = [c["name"] for c in metrics["checks"] if not c["passed"]]
    assert failed == ["item_count"]
    assert "FAILED" in (out / "report.html").read_text()
    assert (out / "sweep_recall_latency.png").exists()
    assert not (out / "stage.json").exists()  # the stage is not complete


def test_gate_fails_on_nan_and_duplicate_vectors(tmp_path: Path) -> None:
    vecs, _, _ = clustered_vectors(4, 6, 2, 16, 0)
    vecs[5] = np.nan
    run = tmp_path / "nan"
    make_run(run, vectors=vecs, out_of_stock=())
    with pytest.raises(GateFailed) as err:
        evaluate(run)
    assert err.value.check == "item_count"  # the NaN item could not be indexed ...
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    nan_check = next(c for c in metrics["checks"] if c["name"] == "vectors_valid")
    assert nan_check["passed"] is False and nan_check["value"] == 1  # ... and is named as invalid

    vecs, _, _ = clustered_vectors(4, 6, 2, 16, 0)
    vecs[10:16] = vecs[0]  # 6 of 48 items share one vector: 6/48 = 12.5 % duplicates
    run = tmp_path / "dup"
    make_run(run, vectors=vecs, out_of_stock=())
    with pytest.raises(GateFailed) as err:
        evaluate(run, max_duplicate_rate=0.05)
    assert err.value.check == "duplicate_rate"
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert metrics["duplicate_rate"] == pytest.approx(6 / 48)
    assert metrics["self_first_rate"] == 1.0  # exact-duplicate ties are not self-first misses
    assert evaluate(run, max_duplicate_rate=0.2).passed


def test_drift_against_the_previous_successful_run(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    prev = root / "20260101-000000-aaaa"
    make_run(prev, n_categories=4, groups_per_category=10)
    write_manifest(prev, "2026-01-01T00:00:00.000+00:00")
    failed_gate = root / "20260101-120000-cccc"  # later, but its index failed the gate: never the reference
    make_run(failed_gate, n_categories=4, groups_per_category=10, seed=9)
    write_manifest(failed_gate, "2026-01-01T12:00:00.000+00:00", evaluate_status="failed")

    same = root / "20260102-000000-bbbb"
    make_run(same, n_categories=4, groups_per_category=10)
    write_manifest(same, "2026-01-02T00:00:00.000+00:00")
    m = evaluate(same).metrics
    assert m["drift"]["previous_run"] == prev.name
    assert m["count_delta"] == 0.0 and m["drift_overlap"] == pytest.approx(1.0)

    # a model change that scrambles neighbourhoods: same products, unrelated vectors
    drifted = root / "20260103-000000-dddd"
    vecs, _, _ = clustered_vectors(4, 10, 2, 16, 0)
    vecs = vecs[np.random.default_rng(1).permutation(len(vecs))]
    make_run(drifted, n_categories=4, groups_per_category=10, vectors=vecs)
    write_manifest(drifted, "2026-01-03T00:00:00.000+00:00", evaluate_status="failed")  # as it will end
    with pytest.raises(GateFailed) as err:
        evaluate(drifted, min_drift_overlap=0.5, max_self_check=100)
    assert err.value.check == "drift_overlap"
    metrics = json.loads((drifted / "evaluate" / "metrics.json").read_text())
    assert metrics["drift"]["previous_run"] == same.name  # latest successful before it
    assert metrics["drift_overlap"] < 0.4

    # a catalog that shrank by half: count delta gate
    shrunk = root / "20260104-000000-eeee"
    make_run(shrunk, n_categories=2, groups_per_category=10)
    write_manifest(shrunk, "2026-01-04T00:00:00.000+00:00")
    with pytest.raises(GateFailed) as err:
        evaluate(shrunk, compare_run=str(same))
    assert err.value.check == "count_delta"
    assert json.loads((shrunk / "evaluate" / "metrics.json").read_text())["count_delta"] == pytest.approx((38 - 78) / 78)  # 2 of 40 out of stock
    assert evaluate(shrunk, compare_run="none").passed


def test_metric_helpers() -> None:
    assert nevaluate.average_precision(np.array([1, 0, 1]), n_relevant=2, k=3) == pytest.approx((1 + 2 / 3) / 2)
    assert nevaluate.average_precision(np.array([0, 0, 0]), n_relevant=5, k=3) == 0.0
    table = pd.DataFrame([
        {"n_trees": 10, "search_k": 10, "effective_search_k": 10, "recall@10": 0.80, "p50_ms": 0.01},
        {"n_trees": 10, "search_k": 100, "effective_search_k": 100, "recall@10": 0.96, "p50_ms": 0.03},
        {"n_trees": 50, "search_k": 500, "effective_search_k": 500, "recall@10": 0.99, "p50_ms": 0.08},
    ])
    assert nevaluate.choose_setting(table, 0.95)["search_k"] == 100
    assert nevaluate.choose_setting(table, 0.9)["search_k"] == 100
    assert nevaluate.choose_setting(table, 0.5)["search_k"] == 10
    assert nevaluate.choose_setting(table, 0.999)["n_trees"] == 50
    assert nevaluate.stable_sample(["b", "a", "c"], 2) == nevaluate.stable_sample(["c", "a", "b"], 2)


@pytest.mark.slow
def test_index_and_evaluate_notebooks_run_with_papermill(tmp_path: Path) -> None:
    import papermill

    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    run = tmp_path / "runs" / "nb"
    write_upstream(run, n_categories=3, groups_per_category=5)
    for name, params in (("04_index.ipynb", {"n_trees": 5}),
                         ("05_evaluate.ipynb", {"n_queries": 20, "sweep_n_trees": [2, 5], "sweep_search_k": [-1, 100]})):
        papermill.execute_notebook(str(notebooks / name), str(tmp_path / name), parameters={"run_dir": str(run), **params},
                                   kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    sidecar = json.loads((run / "index" / "index.json").read_text())
    assert sidecar["n_trees"] == 5 and sidecar["n_items"] == 28  # 30 photos, 2 out of stock
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert metrics["passed"] and metrics["recall@10"] == pytest.approx(1.0)
    assert sorted({r["n_trees"] for r in metrics["sweep"]}) == [2, 5]
    assert metrics["chosen"]["recall@10"] >= 0.95
