"""Metric learning for similar-item search: a projection head over frozen backbone features.

Not a chain stage: ``notebooks/train_metric.ipynb`` runs it on a labelled image folder (one sub-folder per
category, e.g. ../shared/datasets/clothing-small/train) or a catalog Parquet file, and stores the head in the
BentoML model store; the embed stage uses it through ``EmbedConfig.head = "bentoml:<name>:<version>"``.

* Split: a fixed, content-hash based 80/20 split (sha256 of the image bytes): stable across machines and
  file renames, and exact duplicates always fall on the same side. Training never sees the test 20%.
* Features: the backbone runs once per image and augmented view (random resized crop, flip, colour
  jitter; deterministic per image and view) and the results are cached under
  ``<cache>/train_features/<model id>/``, so re-runs and hyper-parameter sweeps take seconds.
* Losses: supervised contrastive (default), proxy (normalised softmax over learnable class proxies) or
  batch-hard triplet, on the L2-normalised head output.
* Evaluation: leave-one-out category precision@k with cosine kNN inside the held-out split, for the frozen
  backbone and for the head.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from niteru.config import StageConfig
from niteru.errors import ConfigError, SchemaError
from niteru.io import atomic_path, sha256_file, write_json_atomic

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from matplotlib.figure import Figure
    from PIL import Image

    from niteru.embed import Embedder

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLIT_SALT = "niteru-split-v1"
AUG_VERSION = "aug-v1"
CACHE_CHUNK = 256  # images per feature-cache file
Loss = Literal["supcon", "proxy", "triplet"]


# ============================================================================================ data
def list_labelled_images(source: str | Path, label_column: str = "category") -> "pd.DataFrame":
    """``path``, ``label``, ``sha256`` of every image: a folder of ``<label>/<image>`` files or a catalog Parquet
    (``image_path`` or ``image_uri`` plus ``label_column``). Sorted by path."""
    import pandas as pd

    src = Path(source).expanduser()
    if src.is_dir():
        files = sorted(p for p in src.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
        frame = pd.DataFrame({"path": [str(p.resolve()) for p in files], "label": [p.parent.name for p in files]})
    elif src.suffix == ".parquet" and src.is_file():
        catalog = pd.read_parquet(src)
        path_col = "image_path" if "image_path" in catalog.columns else "image_uri"
        if path_col not in catalog.columns or label_column not in catalog.columns:
            raise SchemaError(f"{src} needs an image_path or image_uri column and {label_column!r}")
        frame = pd.DataFrame({"path": catalog[path_col].astype(str), "label": catalog[label_column].astype(str)})
        frame = frame.sort_values("path").reset_index(drop=True)
    else:
        raise ConfigError(f"data_dir {src} is neither a folder of <label>/<image> files nor a catalog .parquet")
    if frame.empty or frame["label"].nunique() < 2:
        raise ConfigError(f"{src} holds {len(frame)} images in {frame['label'].nunique()} label(s); "
                          "metric learning needs at least two labels")
    frame["sha256"] = [sha256_file(p) for p in frame["path"]]
    return frame


def hash_split(shas: "pd.Series | list[str]", test_fraction: float = 0.2, salt: str = SPLIT_SALT) -> np.ndarray:
    """True for the test items: ``sha256(salt + image sha256) mod 10_000 < test_fraction * 10_000``.

    Depends only on each image's content, never on order, folder or the other images."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    cut = round(test_fraction * 10_000)
    return np.array([int(hashlib.sha256(f"{salt}:{s}".encode()).hexdigest()[:8], 16) % 10_000 < cut for s in shas],
                    dtype=bool)


