"""Embed stage: item crops -> L2-normalised float32 vectors, incrementally and in batches.

Reads ``extract/catalog.parquet`` (rows with ``fetch_status == "ok"``) and ``detect/boxes.parquet``; writes
``embed/vectors.npy``, ``embed/items.parquet`` and ``embed/model.json`` (+ ``embed/projection.npz`` when a PCA
projection is fitted). Only crops missing from the feature store (:mod:`niteru.features`) go through the model.

Pipeline: DataLoader workers decode (JPEG draft mode when the crop allows it), crop and resize to uint8 tensors;
the main process normalises on the device and runs the backbone under ``torch.inference_mode`` in
``channels_last`` with bf16 autocast on CUDA. On CUDA, JPEG bytes are decoded on the GPU with nvjpeg
(``torchvision.io.decode_jpeg(device="cuda")``) and cropped/resized there.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from pydantic import Field

from niteru.backbones import DEFAULT_BACKBONE, Backbone, backbone_from_state, inference_copy, load_backbone
from niteru.config import StageConfig
from niteru.errors import BadImageError, ConfigError, SchemaError
from niteru.images import DEFAULT_MAX_PIXELS, to_rgb
from niteru.io import read_json, write_json_atomic, write_npy_atomic, write_parquet_atomic
from niteru.runtime import OpenVinoNetwork, Runtime, decode_threads, resolve_runtime, threaded_batches

log = logging.getLogger(__name__)

RESIZE_MODES = ("pad", "squash")
ITEM_COLUMNS = ["product_id", "crop_index", "image_sha256", "x0", "y0", "x1", "y1"]
PAD_VALUE = 255  # product photos: pad with white
FLUSH_EVERY = 2048  # items per feature-store shard while embedding
MODEL_JSON = "model.json"
PROJECTION_FILE = "projection.npz"
SHARD_FEATURES = "features.npy"
SHARD_FEATURES_JSON = "features.json"
# OpenVINO CPU throughput is flat in the batch size (115-121 img/s for 4-16 on 2 cores); small batches keep the
# decode threads and the inference streams overlapped, so the CPU path caps batch_size here.
OPENVINO_MAX_BATCH = 8


class EmbedConfig(StageConfig):
    stage = "embed"

    backbone: str = Field(DEFAULT_BACKBONE, description="efficientnet_lite0, resnet50, mobilenet_v3_large, "
                                                       "efficientnet_b0 or vit_b_16")
    weights: str = Field("", description="'' = backbone default (shipped / torch hub cache), a state-dict file, "
                                         "or 'random'")
    head: str = Field("", description="projection head: '' = none, else a file or bentoml:<name>:<version>")
    resize: str = Field("pad", description="pad (keep aspect, white border) or squash")
    pca_dim: int = Field(0, ge=0, description="PCA to this many dimensions fitted on the catalog; 0 = off")
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    num_workers: int = Field(-1, ge=-1, description="decode workers (DataLoader processes; threads on the OpenVINO "
                                                    "path); -1 = auto")
    gpu_decode: bool = Field(True, description="decode JPEGs with nvjpeg when the device is CUDA")
    runtime: Runtime = Field("auto", description="CPU inference runtime: auto (OpenVINO when installed, else torch), "
                                             "torch or openvino; CUDA always runs on torch")
    shard_index: int = Field(0, ge=0, description="which shard this worker embeds")
    num_shards: int = Field(1, ge=1, description="number of shards; >1 writes embed/shards/ for merge_shards")


# ---------------------------------------------------------------------------------------- preprocessing
def target_size(width: float, height: float, size: int, mode: str) -> tuple[int, int]:
    """(width, height) a crop is resized to before padding to ``size`` x ``size``."""
    if mode == "squash":
        return size, size
    if mode != "pad":
        raise ConfigError(f"unknown resize mode {mode!r}; use one of {RESIZE_MODES}")
    scale = size / max(width, height)
    return max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale)))


def clamp_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer pixel box inside the image, at least 1x1."""
    x0 = min(max(int(math.floor(box[0])), 0), width - 1)
    y0 = min(max(int(math.floor(box[1])), 0), height - 1)
    x1 = max(min(int(math.ceil(box[2])), width), x0 + 1)
    y1 = max(min(int(math.ceil(box[3])), height), y0 + 1)
    return x0, y0, x1, y1


def pil_chw(img: Image.Image) -> torch.Tensor:
    """A PIL image's RGB pixels as a uint8 CHW tensor (a view with channels-last strides, what the uint8 kernel wants)."""
    return torch.from_numpy(np.array(to_rgb(img))).permute(2, 0, 1)


