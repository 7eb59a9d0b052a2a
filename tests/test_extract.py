"""The extract stage: snapshot + diff across two runs, failure threshold, retry of failed items, notebook."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from niteru import runs
from niteru.errors import ConfigError, StageError
from niteru.extract import DIFF_SCHEMA, OUTPUT_SCHEMA, ExtractConfig, compute_diff, run
from niteru.io import sha256_file

T0 = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
T1 = dt.datetime(2026, 6, 2, tzinfo=dt.timezone.utc)


def photo(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG", quality=95)
    return str(path)


def row(pid: str, uri: str, in_stock: bool = True, price: float = 10.0, updated: dt.datetime = T0) -> dict:
    return {"product_id": pid, "image_uri": uri, "category": "hat", "brand": "Mori", "price": price,
            "in_stock": in_stock, "updated_at": updated}


def write_source(rows: list[dict], path: Path) -> str:
    frame = pd.DataFrame(rows)
    frame["updated_at"] = pd.to_datetime(frame["updated_at"], utc=True)
    frame.to_parquet(path)
    return str(path)


@pytest.fixture()
def two_days(tmp_path: Path) -> dict[str, object]:
    img = tmp_path / "img"
    uris = {i: photo(img / f"p{i}.jpg", (30 * i, 80, 200 - 20 * i)) for i in range(8)}
    day0 = write_source([row(f"p{i}", uris[i]) for i in range(8)], tmp_path / "day0.parquet")
    new_shot = photo(img / "p1-reshoot.jpg", (250, 250, 0))
    uris[8] = photo(img / "p8.jpg", (5, 200, 5))
    day1_rows = [
        row("p1", new_shot, updated=T1),            # changed: new image URI
        row("p2", uris[2], updated=T1),             # changed: same URI, different bytes
        row("p3", uris[3], in_stock=False),         # availability: sold out
        row("p4", uris[4], price=12.5),             # unchanged image, metadata (price) changed
        *[row(f"p{i}", uris[i]) for i in (5, 6, 7)],  # unchanged
        row("p8", uris[8], updated=T1),             # new; p0 is removed
    ]
    return {"day0": day0, "day1_rows": day1_rows, "tmp": tmp_path, "p2": img / "p2.jpg"}


def test_diff_across_two_snapshots(two_days: dict[str, object]) -> None:
    tmp = Path(two_days["tmp"])  # type: ignore[arg-type]
    runs_root = tmp / "runs"
    first = run(ExtractConfig(run_dir=str(runs_root / "day0"), source=str(two_days["day0"])))
    assert first.counts == {"total": 8, "new": 8, "changed": 0, "removed": 0, "availability": 0, "unchanged": 0,
                            "fetched": 8, "cached": 0, "failed": 0}
    photo(Path(two_days["p2"]), (0, 0, 0))  # type: ignore[arg-type]  # same URI, new content (row updated)
    day1 = write_source(two_days["day1_rows"], tmp / "day1.parquet")  # type: ignore[arg-type]
    second = run(ExtractConfig(run_dir=str(runs_root / "day1"), source=day1, previous_run="day0"))

    changes = dict(zip(second.diff["product_id"], second.diff["change"]))
    assert changes == {"p0": "removed", "p1": "changed", "p2": "changed", "p3": "availability", "p4": "unchanged",
                       "p5": "unchanged", "p6": "unchanged", "p7": "unchanged", "p8": "new"}
    assert second.counts == {"total": 8, "new": 1, "changed": 2, "removed": 1, "availability": 1, "unchanged": 4,
                             "fetched": 3, "cached": 5, "failed": 0}
    diff = second.diff.set_index("product_id")
    assert diff.loc["p4", "metadata_changed"] and not diff.loc["p5", "metadata_changed"]
    assert second.metrics["metadata_changed"] == 1
    assert diff.loc["p2", "image_sha256"] != diff.loc["p2", "previous_image_sha256"]
    assert diff.loc["p5", "image_sha256"] == diff.loc["p5", "previous_image_sha256"]
    assert pd.isna(diff.loc["p0", "image_sha256"]) and pd.isna(diff.loc["p8", "previous_image_sha256"])
    assert second.previous_run == (runs_root / "day0").resolve()

    # artifacts follow the contract: removed items are gone, sold-out ones are flagged
    out = runs_root / "day1" / "extract"
    catalog = pq.read_table(out / "catalog.parquet")
    assert catalog.schema == OUTPUT_SCHEMA and pq.read_table(out / "diff.parquet").schema == DIFF_SCHEMA
    frame = catalog.to_pandas().set_index("product_id")
    assert list(frame.index) == ["p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8"]
    assert not frame.loc["p3", "in_stock"] and frame["fetch_status"].eq("ok").all()
    assert (frame.loc["p2", "width"], frame.loc["p2", "height"]) == (24, 16)
    assert sha256_file(frame.loc["p2", "image_path"]) == frame.loc["p2", "image_sha256"]
    summary = json.loads((out / "stage.json").read_text())
    assert summary["counts"] == second.counts and summary["previous_run"] == str((runs_root / "day0").resolve())


def test_previous_run_defaults_to_latest_successful_run(two_days: dict[str, object]) -> None:
    tmp = Path(two_days["tmp"])  # type: ignore[arg-type]
    root = tmp / "runs"
    source = str(two_days["day0"])
    for run_id, start, status in (("r1", "2026-06-01T00:00", "succeeded"), ("r2", "2026-06-02T00:00", "failed"),
                                  ("r3", "2026-06-03T00:00", "running")):
        runs.save_manifest(root / run_id, {"run_id": run_id, "started_at": start, "status": status, "source": source,
                                           "stages": {"extract": {"status": status}}})
    run(ExtractConfig(run_dir=str(root / "r1"), source=source))
    run(ExtractConfig(run_dir=str(root / "r2"), source=source, max_failure_rate=1.0))
    third = run(ExtractConfig(run_dir=str(root / "r3"), source=source))
    assert third.previous_run == (root / "r1").resolve()  # r2 failed, so r1 is the baseline
    assert third.counts["unchanged"] == 8 and third.counts["cached"] == 8 and third.counts["fetched"] == 0
    with pytest.raises(ConfigError, match="does not exist"):
        run(ExtractConfig(run_dir=str(root / "r3"), source=source, previous_run="nope"))


def test_failure_threshold_then_retry_only_failed(tmp_path: Path) -> None:
    img = tmp_path / "img"
    good = [photo(img / f"g{i}.jpg", (10 * i, 10, 10)) for i in range(3)]
    missing = str(img / "late.jpg")
    corrupt = img / "broken.jpg"
    corrupt.write_bytes(Path(good[0]).read_bytes()[:200])
    source = write_source([*(row(f"g{i}", u) for i, u in enumerate(good)), row("late", missing),
                           row("broken", str(corrupt))], tmp_path / "cat.parquet")
    cfg = ExtractConfig(run_dir=str(tmp_path / "runs" / "r"), source=source, max_failure_rate=0.2)
    with pytest.raises(StageError, match=r"2 of 5 images \(40.0%\) could not be fetched.*retry_failed=True"):
        run(cfg)
    out = tmp_path / "runs" / "r" / "extract"
    assert not (out / "stage.json").exists()  # the stage is not complete
    failures = pd.read_parquet(out / "failures.parquet").set_index("product_id")
    assert failures["error_kind"].to_dict() == {"broken": "bad_image", "late": "not_found"}
    assert failures.loc["broken", "attempts"] == 1 and "truncated or corrupt" in failures.loc["broken", "error"]

    photo(Path(missing), (1, 2, 3))          # the late image shows up
    Path(source).unlink()                    # the retry must not re-read the catalog source
    retried = run(cfg.model_copy(update={"retry_failed": True}))
    assert retried.counts["fetched"] == 1 and retried.counts["cached"] == 3 and retried.counts["failed"] == 1
    assert list(retried.failures["product_id"]) == ["broken"]
    assert (out / "stage.json").exists()
    catalog = pd.read_parquet(out / "catalog.parquet").set_index("product_id")
    assert catalog.loc["late", "fetch_status"] == "ok" and catalog.loc["broken", "fetch_status"] == "failed"
    assert catalog.loc["broken", "fetch_error"].startswith("bad_image: ")


def test_compute_diff_without_previous_marks_everything_new() -> None:
    current = pd.DataFrame({"product_id": ["b", "a"], "image_uri": ["x", "y"], "image_sha256": ["1", None],
                            "in_stock": [True, False]})
    diff = compute_diff(current, None)
    assert diff[["product_id", "change"]].values.tolist() == [["a", "new"], ["b", "new"]]


def test_config_rejects_unknown_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="unknown parameter 'sources'"):
        ExtractConfig.from_params({"sources": "demo"})
    with pytest.raises(ConfigError, match="max_failure_rate"):
        ExtractConfig.from_params({"max_failure_rate": 2})


@pytest.mark.slow  # a kernel start plus matplotlib: ~5 s idle, 20+ s on a busy 2-core machine
def test_notebook_runs_standalone_on_a_local_catalog(two_days: dict[str, object]) -> None:
    import papermill

    tmp = Path(two_days["tmp"])  # type: ignore[arg-type]
    nb = Path(__file__).resolve().parents[1] / "notebooks" / "01_extract.ipynb"
    run_dir = tmp / "runs" / "nb"
    papermill.execute_notebook(str(nb), str(tmp / "out.ipynb"), kernel_name="python3", progress_bar=False,
                               parameters={"run_dir": str(run_dir), "source": str(two_days["day0"]),
                                           "categories": ["hat"], "limit": 5})
    summary = json.loads((run_dir / "extract" / "stage.json").read_text())
    assert summary["counts"]["total"] == 5 and summary["counts"]["new"] == 5 and summary["counts"]["failed"] == 0
