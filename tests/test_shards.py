"""Stable shard assignment and shard-merge preconditions."""

from __future__ import annotations

import pytest

from niteru.errors import ConfigError
from niteru.io import write_json_atomic
from niteru.runs import write_stage_summary
from niteru.shards import in_shard, read_shard_records, shard_dir, shard_of


def test_shards_partition_items_stably():
    ids = [f"P{i:05d}-v0" for i in range(1000)]
    masks = [in_shard(ids, i, 4) for i in range(4)]
    assert [sum(col) for col in zip(*masks)] == [1] * len(ids)  # every item in exactly one shard
    assert all(200 < sum(m) < 300 for m in masks)  # roughly balanced
    assert shard_of("P00042-v0", 4) == 2  # sha256-based: the same on every machine and Python version
    with pytest.raises(ConfigError, match="shard_index"):
        in_shard(ids, 4, 4)


def test_merge_preconditions(tmp_path):
    stage = tmp_path / "embed"
    for i, model in enumerate(["m1", "m2"]):
        d = shard_dir(stage, i, 2)
        write_json_atomic(d / "features.json", {"feature_model_id": model})
    with pytest.raises(ConfigError, match="missing or incomplete"):
        read_shard_records(stage, 2, "features.json", "feature_model_id")
    for i in range(2):
        write_stage_summary(shard_dir(stage, i, 2))
    with pytest.raises(ConfigError, match=r"different models .*\['m1', 'm2'\]"):
        read_shard_records(stage, 2, "features.json", "feature_model_id")
    write_json_atomic(shard_dir(stage, 1, 2) / "features.json", {"feature_model_id": "m1"})
    dirs, records = read_shard_records(stage, 2, "features.json", "feature_model_id")
    assert [d.name for d in dirs] == ["0-of-2", "1-of-2"] and records[1]["feature_model_id"] == "m1"