def prepare_pil(img: Image.Image, box: Sequence[float] | None, size: int, mode: str) -> np.ndarray:
    """Crop ``box`` (pixels of ``img``), resize and pad: uint8 ``[size, size, 3]``.

    The one preprocessing of query photos and catalog crops alike: :func:`prepare_tensor` on the image's pixels
    (torch's uint8 antialiased bilinear kernel, which reproduces PIL's ``BILINEAR`` resize within one grey level).
    """
    return prepare_tensor(pil_chw(img), box, size, mode).permute(1, 2, 0).numpy()


def pil_resize_reference(img: Image.Image, box: Sequence[float] | None, size: int, mode: str) -> np.ndarray:
    """The same crop/resize/pad done by PIL itself (``BILINEAR``, antialiased), uint8 ``[size, size, 3]``.

    Not used by the pipeline: the reference :func:`prepare_tensor` is tested against, and the preprocessing of the
    naive baseline in ``benchmarks/bench_embed.py``.
    """
    img = to_rgb(img)
    if box is not None:
        img = img.crop(clamp_box(box, *img.size))
    new_w, new_h = target_size(img.width, img.height, size, mode)
    canvas = Image.new("RGB", (size, size), (PAD_VALUE,) * 3)
    canvas.paste(img.resize((new_w, new_h), Image.BILINEAR, reducing_gap=None),
                 ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(canvas)


_SWAPS_AXES = {5, 6, 7, 8}
DRAFT_OVERSAMPLE = 2.0  # reduced-scale JPEG decode keeps the crop >= 2x the model input
DRAFT_MAX_SCALE = 0.5  # libjpeg scales by 1/2, 1/4, 1/8


def decode_crop_chw(path: str | os.PathLike[str], box: Sequence[float], size: int, mode: str,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode one image file and return its ``box`` crop (pixels of the EXIF-transposed image) ready for the model:
    uint8 CHW ``[3, size, size]``.

    Big JPEGs are decoded at a reduced scale (libjpeg DCT scaling, ``Image.draft``) that keeps the crop at least
    :data:`DRAFT_OVERSAMPLE` times the model input, so the final antialiased resize still dominates: nearly the same
    pixels, a fraction of the decode time for multi-megapixel photos. Crop, resize and pad are :func:`prepare_tensor`
    (what :func:`prepare_pil` applies to query photos); its uint8 kernel is ~4x faster than PIL's resize.
    """
    try:
        img = Image.open(path)
        raw_w, raw_h = img.size
        if raw_w * raw_h > max_pixels:
            raise BadImageError(f"image {path} has {raw_w * raw_h:,} pixels, over the limit of {max_pixels:,}")
        orientation = img.getexif().get(0x0112, 1)
        full_w, full_h = (raw_h, raw_w) if orientation in _SWAPS_AXES else (raw_w, raw_h)
        crop_w, crop_h = max(box[2] - box[0], 1.0), max(box[3] - box[1], 1.0)
        need = size / max(crop_w, crop_h) if mode == "pad" else size / min(crop_w, crop_h)
        if need <= DRAFT_MAX_SCALE / DRAFT_OVERSAMPLE and img.format == "JPEG":
            scale = need * DRAFT_OVERSAMPLE
            img.draft("RGB", (math.ceil(raw_w * scale), math.ceil(raw_h * scale)))
        if orientation in range(2, 9):
            img = ImageOps.exif_transpose(img)  # (a copy; skipped for the common upright photo)
        chw = pil_chw(img)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"cannot decode image {path}: {exc}") from None
    sx, sy = img.width / full_w, img.height / full_h
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return prepare_tensor(chw, scaled, size, mode)


class CropDataset(torch.utils.data.Dataset):
    """Items (image path + box) -> uint8 CHW tensors; or, with ``raw_jpeg``, JPEG bytes for GPU decoding."""

    def __init__(self, paths: Sequence[str], boxes: np.ndarray, size: int, mode: str, raw_jpeg: bool = False):
        self.paths = list(paths)
        self.boxes = np.asarray(boxes, dtype=np.float64)
        self.size, self.mode, self.raw_jpeg = size, mode, raw_jpeg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        path, box = self.paths[i], tuple(self.boxes[i])
        if self.raw_jpeg:
            data = Path(path).read_bytes()
            if data[:3] == b"\xff\xd8\xff":
                try:
                    orientation = Image.open(path).getexif().get(0x0112, 1)
                except (OSError, SyntaxError, ValueError) as exc:
                    raise BadImageError(f"cannot read image header of {path}: {exc}") from None
                return ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), box, int(orientation))
        return ("pixels", decode_crop_chw(path, box, self.size, self.mode), box, 1)


def _collate(samples: list[Any]) -> Any:
    if samples and isinstance(samples[0], tuple) and samples[0][0] == "pixels" and all(s[0] == "pixels" for s in samples):
        return torch.stack([s[1] for s in samples])
    return samples


def orient_chw(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1..8) to a CHW tensor, like ``PIL.ImageOps.exif_transpose``."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def prepare_tensor(image: torch.Tensor, box: Sequence[float] | None, size: int, mode: str) -> torch.Tensor:
    """Crop, antialiased bilinear resize and white pad of a uint8 CHW image: the crop preprocessing everywhere.

    uint8 CPU tensors use torch's uint8 antialiased kernel directly (it reproduces PIL's ``BILINEAR`` filter within
    one grey level); other devices (the CUDA/nvjpeg path) resize in float and round.
    """
    _, height, width = image.shape
    if box is not None:
        x0, y0, x1, y1 = clamp_box(box, width, height)
        image = image[:, y0:y1, x0:x1]
    new_w, new_h = target_size(image.shape[2], image.shape[1], size, mode)
    if image.dtype == torch.uint8 and image.device.type == "cpu":
        resized = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", antialias=True,
                                align_corners=False)[0]
    else:
        resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True,
                                align_corners=False)[0].round_().clamp_(0, 255).to(torch.uint8)
    if (new_w, new_h) == (size, size):
        return resized.contiguous()
    out = torch.full((3, size, size), PAD_VALUE, dtype=torch.uint8, device=resized.device)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    out[:, top:top + new_h, left:left + new_w] = resized
    return out


def gpu_batch(samples: list[Any], size: int, mode: str, device: str) -> torch.Tensor:
    """Decode a list of dataset samples on the GPU (nvjpeg) and return a uint8 batch ``[B, 3, size, size]``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(samples)
    jpeg = [i for i, s in enumerate(samples) if s[0] == "jpeg"]
    if jpeg:
        with warnings.catch_warnings():  # torchvision >= 0.29 flags its decoders as deprecated (torchcodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = decode_jpeg([samples[i][1] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(jpeg, decoded):
            _, _, box, orientation = samples[i]
            out[i] = prepare_tensor(orient_chw(image, orientation), box, size, mode)
    for i, sample in enumerate(samples):
        if sample[0] == "pixels":
            out[i] = sample[1].to(device, non_blocking=True)
    return torch.stack(out)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- projection
@dataclass(frozen=True)
class Projection:
    """PCA fitted on the catalog's (L2-normalised) features: ``(x - mean) @ components.T``."""

    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, dim: int) -> "Projection":
        x = l2_normalize(np.asarray(features, dtype=np.float64))
        if dim > min(x.shape):
            raise ConfigError(f"pca_dim={dim} is larger than min(n_items={x.shape[0]}, feature dim={x.shape[1]}); "
                              f"lower pca_dim or set it to 0")
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        comps = vt[:dim]
        signs = np.sign(comps[np.arange(dim), np.abs(comps).argmax(axis=1)])  # deterministic signs
        comps = comps * signs[:, None]
        return cls(mean.astype(np.float32), np.ascontiguousarray(comps, dtype=np.float32))

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256(self.mean.tobytes())
        digest.update(self.components.tobytes())
        return digest.hexdigest()

    def apply(self, features: np.ndarray) -> np.ndarray:
        return (l2_normalize(features) - self.mean) @ self.components.T

    def save(self, path: Path) -> Path:
        from niteru.io import atomic_path

        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, mean=self.mean, components=self.components)
        return path

    @classmethod
    def load(cls, path: Path) -> "Projection":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["mean"].astype(np.float32), data["components"].astype(np.float32))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# ---------------------------------------------------------------------------------------- the embedder
