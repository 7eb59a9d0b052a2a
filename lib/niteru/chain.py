"""The chain, declared once, and its papermill runner.

``CHAIN`` lists the ordered stages (notebook, config class, upstream stages). The local
:class:`ChainRunner` executes them through papermill's Python API into ``runs/<run_id>/``; the Airflow
DAG (:mod:`niteru.airflow_dag`) is generated from the same declaration.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from niteru import runs
from niteru.config import StageConfig
from niteru.errors import ConfigError, StageError

log = logging.getLogger(__name__)

#: Parameters that the runner sets itself; callers may not pass them per stage.
RUNNER_OWNED = frozenset({"run_dir"})


@dataclass(frozen=True)
class Stage:
    """One chain stage: a parameterised notebook backed by one library module."""

    name: str
    notebook: str
    config: str | type[StageConfig]  # "module:ConfigClass", imported lazily (heavy modules stay unimported)
    upstream: tuple[str, ...] = ()
    shardable: bool = False
    gpu: bool = False

    def config_class(self) -> type[StageConfig]:
        if isinstance(self.config, type):
            return self.config
        module, _, attr = self.config.partition(":")
        return getattr(importlib.import_module(module), attr)


CHAIN: tuple[Stage, ...] = (
    Stage("extract", "01_extract.ipynb", "niteru.extract:ExtractConfig"),
    Stage("detect", "02_detect.ipynb", "niteru.detect:DetectConfig", ("extract",), shardable=True, gpu=True),
    Stage("embed", "03_embed.ipynb", "niteru.embed:EmbedConfig", ("extract", "detect"), shardable=True, gpu=True),
    Stage("index", "04_index.ipynb", "niteru.index:IndexConfig", ("extract", "embed")),
    Stage("evaluate", "05_evaluate.ipynb", "niteru.evaluate:EvaluateConfig", ("extract", "embed", "index")),
    Stage("package", "06_package.ipynb", "niteru.package:PackageConfig", ("extract", "detect", "embed", "index", "evaluate")),
)
STAGE_NAMES = tuple(s.name for s in CHAIN)


def get_stage(name: str, chain: Iterable[Stage] = CHAIN) -> Stage:
    for stage in chain:
        if stage.name == name:
            return stage
    raise ConfigError(f"unknown stage {name!r}; the chain has: {', '.join(s.name for s in chain)}")


def default_notebooks_dir() -> Path:
    """The repository's notebooks/ folder (the package is installed editable from lib/)."""
    env = os.environ.get("NITERU_NOTEBOOKS")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "notebooks" / CHAIN[0].notebook).exists():
            return parent / "notebooks"
    raise ConfigError("cannot find the notebooks/ folder; set NITERU_NOTEBOOKS to its path")


