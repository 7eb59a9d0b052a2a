"""The generated Airflow DAG: its shape, the Kubernetes GPU option, and `airflow dags test` runs offline with SQLite.

Needs the Airflow extra (requirements-airflow.txt); skipped cleanly without it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from niteru import runs
from niteru.chain import CHAIN, STAGE_NAMES, split_params
from niteru.errors import ConfigError

needs_airflow = pytest.mark.skipif(
    importlib.util.find_spec("airflow") is None or importlib.util.find_spec("airflow.providers.papermill") is None,
    reason="Airflow is not installed (pip install -r requirements-airflow.txt)")

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_BIN = Path(sys.executable).with_name("airflow")


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A throw-away AIRFLOW_HOME with a migrated SQLite DB; the environment for `airflow` subprocesses."""
    home = tmp_path_factory.mktemp("airflow-home")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        "BENTOML_HOME": str(home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "PATH": f"{AIRFLOW_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    env.pop("NITERU_ALERT_WEBHOOK", None)
    saved = {k: os.environ.get(k) for k in ("AIRFLOW_HOME", "AIRFLOW__CORE__LOAD_EXAMPLES")}
    os.environ.update(AIRFLOW_HOME=env["AIRFLOW_HOME"], AIRFLOW__CORE__LOAD_EXAMPLES="False")  # in-process imports
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _migrate(env: dict[str, str]) -> None:
    marker = Path(env["AIRFLOW_HOME"]) / ".migrated"
    if marker.exists():
        return
    proc = subprocess.run([str(AIRFLOW_BIN), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    marker.touch()


def _dags_test(env: dict[str, str], dag_id: str, timeout: int = 480) -> subprocess.CompletedProcess[str]:
    _migrate(env)
    return subprocess.run([str(AIRFLOW_BIN), "dags", "test", dag_id], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _only_run(runs_root: Path) -> Path:
    found = [p for p in runs_root.iterdir() if (p / runs.MANIFEST).exists()]
    assert len(found) == 1, found
    return found[0]


# ------------------------------------------------------------------------------------ DAG shape (fast)
@pytest.mark.airflow
@needs_airflow
def test_dag_shape_follows_the_chain(airflow_home: dict[str, str], tmp_path: Path) -> None:
    from airflow.providers.papermill.operators.papermill import PapermillOperator

    from niteru.airflow_dag import DagSettings, build_dag

    dag = build_dag(DagSettings(runs_root=tmp_path, notebooks_dir=REPO / "notebooks", shards={"detect": 2, "embed": 3}))
    up = {t.task_id: set(t.upstream_task_ids) for t in dag.tasks}
    assert set(up) == {"init_run", "extract", "detect.shard_0", "detect.shard_1", "detect.merge", "embed.shard_0",
                       "embed.shard_1", "embed.shard_2", "embed.merge", "index", "evaluate", "package", "finalize_run"}
    assert up["detect.shard_1"] == {"init_run", "extract"}
    assert up["detect.merge"] == {"detect.shard_0", "detect.shard_1"}
    assert up["embed.shard_2"] == {"init_run", "extract", "detect.merge"}
    assert up["index"] == {"init_run", "extract", "embed.merge"}
    assert up["package"] == {"init_run", "extract", "detect.merge", "embed.merge", "index", "evaluate"}
    assert up["finalize_run"] == {"extract", "detect.merge", "embed.merge", "index", "evaluate", "package"}
    tasks = {t.task_id: t for t in dag.tasks}
    assert tasks["finalize_run"].trigger_rule == "all_done"
    shard = tasks["embed.shard_2"]
    assert isinstance(shard, PapermillOperator) and shard.shard == (2, 3) and shard.stage_name == "embed"
    assert tasks["index"].shard is None and tasks["index"].on_failure_callback
    assert dag.schedule is None or str(dag.timetable.summary) in ("None", "null")


@pytest.mark.airflow
@needs_airflow
def test_kubernetes_backend_puts_gpu_shards_in_pods(airflow_home: dict[str, str], tmp_path: Path) -> None:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from niteru.airflow_dag import DagSettings, KubernetesSettings, build_dag

    k8s = KubernetesSettings(image="europe-docker.pkg.dev/p/niteru:1", namespace="niteru", gpus=1,
                             node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
                             volume_claim="niteru-runs")
    settings = DagSettings(runs_root=tmp_path / "runs", notebooks_dir=REPO / "notebooks",
                           shards={"detect": 2, "embed": 2},
                           gpu_backend="kubernetes", kubernetes=k8s)
    tasks = {t.task_id: t for t in build_dag(settings).tasks}
    pods = sorted(k for k, t in tasks.items() if isinstance(t, KubernetesPodOperator))
    assert pods == ["detect.shard_0", "detect.shard_1", "embed.shard_0", "embed.shard_1"]
    pod = tasks["embed.shard_1"]
    assert pod.container_resources.limits["nvidia.com/gpu"] == "1"
    assert pod.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert [m.mount_path for m in pod.volume_mounts] == [str(tmp_path / "runs")]
    args = pod.arguments
    assert args[:3] == ["-m", "niteru.airflow_dag", "run-stage"]
    assert args[args.index("--stage") + 1] == "embed"
    assert (args[args.index("--shard-index") + 1], args[args.index("--num-shards") + 1]) == ("1", "2")
    assert type(tasks["index"]).__name__ == "NiteruNotebookOperator"  # CPU stages stay on Airflow workers
    with pytest.raises(ConfigError, match="NITERU_K8S_IMAGE"):
        build_dag(DagSettings(runs_root=tmp_path, gpu_backend="kubernetes"))


@pytest.mark.airflow
@needs_airflow
def test_settings_from_env(tmp_path: Path) -> None:
    from niteru.airflow_dag import DagSettings, parse_shards

    cfg = tmp_path / "chain.json"
    cfg.write_text(json.dumps({"common": {"seed": 7}, "stages": {"embed": {"batch_size": 8}}}))
    s = DagSettings.from_env({"NITERU_RUNS_ROOT": str(tmp_path), "NITERU_CHAIN_CONFIG": str(cfg),
                              "NITERU_SHARDS": "detect=4,embed=8", "NITERU_DAG_SCHEDULE": "0 0 * * *"})
    assert (s.common, s.stages, s.shards, s.schedule) == ({"seed": 7}, {"embed": {"batch_size": 8}},
                                                          {"detect": 4, "embed": 8}, "0 0 * * *")
    assert parse_shards("3") == {"detect": 3, "embed": 3}
    with pytest.raises(ConfigError, match="'index' cannot be sharded"):
        parse_shards("index=2")
    with pytest.raises(ConfigError, match="at least 1 shard"):
        parse_shards("0")
    with pytest.raises(ConfigError, match="NITERU_RUNS_ROOT is not set"):
        DagSettings.from_env({})
    cfg.write_text(json.dumps({"common": {}, "stage": {}}))
    with pytest.raises(ConfigError, match="unknown top-level key"):
        DagSettings.from_env({"NITERU_RUNS_ROOT": str(tmp_path), "NITERU_CHAIN_CONFIG": str(cfg)})


# ------------------------------------------------------------------------ task bodies and `airflow dags test`
_TOY_STAGES = '''
from niteru.config import StageConfig
from niteru.runs import read_stage_summary, write_stage_summary
from niteru.shards import list_shard_dirs


class ShardConfig(StageConfig):
    shard_index: int = 0
    num_shards: int = 1


def merge_shards(cfg):
    stage = cfg.run_path / "b"
    total = sum(read_stage_summary(d)["counts"]["n"] for d in list_shard_dirs(stage, cfg.num_shards))
    write_stage_summary(stage, counts={"n": total})
'''

def _toy_notebook(path: Path, extra_params: str, body: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('run_dir: str = "runs/dev"  # run folder\nseed: int = 0  # seed\n'
                                       + extra_params)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.slow
def test_stage_tasks_fan_out_merge_and_record_a_failed_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task bodies the DAG runs (init -> stage -> 3 shards -> merge -> gate -> finalize), executed in-process
    with real papermill kernels on a 3-stage chain; no Airflow needed for this part."""
    from niteru.airflow_dag import DagSettings, execute_stage, finalize_run, init_run, merge_stage, papermill_executor
    from niteru.chain import Stage
    from niteru.errors import StageError

    mods, nbs, root = tmp_path / "mods", tmp_path / "nbs", tmp_path / "runs"
    for d in (mods, nbs):
        d.mkdir()
    (mods / "toy_stages.py").write_text(_TOY_STAGES)
    monkeypatch.syspath_prepend(str(mods))
    _toy_notebook(nbs / "a.ipynb", "", "from niteru.runs import write_stage_summary\n"
                                       "write_stage_summary(run_dir + '/a', counts={'n': 4})")
    _toy_notebook(nbs / "b.ipynb", "shard_index: int = 0  # shard\nnum_shards: int = 1  # shards\n",
                  "from pathlib import Path\nfrom niteru.shards import shard_dir\n"
                  "from niteru.runs import write_stage_summary\n"
                  "write_stage_summary(shard_dir(Path(run_dir) / 'b', shard_index, num_shards), "
                  "counts={'n': 10 ** shard_index})")
    _toy_notebook(nbs / "c.ipynb", "",
                  "from niteru.errors import GateFailed\nraise GateFailed('recall_at_10', '0.2 < 0.6')")
    chain = (Stage("a", "a.ipynb", "niteru.config:StageConfig"),
             Stage("b", "b.ipynb", "toy_stages:ShardConfig", ("a",), shardable=True, gpu=True),
             Stage("c", "c.ipynb", "niteru.config:StageConfig", ("b",)))
    settings = DagSettings(runs_root=root, notebooks_dir=nbs, shards={"b": 3}, chain=chain, common={"seed": 3})
    with pytest.raises(ConfigError, match="set by the DAG"):
        init_run(settings, "manual__1", runs.utcnow(), conf={"stages": {"b": {"num_shards": 2}}})
    with pytest.raises(ConfigError, match="unknown parameter 'sed'"):
        init_run(settings, "manual__1", runs.utcnow(), conf={"stages": {"a": {"sed": 1}}})
    when = runs.utcnow()
    run_dir = init_run(settings, "manual__1", when, conf={"stages": {"a": {"seed": 5}}})
    assert init_run(settings, "manual__1", when) == run_dir  # a retried init reuses the run
    run = papermill_executor()
    execute_stage(run_dir, chain[0], nbs, str(tmp_path / "audit"), None, run)  # output notebooks elsewhere (gs://...)
    for i in (2, 0, 1):  # shards finish in any order
        execute_stage(run_dir, chain[1], nbs, "", (i, 3), run)
    merge_stage(run_dir, chain[1])
    with pytest.raises(StageError, match="GateFailed: quality gate 'recall_at_10' failed: 0.2 < 0.6"):
        execute_stage(run_dir, chain[2], nbs, "", None, run)
    with pytest.raises(StageError, match=f"run {run_dir.name} failed: stage 'c' failed in cell 2"):
        finalize_run(run_dir)

    manifest = runs.load_manifest(run_dir)
    assert manifest["status"] == "failed" and "quality gate 'recall_at_10' failed" in manifest["error"]
    assert manifest["orchestrator"]["shards"] == {"b": 3} and manifest["duration_s"] > 0
    a, b, c = (manifest["stages"][n] for n in "abc")
    assert a["parameters"] == {"seed": 5} and b["parameters"] == {"seed": 3}
    assert a["status"] == b["status"] == "succeeded" and a["counts"] == {"n": 4}
    assert sorted(b["shards"]) == ["0-of-3", "1-of-3", "2-of-3"]
    assert [b["shards"][k]["counts"]["n"] for k in sorted(b["shards"])] == [1, 10, 100]
    assert b["counts"] == {"n": 111}  # merge_shards summed the three shards
    assert b["artifacts"] == runs.checksum_tree(run_dir / "b") and len(b["artifacts"]) == 4
    a_digest = hashlib.sha256(json.dumps(a["artifacts"], sort_keys=True).encode()).hexdigest()
    assert {s["input_hashes"]["a"] for s in b["shards"].values()} == {a_digest}  # every shard saw the same input
    assert c["status"] == "failed" and c["gate_failed"] is True and c["artifacts"] == {}
    injected = json.loads((run_dir / "notebooks" / "b.shard-2-of-3.ipynb").read_text())
    source = "".join(next(cell["source"] for cell in injected["cells"]
                          if "injected-parameters" in cell["metadata"].get("tags", [])))
    assert "shard_index = 2" in source and "num_shards = 3" in source and f'run_dir = "{run_dir}"' in source
    assert (run_dir / "notebooks" / "c.ipynb").exists()  # the failed notebook is kept for the audit
    audit_nb = tmp_path / "audit" / run_dir.name / "notebooks" / "a.ipynb"
    assert a["output_notebook"] == str(audit_nb) and audit_nb.exists()
    assert not (run_dir / "notebooks" / "a.ipynb").exists()


@pytest.mark.slow
@pytest.mark.airflow
@needs_airflow
def test_dags_test_runs_the_real_chain_sharded(airflow_home: dict[str, str], tmp_path: Path) -> None:
    """The shipped dags/niteru_chain.py on the tiny demo catalog, detect and embed in 2 shards each."""
    missing = [s.notebook for s in CHAIN if not (REPO / "notebooks" / s.notebook).exists()]
    if missing:
        pytest.skip(f"chain notebooks not written yet: {missing}")
    import numpy as np
    import pandas as pd

    from niteru.shards import shard_of

    root = tmp_path / "runs"
    config = {"common": {"seed": 0, "device": "cpu"}, "stages": {}}
    (tmp_path / "chain.json").write_text(json.dumps(config))
    env = {**airflow_home, "NITERU_RUNS_ROOT": str(root), "NITERU_CHAIN_CONFIG": str(tmp_path / "chain.json"),
           "NITERU_SHARDS": "2", "NITERU_RETRIES": "0"}
    proc = _dags_test(env, "niteru_chain")
    run_dir = _only_run(root)
    manifest = runs.load_manifest(run_dir)
    assert proc.returncode == 0 and manifest["status"] == "succeeded", \
        (manifest.get("error"), (proc.stdout + proc.stderr)[-4000:])
    assert manifest["chain"] == list(STAGE_NAMES)
    assert manifest["orchestrator"] == {**manifest["orchestrator"], "kind": "airflow", "dag_id": "niteru_chain",
                                        "shards": {"detect": 2, "embed": 2}}
    expected = split_params(CHAIN, config["common"], config["stages"])  # exactly what `niteru run` would pass
    for name in STAGE_NAMES:
        entry = manifest["stages"][name]
        assert entry["status"] == "succeeded", (name, entry.get("error"))
        assert entry["parameters"] == expected[name]
        assert entry["artifacts"] == runs.checksum_tree(run_dir / name) and entry["artifacts"], name
        assert (run_dir / name / runs.STAGE_SUMMARY).exists()
    notebooks = sorted(p.name for p in (run_dir / "notebooks").iterdir())
    assert notebooks == sorted(["01_extract.ipynb", "02_detect.shard-0-of-2.ipynb", "02_detect.shard-1-of-2.ipynb",
                                "03_embed.shard-0-of-2.ipynb", "03_embed.shard-1-of-2.ipynb", "04_index.ipynb",
                                "05_evaluate.ipynb", "06_package.ipynb"])

    catalog = pd.read_parquet(run_dir / "extract" / "catalog.parquet")
    usable = set(catalog.loc[catalog["fetch_status"] == "ok", "product_id"])
    assert len(usable) == 32  # the default demo:16x2
    boxes = pd.read_parquet(run_dir / "detect" / "boxes.parquet")
    assert set(boxes["product_id"]) == usable
    per_shard = [set(pd.read_parquet(run_dir / "detect" / "shards" / f"{i}-of-2" / "boxes.parquet")["product_id"])
                 for i in range(2)]
    assert per_shard[0] | per_shard[1] == usable and not per_shard[0] & per_shard[1] and all(per_shard)
    assert all(shard_of(pid, 2) == i for i, ids in enumerate(per_shard) for pid in ids)
    assert boxes["product_id"].tolist() == sorted(boxes["product_id"])  # deterministic merge order

    items = pd.read_parquet(run_dir / "embed" / "items.parquet")
    vectors = np.load(run_dir / "embed" / "vectors.npy")
    assert len(items) == len(vectors) == len(boxes)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    shard_rows = sum(len(pd.read_parquet(run_dir / "embed" / "shards" / f"{i}-of-2" / "items.parquet"))
                     for i in range(2))
    assert shard_rows == len(items)
    index_meta = json.loads((run_dir / "index" / "index.json").read_text())
    idmap = pd.read_parquet(run_dir / "index" / "idmap.parquet")
    in_stock = set(catalog.loc[catalog["in_stock"], "product_id"])
    expected_items = items[items["product_id"].isin(in_stock)] if index_meta.get("in_stock_only") else items
    assert index_meta["n_items"] == len(idmap) == len(expected_items) > 0
    assert set(idmap["product_id"]) == set(expected_items["product_id"])
    assert (run_dir / "evaluate" / "metrics.json").exists() and (run_dir / "package" / "package.json").exists()