class FeatureNet(torch.nn.Module):
    """Backbone followed by an optional projection head."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        return self.head(feats) if self.head is not None else feats


def _state_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_head(spec: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    try:
        from niteru.heads import load_head
    except ImportError:
        raise ConfigError(f"head={spec!r} needs the module niteru.heads (projection heads), which is not installed "
                          f"in this checkout yet; use head='' for the frozen backbone") from None
    head, metadata = load_head(spec)
    return head, dict(metadata or {})


class Embedder:
    """Images -> L2-normalised float32 vectors with one backbone (+ head) (+ PCA projection)."""

    def __init__(self, backbone: Backbone, head: torch.nn.Module | None = None, head_spec: str = "",
                 projection: Projection | None = None, resize: str = "pad", device: str = "cpu",
                 runtime: str = "auto"):
        if resize not in RESIZE_MODES:
            raise ConfigError(f"unknown resize mode {resize!r}; use one of {RESIZE_MODES}")
        self.backbone = backbone
        self.head_spec = head_spec
        self.projection = projection
        self.resize = resize
        self.device = device
        self.runtime = resolve_runtime(runtime, device)
        self._openvino: OpenVinoNetwork | None = None
        self._openvino_lock = threading.Lock()
        self.input_size = backbone.info.input_size
        self.network = FeatureNet(inference_copy(backbone.module), head.eval() if head is not None else None).eval()
        self.head_sha256 = _state_sha256(head) if head is not None else ""
        if head is not None:
            with torch.inference_mode():
                self.feature_dim = int(head(torch.zeros(2, backbone.dim)).shape[1])
        else:
            self.feature_dim = backbone.dim
        self.channels_last = True
        self.network.to(device)
        if self.channels_last:
            self.network.to(memory_format=torch.channels_last)
        self._mean = torch.tensor(backbone.info.mean, device=device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(backbone.info.std, device=device).view(1, 3, 1, 1) * 255.0

    # ------------------------------------------------------------------ identity
    @property
    def feature_model_id(self) -> str:
        """Identity of the raw (pre-projection) features: backbone, weights hash, input size, resize, head."""
        parts = [self.backbone.model_id, f"s{self.input_size}", self.resize]
        if self.head_spec:
            parts.append(f"h{self.head_sha256[:12]}")
        return "-".join(parts)

    @property
    def model_id(self) -> str:
        if self.projection is None:
            return self.feature_model_id
        return f"{self.feature_model_id}-pca{self.projection.dim}-{self.projection.sha256[:8]}"

    @property
    def dim(self) -> int:
        return self.projection.dim if self.projection is not None else self.feature_dim

    def with_projection(self, projection: Projection | None) -> "Embedder":
        """The same network with another projection (shares the weights)."""
        clone = object.__new__(Embedder)
        clone.__dict__.update(self.__dict__)
        clone.projection = projection
        return clone

    # ------------------------------------------------------------------ inference
    @property
    def is_cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    def openvino_network(self) -> OpenVinoNetwork:
        """The network compiled by OpenVINO (:class:`niteru.runtime.OpenVinoNetwork`), built on first use (~1 s)."""
        if self._openvino is None:
            with self._openvino_lock:
                if self._openvino is None:
                    self._openvino = OpenVinoNetwork(self.network, self.input_size, self._mean, self._std)
        return self._openvino

    def warmup(self) -> None:
        """Build the runtime and run one tiny batch, so that the first real request is not the slow one."""
        self.forward_uint8(torch.full((1, 3, self.input_size, self.input_size), PAD_VALUE, dtype=torch.uint8))

    def forward_uint8(self, batch: torch.Tensor) -> np.ndarray:
        """Raw features of a uint8 ``[B, 3, S, S]`` batch (any device) as float32 numpy."""
        if self.runtime == "openvino":
            return self.openvino_network()(batch.cpu().numpy())
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True).float().sub_(self._mean).div_(self._std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.is_cuda:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    feats = self.network(x)
            else:
                feats = self.network(x)
            return feats.float().cpu().numpy()

    def forward_stream(self, batches: Iterable[torch.Tensor | np.ndarray]) -> Iterator[np.ndarray]:
        """Raw features of a stream of uint8 ``[B, 3, S, S]`` batches, in order. On OpenVINO several batches are in
        flight at once (one per inference stream), so producing the next batch overlaps with inference."""
        if self.runtime == "openvino":
            yield from self.openvino_network().map(
                b.cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b) for b in batches)
        else:
            for batch in batches:
                yield self.forward_uint8(torch.as_tensor(batch))

    def finish(self, features: np.ndarray) -> np.ndarray:
        """Raw features -> final vectors: projection (if any), then L2 normalisation."""
        out = self.projection.apply(features) if self.projection is not None else features
        return l2_normalize(out)

    def embed(self, images: list[Image.Image], batch_size: int = 64) -> np.ndarray:
        """Embed whole PIL images (e.g. a query photo): float32 ``[n, dim]``, L2-normalised."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = []
        for start in range(0, len(images), batch_size):
            crops = [prepare_tensor(pil_chw(img), None, self.input_size, self.resize)
                     for img in images[start:start + batch_size]]
            chunks.append(self.forward_uint8(torch.stack(crops)))
        return self.finish(np.concatenate(chunks))

    def iter_features(self, paths: Sequence[str], boxes: np.ndarray, batch_size: int = 64, num_workers: int = -1,
                      gpu_decode: bool = True, progress: bool = True) -> Iterator[tuple[slice, np.ndarray]]:
        """Raw features of crops ``boxes`` of image files ``paths``, yielded batch by batch with their slice."""
        from tqdm.auto import tqdm

        n = len(paths)
        if n == 0:
            return
        if self.runtime == "openvino":
            yield from self._iter_features_openvino(paths, boxes, batch_size, num_workers, progress)
            return
        raw_jpeg = gpu_decode and self.is_cuda
        workers = resolve_workers(num_workers, n, batch_size, self.is_cuda)
        dataset = CropDataset(paths, boxes, self.input_size, self.resize, raw_jpeg=raw_jpeg)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
            pin_memory=self.is_cuda and not raw_jpeg, persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )
        start = 0
        with tqdm(total=n, unit="img", desc="embed", disable=not progress, smoothing=0.1) as bar:
            for batch in loader:
                if isinstance(batch, list):
                    batch = gpu_batch(batch, self.input_size, self.resize, self.device)
                feats = self.forward_uint8(batch)
                yield slice(start, start + len(feats)), feats
                start += len(feats)
                bar.update(len(feats))

    def _iter_features_openvino(self, paths: Sequence[str], boxes: np.ndarray, batch_size: int, num_workers: int,
                                progress: bool) -> Iterator[tuple[slice, np.ndarray]]:
        """CPU path: decode threads feed the OpenVINO infer requests; results come back in input order."""
        from tqdm.auto import tqdm

        n = len(paths)
        net = self.openvino_network()
        batch_size = min(batch_size, OPENVINO_MAX_BATCH)
        threads = decode_threads(num_workers, n, batch_size)
        boxes = np.asarray(boxes, dtype=np.float64)

        def load(i: int) -> np.ndarray:
            return decode_crop_chw(paths[i], tuple(boxes[i]), self.input_size, self.resize).numpy()

        batches = threaded_batches(load, n, batch_size, threads, prefetch=2 * threads + net.n_requests)
        start = 0
        with tqdm(total=n, unit="img", desc="embed", disable=not progress, smoothing=0.1) as bar:
            for feats in self.forward_stream(batches):
                yield slice(start, start + len(feats)), feats
                start += len(feats)
                bar.update(len(feats))

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        """What ``embed/model.json`` holds (without the projection file name)."""
        info = self.backbone.info
        return {
            "model_id": self.model_id,
            "feature_model_id": self.feature_model_id,
            "backbone": info.name,
            "weights": self.backbone.weights,
            "weights_source": self.backbone.weights_source,
            "weights_sha256": self.backbone.weights_sha256,
            "head": self.head_spec,
            "head_sha256": self.head_sha256,
            "head_config": (self.network.head.config()
                            if self.network.head is not None and hasattr(self.network.head, "config") else None),
            "input_size": self.input_size,
            "resize": self.resize,
            "mean": list(info.mean),
            "std": list(info.std),
            "feature_dim": self.feature_dim,
            "dim": self.dim,
            "normalize": "l2",
            "projection": ({"type": "pca", "dim": self.projection.dim, "sha256": self.projection.sha256}
                           if self.projection is not None else {"type": "none"}),
        }

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(config, state_dict) holding everything needed to rebuild this embedder without the original files."""
        state = {f"backbone.{k}": v.detach().cpu() for k, v in self.backbone.module.state_dict().items()}
        if self.network.head is not None:
            state.update({f"head.{k}": v.detach().cpu() for k, v in self.network.head.state_dict().items()})
        if self.projection is not None:
            state["projection.mean"] = torch.from_numpy(self.projection.mean.copy())
            state["projection.components"] = torch.from_numpy(self.projection.components.copy())
        return self.config(), state

    @classmethod
    def from_export(cls, config: dict[str, Any], state_dict: dict[str, torch.Tensor], device: str = "cpu",
                    runtime: str = "auto") -> "Embedder":
        prefix = "backbone."
        backbone = backbone_from_state(
            config["backbone"], {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)},
            config.get("weights", ""), config.get("weights_source", "export"), config["weights_sha256"],
        )
        head = None
        if config.get("head"):
            if config.get("head_config"):  # rebuilt from the export alone: the head file is not needed
                from niteru.heads import ProjectionHead

                head = ProjectionHead.from_config(config["head_config"])
            else:
                head, _ = _load_head(config["head"])
            head.load_state_dict({k[5:]: v for k, v in state_dict.items() if k.startswith("head.")})
        projection = None
        if config.get("projection", {}).get("type") == "pca":
            projection = Projection(state_dict["projection.mean"].numpy().astype(np.float32),
                                    state_dict["projection.components"].numpy().astype(np.float32))
        embedder = cls(backbone, head, config.get("head", ""), projection, config.get("resize", "pad"),
                       _resolve(device), runtime)
        _check_identity(embedder, config)
        return embedder


def _resolve(device: str) -> str:
    from niteru.device import resolve_device

    return resolve_device(device)


def _check_identity(embedder: Embedder, config: dict[str, Any]) -> None:
    if config.get("model_id") and embedder.model_id != config["model_id"]:
        raise ConfigError(f"rebuilt embedder has model id {embedder.model_id!r} but the model description says "
                          f"{config['model_id']!r}: the weights, head or projection files changed since it was written")


def build_embedder(backbone: str = DEFAULT_BACKBONE, weights: str = "", head: str = "", resize: str = "pad",
                   device: str = "auto", seed: int = 0, projection: Projection | None = None,
                   runtime: str = "auto") -> Embedder:
    """An :class:`Embedder` from registry names and weight/head specs."""
    bb = load_backbone(backbone, weights, seed=seed)
    head_module = _load_head(head)[0] if head else None
    return Embedder(bb, head_module, head, projection, resize, _resolve(device), runtime)


def load_embedder(model_json: str | os.PathLike[str] | dict[str, Any], device: str = "cpu",
                  runtime: str = "auto") -> Embedder:
    """Rebuild the embedder that wrote ``embed/model.json`` (a path to it, its folder, or its parsed dict).

    The weights file must still hash to the recorded sha256; the PCA projection is read from
    ``projection.npz`` next to the model.json (for a dict: the ``projection.file`` path it names).
    """
    base: Path | None = None
    if isinstance(model_json, dict):
        config = model_json
    else:
        path = Path(model_json)
        if path.is_dir():
            path = path / MODEL_JSON
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: run the embed stage first or pass the path of its model.json")
        config, base = read_json(path), path.parent
    weights = config.get("weights", "")
    if weights and weights.lower() != "random" and not Path(weights).is_file() and config.get("weights_source"):
        weights = config["weights_source"]
    seed = int(config["weights_sha256"][len("random-seed"):]) if config["weights_sha256"].startswith("random-seed") else 0
    embedder = build_embedder(config["backbone"], weights, config.get("head", ""), config.get("resize", "pad"),
                              device, seed=seed, runtime=runtime)
    if embedder.backbone.weights_sha256 != config["weights_sha256"]:
        raise ConfigError(f"weights {embedder.backbone.weights_source} hash to {embedder.backbone.weights_sha256[:12]}, "
                          f"but the model was built with {config['weights_sha256'][:12]}: restore the original file")
    proj_info = config.get("projection") or {"type": "none"}
    if proj_info.get("type") == "pca":
        file = Path(proj_info.get("file", PROJECTION_FILE))
        if not file.is_absolute():
            if base is None:
                raise ConfigError("a model.json dict with a PCA projection needs an absolute projection.file path")
            file = base / file
        embedder = embedder.with_projection(Projection.load(file))
    _check_identity(embedder, config)
    return embedder


def resolve_workers(num_workers: int, n_items: int, batch_size: int, cuda: bool) -> int:
    """DataLoader workers: -1 = auto (none for a single batch; on CPU leave cores to the model)."""
    if num_workers >= 0:
        return num_workers
    if n_items <= batch_size:
        return 0
    cores = os.cpu_count() or 1
    return min(16, max(1, cores - 2)) if cuda else max(1, min(4, cores // 2))


# ---------------------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class EmbedResult:
    stage_dir: Path
    n_items: int
    dim: int
    model_id: str
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def load_items(cfg: EmbedConfig) -> pd.DataFrame:
    """Crops to embed: detect boxes joined with the usable catalog rows, sorted by (product_id, crop_index)."""
    catalog_path = cfg.upstream_dir("extract") / "catalog.parquet"
    boxes_path = cfg.upstream_dir("detect") / "boxes.parquet"
    catalog = pd.read_parquet(catalog_path)
    boxes = pd.read_parquet(boxes_path)
    _require(catalog, ["product_id", "image_path", "image_sha256", "fetch_status"], catalog_path)
    _require(boxes, ITEM_COLUMNS, boxes_path)
    usable = catalog.loc[catalog["fetch_status"] == "ok", ["product_id", "image_path", "image_sha256"]]
    items = boxes[ITEM_COLUMNS].merge(usable, on="product_id", how="inner", suffixes=("", "_catalog"))
    stale = items["image_sha256"] != items["image_sha256_catalog"]
    if stale.any():
        raise SchemaError(f"{int(stale.sum())} box row(s) in {boxes_path} refer to another image version than "
                          f"{catalog_path} (image_sha256 differs, e.g. product {items.loc[stale, 'product_id'].iloc[0]!r}):"
                          f" rerun the detect stage")
    missing = set(usable["product_id"]) - set(items["product_id"])
    if missing:
        log.warning("%d usable product(s) have no boxes in %s and are not embedded, e.g. %s",
                    len(missing), boxes_path, sorted(missing)[:3])
    items = items.drop(columns=["image_sha256_catalog"]).astype({"crop_index": "int64"})
    return items.sort_values(["product_id", "crop_index"], kind="stable").reset_index(drop=True)


def _require(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise SchemaError(f"{path} lacks column(s) {absent}; it has {list(frame.columns)}: rerun the stage that writes it")


def compute_features(embedder: Embedder, items: pd.DataFrame, store: Any, batch_size: int, num_workers: int,
                     gpu_decode: bool, progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Raw features of every item; only items missing from ``store`` go through the model (then stored)."""
    from niteru.features import item_key

    boxes = items[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float64)
    keys = [item_key(sha, box) for sha, box in zip(items["image_sha256"], boxes)]
    unique_keys = list(dict.fromkeys(keys))
    have = store.contains(unique_keys)
    todo_keys = [k for k, h in zip(unique_keys, have) if not h]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    todo_rows = np.array([first[k] for k in todo_keys], dtype=np.int64)
    t0 = time.perf_counter()
    if len(todo_rows):
        log.info("embedding %d new crop(s); %d found in the feature store", len(todo_rows), len(unique_keys) - len(todo_rows))
        paths = items["image_path"].to_numpy()[todo_rows].tolist()
        pending_keys: list[str] = []
        pending: list[np.ndarray] = []
        for sl, feats in embedder.iter_features(paths, boxes[todo_rows], batch_size, num_workers, gpu_decode, progress):
            pending_keys.extend(todo_keys[sl])
            pending.append(feats)
            if len(pending_keys) >= FLUSH_EVERY:
                store.put(pending_keys, np.concatenate(pending))
                pending_keys, pending = [], []
        store.put(pending_keys, np.concatenate(pending) if pending else np.zeros((0, store.dim), np.float32))
    seconds = time.perf_counter() - t0
    stats = {"embedded": int(len(todo_rows)), "from_store": int(len(unique_keys) - len(todo_rows)),
             "embed_seconds": round(seconds, 3),
             "images_per_s": round(len(todo_rows) / seconds, 1) if len(todo_rows) and seconds > 0 else None}
    return store.get(keys), stats


