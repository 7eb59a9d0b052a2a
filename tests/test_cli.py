"""The `niteru` command line: parameter parsing, validation errors, run listing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from niteru import runs
from niteru.cli import load_config_file, parse_assignments


def test_parse_assignments_types_and_scopes():
    common, stages = parse_assignments(("seed=3", "embed.batch_size=16", "extract.source=demo:n=4,v=2",
                                        "index.in_stock_only=false", "evaluate.k_values=[5, 10]"))
    assert common == {"seed": 3}
    assert stages == {"embed": {"batch_size": 16}, "extract": {"source": "demo:n=4,v=2"},
                      "index": {"in_stock_only": False}, "evaluate": {"k_values": [5, 10]}}


def test_config_file_rejects_unknown_sections(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("common:\n  seed: 2\nstages:\n  embed:\n    batch_size: 8\n")
    assert load_config_file(good) == ({"seed": 2}, {"embed": {"batch_size": 8}})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stage": {}}))
    with pytest.raises(Exception, match="unknown top-level key"):
        load_config_file(bad)


def _niteru(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "niteru.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_unknown_parameter_is_a_clear_error_and_nothing_runs(tmp_path):
    proc = _niteru("run", "--runs-root", str(tmp_path), "--set", "embed.batch_sise=8")
    assert proc.returncode == 2
    assert "unknown parameter 'batch_sise'" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_runs_lists_status_and_metrics(tmp_path):
    run_dir = tmp_path / "20260101-000000-abcd"
    run_dir.mkdir()
    runs.save_manifest(run_dir, {
        "run_id": run_dir.name, "status": "succeeded", "started_at": "2026-01-01T00:00:00+00:00",
        "duration_s": 12.5, "source": "demo",
        "stages": {"evaluate": {"metrics": {"recall@10": 0.987, "precision@10": 0.5}}, "index": {"counts": {}}},
    })
    proc = _niteru("runs", "--runs-root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(run_dir.name)][0]
    assert "succeeded" in line and "0.987" in line and "0.500" in line
    listed = json.loads(_niteru("runs", "--runs-root", str(tmp_path), "--json").stdout)
    assert listed[0]["metrics"]["recall@10"] == 0.987