def augment(img: "Image.Image", seed: int) -> "Image.Image":
    """Random resized crop (55-100% of the area), horizontal flip and mild colour jitter; deterministic in ``seed``."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    w, h = img.size
    area = w * h * rng.uniform(0.55, 1.0)
    ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw, ch = min(w, round(np.sqrt(area * ratio))), min(h, round(np.sqrt(area / ratio)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(float(rng.uniform(0.8, 1.2)))
    return out


def _view_seed(sha: str, view: int, seed: int) -> int:
    return int(hashlib.sha256(f"{AUG_VERSION}:{seed}:{view}:{sha}".encode()).hexdigest()[:8], 16)


def _load_view(path: str, sha: str, view: int, seed: int, size: int, resize: str,
               box: tuple[float, float, float, float] | None) -> np.ndarray:
    from niteru.embed import prepare_pil
    from niteru.images import load_rgb

    img = load_rgb(path)
    if box is not None:
        img = img.crop(tuple(round(v) for v in box))
    if view > 0:
        img = augment(img, _view_seed(sha, view, seed))
    return prepare_pil(img, None, size, resize)


def compute_features(embedder: "Embedder", paths: list[str], shas: list[str], view: int = 0, seed: int = 0,
                     cache_dir: Path | None = None, batch_size: int = 32, num_workers: int = 2,
                     boxes: list[tuple[float, float, float, float] | None] | None = None, desc: str = "features"
                     ) -> np.ndarray:
    """Raw backbone features ``[n, feature_dim]`` of one view (0 = the plain image) of every image.

    Cached in chunks of ``CACHE_CHUNK`` images, one ``.npy`` per (model, view, seed, images, boxes) under
    ``cache_dir``, so an interrupted run resumes; decode, crop and augmentation run in ``num_workers``
    threads ahead of the model.
    """
    from tqdm.auto import tqdm

    boxes = boxes if boxes is not None else [None] * len(paths)
    chunks: list[np.ndarray] = []
    with tqdm(total=len(paths), desc=desc, unit="img") as bar:
        for start in range(0, len(paths), CACHE_CHUNK):
            part = slice(start, start + CACHE_CHUNK)
            chunks.append(_chunk_features(embedder, paths[part], shas[part], boxes[part], view, seed, cache_dir,
                                          batch_size, num_workers, bar))
    return np.concatenate(chunks) if chunks else np.zeros((0, embedder.feature_dim), np.float32)


def _chunk_features(embedder: "Embedder", paths: list[str], shas: list[str],
                    boxes: list[tuple[float, float, float, float] | None], view: int, seed: int,
                    cache_dir: Path | None, batch_size: int, num_workers: int, bar: Any) -> np.ndarray:
    """One cache chunk: loaded when present, else computed (decode/augment in threads) and written atomically."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from niteru.io import write_npy_atomic

    key = hashlib.sha256(json.dumps([embedder.feature_model_id, AUG_VERSION, view, seed, shas,
                                     [list(b) if b else None for b in boxes]]).encode()).hexdigest()[:24]
    cache_file = cache_dir / embedder.feature_model_id / f"view{view}-{key}.npy" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        bar.update(len(paths))
        return np.load(cache_file)
    size, resize, n = embedder.input_size, embedder.resize, len(paths)
    out: list[np.ndarray] = []
    def batches(arrays: Iterator[np.ndarray]) -> Iterator[torch.Tensor]:
        batch: list[np.ndarray] = []
        for i, arr in enumerate(arrays, start=1):
            batch.append(arr)
            if len(batch) == batch_size or i == n:
                yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
                batch = []

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        arrays = pool.map(_load_view, paths, shas, [view] * n, [seed] * n, [size] * n, [resize] * n, boxes)
        for feats in embedder.forward_stream(batches(arrays)):
            out.append(feats)
            bar.update(len(feats))
    feats = np.concatenate(out).astype(np.float32)
    if cache_file is not None:
        write_npy_atomic(cache_file, feats)
    return feats


# ========================================================================================== metrics
def precision_at_k(vectors: np.ndarray, labels: "np.ndarray | list[str]", k: int = 10, batch: int = 1024) -> float:
    """Leave-one-out category precision@k with cosine kNN (exact, batched matmul)."""
    from niteru.embed import l2_normalize

    v = l2_normalize(vectors)
    labels = np.asarray(labels)
    n = len(v)
    if n <= k:
        raise ConfigError(f"precision@{k} needs more than {k} items, got {n}")
    hits = 0
    for start in range(0, n, batch):
        sims = v[start:start + batch] @ v.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # leave the query out
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        hits += int((labels[top] == labels[start:start + batch, None]).sum())
    return hits / (n * k)


# =========================================================================================== losses
def supcon_loss(z: "torch.Tensor", y: "torch.Tensor", temperature: float = 0.1) -> "torch.Tensor":
    """Supervised contrastive loss (Khosla et al. 2020) over L2-normalised ``z``; anchors without positives skip."""
    import torch

    logits = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye
    n_pos = pos.sum(1)
    keep = n_pos > 0
    mean_log_prob = (log_prob.masked_fill(~pos, 0.0)).sum(1)[keep] / n_pos[keep]
    return -mean_log_prob.mean()


def proxy_loss(z: "torch.Tensor", y: "torch.Tensor", proxies: "torch.Tensor", temperature: float = 0.1) -> "torch.Tensor":
    """Normalised-softmax proxy loss: cross entropy of cosine similarities to one learnable proxy per class."""
    import torch.nn.functional as F

    return F.cross_entropy(z @ F.normalize(proxies, dim=1).T / temperature, y)