def run(cfg: EmbedConfig, embedder: Embedder | None = None, progress: bool = True) -> EmbedResult:
    """Embed this shard's crops (all of them when ``num_shards == 1``) and write the stage artifacts.

    Unsharded, writes ``embed/vectors.npy``, ``items.parquet``, ``model.json`` and ``stage.json``. Sharded,
    writes the shard's raw features to ``embed/shards/<i>-of-<n>/``; :func:`merge_shards` writes the final files.
    ``embedder`` overrides the one built from ``cfg`` (it must match the config).
    """
    from niteru.features import FeatureStore
    from niteru.runs import write_stage_summary
    from niteru.shards import in_shard, shard_dir

    torch.manual_seed(cfg.seed)
    items = load_items(cfg)
    items = items[in_shard(items["product_id"].tolist(), cfg.shard_index, cfg.num_shards)].reset_index(drop=True)
    if embedder is None:
        embedder = build_embedder(cfg.backbone, cfg.weights, cfg.head, cfg.resize, cfg.device, seed=cfg.seed,
                                  runtime=cfg.runtime)
    store = FeatureStore.under(cfg.cache_path, embedder.feature_model_id, embedder.feature_dim)
    raw, stats = compute_features(embedder, items, store, cfg.batch_size, cfg.num_workers, cfg.gpu_decode, progress)
    counts = {"items": len(items), "products": int(items["product_id"].nunique()),
              "embedded": stats["embedded"], "from_store": stats["from_store"]}
    metrics = {"images_per_s": stats["images_per_s"], "embed_seconds": stats["embed_seconds"],
               "device": embedder.device, "runtime": embedder.runtime}
    stage_dir = cfg.stage_dir()
    if cfg.num_shards == 1:
        return finalize(cfg, items[ITEM_COLUMNS], raw, embedder.config(), counts, metrics)
    out = shard_dir(stage_dir, cfg.shard_index, cfg.num_shards)
    write_parquet_atomic(out / "items.parquet", items[ITEM_COLUMNS])
    write_npy_atomic(out / SHARD_FEATURES, raw.astype(np.float32))
    write_json_atomic(out / SHARD_FEATURES_JSON, embedder.with_projection(None).config())
    write_stage_summary(out, metrics=metrics, counts=counts, shard_index=cfg.shard_index, num_shards=cfg.num_shards)
    return EmbedResult(out, len(items), embedder.feature_dim, embedder.feature_model_id, counts, metrics)


