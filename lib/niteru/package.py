"""Package stage: put the evaluated model + index into the BentoML model store and build the bento.

Inputs (run folder): ``evaluate/`` (the gate verdict), ``embed/model.json`` (the embedder),
``detect/detector.json`` (the detector and crop policy), ``index/`` (Annoy index, id map, vectors,
sidecar) and ``extract/catalog.parquet`` (the availability snapshot). Packaging refuses to run when
the evaluation gate failed (:class:`niteru.errors.GateFailed`).

One BentoML model (default name ``niteru``) holds everything the service needs, so a model tag pins
a consistent embedder + index pair::

    embedder.json / embedder.pt   Embedder.export(): config and state dict (torch.save, weights_only-safe)
    embed_model.json              the embed stage's model.json
    detector.json                 detector spec + crop policy (+ detector_weights.pt when it has a file)
    index/                        index.ann, index.json, idmap.parquet, vectors.npy
    availability.parquet          product_id, in_stock, price of the catalog snapshot
    manifest.json                 run id, model id, gate metrics, sha256 of every file, versions

Labels carry the run id, model id and headline metrics. The bento is then built from
``bentos/niteru_search`` with ``bentoml build`` (offline: ``lock_packages: false``, ``uv`` on PATH)
with ``NITERU_MODEL_TAG`` set to the new model's tag, and ``package/package.json`` records both tags.
:func:`load_bundle` is the inverse used by the service.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from niteru.config import StageConfig
from niteru.errors import ConfigError, GateFailed, StageError
from niteru.io import read_json, sha256_file, write_json_atomic, write_parquet_atomic
from niteru.runs import git_info, package_versions, write_stage_summary

if TYPE_CHECKING:
    import pandas as pd

    from niteru.index import LoadedIndex

log = logging.getLogger(__name__)

MODEL_NAME = "niteru"
SERVICE_DIR_NAME = "niteru_search"
MANIFEST_FILE = "manifest.json"
EMBEDDER_CONFIG = "embedder.json"
EMBEDDER_STATE = "embedder.pt"
EMBED_MODEL_JSON = "embed_model.json"
DETECTOR_FILE = "detector.json"
DETECTOR_WEIGHTS = "detector_weights.pt"
INDEX_DIR = "index"
AVAILABILITY_FILE = "availability.parquet"
PACKAGE_FILE = "package.json"
BUNDLE_SCHEMA = 1

#: Headline evaluation metrics copied into the model labels.
LABEL_METRICS = ("recall@10", "recall@50", "precision@10", "map@10", "self_first_rate")


class PackageConfig(StageConfig):
    """Parameters of the package stage (notebooks/06_package.ipynb)."""

    stage: ClassVar[str] = "package"

    model_name: str = Field(MODEL_NAME, description="BentoML model name in the local model store")
    bento_dir: str = Field("", description="service folder with bentofile.yaml; '' = the repository's bentos/niteru_search")
    build_bento: bool = Field(True, description="build the bento after storing the model")
    crop_policy: str = Field("", description="crop policy the service uses for query images; '' = the detect stage's")


@dataclass(frozen=True)
class PackageResult:
    package_dir: Path
    model_tag: str
    bento_tag: str | None
    manifest: dict[str, Any]


# ------------------------------------------------------------------------------------------- gate
def check_gate(evaluate_dir: Path) -> dict[str, Any]:
    """Return the evaluation metrics; raise :class:`GateFailed` when the gate failed or did not run."""
    metrics_path = evaluate_dir / "metrics.json"
    if not metrics_path.exists():
        raise ConfigError(f"{metrics_path} is missing: run the evaluate stage before packaging")
    metrics = read_json(metrics_path)
    failed = [c for c in metrics.get("checks", []) if not c.get("passed", False)]
    if not metrics.get("passed", False) or failed:
        names = ", ".join(c.get("name", "?") for c in failed) or "unknown check"
        raise GateFailed(failed[0].get("name", "evaluate") if failed else "evaluate",
                         f"the evaluation gate failed ({names}); refusing to package {evaluate_dir.parent.name}. "
                         f"See {evaluate_dir / 'report.html'}")
    if not (evaluate_dir / "stage.json").exists():
        raise ConfigError(f"{evaluate_dir} has metrics but no stage.json: the evaluate stage did not finish; re-run it")
    return metrics


def headline_labels(run_id: str, model_id: str, metrics: dict[str, Any]) -> dict[str, str]:
    labels = {"run_id": run_id, "model_id": _label(model_id), "gate": "passed"}
    for key in LABEL_METRICS:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            labels[key.replace("@", "_at_")] = f"{value:.4f}"
    return labels


def _label(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", str(value))[:63]


# ------------------------------------------------------------------------------------------- store
def stage_bundle(cfg: PackageConfig, dest: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write the bundle files into ``dest`` (a BentoML model folder); return the manifest."""
    import pandas as pd
    import torch

    from niteru.embed import load_embedder
    from niteru.index import load_index

    run = cfg.run_path
    embed_dir, index_dir = cfg.upstream_dir("embed"), cfg.upstream_dir("index")
    extract_dir = cfg.upstream_dir("extract")
    model_json = read_json(embed_dir / "model.json")
    embedder = load_embedder(embed_dir / "model.json", device="cpu")
    loaded = load_index(index_dir, expected_model_id=embedder.model_id, verify_checksums=True)
    n_items, index_meta = loaded.n_items, dict(loaded.meta)
    loaded.unload()

    config, state = embedder.export()
    write_json_atomic(dest / EMBEDDER_CONFIG, config)
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, dest / EMBEDDER_STATE)
    write_json_atomic(dest / EMBED_MODEL_JSON, model_json)

    detector = detector_record(run / "detect" / DETECTOR_FILE, dest, cfg.crop_policy)
    write_json_atomic(dest / DETECTOR_FILE, detector)

    (dest / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    for path in sorted(index_dir.iterdir()):
        if path.is_file() and path.name != "stage.json" and not path.name.startswith("."):
            shutil.copy2(path, dest / INDEX_DIR / path.name)

    catalog = pd.read_parquet(extract_dir / "catalog.parquet")
    if "fetch_status" in catalog.columns:
        catalog = catalog[catalog["fetch_status"] == "ok"]
    cols = [c for c in ("product_id", "in_stock", "price") if c in catalog.columns]
    write_parquet_atomic(dest / AVAILABILITY_FILE, catalog[cols].reset_index(drop=True))

    search_k = metrics.get("recommended_search_k")
    manifest = {
        "schema": BUNDLE_SCHEMA,
        "run_id": cfg.run_id,
        "run_dir": str(run),
        "model_id": embedder.model_id,
        "dim": int(embedder.dim),
        "n_items": n_items,
        "index": {k: index_meta.get(k) for k in ("n_trees", "search_k", "seed", "metric", "model_id")},
        "search_k": int(search_k) if isinstance(search_k, (int, float)) else None,
        "crop_policy": detector["policy"],
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))},
        "git": git_info(),
        "versions": package_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest["files"] = {p.relative_to(dest).as_posix(): sha256_file(p)
                         for p in sorted(dest.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    write_json_atomic(dest / MANIFEST_FILE, manifest)
    return manifest


def detector_record(path: Path, dest: Path, crop_policy: str = "") -> dict[str, Any]:
    """The detect stage's detector.json made self-contained (weights file copied into the bundle)."""
    if path.exists():
        record = read_json(path)
    else:
        log.warning("%s is missing: the service will embed whole query images", path)
        record = {"spec": {"name": "whole"}, "policy": "whole", "min_score": 0.0}
    spec = dict(record.get("spec", record))
    weights = spec.get("weights")
    if weights and not str(weights).startswith(("bentoml:", "torchvision:", "random")) and Path(weights).is_file():
        shutil.copy2(weights, dest / DETECTOR_WEIGHTS)
        spec["weights"] = DETECTOR_WEIGHTS
    policy = crop_policy or record.get("policy", "largest")
    return {"spec": spec, "policy": policy, "min_score": float(record.get("min_score", 0.0)),
            "detector_id": record.get("detector_id")}


def store_model(cfg: PackageConfig, metrics: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Create the BentoML model from the run folder; return ``(tag, manifest)``."""
    import bentoml

    model_id = read_json(cfg.upstream_dir("embed") / "model.json").get("model_id", "")
    labels = headline_labels(cfg.run_id, model_id, metrics)
    with bentoml.models.create(cfg.model_name, labels=labels, metadata={"run_id": cfg.run_id, "model_id": model_id},
                               module="niteru.package") as model:
        manifest = stage_bundle(cfg, Path(model.path), metrics)
    tag = str(model.tag)
    log.info("stored %s (%d items, model %s)", tag, manifest["n_items"], manifest["model_id"])
    return tag, manifest


# ------------------------------------------------------------------------------------------- bento
def default_bento_dir() -> Path:
    env = os.environ.get("NITERU_BENTO_DIR")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        if (parent / "bentos" / SERVICE_DIR_NAME / "bentofile.yaml").exists():
            return parent / "bentos" / SERVICE_DIR_NAME
    raise ConfigError("cannot find bentos/niteru_search/bentofile.yaml; set bento_dir or NITERU_BENTO_DIR")


def bentoml_env(model_tag: str | None = None) -> dict[str, str]:
    """Environment for bentoml subprocesses: no telemetry, this venv's ``uv`` on PATH, the model tag."""
    env = dict(os.environ)
    env["BENTOML_DO_NOT_TRACK"] = "true"
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if model_tag:
        env["NITERU_MODEL_TAG"] = model_tag
    return env


def build_bento(bento_dir: Path, model_tag: str, labels: dict[str, str] | None = None, timeout_s: int = 600) -> str:
    """``bentoml build`` the service folder against ``model_tag``; return the bento tag."""
    if shutil.which("uv", path=bentoml_env()["PATH"]) is None:
        raise ConfigError("`uv` is not on PATH: bentoml build needs it for offline builds; pip install uv")
    bento_dir = Path(bento_dir).resolve()
    if not (bento_dir / "bentofile.yaml").is_file():
        raise ConfigError(f"{bento_dir} has no bentofile.yaml: point bento_dir at the service folder")
    cmd = [str(Path(sys.executable).parent / "bentoml"), "build", ".", "--output", "tag"]
    if not Path(cmd[0]).exists():
        cmd[:1] = [sys.executable, "-m", "bentoml"]
    for key, value in (labels or {}).items():
        cmd += ["--label", f"{key}={value}"]
    # bentoml only reads files below the working directory: build from inside the service folder
    proc = subprocess.run(cmd, env=bentoml_env(model_tag), cwd=bento_dir, capture_output=True, text=True,
                          timeout=timeout_s)
    match = re.search(r"__tag__:(\S+)", proc.stdout)
    if proc.returncode != 0 or not match:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise StageError(f"bentoml build of {bento_dir} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return match.group(1)


def run(cfg: PackageConfig) -> PackageResult:
    """Gate check, model store, bento build, ``package/package.json``."""
    t0 = time.perf_counter()
    metrics = check_gate(cfg.run_path / "evaluate")
    model_tag, manifest = store_model(cfg, metrics)
    bento_tag = None
    build_s = 0.0
    if cfg.build_bento:
        t_build = time.perf_counter()
        bento_dir = Path(cfg.bento_dir) if cfg.bento_dir else default_bento_dir()
        bento_tag = build_bento(bento_dir, model_tag, labels={"run_id": cfg.run_id, "model": model_tag.replace(":", "_")})
        build_s = time.perf_counter() - t_build
        log.info("built bento %s", bento_tag)
    out = cfg.stage_dir()
    record = {"model_tag": model_tag, "bento_tag": bento_tag, "run_id": cfg.run_id, "model_id": manifest["model_id"],
              "n_items": manifest["n_items"], "labels": headline_labels(cfg.run_id, manifest["model_id"], metrics),
              "files": manifest["files"]}
    write_json_atomic(out / PACKAGE_FILE, record)
    size_mb = sum(p.stat().st_size for p in Path(_model_path(model_tag)).rglob("*") if p.is_file()) / 2**20
    write_stage_summary(out, metrics={"model_mb": round(size_mb, 3), "bento_build_seconds": round(build_s, 3)},
                        counts={"n_items": manifest["n_items"], "n_files": len(manifest["files"])},
                        model_tag=model_tag, bento_tag=bento_tag, total_seconds=round(time.perf_counter() - t0, 3))
    return PackageResult(out, model_tag, bento_tag, manifest)


def bundle_files(model_tag: str) -> "pd.DataFrame":
    """The files of a packaged model with their size (MiB) and sha256 (for notebooks and audits)."""
    import pandas as pd

    folder = Path(_model_path(model_tag))
    manifest = read_json(folder / MANIFEST_FILE)
    rows = [{"file": name, "MiB": round((folder / name).stat().st_size / 2**20, 4), "sha256": digest}
            for name, digest in manifest["files"].items()]
    return pd.DataFrame(rows)


def _model_path(tag: str) -> str:
    import bentoml

    return bentoml.models.get(tag).path


# ------------------------------------------------------------------------------------------- load
@dataclass
class Bundle:
    """Everything the service loads from one model: embedder, detector, crop policy, index."""

    path: Path
    manifest: dict[str, Any]
    embedder: Any  # niteru.embed.Embedder
    detector: Any  # niteru.detect.Detector
    crop_policy: str
    min_score: float
    index: "LoadedIndex"

    @property
    def availability_path(self) -> Path:
        return self.path / AVAILABILITY_FILE


def load_bundle(model_dir: str | os.PathLike[str], device: str = "cpu", verify: bool = True,
                runtime: str = "auto") -> Bundle:
    """Rebuild the service's components from a packaged model folder (see the module docstring)."""
    import torch

    from niteru.detect import load_detector
    from niteru.embed import Embedder
    from niteru.index import load_index

    folder = Path(model_dir)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.exists():
        raise ConfigError(f"{folder} is not a niteru model (no {MANIFEST_FILE}); package a run first")
    manifest = read_json(manifest_path)
    if verify:
        bad = [name for name, digest in manifest.get("files", {}).items()
               if not (folder / name).exists() or sha256_file(folder / name) != digest]
        if bad:
            raise ConfigError(f"model {folder} is corrupt: {bad} do not match the manifest's sha256; re-package")
    state = torch.load(folder / EMBEDDER_STATE, map_location="cpu", weights_only=True)
    embedder = Embedder.from_export(read_json(folder / EMBEDDER_CONFIG), state, device=device, runtime=runtime)
    record = read_json(folder / DETECTOR_FILE)
    spec = dict(record["spec"])
    if spec.get("weights") == DETECTOR_WEIGHTS:
        spec["weights"] = str(folder / DETECTOR_WEIGHTS)
    detector = load_detector(spec, device=device)
    index = load_index(folder / INDEX_DIR, expected_model_id=embedder.model_id)
    return Bundle(folder, manifest, embedder, detector, record.get("policy", "largest"),
                  float(record.get("min_score", 0.0)), index)


def describe(result: PackageResult) -> str:
    return json.dumps({"model_tag": result.model_tag, "bento_tag": result.bento_tag,
                       "n_items": result.manifest["n_items"], "model_id": result.manifest["model_id"]}, indent=2)


# ------------------------------------------------------------------------------------------- serve
def free_port() -> int:
    """A currently free loopback TCP port."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(target: str, port: int, env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 log_path: str | os.PathLike[str] | None = None) -> subprocess.Popen:
    """``bentoml serve <target>`` on 127.0.0.1:``port`` (target: a bento tag or a service folder).

    The server gets its own process group so :func:`stop_server` can stop its workers too.
    """
    cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, env={**bentoml_env(), **(env or {})}, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log_path:
            out.close()


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 180.0) -> float:
    """Poll ``<url>/readyz`` until it answers 200; return the seconds waited."""
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise StageError(f"bentoml serve exited with code {proc.returncode} before becoming ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise StageError(f"{url} was not ready after {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """Graceful stop (SIGTERM to the server's process group: in-flight requests finish), then SIGKILL."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    return int(proc.returncode if proc.returncode is not None else -1)
