"""The chain as an Airflow 3 DAG, generated from :data:`niteru.chain.CHAIN`.

Task graph (``N`` = shards of a shardable stage)::

    init_run -> extract -> detect.shard_0..N-1 -> detect.merge -> embed.shard_0..N-1 -> embed.merge
             -> index -> evaluate -> package -> finalize_run

* ``init_run`` resolves the parameters exactly like the local runner (:func:`niteru.chain.split_params`,
  :func:`niteru.chain.validate_stage_params`, notebook parameter check), merges ``dag_run.conf``
  (``{"common": {...}, "stages": {...}}``) over the configured ones, creates ``<runs_root>/<run_id>/`` and writes
  the same ``manifest.json`` as :class:`niteru.chain.ChainRunner` (plus an ``orchestrator`` record).
* every stage (and shard) runs its notebook with the papermill provider's ``PapermillOperator``
  (:class:`NiteruNotebookOperator`) or, for ``gpu=True`` stages with ``gpu_backend="kubernetes"``, in a
  ``KubernetesPodOperator`` running ``python -m niteru.airflow_dag run-stage`` (the same code path) on a GPU node.
  Parameters are the manifest's ``{**parameters, "run_dir": ...}`` plus ``shard_index``/``num_shards``;
  shard outputs go to ``<stage>/shards/<i>-of-<n>/`` (:mod:`niteru.shards`).
* ``<stage>.merge`` calls the stage module's ``merge_shards(cfg)``; each task records status, timings, input
  hashes, metrics and artifact sha256s in the manifest (under a file lock: shards run in parallel).
* ``finalize_run`` (runs even after a failure) sets the run status and fails the DAG run if any stage failed.

Output notebooks go to ``<run_dir>/notebooks/`` or, with ``output_url`` (e.g. ``gs://bucket/niteru/runs``), to
``<output_url>/<run_id>/notebooks/`` through papermill's I/O handlers. Stage artifacts need a filesystem shared by
all workers: on Cloud Composer that is the environment bucket's gcsfuse mount (``/home/airflow/gcs/data``), i.e.
the run folder lives in ``gs://<bucket>/data/...``. See docs/airflow.md.

Airflow is imported only inside the functions that need it: ``import niteru.airflow_dag`` works without it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from niteru import runs
from niteru.chain import (CHAIN, ChainRunner, Stage, default_notebooks_dir, get_stage, notebook_parameters,
                          split_params, validate_stage_params)
from niteru.errors import ConfigError, StageError
from niteru.shards import shard_dir

if TYPE_CHECKING:
    from airflow.sdk import DAG

log = logging.getLogger(__name__)

INIT_TASK = "init_run"
FINAL_TASK = "finalize_run"
MANIFEST_LOCK = ".manifest.lock"
GPU_BACKENDS = ("papermill", "kubernetes")
SHARD_PARAMS = ("shard_index", "num_shards")


# ==================================================================================== settings
@dataclass(frozen=True)
class KubernetesSettings:
    """Where GPU shards run when ``gpu_backend="kubernetes"`` (GKE / Cloud Composer)."""

    image: str = ""
    namespace: str = "default"
    gpus: int = 1
    #: e.g. {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    node_selector: dict[str, str] = field(default_factory=dict)
    volume_claim: str = ""  # PVC (Filestore / GCS FUSE) mounted at runs_root in the pod
    service_account: str = ""
    cpu: str = "4"
    memory: str = "16Gi"
    kubernetes_conn_id: str | None = None
    in_cluster: bool | None = None


@dataclass(frozen=True)
class DagSettings:
    """Everything the generated DAG depends on; :meth:`from_env` reads the ``NITERU_*`` variables."""

    runs_root: Path
    dag_id: str = "niteru_chain"
    notebooks_dir: Path | None = None
    common: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)  # per shardable stage; missing -> 1
    schedule: str | None = None
    output_url: str = ""  # '' = <run_dir>/notebooks; else e.g. gs://bucket/niteru/runs
    kernel_name: str = "python3"
    gpu_backend: str = "papermill"
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    retries: int = 1
    retry_delay_s: int = 300
    max_active_tasks: int = 16
    alerts: bool = True
    log_output: bool = False
    chain: tuple[Stage, ...] = CHAIN

    def num_shards(self, stage: Stage) -> int:
        return self.shards.get(stage.name, 1) if stage.shardable else 1

    def resolved_notebooks_dir(self) -> Path:
        return Path(self.notebooks_dir) if self.notebooks_dir else default_notebooks_dir()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DagSettings":
        """Settings from the environment (what dags/niteru_chain.py uses).

        ``NITERU_RUNS_ROOT`` (required), ``NITERU_CHAIN_CONFIG`` (JSON/YAML ``{"common", "stages"}`` as for
        ``niteru run --config``), ``NITERU_SHARDS`` (``8`` for every shardable stage or ``detect=4,embed=8``),
        ``NITERU_DAG_ID``, ``NITERU_DAG_SCHEDULE`` (cron/preset; unset = manual only), ``NITERU_NOTEBOOKS``,
        ``NITERU_OUTPUT_URL``, ``NITERU_KERNEL``, ``NITERU_GPU_BACKEND`` (papermill|kubernetes),
        ``NITERU_K8S_IMAGE``/``_NAMESPACE``/``_GPUS``/``_NODE_SELECTOR`` (k=v,...)/``_PVC``/``_SERVICE_ACCOUNT``/
        ``_CPU``/``_MEMORY``/``_CONN_ID``, ``NITERU_RETRIES``, ``NITERU_MAX_ACTIVE_TASKS``, ``NITERU_ALERTS`` (0/1).
        """
        env = os.environ if env is None else env
        root = env.get("NITERU_RUNS_ROOT")
        if not root:
            raise ConfigError("NITERU_RUNS_ROOT is not set: point it at the shared run folder root "
                              "(on Cloud Composer e.g. /home/airflow/gcs/data/niteru/runs)")
        common, stages = load_chain_config(env.get("NITERU_CHAIN_CONFIG") or None)
        k8s = KubernetesSettings(
            image=env.get("NITERU_K8S_IMAGE", ""), namespace=env.get("NITERU_K8S_NAMESPACE", "default"),
            gpus=_int(env, "NITERU_K8S_GPUS", 1), node_selector=_pairs(env.get("NITERU_K8S_NODE_SELECTOR", "")),
            volume_claim=env.get("NITERU_K8S_PVC", ""), service_account=env.get("NITERU_K8S_SERVICE_ACCOUNT", ""),
            cpu=env.get("NITERU_K8S_CPU", "4"), memory=env.get("NITERU_K8S_MEMORY", "16Gi"),
            kubernetes_conn_id=env.get("NITERU_K8S_CONN_ID") or None,
        )
        settings = cls(
            runs_root=Path(root), dag_id=env.get("NITERU_DAG_ID", "niteru_chain"),
            notebooks_dir=Path(env["NITERU_NOTEBOOKS"]) if env.get("NITERU_NOTEBOOKS") else None,
            common=common, stages=stages, shards=parse_shards(env.get("NITERU_SHARDS", "1")),
            schedule=env.get("NITERU_DAG_SCHEDULE") or None, output_url=env.get("NITERU_OUTPUT_URL", ""),
            kernel_name=env.get("NITERU_KERNEL", "python3"), gpu_backend=env.get("NITERU_GPU_BACKEND", "papermill"),
            kubernetes=k8s, retries=_int(env, "NITERU_RETRIES", 1),
            max_active_tasks=_int(env, "NITERU_MAX_ACTIVE_TASKS", 16),
            alerts=env.get("NITERU_ALERTS", "1") not in ("0", "false", "no"),
        )
        check_settings(settings)
        return settings


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(env.get(key, default))
    except ValueError:
        raise ConfigError(f"{key}={env.get(key)!r} is not an integer") from None


def _pairs(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value in {text!r}, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def parse_shards(text: str, chain: Sequence[Stage] = CHAIN) -> dict[str, int]:
    """``"8"`` -> every shardable stage gets 8 shards; ``"detect=4,embed=8"`` -> per stage."""
    text = (text or "1").strip()
    shardable = [s.name for s in chain if s.shardable]
    raw = {name: text for name in shardable} if "=" not in text else _pairs(text)
    out: dict[str, int] = {}
    for name, value in raw.items():
        if name not in shardable:
            raise ConfigError(f"NITERU_SHARDS: stage '{name}' cannot be sharded (shardable: {', '.join(shardable)})")
        try:
            out[name] = int(value)
        except ValueError:
            raise ConfigError(f"NITERU_SHARDS: {name}={value!r} is not an integer") from None
        if out[name] < 1:
            raise ConfigError(f"NITERU_SHARDS: {name} needs at least 1 shard (got {out[name]})")
    return out


def load_chain_config(path: str | os.PathLike[str] | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``{"common": {...}, "stages": {...}}`` from a JSON or YAML file (the format of ``niteru run --config``)."""
    if not path:
        return {}, {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"NITERU_CHAIN_CONFIG={str(path)!r} does not exist; point it at a JSON/YAML chain config")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    return _split_conf(data, str(p))