def merge_shards(cfg: EmbedConfig) -> EmbedResult:
    """Concatenate the shard outputs (sorted by product id, crop index) and write the final artifacts.

    Deterministic: the result is byte-identical to an unsharded run over the same items.
    """
    from niteru.runs import read_stage_summary
    from niteru.shards import read_shard_records

    stage_dir = cfg.stage_dir()
    dirs, configs = read_shard_records(stage_dir, cfg.num_shards, SHARD_FEATURES_JSON, "feature_model_id")
    items = pd.concat([pd.read_parquet(d / "items.parquet") for d in dirs], ignore_index=True)
    raw = np.concatenate([np.load(d / SHARD_FEATURES) for d in dirs])
    order = np.lexsort((items["crop_index"].to_numpy(), items["product_id"].to_numpy()))
    items, raw = items.iloc[order].reset_index(drop=True), raw[order]
    counts: dict[str, int] = {"items": len(items), "products": int(items["product_id"].nunique()), "shards": len(dirs)}
    seconds = 0.0
    for d in dirs:
        summary = read_stage_summary(d)
        for key in ("embedded", "from_store"):
            counts[key] = counts.get(key, 0) + int(summary.get("counts", {}).get(key, 0))
        seconds = max(seconds, float(summary.get("metrics", {}).get("embed_seconds") or 0.0))
    metrics = {"embed_seconds": seconds, "images_per_s": round(counts["embedded"] / seconds, 1) if seconds else None,
               "device": read_stage_summary(dirs[0]).get("metrics", {}).get("device")}
    return finalize(cfg, items, raw, configs[0], counts, metrics)


