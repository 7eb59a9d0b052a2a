"""Metric learning: losses go down and separate classes, heads round-trip through files and the BentoML store,
the content-hash split is stable, and a tiny end-to-end training run on generated photos beats the frozen backbone."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from niteru import train
from niteru.errors import ConfigError
from niteru.heads import ProjectionHead, list_heads, load_head, save_head
from niteru.train import TrainConfig, hash_split, precision_at_k, train_head


def clustered_features(n_per_class: int = 40, classes: int = 4, dim: int = 64, seed: int = 0):
    """Features whose class signal lives in a few dimensions drowned by large nuisance variance."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    centers = rng.normal(0, 1.0, (classes, 4))
    feats = rng.normal(0, 3.0, (len(labels), dim)).astype(np.float32)
    feats[:, :4] += centers[labels] * 3
    views = np.stack([feats, feats + rng.normal(0, 0.3, feats.shape).astype(np.float32)])
    return views, labels


@pytest.mark.parametrize("loss", ["supcon", "proxy", "triplet"])
def test_loss_decreases_and_neighbours_improve(loss):
    views, labels = clustered_features()
    cfg = TrainConfig(loss=loss, epochs=30, batch_size=64, out_dim=16, hidden_dim=32, lr=0.01, seed=1)
    head, history = train_head(views, labels, cfg)
    assert len(history) == 30 and np.isfinite(history).all()
    assert np.mean(history[-3:]) < np.mean(history[:3]) - 0.1, history
    before = precision_at_k(views[0], labels, k=5)
    after = precision_at_k(train.apply_head(head, views[0]), labels, k=5)
    assert after > before + 0.1, (before, after)


def test_precision_at_k_counts_leave_one_out_neighbours():
    vectors = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1], [0.1, 0.9], [0.2, 0.8]], np.float32)
    assert precision_at_k(vectors, ["a", "a", "a", "b", "b", "b"], k=2) == 1.0
    assert precision_at_k(vectors, ["a", "b", "a", "b", "a", "b"], k=2) == pytest.approx(4 / 12)
    with pytest.raises(ConfigError, match="needs more than 10 items"):
        precision_at_k(vectors, list("aaabbb"), k=10)


def test_split_is_stable_and_content_based():
    shas = [f"{i:064x}" for i in range(4000)]
    split = hash_split(shas, 0.2)
    assert 0.18 < split.mean() < 0.22
    # independent of order and of the other items
    rev = hash_split(shas[::-1], 0.2)[::-1]
    assert (rev == split).all() and (hash_split(shas[:10], 0.2) == split[:10]).all()
    # pinned: the split must never drift silently (it would leak test images into training)
    assert np.flatnonzero(split[:40]).tolist() == np.flatnonzero(hash_split(shas[:40], 0.2)).tolist()
    assert hash_split(["a" * 64], 0.2).tolist() == [
        int(__import__("hashlib").sha256(f"{train.SPLIT_SALT}:{'a' * 64}".encode()).hexdigest()[:8], 16) % 10_000 < 2000]
    with pytest.raises(ConfigError):
        hash_split(shas, 1.0)


def test_head_saves_and_loads_from_file_and_bentoml(tmp_path):
    head = ProjectionHead(32, 8, 16).eval()
    x = torch.randn(5, 32)
    ref = head(x)
    assert torch.allclose(ref.norm(dim=1), torch.ones(5), atol=1e-5)
    spec = save_head(head, tmp_path / "h.pt", {"metrics": {"p@10": 0.81}, "lr": 0.001})
    loaded, meta = load_head(spec)
    assert torch.allclose(loaded(x), ref) and meta == {"metrics": {"p@10": 0.81}, "lr": 0.001}

    tag = save_head(head, "bentoml:test-head", {"metrics": {"p@10": 0.82}, "epochs": 3})
    assert tag.startswith("bentoml:test-head:")
    store = Path(os.environ["BENTOML_HOME"]) / "models" / "test-head"
    assert store.is_dir()  # BENTOML_HOME is respected
    loaded, meta = load_head(tag)
    assert torch.allclose(loaded(x), ref) and meta["metrics"] == {"p@10": 0.82}
    latest, _ = load_head("bentoml:test-head")
    assert torch.allclose(latest(x), ref)
    assert any(h["tag"] == tag.removeprefix("bentoml:") and h["epochs"] == 3 for h in list_heads())
    with pytest.raises(ConfigError, match="does not exist"):
        load_head(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="not in the BentoML model store"):
        load_head("bentoml:no-such-head:v1")


def write_folder(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """Three visually distinct 'categories' of generated product photos."""
    rng = np.random.default_rng(seed)
    for label, kind in (("stripes", 0), ("dots", 1), ("plain", 2)):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            arr = np.full((96, 96, 3), 235, np.float32) + rng.normal(0, 4, (96, 96, 3))
            colour = rng.integers(0, 200, 3)
            yy, xx = np.mgrid[20:76, 20:76]
            if kind == 0:
                pattern = (xx // 6 % 2)[..., None] * 60.0
            elif kind == 1:
                pattern = (((xx % 12) - 6) ** 2 + ((yy % 12) - 6) ** 2 < 10)[..., None] * 80.0
            else:
                pattern = np.zeros((56, 56, 1))
            arr[20:76, 20:76] = colour + pattern
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / label / f"{i}.png")
    return root


@pytest.mark.slow
def test_training_run_end_to_end(tmp_path):
    data = write_folder(tmp_path / "data")
    cfg = TrainConfig(data_dir=str(data), run_dir=str(tmp_path / "runs" / "t"), device="cpu",  # shipped weights
                      aug_views=1, epochs=30, batch_size=8, lr=0.003, k=3, test_fraction=0.3, out_dim=16, hidden_dim=32,
                      register_as="bentoml:tiny-head")
    result = train.run(cfg)
    m = result.metrics
    assert m["n_train"] + m["n_test"] == 36 and m["n_test"] >= 6
    assert result.history[-1] < 0.6 * result.history[0]
    assert m["frozen_test_p@3"] >= 0.6 and m["head_train_p@3"] >= 0.95 and m["head_test_p@3"] >= 0.6
    head, meta = load_head(result.head_spec)
    assert meta["metrics"]["head_test_p@3"] == m["head_test_p@3"] and meta["training"]["epochs"] == 30
    assert meta["input_model_id"].startswith("efficientnet_lite0-w579344248a93")
    assert (result.out_dir / "loss.png").stat().st_size > 1000
    # the feature cache makes a re-run skip the backbone entirely
    cached = list((tmp_path / "runs" / "_cache" / "train_features").rglob("*.npy"))
    assert len(cached) == 2
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    again = train.run(cfg.model_copy(update={"register_as": ""}))
    assert again.metrics["head_test_p@3"] == m["head_test_p@3"]
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps
    assert again.head_spec == str(again.head_file)

    # the embed stage's embedder applies the head on top of the backbone
    from niteru.embed import build_embedder

    embedder = build_embedder(head=result.head_spec, device="cpu")
    vec = embedder.embed([Image.open(next((data / "dots").iterdir())).convert("RGB")])
    assert vec.shape == (1, 16) and np.isclose(np.linalg.norm(vec), 1.0, atol=1e-5)