def _split_conf(data: Any, where: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'common' and/or 'stages'")
    unknown = set(data) - {"common", "stages"}
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {sorted(unknown)}; expected 'common' and 'stages'")
    return dict(data.get("common") or {}), {k: dict(v) for k, v in (data.get("stages") or {}).items()}


def check_settings(settings: DagSettings) -> None:
    """Cheap checks at DAG-parse time (no stage module imported; full validation happens in ``init_run``)."""
    if settings.gpu_backend not in GPU_BACKENDS:
        raise ConfigError(f"gpu_backend={settings.gpu_backend!r}: use one of {GPU_BACKENDS} (NITERU_GPU_BACKEND)")
    if settings.gpu_backend == "kubernetes" and not settings.kubernetes.image:
        raise ConfigError("gpu_backend='kubernetes' needs a container image with niteru installed (NITERU_K8S_IMAGE)")
    names = {s.name for s in settings.chain}
    for name in settings.shards:
        if name not in names or not get_stage(name, settings.chain).shardable:
            raise ConfigError(f"shards given for stage '{name}', which is not a shardable stage of the chain")
    if settings.output_url and "://" not in settings.output_url and not Path(settings.output_url).is_absolute():
        raise ConfigError(f"output_url={settings.output_url!r} must be an absolute path or a URL such as gs://bucket/x")


# ==================================================================================== run resolution
def run_id_for(dag_run_id: str, when: dt.datetime) -> str:
    """A niteru run id (``YYYYmmdd-HHMMSS-xxxx``) that is stable for one DAG run, so a retried init is idempotent."""
    return f"{when.astimezone(dt.timezone.utc):%Y%m%d-%H%M%S}-{hashlib.sha256(dag_run_id.encode()).hexdigest()[:4]}"


def stage_parameters(stage: Stage, params: Mapping[str, Any], run_dir: Path,
                     shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """What the notebook receives: exactly the local runner's ``{**parameters, "run_dir": ...}`` (+ shard)."""
    out = {**params, "run_dir": str(run_dir)}
    if shard is not None:
        out.update(shard_index=shard[0], num_shards=shard[1])
    return out


def shard_key(shard: tuple[int, int]) -> str:
    return f"{shard[0]}-of-{shard[1]}"


def output_notebook(settings_output_url: str, run_dir: Path, stage: Stage, shard: tuple[int, int] | None) -> str:
    name = stage.notebook if shard is None else stage.notebook.replace(".ipynb", f".shard-{shard_key(shard)}.ipynb")
    if settings_output_url:
        return f"{settings_output_url.rstrip('/')}/{run_dir.name}/{runs.NOTEBOOKS_DIR}/{name}"
    return str(run_dir / runs.NOTEBOOKS_DIR / name)


def resolve_run_params(settings: DagSettings, run_dir: Path,
                       conf: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per-stage parameters for one run, validated exactly as the local runner validates them.

    ``conf`` (the DAG run's conf) is merged over the configured common/per-stage values.
    """
    common, stages = dict(settings.common), {k: dict(v) for k, v in settings.stages.items()}
    if conf:
        extra_common, extra_stages = _split_conf(dict(conf), "dag_run.conf")
        common.update(extra_common)
        for name, values in extra_stages.items():
            stages.setdefault(name, {}).update(values)
    for stage in settings.chain:  # the DAG sets these itself, from its shape
        given = set(SHARD_PARAMS) & (set(common) | set(stages.get(stage.name, {})))
        if stage.shardable and given:
            raise ConfigError(f"stage '{stage.name}': {sorted(given)} are set by the DAG (NITERU_SHARDS), not by "
                              "parameters")
    params = split_params(settings.chain, common, stages)
    notebooks = settings.resolved_notebooks_dir()
    for stage in settings.chain:
        n = settings.num_shards(stage)
        shard = (0, n) if stage.shardable else None
        probe = {**params[stage.name], **({"shard_index": 0, "num_shards": n} if shard else {})}
        validate_stage_params(stage, probe, run_dir)
        path = notebooks / stage.notebook
        if not path.exists():
            raise ConfigError(f"stage '{stage.name}': notebook {path} does not exist (set NITERU_NOTEBOOKS)")
        unknown = sorted(set(probe) - set(notebook_parameters(path)))
        if unknown:
            raise ConfigError(f"stage '{stage.name}': notebook {stage.notebook} declares no parameter(s) {unknown}")
    return params


@contextmanager
def manifest_lock(run_dir: Path, timeout_s: float = 120.0) -> Iterator[dict[str, Any]]:
    """Read-modify-write the manifest under a file lock (parallel shard tasks update it)."""
    from filelock import FileLock

    with FileLock(str(run_dir / MANIFEST_LOCK), timeout=timeout_s):
        manifest = runs.load_manifest(run_dir)
        yield manifest
        runs.save_manifest(run_dir, manifest)


def init_run(settings: DagSettings, dag_run_id: str, when: dt.datetime,
             conf: Mapping[str, Any] | None = None, dag_id: str | None = None) -> Path:
    """Create (or, on a retry, reuse) the run folder and its manifest; returns the run folder."""
    run_id = run_id_for(dag_run_id, when)
    run_dir = (Path(settings.runs_root) / run_id).resolve()
    params = resolve_run_params(settings, run_dir, conf)
    if (run_dir / runs.MANIFEST).exists():
        log.info("run %s already initialised (task retry); reusing %s", run_id, run_dir)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    runner = ChainRunner(runs_root=settings.runs_root, notebooks_dir=settings.resolved_notebooks_dir(),
                         kernel_name=settings.kernel_name, chain=settings.chain)
    manifest = runner.new_manifest(run_id, run_dir, settings.chain, params)  # same layout as `niteru run`
    manifest.update(status=runs.STATUS_RUNNING, started_at=runs.iso())
    manifest["orchestrator"] = {
        "kind": "airflow", "dag_id": dag_id or settings.dag_id, "dag_run_id": dag_run_id,
        "shards": {s.name: settings.num_shards(s) for s in settings.chain if s.shardable},
        "gpu_backend": settings.gpu_backend, "output_url": settings.output_url or None,
    }
    for stage in settings.chain:
        if stage.shardable:
            manifest["stages"][stage.name]["num_shards"] = settings.num_shards(stage)
    runs.save_manifest(run_dir, manifest)
    log.info("initialised run %s in %s", run_id, run_dir)
    return run_dir


# ==================================================================================== stage execution
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


NotebookExecutor = Callable[[str, str, dict[str, Any]], None]


def papermill_executor(kernel_name: str = "python3", log_output: bool = False) -> NotebookExecutor:
    def execute(nb_in: str, nb_out: str, parameters: dict[str, Any]) -> None:
        import papermill

        papermill.execute_notebook(nb_in, nb_out, parameters=parameters, kernel_name=kernel_name,
                                   progress_bar=False, log_output=log_output, cwd=parameters["run_dir"])

    return execute


def execute_stage(run_dir: Path, stage: Stage, notebooks_dir: Path, output_url: str,
                  shard: tuple[int, int] | None, executor: NotebookExecutor) -> dict[str, Any]:
    """Run one stage (or one shard of it) like :class:`ChainRunner` does, recording it in the manifest.

    Raises :class:`StageError` naming the stage, the notebook and the failing cell; a failed quality gate keeps
    its ``GateFailed: quality gate '<check>' failed`` text so alerts can name it.
    """
    from papermill.exceptions import PapermillExecutionError

    run_dir = Path(run_dir)
    stage_dir = run_dir / stage.name
    out_dir = shard_dir(stage_dir, *shard) if shard else stage_dir
    nb_in = Path(notebooks_dir) / stage.notebook
    nb_out = output_notebook(output_url, run_dir, stage, shard)
    if "://" not in nb_out:
        Path(nb_out).parent.mkdir(parents=True, exist_ok=True)
    label = stage.name if shard is None else f"{stage.name} shard {shard_key(shard)}"
    with manifest_lock(run_dir) as manifest:
        entry = manifest["stages"][stage.name]
        parameters = stage_parameters(stage, entry["parameters"], run_dir, shard)
        record = {"status": runs.STATUS_RUNNING, "started_at": runs.iso(), "output_notebook": _rel(nb_out, run_dir),
                  "input_hashes": {up: _digest(manifest["stages"][up].get("artifacts", {}))
                                   for up in stage.upstream if up in manifest["stages"]}}
        record["input_hashes"]["notebook"] = runs.sha256_file(nb_in)
        if shard is None:
            entry.pop("error", None)
            entry.update(record)
        else:
            entry.setdefault("shards", {})[shard_key(shard)] = record
            entry.setdefault("started_at", record["started_at"])
            entry["status"] = runs.STATUS_RUNNING
    (out_dir / runs.STAGE_SUMMARY).unlink(missing_ok=True)  # the summary marks completion
    log.info("%s: running %s -> %s", label, nb_in, nb_out)
    t0 = time.perf_counter()
    error = None
    gate = False
    try:
        executor(str(nb_in), nb_out, parameters)
    except PapermillExecutionError as exc:
        error = (f"stage '{stage.name}'{'' if shard is None else f' (shard {shard_key(shard)})'} failed in cell "
                 f"{exc.cell_index} (execution count {exc.exec_count}) of {nb_out}: {exc.ename}: {exc.evalue}")
        gate = exc.ename == "GateFailed"
    except Exception as exc:  # kernel died, notebook unreadable, ...
        error = f"stage '{stage.name}' could not be executed ({nb_out}): {type(exc).__name__}: {exc}"
    duration = round(time.perf_counter() - t0, 3)
    if error is None and not (out_dir / runs.STAGE_SUMMARY).exists():
        error = f"stage '{stage.name}' finished without writing {out_dir / runs.STAGE_SUMMARY}"
    summary = runs.read_stage_summary(out_dir) if error is None else {}
    with manifest_lock(run_dir) as manifest:
        entry = manifest["stages"][stage.name]
        target = entry if shard is None else entry["shards"][shard_key(shard)]
        target.update(ended_at=runs.iso(), duration_s=duration, artifacts=runs.checksum_tree(out_dir))
        if error:
            target.update(status=runs.STATUS_FAILED, error=error, gate_failed=gate)
            entry.update(status=runs.STATUS_FAILED, error=error, gate_failed=gate)
        else:
            target.update(status=runs.STATUS_SUCCEEDED, metrics=summary.get("metrics", {}),
                          counts=summary.get("counts", {}))
            if shard is None:
                entry.pop("gate_failed", None)
    if error:
        log.error(error)
        raise StageError(error)
    log.info("%s: succeeded in %.1f s", label, duration)
    return {"stage": stage.name, "shard": shard_key(shard) if shard else None, "output_notebook": nb_out,
            "duration_s": duration, "metrics": summary.get("metrics", {})}


def _rel(path: str, run_dir: Path) -> str:
    try:
        return str(Path(path).relative_to(run_dir))
    except ValueError:
        return path


def merge_stage(run_dir: Path, stage: Stage) -> dict[str, Any]:
    """Merge a sharded stage's outputs with its module's ``merge_shards(cfg)`` and record the stage as done."""
    import importlib

    run_dir = Path(run_dir)
    stage_dir = run_dir / stage.name
    t0 = time.perf_counter()
    manifest = runs.load_manifest(run_dir)
    entry = manifest["stages"][stage.name]
    n = int(entry.get("num_shards", 1))
    cfg = validate_stage_params(stage, {**entry["parameters"], "shard_index": 0, "num_shards": n}, run_dir)
    if n > 1:
        (stage_dir / runs.STAGE_SUMMARY).unlink(missing_ok=True)
        module = importlib.import_module(stage.config.partition(":")[0])
        merge = getattr(module, "merge_shards", None)
        if merge is None:
            raise ConfigError(f"stage '{stage.name}' is sharded but {module.__name__} has no merge_shards(cfg)")
        log.info("%s: merging %d shards", stage.name, n)
        merge(cfg)
    if not (stage_dir / runs.STAGE_SUMMARY).exists():
        raise StageError(f"stage '{stage.name}': merging {n} shard(s) wrote no {stage_dir / runs.STAGE_SUMMARY}")
    summary = runs.read_stage_summary(stage_dir)
    with manifest_lock(run_dir) as manifest:
        entry = manifest["stages"][stage.name]
        shards = entry.get("shards", {})
        starts = [s["started_at"] for s in shards.values() if s.get("started_at")]
        entry.update(status=runs.STATUS_SUCCEEDED, ended_at=runs.iso(), artifacts=runs.checksum_tree(stage_dir),
                     metrics=summary.get("metrics", {}), counts=summary.get("counts", {}),
                     merge_duration_s=round(time.perf_counter() - t0, 3))
        if starts:
            entry["started_at"] = min(starts)
            entry["duration_s"] = round(_seconds_between(min(starts), entry["ended_at"]), 3)
        if n > 1:
            entry["output_notebook"] = [s.get("output_notebook") for _, s in sorted(shards.items())]
        entry.pop("error", None)
    return {"stage": stage.name, "num_shards": n, "metrics": summary.get("metrics", {})}


def _seconds_between(a: str, b: str) -> float:
    return (dt.datetime.fromisoformat(b) - dt.datetime.fromisoformat(a)).total_seconds()


def finalize_run(run_dir: Path) -> dict[str, Any]:
    """Set the run's final status from its stages (all must have succeeded); raise when it failed."""
    run_dir = Path(run_dir)
    with manifest_lock(run_dir) as manifest:
        error = None
        for name in manifest["chain"]:
            entry = manifest["stages"][name]
            if entry.get("status") != runs.STATUS_SUCCEEDED:
                error = entry.get("error") or f"stage '{name}' did not finish (status {entry.get('status')!r})"
                break
        manifest["ended_at"] = runs.iso()
        if manifest.get("started_at"):
            manifest["duration_s"] = round(_seconds_between(manifest["started_at"], manifest["ended_at"]), 3)
        manifest["status"] = runs.STATUS_FAILED if error else runs.STATUS_SUCCEEDED
        if error:
            manifest["error"] = error
        else:
            manifest.pop("error", None)
    if error:
        raise StageError(f"run {run_dir.name} failed: {error}")
    return {"run_id": run_dir.name, "status": runs.STATUS_SUCCEEDED, "duration_s": manifest.get("duration_s")}


# ==================================================================================== the DAG
def _run_dir_from(context: Mapping[str, Any]) -> Path:
    value = context["ti"].xcom_pull(task_ids=INIT_TASK)
    if not value:
        raise StageError(f"no run folder from task '{INIT_TASK}' (did it succeed?)")
    return Path(value)


def _init_callable(settings: DagSettings) -> Callable[..., str]:
    def _init(**context: Any) -> str:
        dag_run = context["dag_run"]
        when = getattr(dag_run, "run_after", None) or getattr(dag_run, "logical_date", None) or runs.utcnow()
        return str(init_run(settings, dag_run.run_id, when, getattr(dag_run, "conf", None) or {}, dag_run.dag_id))

    return _init


def _merge_callable(stage: Stage) -> Callable[..., dict[str, Any]]:
    def _merge(**context: Any) -> dict[str, Any]:
        return merge_stage(_run_dir_from(context), stage)

    return _merge


def _finalize(**context: Any) -> dict[str, Any]:
    return finalize_run(_run_dir_from(context))


def notebook_operator_class() -> type:
    """:class:`NiteruNotebookOperator`: the papermill provider's operator plus niteru's run bookkeeping."""
    from airflow.providers.papermill.operators.papermill import PapermillOperator

    class NiteruNotebookOperator(PapermillOperator):
        """Runs one chain stage (or shard) through ``PapermillOperator.execute`` and records it in the manifest."""

        ui_color = "#d9ecf2"

        def __init__(self, *, stage_name: str, shard: tuple[int, int] | None, notebooks_dir: str,
                     output_url: str = "", chain: tuple[Stage, ...] = CHAIN, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.stage_name = stage_name
            self.shard = tuple(shard) if shard else None
            self.notebooks_dir = notebooks_dir
            self.output_url = output_url
            self.chain = chain

        def execute(self, context: Any) -> dict[str, Any]:  # type: ignore[override]
            stage = get_stage(self.stage_name, self.chain)

            def run_with_provider(nb_in: str, nb_out: str, parameters: dict[str, Any]) -> None:
                self.input_nb, self.output_nb, self.parameters = nb_in, nb_out, parameters
                PapermillOperator.execute(self, context)

            return execute_stage(_run_dir_from(context), stage, Path(self.notebooks_dir), self.output_url,
                                 self.shard, run_with_provider)  # type: ignore[arg-type]

    return NiteruNotebookOperator


def _stage_task(settings: DagSettings, stage: Stage, shard: tuple[int, int] | None, task_id: str,
                callbacks: dict[str, Any]) -> Any:
    notebooks = str(settings.resolved_notebooks_dir())
    if stage.gpu and settings.gpu_backend == "kubernetes":
        return _kubernetes_task(settings, stage, shard, task_id, notebooks, callbacks)
    operator = notebook_operator_class()
    return operator(task_id=task_id, stage_name=stage.name, shard=shard, notebooks_dir=notebooks,
                    output_url=settings.output_url, chain=settings.chain, kernel_name=settings.kernel_name,
                    log_output=settings.log_output, **callbacks)


def _kubernetes_task(settings: DagSettings, stage: Stage, shard: tuple[int, int] | None, task_id: str,
                     notebooks: str, callbacks: dict[str, Any]) -> Any:
    """A GPU pod running ``python -m niteru.airflow_dag run-stage`` with the run folder mounted at the same path."""
    try:
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from kubernetes.client import models as k8s
    except ImportError:
        raise ConfigError("gpu_backend='kubernetes' needs apache-airflow-providers-cncf-kubernetes "
                          "(pip install -r requirements-airflow.txt)") from None
    k = settings.kubernetes
    args = ["-m", "niteru.airflow_dag", "run-stage", "--run-dir", "{{ ti.xcom_pull(task_ids='%s') }}" % INIT_TASK,
            "--stage", stage.name, "--notebooks-dir", notebooks, "--kernel", settings.kernel_name]
    if shard:
        args += ["--shard-index", str(shard[0]), "--num-shards", str(shard[1])]
    if settings.output_url:
        args += ["--output-url", settings.output_url]
    limits = {"cpu": k.cpu, "memory": k.memory, "nvidia.com/gpu": str(k.gpus)}
    volumes, mounts = [], []
    if k.volume_claim:
        volumes = [k8s.V1Volume(name="niteru-runs", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=k.volume_claim))]
        mounts = [k8s.V1VolumeMount(name="niteru-runs", mount_path=str(settings.runs_root))]
    return KubernetesPodOperator(
        task_id=task_id, name=f"niteru-{stage.name}" + (f"-{shard[0]}" if shard else ""), namespace=k.namespace,
        image=k.image, cmds=["python"], arguments=args, in_cluster=k.in_cluster, container_resources=k8s.V1ResourceRequirements(requests=limits, limits=limits),
        node_selector=k.node_selector or None, volumes=volumes, volume_mounts=mounts,
        tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        service_account_name=k.service_account or None, get_logs=True, on_finish_action="delete_pod",
        env_vars={"NITERU_RUNS_ROOT": str(settings.runs_root), "BENTOML_DO_NOT_TRACK": "true"},
        **({"kubernetes_conn_id": k.kubernetes_conn_id} if k.kubernetes_conn_id else {}), **callbacks,
    )


def build_dag(settings: DagSettings) -> "DAG":
    """The Airflow DAG for ``settings.chain``: init -> stages (sharded ones fanned out + merged) -> finalize."""
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG, TaskGroup, TriggerRule

    check_settings(settings)
    callbacks: dict[str, Any] = {}
    if settings.alerts:
        from niteru.alerts import airflow_failure_callback

        callbacks["on_failure_callback"] = airflow_failure_callback
    default_args = {"retries": settings.retries, "retry_delay": dt.timedelta(seconds=settings.retry_delay_s)}
    with DAG(
        dag_id=settings.dag_id, schedule=settings.schedule, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
        catchup=False, max_active_runs=1, max_active_tasks=settings.max_active_tasks, default_args=default_args,
        tags=["niteru"], doc_md=__doc__,
    ) as dag:
        init = PythonOperator(task_id=INIT_TASK, python_callable=_init_callable(settings), **callbacks)
        ends: dict[str, Any] = {}  # stage -> the task that completes it
        for stage in settings.chain:
            n = settings.num_shards(stage)
            if stage.shardable:
                with TaskGroup(group_id=stage.name) as group:
                    shards = [_stage_task(settings, stage, (i, n), f"shard_{i}", callbacks) for i in range(n)]
                    merge = PythonOperator(task_id="merge", python_callable=_merge_callable(stage), **callbacks)
                    shards >> merge
                start: Any = group
                ends[stage.name] = merge
            else:
                start = ends[stage.name] = _stage_task(settings, stage, None, stage.name, callbacks)
            init >> start
            for up in stage.upstream:
                ends[up] >> start
        final = PythonOperator(task_id=FINAL_TASK, python_callable=_finalize, trigger_rule=TriggerRule.ALL_DONE,
                               retries=0)
        list(ends.values()) >> final
    return dag


def build_sla_dag(runs_root: str | os.PathLike[str], deadline: str, dag_id: str = "niteru_sla",
                  window_h: float = 24.0) -> "DAG":
    """A daily DAG that runs :func:`niteru.alerts.check_sla` at the deadline (alerts and fails on a miss)."""
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG

    from niteru.alerts import check_sla

    hh, _, mm = deadline.partition(":")
    if not (hh.isdigit() and mm.isdigit()):
        raise ConfigError(f"SLA deadline {deadline!r} must be HH:MM (UTC), e.g. 06:00 (NITERU_SLA_DEADLINE)")

    def _check(**_: Any) -> dict[str, Any]:
        result = check_sla(runs_root, deadline, runs.utcnow(), window_h=window_h)
        if not result.ok:
            raise StageError(f"SLA missed: {result.message}")
        return result.to_dict()

    with DAG(dag_id=dag_id, schedule=f"{int(mm)} {int(hh)} * * *", catchup=False, tags=["niteru"],
             start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), max_active_runs=1) as dag:
        PythonOperator(task_id="check_sla", python_callable=_check, retries=0)
    return dag


# ==================================================================================== CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m niteru.airflow_dag",
                                     description="Airflow helpers for the niteru chain.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run-stage", help="run one stage/shard into an initialised run folder (Kubernetes pods)")
    run.add_argument("--run-dir", required=True)
    run.add_argument("--stage", required=True)
    run.add_argument("--shard-index", type=int, default=None)
    run.add_argument("--num-shards", type=int, default=None)
    run.add_argument("--notebooks-dir", default=None)
    run.add_argument("--output-url", default="")
    run.add_argument("--kernel", default="python3")
    show = sub.add_parser("show", help="validate the NITERU_* settings and print the task graph")
    show.add_argument("--validate", action="store_true", help="also validate every stage's parameters")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "run-stage":
        stage = get_stage(args.stage)
        shard = None
        if args.num_shards is not None:
            shard = (args.shard_index or 0, args.num_shards)
        notebooks = Path(args.notebooks_dir) if args.notebooks_dir else default_notebooks_dir()
        result = execute_stage(Path(args.run_dir), stage, notebooks, args.output_url, shard,
                               papermill_executor(args.kernel))
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        return 0
    settings = DagSettings.from_env()
    if args.validate:
        resolve_run_params(settings, Path(settings.runs_root).resolve() / "_validate")
    for stage in settings.chain:
        n = settings.num_shards(stage)
        where = "kubernetes GPU pod" if stage.gpu and settings.gpu_backend == "kubernetes" else "papermill"
        sys.stdout.write(f"{stage.name:9s} {stage.notebook:18s} shards={n} ({where}) "
                         f"upstream={','.join(stage.upstream) or '-'}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = [
    "DagSettings", "KubernetesSettings", "build_dag", "build_sla_dag", "execute_stage", "finalize_run", "init_run",
    "merge_stage", "notebook_operator_class", "parse_shards", "resolve_run_params", "run_id_for", "stage_parameters",
]