def finalize(cfg: EmbedConfig, items: pd.DataFrame, raw: np.ndarray, feature_config: dict[str, Any],
             counts: dict[str, Any], metrics: dict[str, Any]) -> EmbedResult:
    """Fit the optional PCA on the catalog, L2-normalise and write vectors/items/model.json/stage.json."""
    from niteru.runs import write_stage_summary

    stage_dir = cfg.stage_dir()
    config = dict(feature_config)
    if cfg.pca_dim:
        projection = Projection.fit(raw, cfg.pca_dim)
        vectors = l2_normalize(projection.apply(raw))
        projection.save(stage_dir / PROJECTION_FILE)
        config["projection"] = {"type": "pca", "dim": projection.dim, "sha256": projection.sha256,
                                "file": PROJECTION_FILE}
        config["model_id"] = f"{config['feature_model_id']}-pca{projection.dim}-{projection.sha256[:8]}"
        config["dim"] = projection.dim
        explained = _explained_variance(raw, projection)
        metrics = {**metrics, "pca_explained_variance": round(explained, 4)}
    else:
        (stage_dir / PROJECTION_FILE).unlink(missing_ok=True)
        vectors = l2_normalize(raw)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    write_npy_atomic(stage_dir / "vectors.npy", vectors)
    write_parquet_atomic(stage_dir / "items.parquet", items[ITEM_COLUMNS].reset_index(drop=True))
    write_json_atomic(stage_dir / MODEL_JSON, config)
    metrics = {**metrics, "dim": int(vectors.shape[1]), "model_id": config["model_id"]}
    write_stage_summary(stage_dir, metrics=metrics, counts=counts)
    log.info("embed: %d vectors of dim %d (%s)", len(vectors), vectors.shape[1], config["model_id"])
    return EmbedResult(stage_dir, len(vectors), int(vectors.shape[1]), config["model_id"], counts, metrics)