# ------------------------------------------------------------------------------ parameter handling
def split_params(chain: Iterable[Stage], common: Mapping[str, Any] | None,
                 per_stage: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Resolve the explicit parameters of every stage; unknown names are errors, not warnings.

    ``common`` values go to every stage whose config has that field (e.g. ``seed``, ``device``,
    ``cache_dir``); each must be known to at least one stage.
    """
    chain = tuple(chain)
    common = dict(common or {})
    per_stage = {k: dict(v) for k, v in (per_stage or {}).items()}
    errors: list[str] = []
    for name in per_stage:
        if name not in {s.name for s in chain}:
            errors.append(f"parameters given for unknown stage '{name}' (stages: {', '.join(s.name for s in chain)})")
    owned = (RUNNER_OWNED & set(common)) | {k for v in per_stage.values() for k in RUNNER_OWNED & set(v)}
    if owned:
        errors.append(f"parameter(s) {sorted(owned)} are set by the runner and cannot be passed")
    fields = {s.name: set(s.config_class().model_fields) for s in chain}
    for key in common:
        if not any(key in f for f in fields.values()):
            errors.append(f"unknown common parameter '{key}': no stage has it")
    if errors:
        raise ConfigError("invalid chain parameters:\n  - " + "\n  - ".join(errors))
    resolved: dict[str, dict[str, Any]] = {}
    for stage in chain:
        own = {k: v for k, v in common.items() if k in fields[stage.name]}
        own.update(per_stage.get(stage.name, {}))
        resolved[stage.name] = own
    return resolved


def validate_stage_params(stage: Stage, params: Mapping[str, Any], run_dir: Path) -> StageConfig:
    """Build the stage config exactly as the notebook will (raises ConfigError naming each bad field)."""
    try:
        return stage.config_class().from_params({**params, "run_dir": str(run_dir)})
    except ConfigError as exc:
        raise ConfigError(f"stage '{stage.name}': {exc}") from None


def notebook_parameters(path: Path) -> dict[str, Any]:
    """Names and defaults declared in a notebook's ``parameters`` cell (papermill's inspector)."""
    import papermill

    return {name: info for name, info in papermill.inspect_notebook(str(path)).items()}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------- runner
@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    status: str
    manifest: dict[str, Any]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == runs.STATUS_SUCCEEDED


EventHook = Callable[[dict[str, Any]], None]


@dataclass
class ChainRunner:
    """Runs the chain stage by stage with papermill, recording everything in the run folder."""

    runs_root: Path = Path("runs")
    notebooks_dir: Path | None = None
    kernel_name: str = "python3"
    chain: tuple[Stage, ...] = CHAIN
    log_output: bool = False
    hooks: list[EventHook] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.runs_root = Path(self.runs_root).resolve()
        self.notebooks_dir = Path(self.notebooks_dir) if self.notebooks_dir else default_notebooks_dir()

    # ------------------------------------------------------------------ public API
    def run(self, common: Mapping[str, Any] | None = None,
            stages: Mapping[str, Mapping[str, Any]] | None = None, run_id: str | None = None,
            until: str | None = None) -> RunResult:
        """Validate every stage's parameters, then execute the chain (up to ``until``) in a new run."""
        chain = self._select(until)
        params = split_params(chain, common, stages)
        run_id = run_id or runs.new_run_id()
        run_dir = self.runs_root / run_id
        if (run_dir / runs.MANIFEST).exists():
            raise ConfigError(f"run {run_id!r} already exists in {self.runs_root}; use --resume {run_id}")
        configs = {}
        for stage in chain:  # all validation happens before anything executes
            configs[stage.name] = validate_stage_params(stage, params[stage.name], run_dir)
            self._check_notebook(stage, params[stage.name])
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.new_manifest(run_id, run_dir, chain, params)
        manifest["source"] = getattr(configs.get("extract"), "source", manifest["source"])
        runs.save_manifest(run_dir, manifest)
        return self._execute(run_dir, manifest, chain)

    def resume(self, run_id: str, common: Mapping[str, Any] | None = None,
               stages: Mapping[str, Mapping[str, Any]] | None = None) -> RunResult:
        """Continue a run from its first incomplete stage; finished stages whose artifacts still match
        their recorded sha256s are not recomputed.

        Parameter overrides (same form as :meth:`run`) are merged into the recorded ones; a stage whose
        parameters change is re-run with everything downstream of it, e.g.
        ``resume(run_id, stages={"extract": {"retry_failed": True}})`` re-fetches only the failed images.
        """
        run_dir = self.runs_root / run_id
        manifest = runs.load_manifest(run_dir)
        chain = tuple(get_stage(n, self.chain) for n in manifest["chain"])
        overrides = split_params(chain, common, stages) if (common or stages) else {}
        for stage in chain:
            entry = manifest["stages"][stage.name]
            merged = {**entry["parameters"], **overrides.get(stage.name, {})}
            validate_stage_params(stage, merged, run_dir)
            if merged != entry["parameters"]:
                self._check_notebook(stage, merged)
                entry.setdefault("parameter_history", []).append(entry["parameters"])
                entry["parameters"] = merged
                entry["status"] = runs.STATUS_PENDING  # changed parameters: recompute this stage and downstream
        return self._execute(run_dir, manifest, chain)

    # ------------------------------------------------------------------ internals
    def _select(self, until: str | None) -> tuple[Stage, ...]:
        if until is None:
            return self.chain
        names = [s.name for s in self.chain]
        get_stage(until, self.chain)
        return self.chain[: names.index(until) + 1]

    def _check_notebook(self, stage: Stage, params: Mapping[str, Any]) -> None:
        path = self.notebooks_dir / stage.notebook
        if not path.exists():
            raise ConfigError(f"stage '{stage.name}': notebook {path} does not exist")
        declared = notebook_parameters(path)
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise ConfigError(f"stage '{stage.name}': notebook {stage.notebook} declares no parameter(s) {unknown}")

    def new_manifest(self, run_id: str, run_dir: Path, chain: tuple[Stage, ...],
                      params: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            "schema": 1,
            "run_id": run_id,
            "run_dir": str(run_dir),
            "status": runs.STATUS_PENDING,
            "source": params.get("extract", {}).get("source"),
            "created_at": runs.iso(),
            "started_at": None,
            "ended_at": None,
            "duration_s": None,
            "git": runs.git_info(self.notebooks_dir),
            "versions": runs.package_versions(),
            "kernel": self.kernel_name,
            "chain": [s.name for s in chain],
            "stages": {
                s.name: {
                    "notebook": s.notebook,
                    "upstream": list(s.upstream),
                    "parameters": params[s.name],
                    "status": runs.STATUS_PENDING,
                }
                for s in chain
            },
        }

    def _stage_is_reusable(self, run_dir: Path, entry: dict[str, Any], stage: Stage) -> bool:
        if entry.get("status") != runs.STATUS_SUCCEEDED:
            return False
        recorded = entry.get("artifacts") or {}
        current = runs.checksum_tree(run_dir / stage.name)
        if recorded != current:
            log.warning("stage %s: artifacts differ from the manifest's checksums; recomputing", stage.name)
            return False
        return True

    def _execute(self, run_dir: Path, manifest: dict[str, Any], chain: tuple[Stage, ...]) -> RunResult:
        from filelock import FileLock, Timeout

        lock = FileLock(str(run_dir / ".run.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise ConfigError(f"run {run_dir.name} is being executed by another process ({run_dir}/.run.lock)") from None
        try:
            return self._execute_locked(run_dir, manifest, chain)
        finally:
            lock.release()

    def _execute_locked(self, run_dir: Path, manifest: dict[str, Any], chain: tuple[Stage, ...]) -> RunResult:
        t_run = time.perf_counter()
        manifest["status"] = runs.STATUS_RUNNING
        manifest["started_at"] = manifest.get("started_at") or runs.iso()
        manifest.pop("error", None)
        runs.save_manifest(run_dir, manifest)
        self._emit("run_started", manifest)
        upstream_changed = False
        error: str | None = None
        for index, stage in enumerate(chain, start=1):
            entry = manifest["stages"][stage.name]
            if not upstream_changed and self._stage_is_reusable(run_dir, entry, stage):
                log.info("stage %s: complete and verified by checksums; skipped", stage.name)
                entry["reused"] = entry.get("reused", 0) + 1
                continue
            upstream_changed = True
            error = self._run_stage(run_dir, manifest, stage, index)
            runs.save_manifest(run_dir, manifest)
            if error:
                break
        manifest["ended_at"] = runs.iso()
        manifest["duration_s"] = round((manifest.get("duration_s") or 0.0) + time.perf_counter() - t_run, 3)
        manifest["status"] = runs.STATUS_FAILED if error else runs.STATUS_SUCCEEDED
        if error:
            manifest["error"] = error
        runs.save_manifest(run_dir, manifest)
        self._emit("run_failed" if error else "run_succeeded", manifest)
        return RunResult(manifest["run_id"], run_dir, manifest["status"], manifest, error)

    def _run_stage(self, run_dir: Path, manifest: dict[str, Any], stage: Stage, index: int) -> str | None:
        import papermill
        from papermill.exceptions import PapermillExecutionError

        entry = manifest["stages"][stage.name]
        stage_dir = run_dir / stage.name
        nb_in = self.notebooks_dir / stage.notebook
        nb_out = run_dir / runs.NOTEBOOKS_DIR / stage.notebook
        nb_out.parent.mkdir(parents=True, exist_ok=True)
        (stage_dir / runs.STAGE_SUMMARY).unlink(missing_ok=True)  # the summary marks completion
        entry.update(status=runs.STATUS_RUNNING, started_at=runs.iso(), output_notebook=str(nb_out.relative_to(run_dir)))
        entry.pop("error", None)
        entry["input_hashes"] = {
            up: _digest(manifest["stages"][up].get("artifacts", {})) for up in stage.upstream if up in manifest["stages"]
        }
        entry["input_hashes"]["notebook"] = runs.sha256_file(nb_in)
        runs.save_manifest(run_dir, manifest)
        self._emit("stage_started", manifest, stage=stage.name)
        log.info("stage %d/%d %s: running %s", index, len(manifest["chain"]), stage.name, stage.notebook)
        t0 = time.perf_counter()
        parameters = {**entry["parameters"], "run_dir": str(run_dir)}
        error = None
        try:
            papermill.execute_notebook(
                str(nb_in), str(nb_out), parameters=parameters, kernel_name=self.kernel_name,
                progress_bar=False, log_output=self.log_output, cwd=str(run_dir),
            )
        except PapermillExecutionError as exc:
            error = (f"stage '{stage.name}' failed in cell {exc.cell_index} (execution count {exc.exec_count}) of "
                     f"{nb_out}: {exc.ename}: {exc.evalue}")
            entry["gate_failed"] = exc.ename == "GateFailed"
        except Exception as exc:  # kernel died, notebook unreadable, ...
            error = f"stage '{stage.name}' could not be executed ({nb_out}): {type(exc).__name__}: {exc}"
        entry["ended_at"] = runs.iso()
        entry["duration_s"] = round(time.perf_counter() - t0, 3)
        if error is None and not (stage_dir / runs.STAGE_SUMMARY).exists():
            error = f"stage '{stage.name}' finished without writing {stage_dir / runs.STAGE_SUMMARY}"
        entry["artifacts"] = runs.checksum_tree(stage_dir)
        if error:
            entry["status"] = runs.STATUS_FAILED
            entry["error"] = error
            log.error(error)
            self._emit("stage_failed", manifest, stage=stage.name, error=error)
            return error
        summary = runs.read_stage_summary(stage_dir)
        entry["metrics"] = summary.get("metrics", {})
        entry["counts"] = summary.get("counts", {})
        entry["status"] = runs.STATUS_SUCCEEDED
        self._emit("stage_succeeded", manifest, stage=stage.name)
        return None

    def _emit(self, event: str, manifest: dict[str, Any], **extra: Any) -> None:
        payload = {"event": event, "run_id": manifest["run_id"], "run_dir": manifest.get("run_dir"),
                   "status": manifest.get("status"), **extra}
        for hook in self.hooks:
            try:
                hook(payload)
            except Exception:  # a broken alert hook must never break the run
                log.exception("event hook %r failed for %s", hook, event)


def raise_for_result(result: RunResult) -> RunResult:
    if not result.ok:
        raise StageError(result.error or f"run {result.run_id} failed")
    return result
