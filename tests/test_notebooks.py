"""Committed notebooks: no outputs, a `parameters` cell whose names and defaults equal the stage config."""

from __future__ import annotations

from pathlib import Path

import nbformat
import papermill
import pytest

from niteru.chain import CHAIN

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_every_chain_stage_has_its_notebook():
    missing = [s.notebook for s in CHAIN if not (NOTEBOOKS / s.notebook).exists()]
    assert not missing, f"missing chain notebooks: {missing}"


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_committed_without_outputs_and_with_one_parameters_cell(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [i for i, c in enumerate(code) if c.outputs], f"{path.name} has outputs; clear them before committing"
    assert all(c.execution_count is None for c in code), f"{path.name} has execution counts"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters' (found {len(tagged)})"


@pytest.mark.parametrize("stage", CHAIN, ids=[s.name for s in CHAIN])
def test_parameters_match_stage_config(stage):
    declared = papermill.inspect_notebook(str(NOTEBOOKS / stage.notebook))
    fields = stage.config_class().model_fields
    assert set(declared) == set(fields), (
        f"{stage.notebook}: parameters {sorted(set(declared) ^ set(fields))} differ from {stage.config}"
    )
    for name, info in declared.items():
        default = fields[name].default
        assert info["default"] is not None, f"{stage.notebook}: parameter {name} needs a default"
        assert eval(info["default"]) == default, (  # noqa: S307 - literal defaults from our own notebooks
            f"{stage.notebook}: default of {name} is {info['default']} but the config says {default!r}"
        )


@pytest.mark.parametrize("stage", CHAIN, ids=[s.name for s in CHAIN])
def test_chain_notebooks_are_thin(stage):
    nb = nbformat.read(NOTEBOOKS / stage.notebook, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert "def " not in cell.source and "class " not in cell.source, f"{stage.notebook}: logic belongs in lib/"
            assert "sys.path" not in cell.source, f"{stage.notebook}: no sys.path hacks"


@pytest.mark.slow
def test_chain_notebooks_run_standalone_with_their_defaults(tmp_path):
    """As in JupyterLab: open each chain notebook in order and run it unchanged (tiny demo in runs/dev)."""
    import json

    for stage in CHAIN:
        papermill.execute_notebook(str(NOTEBOOKS / stage.notebook), str(tmp_path / stage.notebook),
                                   kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
        summary = tmp_path / "runs" / "dev" / stage.name / "stage.json"
        assert summary.exists(), f"{stage.notebook} did not complete its stage folder"
    metrics = json.loads((tmp_path / "runs" / "dev" / "evaluate" / "stage.json").read_text())["metrics"]
    assert metrics["recall@10"] >= 0.95
    assert json.loads((tmp_path / "runs" / "dev" / "package" / "package.json").read_text())["bento_tag"]