def triplet_loss(z: "torch.Tensor", y: "torch.Tensor", margin: float = 0.2) -> "torch.Tensor":
    """Batch-hard triplet loss on cosine distance."""
    import torch

    dist = 1.0 - z @ z.T
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    hardest_pos = dist.masked_fill(~same | eye, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(1)
    keep = torch.isfinite(hardest_pos) & torch.isfinite(hardest_neg)
    return (hardest_pos - hardest_neg + margin).clamp_min(0.0)[keep].mean()


# ========================================================================================= training
class TrainConfig(StageConfig):
    """Parameters of notebooks/train_metric.ipynb (not a chain stage; writes <run_dir>/train/)."""

    stage: ClassVar[str] = "train"

    data_dir: str = Field("demo", description="folder of <label>/<image> files, a catalog .parquet, or 'demo'")
    label_column: str = Field("category", description="label column when data_dir is a catalog")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share (content-hash split)")
    backbone: str = Field("efficientnet_lite0", description="frozen backbone (niteru.backbones)")
    weights: str = Field("", description="backbone weights: '' = its default, a file or 'random'")
    resize: str = Field("pad", description="pad or squash, as the embed stage")
    aug_views: int = Field(2, ge=0, description="augmented views per training image (features cached)")
    loss: Loss = Field("proxy", description="supcon, proxy or triplet")
    out_dim: int = Field(128, ge=2, description="head output dimension")
    hidden_dim: int = Field(512, ge=0, description="head hidden width; 0 = linear head")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="head dropout")
    epochs: int = Field(40, ge=1, description="passes over the training features")
    batch_size: int = Field(256, ge=4, description="items per optimisation step")
    lr: float = Field(0.001, gt=0.0, description="AdamW learning rate (cosine schedule)")
    weight_decay: float = Field(0.0001, ge=0.0, description="AdamW weight decay")
    temperature: float = Field(0.1, gt=0.0, description="supcon/proxy temperature")
    margin: float = Field(0.2, gt=0.0, description="triplet margin")
    k: int = Field(10, ge=1, description="precision@k")
    target_precision: float = Field(0.8, ge=0.0, le=1.0, description="precision@k the head should reach on the test split")
    feature_batch_size: int = Field(32, ge=1, description="images per backbone call while caching features")
    num_workers: int = Field(2, ge=0, description="decode/augment threads")
    register_as: str = Field("bentoml:niteru-head", description="'bentoml:<name>' to version the head in the BentoML store, '' = file only")


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    head_file: Path
    head_spec: str  # what EmbedConfig.head takes: the BentoML tag, or the file when not registered
    metrics: dict[str, Any]
    history: list[float]
    figure_path: Path


def resolve_data(cfg: TrainConfig) -> Path:
    if cfg.data_dir == "demo":
        from niteru.demo import ensure_demo_catalog

        return ensure_demo_catalog(cfg.cache_path, n_products=50, variants=2, seed=cfg.seed) / "catalog.parquet"
    return Path(cfg.data_dir).expanduser()


