"""The papermill chain runner on a toy three-stage chain: validation, manifest, failure, resume."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from niteru import runs
from niteru.chain import ChainRunner, Stage
from niteru.config import StageConfig
from niteru.errors import ConfigError


class AConfig(StageConfig):
    stage = "a"
    value: int = 1
    counter: str = ""


class BConfig(StageConfig):
    stage = "b"
    fail_if_exists: str = ""
    counter: str = ""


class CConfig(StageConfig):
    stage = "c"
    counter: str = ""


COMMON = 'run_dir: str = "runs/dev"\ncache_dir: str = ""\nseed: int = 0\ndevice: str = "auto"\ncounter: str = ""\n'
BODY = {
    "a": ('value: int = 1\n', 'out = Path(run_dir) / "a"\nout.mkdir(parents=True, exist_ok=True)\n'
          '(out / "value.txt").write_text(str(value * 10))'),
    "b": ('fail_if_exists: str = ""\n', 'if fail_if_exists and Path(fail_if_exists).exists():\n'
          '    raise RuntimeError("planted failure")\nout = Path(run_dir) / "b"\nout.mkdir(parents=True, exist_ok=True)\n'
          '(out / "double.txt").write_text(str(2 * int((Path(run_dir) / "a" / "value.txt").read_text())))'),
    "c": ('', 'out = Path(run_dir) / "c"\nout.mkdir(parents=True, exist_ok=True)\n'
          '(out / "final.txt").write_text((Path(run_dir) / "b" / "double.txt").read_text())'),
}


def _write_notebooks(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (params, body) in BODY.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        params_cell = nbformat.v4.new_code_cell(COMMON + params)
        params_cell.metadata["tags"] = ["parameters"]
        nb.cells = [
            nbformat.v4.new_code_cell("from pathlib import Path\nfrom niteru.runs import write_stage_summary"),
            params_cell,
            nbformat.v4.new_code_cell("if counter:\n    with open(counter, 'a') as fh:\n"
                                      f"        fh.write('{name}\\n')"),
            nbformat.v4.new_code_cell(body),
            nbformat.v4.new_code_cell(f'write_stage_summary(Path(run_dir) / "{name}", metrics={{"{name}_done": 1}})'),
        ]
        nbformat.write(nb, folder / f"{name}.ipynb")


@pytest.fixture()
def runner(tmp_path: Path) -> ChainRunner:
    _write_notebooks(tmp_path / "nb")
    chain = (
        Stage("a", "a.ipynb", AConfig),
        Stage("b", "b.ipynb", BConfig, ("a",)),
        Stage("c", "c.ipynb", CConfig, ("b",)),
    )
    return ChainRunner(runs_root=tmp_path / "runs", notebooks_dir=tmp_path / "nb", chain=chain)


def _executions(counter: Path) -> list[str]:
    return counter.read_text().split() if counter.exists() else []


def test_run_writes_manifest_notebooks_and_checksums(runner: ChainRunner, tmp_path: Path):
    events = []
    runner.hooks.append(events.append)
    result = runner.run({"seed": 3}, {"a": {"value": 4}}, run_id="r1")
    assert result.ok, result.error
    run_dir = tmp_path / "runs" / "r1"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["run_id"] == "r1" and manifest["status"] == "succeeded"
    assert manifest["chain"] == ["a", "b", "c"]
    assert set(manifest["git"]) == {"sha", "dirty"}
    assert manifest["versions"]["papermill"]
    assert manifest["stages"]["a"]["parameters"] == {"seed": 3, "value": 4}
    assert manifest["stages"]["b"]["parameters"] == {"seed": 3}
    assert (run_dir / "c" / "final.txt").read_text() == "80"
    for name in "abc":
        entry = manifest["stages"][name]
        assert entry["status"] == "succeeded" and entry["duration_s"] > 0
        assert entry["metrics"] == {f"{name}_done": 1}
        assert entry["artifacts"] == runs.checksum_tree(run_dir / name)
        executed = nbformat.read(run_dir / "notebooks" / f"{name}.ipynb", as_version=4)
        assert executed.metadata["papermill"]["parameters"]["run_dir"] == str(run_dir)
    assert set(manifest["stages"]["b"]["input_hashes"]) == {"a", "notebook"}
    assert [e["event"] for e in events][0] == "run_started" and events[-1]["event"] == "run_succeeded"
    assert [r.run_id for r in runs.list_runs(tmp_path / "runs")] == ["r1"]


@pytest.mark.parametrize(
    ("common", "stages", "needle"),
    [
        ({}, {"a": {"valu": 2}}, "unknown parameter 'valu'"),
        ({}, {"a": {"value": "many"}}, "value"),
        ({"colour": 1}, {}, "unknown common parameter 'colour'"),
        ({}, {"z": {}}, "unknown stage 'z'"),
        ({}, {"a": {"run_dir": "/x"}}, "set by the runner"),
    ],
)
def test_bad_parameters_fail_before_anything_runs(runner, tmp_path, common, stages, needle):
    with pytest.raises(ConfigError, match=needle):
        runner.run(common, stages, run_id="bad")
    assert not (tmp_path / "runs" / "bad").exists()


def test_failed_stage_points_at_cell_and_resume_skips_finished(runner: ChainRunner, tmp_path: Path):
    marker = tmp_path / "break-b"
    marker.write_text("x")
    counter = tmp_path / "counter.txt"
    first = runner.run({"counter": str(counter)}, {"b": {"fail_if_exists": str(marker)}}, run_id="r2")
    assert not first.ok and first.status == "failed"
    assert "stage 'b' failed in cell" in first.error and "planted failure" in first.error
    assert (tmp_path / "runs" / "r2" / "notebooks" / "b.ipynb").exists()  # partial audit log kept
    manifest = runs.load_manifest(tmp_path / "runs" / "r2")
    assert [manifest["stages"][n]["status"] for n in "abc"] == ["succeeded", "failed", "pending"]
    assert _executions(counter) == ["a", "b"]

    marker.unlink()
    resumed = runner.resume("r2")
    assert resumed.ok, resumed.error
    assert _executions(counter) == ["a", "b", "b", "c"]  # 'a' was verified by checksum, not re-executed
    assert resumed.manifest["stages"]["a"]["reused"] == 1

    # tampering with a finished stage's artifact makes resume recompute it and everything downstream
    (tmp_path / "runs" / "r2" / "a" / "value.txt").write_text("999")
    again = runner.resume("r2")
    assert again.ok
    assert _executions(counter) == ["a", "b", "b", "c", "a", "b", "c"]
    assert (tmp_path / "runs" / "r2" / "c" / "final.txt").read_text() == "20"


def test_run_id_collision_is_an_error(runner):
    assert runner.run(run_id="same").ok
    with pytest.raises(ConfigError, match="already exists"):
        runner.run(run_id="same")


def test_previous_successful_run(runner, tmp_path):
    runner.run(run_id="20260101-000000-aaaa")
    runner.run(run_id="20260102-000000-bbbb")
    third = runner.run(run_id="20260103-000000-cccc")
    prev = runs.previous_successful_run(third.run_dir)
    assert prev is not None and prev.name == "20260102-000000-bbbb"


def test_resume_with_changed_parameters_reruns_that_stage_and_downstream(runner: ChainRunner, tmp_path: Path):
    counter = tmp_path / "counter.txt"
    assert runner.run({"counter": str(counter)}, run_id="r5").ok
    resumed = runner.resume("r5", stages={"b": {"fail_if_exists": str(tmp_path / "absent")}})
    assert resumed.ok
    assert _executions(counter) == ["a", "b", "c", "b", "c"]
    entry = resumed.manifest["stages"]["b"]
    assert entry["parameters"]["fail_if_exists"].endswith("absent") and entry["parameter_history"]
    with pytest.raises(ConfigError, match="unknown parameter"):
        runner.resume("r5", stages={"b": {"nope": 1}})
