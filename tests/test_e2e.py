"""End to end: the real chain (all six notebooks) on a tiny demo catalog, offline, twice (day 1, day 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from niteru import runs
from niteru.chain import CHAIN, ChainRunner
from niteru.demo import evolve_demo_catalog, write_catalog_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_days(tmp_path_factory, demo_catalog):
    """Run the chain on day 1 and on day 2 of a catalog living at one path (so day 2 diffs against day 1)."""
    root = tmp_path_factory.mktemp("e2e")
    catalog_dir = root / "warehouse"
    catalog_dir.mkdir()
    write_catalog_files(pd.read_parquet(demo_catalog / "catalog.parquet"), catalog_dir)
    source = str(catalog_dir / "catalog.duckdb")
    runner = ChainRunner(runs_root=root / "runs")
    common = {"seed": 0}
    stages = {"extract": {"source": source}}
    day1 = runner.run(common, stages, run_id="20260101-000000-day1")
    evolve_demo_catalog(catalog_dir, root / "day2-images", day=1, removed=0.1, new=0.1, changed=0.1, availability=0.1)
    write_catalog_files(pd.read_parquet(root / "day2-images" / "catalog.parquet"), catalog_dir)
    day2 = runner.run(common, stages, run_id="20260102-000000-day2")
    return runner, day1, day2


def test_day1_chain_succeeds_with_complete_manifest(two_days):
    _, day1, _ = two_days
    assert day1.ok, day1.error
    manifest = json.loads((day1.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["chain"] == [s.name for s in CHAIN]
    assert manifest["versions"]["torch"] and "sha" in manifest["git"]
    for stage in CHAIN:
        entry = manifest["stages"][stage.name]
        assert entry["status"] == "succeeded", (stage.name, entry.get("error"))
        assert entry["artifacts"] and entry["artifacts"] == runs.checksum_tree(day1.run_dir / stage.name)
        assert (day1.run_dir / "notebooks" / stage.notebook).exists()
    counts = manifest["stages"]["extract"]["counts"]
    assert counts["total"] == 32 and counts["new"] == 32 and counts["failed"] == 0


def test_day1_quality_numbers(two_days):
    _, day1, _ = two_days
    metrics = json.loads((day1.run_dir / "evaluate" / "metrics.json").read_text())
    flat = json.dumps(metrics)
    assert "recall@10" in flat
    stage_metrics = runs.read_stage_summary(day1.run_dir / "evaluate")["metrics"]
    assert stage_metrics["recall@10"] >= 0.95
    assert stage_metrics["self_first_rate"] == 1.0
    # every photo's sibling (the other photo of the same product) is among its 10 neighbours
    assert stage_metrics["instance_recall@10"] >= 0.9


def test_day1_package_is_in_the_bento_store(two_days):
    import bentoml

    _, day1, _ = two_days
    package = json.loads((day1.run_dir / "package" / "package.json").read_text())
    bento = bentoml.get(package["bento_tag"])
    model = bentoml.models.get(package["model_tag"])
    assert str(bento.tag) == package["bento_tag"]
    assert model.info.labels.get("run_id") == day1.run_id


def test_day2_is_incremental(two_days):
    _, day1, day2 = two_days
    assert day2.ok, day2.error
    extract = day2.manifest["stages"]["extract"]["counts"]
    assert (extract["new"], extract["removed"], extract["changed"], extract["availability"]) == (3, 3, 3, 3)
    embed = day2.manifest["stages"]["embed"]["counts"]
    assert embed["embedded"] == 6  # only the new and re-shot photos went through the model
    assert embed["from_store"] == embed["items"] - 6
    diff = pd.read_parquet(day2.run_dir / "extract" / "diff.parquet")
    removed = set(diff.loc[diff["change"] == "removed", "product_id"])
    idmap = pd.read_parquet(day2.run_dir / "index" / "idmap.parquet")
    assert removed and not removed & set(idmap["product_id"])


def test_resume_of_a_finished_run_recomputes_nothing(two_days):
    runner, _, day2 = two_days
    before = {n: e["ended_at"] for n, e in day2.manifest["stages"].items()}
    again = runner.resume(day2.run_id)
    assert again.ok
    assert {n: e["ended_at"] for n, e in again.manifest["stages"].items()} == before
    assert all(e["reused"] >= 1 for e in again.manifest["stages"].values())


def test_serve_instructions_name_the_built_bento_and_a_real_photo(two_days):
    from niteru.cli import serve_instructions

    _, day1, _ = two_days
    text = serve_instructions(day1.run_dir)
    package = json.loads((day1.run_dir / "package" / "package.json").read_text())
    assert f"bentoml serve {package['bento_tag']}" in text
    photo = text.split("image=@", 1)[1].split(";type=", 1)[0]
    assert photo.endswith(".jpg") and Path(photo).is_file()