def _explained_variance(raw: np.ndarray, projection: Projection) -> float:
    x = l2_normalize(raw) - projection.mean
    total = float((x.astype(np.float64) ** 2).sum())
    kept = float((projection.apply(raw).astype(np.float64) ** 2).sum())
    return kept / total if total > 0 else 0.0


def overview(cfg: EmbedConfig, max_items: int = 5000) -> pd.DataFrame:
    """For the notebook's plots: per item its category, 2-D principal coordinates and nearest neighbour.

    Columns ``product_id``, ``crop_index``, ``category``, ``pc1``, ``pc2``, ``nn_cosine`` (cosine to the nearest
    other item) and ``nn_same_category``; at most ``max_items`` items (evenly spaced). Empty for a shard run.
    """
    stage_dir = cfg.stage_dir()
    if not (stage_dir / "vectors.npy").exists() or cfg.num_shards > 1:
        return pd.DataFrame(columns=["product_id", "crop_index", "category", "pc1", "pc2", "nn_cosine",
                                     "nn_same_category"])
    vectors = np.load(stage_dir / "vectors.npy", mmap_mode="r")
    items = pd.read_parquet(stage_dir / "items.parquet", columns=["product_id", "crop_index"])
    take = np.unique(np.linspace(0, len(items) - 1, min(max_items, len(items))).astype(np.int64))
    vecs = np.asarray(vectors[take], dtype=np.float32)
    frame = items.iloc[take].reset_index(drop=True)
    catalog = pd.read_parquet(cfg.upstream_dir("extract") / "catalog.parquet")
    categories = catalog.set_index("product_id")["category"] if "category" in catalog else pd.Series(dtype=str)
    frame["category"] = frame["product_id"].map(categories).fillna("?")
    centred = vecs - vecs.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T if len(vt) >= 2 else np.zeros((len(vecs), 2), np.float32)
    frame["pc1"], frame["pc2"] = coords[:, 0], coords[:, 1]
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(axis=1) if len(vecs) > 1 else np.zeros(len(vecs), np.int64)
    frame["nn_cosine"] = sims[np.arange(len(vecs)), nearest] if len(vecs) > 1 else np.nan
    frame["nn_same_category"] = frame["category"].to_numpy()[nearest] == frame["category"].to_numpy()
    return frame
