"""Stable sharding of catalog items so detect/embed can fan out across workers (Airflow, Kubernetes).

An item belongs to shard ``int(sha256(product_id)[:16], 16) % num_shards``: stable across runs, machines
and Python versions, and independent of row order. Shard outputs go to ``<stage>/shards/<i>/`` and the
stage's ``merge_shards`` writes the final artifacts, sorted by product id, so the merge is deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from niteru.errors import ConfigError

SHARDS_DIR = "shards"


def shard_of(product_id: str, num_shards: int) -> int:
    digest = hashlib.sha256(str(product_id).encode("utf-8")).hexdigest()
    return int(digest[:16], 16) % num_shards


def check_shard(shard_index: int, num_shards: int) -> None:
    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1 (got {num_shards})")
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"shard_index must be in [0, {num_shards - 1}] (got {shard_index})")


def in_shard(product_ids: Iterable[str], shard_index: int, num_shards: int) -> list[bool]:
    """Mask of the items that belong to ``shard_index`` of ``num_shards``."""
    check_shard(shard_index, num_shards)
    if num_shards == 1:
        return [True for _ in product_ids]
    return [shard_of(pid, num_shards) == shard_index for pid in product_ids]


def shard_dir(stage_dir: Path, shard_index: int, num_shards: int) -> Path:
    """Where a shard writes: the stage folder itself when unsharded, else ``shards/<i>-of-<n>``."""
    check_shard(shard_index, num_shards)
    if num_shards == 1:
        return stage_dir
    return stage_dir / SHARDS_DIR / f"{shard_index}-of-{num_shards}"


def list_shard_dirs(stage_dir: Path, num_shards: int) -> list[Path]:
    """All shard folders of a stage; a clear error naming the missing ones."""
    dirs = [stage_dir / SHARDS_DIR / f"{i}-of-{num_shards}" for i in range(num_shards)]
    missing = [d.name for d in dirs if not (d / "stage.json").exists()]
    if missing:
        raise ConfigError(f"cannot merge {stage_dir.name}: shard(s) {missing} are missing or incomplete in {stage_dir / SHARDS_DIR}")
    return dirs


def read_shard_records(stage_dir: Path, num_shards: int, record_file: str, id_key: str) -> tuple[list[Path], list[dict]]:
    """The shard folders of a stage and each shard's JSON record (which model/detector made it).

    Shards made by different models cannot be merged: that is a clear error naming the ids.
    """
    from niteru.io import read_json

    dirs = list_shard_dirs(stage_dir, num_shards)
    records = [read_json(d / record_file) for d in dirs]
    ids = sorted({str(r[id_key]) for r in records})
    if len(ids) != 1:
        raise ConfigError(f"cannot merge {stage_dir.name} shards made by different models ({id_key}): {ids}")
    return dirs, records