def train_head(features: np.ndarray, labels: np.ndarray, cfg: TrainConfig, device: str = "cpu"
               ) -> tuple["torch.nn.Module", list[float]]:
    """Train a :class:`~niteru.heads.ProjectionHead` on ``features`` ``[views, n, d]`` with integer ``labels``.

    Each step draws a batch of items and one random view per item. Returns the head (eval, CPU) and the
    mean loss per epoch.
    """
    import torch

    from niteru.heads import ProjectionHead

    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    views, n, dim = feats.shape
    head = ProjectionHead(dim, cfg.out_dim, cfg.hidden_dim, cfg.dropout).to(device)
    params = list(head.parameters())
    proxies = None
    if cfg.loss == "proxy":
        proxies = torch.nn.Parameter(torch.randn(int(y.max()) + 1, cfg.out_dim, generator=gen).to(device))
        params.append(proxies)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, n // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.1)
    history: list[float] = []
    head.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            view = torch.randint(0, views, (len(idx),), generator=gen).to(device)
            z = head(feats[view, idx])
            if cfg.loss == "supcon":
                loss = supcon_loss(z, y[idx], cfg.temperature)
            elif cfg.loss == "proxy":
                loss = proxy_loss(z, y[idx], proxies, cfg.temperature)
            else:
                loss = triplet_loss(z, y[idx], cfg.margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        history.append(total / steps_per_epoch)
    return head.eval().cpu(), history


def apply_head(head: "torch.nn.Module", features: np.ndarray, batch: int = 4096) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate([head(torch.from_numpy(features[s:s + batch])).numpy()
                               for s in range(0, len(features), batch)]) if len(features) else features


def run(cfg: TrainConfig) -> TrainResult:
    """Split, cache features, train the head, evaluate it against the frozen backbone and store it."""
    from niteru.embed import build_embedder
    from niteru.heads import save_head

    t0 = time.perf_counter()
    device = cfg.resolved_device()
    data = list_labelled_images(resolve_data(cfg))
    is_test = hash_split(data["sha256"], cfg.test_fraction)
    train, test = data[~is_test].reset_index(drop=True), data[is_test].reset_index(drop=True)
    classes = sorted(data["label"].unique())
    log.info("train: %d images (%d train / %d test), %d labels", len(data), len(train), len(test), len(classes))
    embedder = build_embedder(cfg.backbone, cfg.weights, "", cfg.resize, device, seed=cfg.seed)
    cache = cfg.cache_path / "train_features"

    def feats(frame: "pd.DataFrame", view: int, desc: str) -> np.ndarray:
        return compute_features(embedder, frame["path"].tolist(), frame["sha256"].tolist(), view, cfg.seed, cache,
                                cfg.feature_batch_size, cfg.num_workers, desc=desc)

    plain = feats(data, 0, "features")  # all images at once: the same cache entry as benchmarks/quality_clothing.py
    test_feats = plain[is_test]
    train_views = np.stack([plain[~is_test]] + [feats(train, v, f"train view {v}") for v in range(1, cfg.aug_views + 1)])
    t_train = time.perf_counter()
    label_ids = np.searchsorted(classes, train["label"].to_numpy())
    head, history = train_head(train_views, label_ids, cfg, device)
    train_seconds = time.perf_counter() - t_train
    k = cfg.k
    metrics = {
        f"frozen_test_p@{k}": round(precision_at_k(test_feats, test["label"].to_numpy(), k), 4),
        f"head_test_p@{k}": round(precision_at_k(apply_head(head, test_feats), test["label"].to_numpy(), k), 4),
        f"head_train_p@{k}": round(precision_at_k(apply_head(head, train_views[0]), train["label"].to_numpy(), k), 4),
        "target_precision": cfg.target_precision,
        "train_seconds": round(train_seconds, 2),
        "n_train": int(len(train)), "n_test": int(len(test)), "n_labels": len(classes),
    }
    metrics["target_met"] = metrics[f"head_test_p@{k}"] >= cfg.target_precision
    params = cfg.model_dump(exclude={"run_dir", "cache_dir", "device"})
    metadata = {"metrics": metrics, "training": params, "labels": classes, "input_model_id": embedder.feature_model_id,
                "backbone": cfg.backbone, "weights_sha256": embedder.backbone.weights_sha256,
                "data": str(resolve_data(cfg)), "split": {"salt": SPLIT_SALT, "test_fraction": cfg.test_fraction}}
    out_dir = cfg.stage_dir()
    head_file = Path(save_head(head, out_dir / "head.pt", metadata))
    spec = save_head(head, cfg.register_as, metadata) if cfg.register_as else str(head_file)
    figure_path = out_dir / "loss.png"
    save_figure(loss_figure(history, metrics, k), figure_path)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(out_dir / "metrics.json", {**metrics, "head": spec, "history": history})
    from niteru.runs import write_stage_summary

    write_stage_summary(out_dir, metrics=metrics, counts={"train": len(train), "test": len(test)}, head=spec)
    return TrainResult(out_dir, head_file, spec, metrics, history, figure_path)


def loss_figure(history: list[float], metrics: dict[str, Any], k: int) -> "Figure":
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2))
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(range(1, len(history) + 1), history)
    ax.set(xlabel="epoch", ylabel="loss", title="training loss")
    ax = fig.add_subplot(1, 2, 2)
    names = ["frozen backbone", "trained head"]
    values = [metrics[f"frozen_test_p@{k}"], metrics[f"head_test_p@{k}"]]
    ax.bar(names, values, color=["#999999", "#2a7ab9"])
    ax.axhline(metrics["target_precision"], color="red", ls="--", lw=1, label="target")
    for i, v in enumerate(values):
        ax.text(i, v + 0.01, f"{v:.3f}", ha="center")
    ax.set(ylim=(0, 1), ylabel=f"precision@{k}", title="held-out split")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def save_figure(fig: "Figure", dest: Path) -> Path:
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    return dest
