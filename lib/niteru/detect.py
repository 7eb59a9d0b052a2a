"""Detection stage: find the product in every catalog photo and decide which crops get embedded.

Detectors (all behind one interface, :class:`Detector`, built by :func:`load_detector` from a JSON spec):

* ``saliency`` (default): class-agnostic foreground box against the photo's background, computed with
  batched tensor ops (runs on CPU or GPU). The background is modelled by the colours of the image border
  (one robust Lab median per side); pixels far from every border colour are foreground (per-image Otsu
  threshold), a morphological opening removes speckle, and the box spans the foreground mass. Works on
  product photos shot against a plain or mildly textured background, which is what catalogs hold; no
  weights are needed, so it works offline.
* torchvision detection architectures (``fasterrcnn_mobilenet_v3_large_320_fpn``, ``retinanet_resnet50_fpn``,
  ``fcos_resnet50_fpn``, ``ssdlite320_mobilenet_v3_large``, ...) with weights from a local file, torchvision's
  own cache (``torchvision:DEFAULT`` when the user has downloaded it before), the BentoML model store
  (``bentoml:<name>:<version>``) or ``random`` init (explicit only; for tests). Weights always load with
  ``torch.load(weights_only=True)``; nothing is downloaded.
* ``whole``: the whole image (no detection).

Whatever the detector finds, :func:`select_crops` applies the crop policy (``largest`` box, ``all`` boxes
above ``min_score`` or the ``whole`` image) and falls back to the whole image when nothing qualifies, so
every usable product gets at least one row in ``detect/boxes.parquet``.

Raw detections are cached under ``<cache>/detections/<detector_key>/`` keyed by image sha256, so a daily
run only detects new images; the crop policy is applied after the cache and can change freely.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import Field

from niteru.config import StageConfig
from niteru.errors import BadImageError, ConfigError, SchemaError
from niteru.io import read_json, sha256_file, write_json_atomic, write_parquet_atomic
from niteru.runs import write_stage_summary
from niteru.shards import in_shard, read_shard_records, shard_dir

if TYPE_CHECKING:  # heavy imports stay deferred
    import pandas as pd
    import torch
    from matplotlib.figure import Figure
    from PIL import Image

log = logging.getLogger(__name__)

Policy = Literal["largest", "all", "whole"]
POLICIES: tuple[str, ...] = ("largest", "all", "whole")
WHOLE = "whole"
BOXES_FILE = "boxes.parquet"
DETECTOR_FILE = "detector.json"
AUDIT_FILE = "audit.png"
BOX_COLUMNS = ("product_id", "image_sha256", "crop_index", "x0", "y0", "x1", "y1", "score", "label", "method")
_CACHE_COLUMNS = ("image_sha256", "width", "height", "box_index", "x0", "y0", "x1", "y1", "score", "label", "method")

#: torchvision detection builders that :class:`TorchvisionDetector` accepts.
TORCHVISION_ARCHS: tuple[str, ...] = (
    "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large", "ssd300_vgg16",
)


# ============================================================================================ boxes
@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels of the EXIF-transposed RGB image (x1, y1 exclusive)."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0
    label: str = "object"
    method: str = WHOLE

    @property
    def width(self) -> float:
        return max(0.0, self.x1 - self.x0)

    @property
    def height(self) -> float:
        return max(0.0, self.y1 - self.y0)

    @property
    def area(self) -> float:
        return self.width * self.height

    def iou(self, other: "Box") -> float:
        ix = max(0.0, min(self.x1, other.x1) - max(self.x0, other.x0))
        iy = max(0.0, min(self.y1, other.y1) - max(self.y0, other.y0))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def clipped(self, width: int, height: int) -> "Box":
        return dataclasses.replace(self, x0=min(max(self.x0, 0.0), width), y0=min(max(self.y0, 0.0), height),
                                   x1=min(max(self.x1, 0.0), width), y1=min(max(self.y1, 0.0), height))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def whole_box(image_size: tuple[int, int]) -> Box:
    """The whole image as a box; ``image_size`` is PIL's ``(width, height)``."""
    width, height = image_size
    return Box(0.0, 0.0, float(width), float(height), 1.0, "image", WHOLE)


def select_crops(boxes: Sequence[Box], policy: str, min_score: float, image_size: tuple[int, int],
                 min_side: float = 8.0) -> list[Box]:
    """Apply the crop policy to one image's detections; never returns an empty list.

    ``largest``: the largest box scoring >= ``min_score``; ``all``: every such box, best score first;
    ``whole``: the whole image. Boxes are clipped to the image and ones thinner than ``min_side`` pixels
    dropped; when nothing qualifies the whole image is returned (``method == "whole"``).
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown crop policy {policy!r}: use one of {', '.join(POLICIES)}")
    if policy == WHOLE:
        return [whole_box(image_size)]
    width, height = image_size
    usable = [b.clipped(width, height) for b in boxes if b.score >= min_score]
    usable = [b for b in usable if b.width >= min_side and b.height >= min_side]
    if not usable:
        return [whole_box(image_size)]
    if policy == "largest":
        return [max(usable, key=lambda b: (b.area, b.score))]
    return sorted(usable, key=lambda b: (-b.score, -b.area))


def crop(image: "Image.Image", box: Box) -> "Image.Image":
    """Cut ``box`` out of ``image`` (rounded outwards to whole pixels, clipped to the image)."""
    import math

    width, height = image.size
    x0, y0 = max(0, math.floor(box.x0)), max(0, math.floor(box.y0))
    x1, y1 = min(width, math.ceil(box.x1)), min(height, math.ceil(box.y1))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError(f"box {box} is empty inside an image of size {width}x{height}")
    if (x0, y0, x1, y1) == (0, 0, width, height):
        return image
    return image.crop((x0, y0, x1, y1))


# ======================================================================================= detectors
class Detector(Protocol):
    """Anything that turns a batch of RGB images into boxes per image."""

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description; ``load_detector(spec)`` rebuilds the same detector."""
        ...

    def detect(self, images: list["Image.Image"]) -> list[list[Box]]:
        ...


def detector_key(spec: dict[str, Any]) -> str:
    """Stable id of a detector configuration (names its cache folder and lands in detector.json)."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()
    return f"{spec.get('name', 'detector')}-{digest[:12]}"


class WholeImageDetector:
    """No detection: every image is its own single crop."""

    name: ClassVar[str] = WHOLE

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.name}

    def detect(self, images: list["Image.Image"]) -> list[list[Box]]:
        return [[whole_box(img.size)] for img in images]


@dataclass
class SaliencyDetector:
    """Class-agnostic foreground box against the photo's background, batched in torch (CPU or GPU).

    ``work_size``: images are resized to this square for the mask (boxes are mapped back to pixels);
    ``border``: fraction of the side used as the background sample; ``margin``: fraction of the box size
    added on every side; ``min_area``/``max_area``: foreground fractions outside which the image has no
    usable box (nothing there, or the product fills the frame: the whole image is then the right crop).
    The score is the contrast between foreground and background distances, in [0, 1].
    """

    work_size: int = 128
    border: float = 0.06
    margin: float = 0.03
    min_area: float = 0.01
    max_area: float = 0.97
    device: str = "cpu"
    name: ClassVar[str] = "saliency"
    _PARAMS: ClassVar[tuple[str, ...]] = ("work_size", "border", "margin", "min_area", "max_area")

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.name, **{k: getattr(self, k) for k in self._PARAMS}}

    def detect(self, images: list["Image.Image"]) -> list[list[Box]]:
        if not images:
            return []
        import torch

        batch = images_to_tensor(images, self.work_size, self.device)
        with torch.inference_mode():
            boxes, scores, fractions = saliency_boxes(batch, self.border)
        out: list[list[Box]] = []
        for img, box, score, frac in zip(images, boxes.cpu().tolist(), scores.cpu().tolist(),
                                         fractions.cpu().tolist()):
            box_area = (box[2] - box[0]) * (box[3] - box[1]) / self.work_size ** 2
            if not self.min_area <= frac <= self.max_area or box_area > self.max_area:
                out.append([])  # nothing stands out, or the product fills the frame: the whole image it is
                continue
            out.append([self._to_pixels(box, score, img.size)])
        return out

    def _to_pixels(self, box: list[float], score: float, size: tuple[int, int]) -> Box:
        width, height = size
        sx, sy = width / self.work_size, height / self.work_size
        x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
        mx, my = self.margin * (x1 - x0), self.margin * (y1 - y0)
        return Box(x0 - mx, y0 - my, x1 + mx, y1 + my, float(score), "foreground", self.name).clipped(width, height)


def images_to_tensor(images: list["Image.Image"], size: int, device: str) -> "torch.Tensor":
    """Resize each image to ``size`` x ``size`` and stack them as float [B, 3, S, S] in [0, 1] on ``device``."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = [np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)) for img in images]
    batch = torch.from_numpy(np.stack(arrays)).to(device, non_blocking=True)
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def rgb_to_lab(rgb: "torch.Tensor") -> "torch.Tensor":
    """sRGB in [0, 1], shape [B, 3, H, W] -> CIE Lab (D65), same shape."""
    import torch

    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    mat = torch.tensor([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
                       dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", mat, lin)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    t = xyz / white
    f = torch.where(t > 0.008856, t.clamp_min(1e-12) ** (1.0 / 3.0), 7.787 * t + 16.0 / 116.0)
    return torch.stack([116.0 * f[:, 1] - 16.0, 500.0 * (f[:, 0] - f[:, 1]), 200.0 * (f[:, 1] - f[:, 2])], dim=1)


def otsu_thresholds(values: "torch.Tensor", bins: int = 64) -> "torch.Tensor":
    """Per-row Otsu threshold of ``values`` [B, N] (non-negative), batched; returns [B]."""
    import torch

    top = values.amax(dim=1, keepdim=True).clamp_min(1e-6)
    idx = (values / top * (bins - 1)).round().long().clamp_(0, bins - 1)
    hist = torch.zeros(values.shape[0], bins, device=values.device).scatter_add_(1, idx, torch.ones_like(values))
    prob = hist / hist.sum(dim=1, keepdim=True)
    centers = torch.arange(bins, device=values.device, dtype=values.dtype)
    w0 = prob.cumsum(1)
    mu = (prob * centers).cumsum(1)
    mu_t = mu[:, -1:]
    between = (mu_t * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-9)
    best = between.argmax(dim=1).to(values.dtype)
    return (best + 0.5) / (bins - 1) * top.squeeze(1)


def saliency_boxes(batch: "torch.Tensor", border: float = 0.06, min_distance: float = 6.0,
                   trim: float = 0.005) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Foreground boxes for a batch [B, 3, S, S] in [0, 1].

    Returns ``boxes`` [B, 4] (x0, y0, x1, y1 in work pixels), ``scores`` [B] and the foreground
    fraction [B]. ``min_distance`` is the smallest Lab distance (about a just-visible colour
    difference times three) that counts as foreground; ``trim`` is the share of foreground mass
    ignored on each side when spanning the box (robust to stray pixels).
    """
    import torch
    import torch.nn.functional as F

    b, _, s, _ = batch.shape
    smooth = F.avg_pool2d(batch, 3, stride=1, padding=1, count_include_pad=False)
    lab = rgb_to_lab(smooth)
    band = max(2, round(border * s))
    sides = [lab[:, :, :band, :], lab[:, :, -band:, :], lab[:, :, :, :band], lab[:, :, :, -band:]]
    # one robust colour per side: two-tone backgrounds (wall + floor) and light gradients are covered
    protos = torch.stack([side.flatten(2).median(dim=2).values for side in sides], dim=1)  # [B, 4, 3]
    dist = (lab.unsqueeze(1) - protos[:, :, :, None, None]).norm(dim=2).amin(dim=1)  # [B, S, S]
    flat = dist.flatten(1)
    thresh = torch.maximum(otsu_thresholds(flat), torch.full((b,), min_distance, device=batch.device))
    mask = (dist > thresh[:, None, None]).float().unsqueeze(1)
    mask = -F.max_pool2d(-mask, 3, stride=1, padding=1)  # erode: drop speckle from textured backgrounds
    mask = F.max_pool2d(mask, 3, stride=1, padding=1).squeeze(1)  # dilate back
    fraction = mask.mean(dim=(1, 2))
    y0, y1 = _mass_span(mask.sum(dim=2), trim)
    x0, x1 = _mass_span(mask.sum(dim=1), trim)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    fg = (dist * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp_min(1.0)
    bg = (dist * (1 - mask)).sum(dim=(1, 2)) / (1 - mask).sum(dim=(1, 2)).clamp_min(1.0)
    scores = ((fg - bg) / (fg + bg).clamp_min(1e-6)).clamp(0.0, 1.0) * (fraction > 0).float()
    return boxes, scores, fraction


def _mass_span(profile: "torch.Tensor", trim: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """First and one-past-last index covering all but ``trim`` of the mass on each side, per row of [B, S]."""
    import torch

    total = profile.sum(dim=1, keepdim=True).clamp_min(1e-6)
    cum = profile.cumsum(dim=1) / total
    size = profile.shape[1]
    start = (cum <= trim).sum(dim=1).clamp(max=size - 1)
    end = (cum < 1.0 - trim).sum(dim=1).clamp(max=size - 1) + 1
    return start.to(profile.dtype), torch.maximum(end, start + 1).to(profile.dtype)


@dataclass
class TorchvisionDetector:
    """A torchvision detection model; labels from the weights' categories, the spec or class indices."""

    arch: str
    weights: str
    num_classes: int = 91
    labels: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()  # keep only these labels ('' = all; class-agnostic use)
    min_size: int = 0  # 0 = the architecture's default input size
    device: str = "cpu"
    weights_sha256: str = ""
    model: Any = dataclasses.field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.arch

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.arch, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "num_classes": self.num_classes, "labels": list(self.labels), "classes": list(self.classes),
                "min_size": self.min_size}

    def detect(self, images: list["Image.Image"]) -> list[list[Box]]:
        if not images:
            return []
        import numpy as np
        import torch

        tensors = [torch.from_numpy(np.array(img.convert("RGB"))).to(self.device).permute(2, 0, 1).float().div_(255)
                   for img in images]
        with torch.inference_mode():
            outputs = self.model(tensors)
        result: list[list[Box]] = []
        for out in outputs:
            boxes: list[Box] = []
            for (x0, y0, x1, y1), score, label in zip(out["boxes"].cpu().tolist(), out["scores"].cpu().tolist(),
                                                      out["labels"].cpu().tolist()):
                name = self.labels[label] if 0 <= label < len(self.labels) else str(label)
                if self.classes and name not in self.classes:
                    continue
                boxes.append(Box(x0, y0, x1, y1, float(score), name, self.arch))
            result.append(boxes)
        return result


def build_torchvision_detector(arch: str, num_classes: int = 91, min_size: int = 0) -> "torch.nn.Module":
    """The architecture with random init and no backbone download (weights are loaded separately)."""
    from torchvision.models import detection

    if arch not in TORCHVISION_ARCHS:
        raise ConfigError(f"unknown detector architecture {arch!r}: use 'saliency', 'whole' or one of "
                          f"{', '.join(TORCHVISION_ARCHS)}")
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if min_size:
        kwargs["min_size"] = min_size
    return getattr(detection, arch)(**kwargs)


def resolve_detector_weights(arch: str, weights: str) -> tuple[dict[str, Any] | None, str, dict[str, Any]]:
    """Load a state dict for ``arch``: (state_dict or None for random, sha256, extra spec from the source).

    ``weights``: a local file; ``torchvision:<ENUM>`` (e.g. ``torchvision:DEFAULT``) read from torchvision's
    cache only; ``bentoml:<name>:<version>`` from the BentoML model store; ``random`` for an untrained
    model (tests). Never downloads.
    """
    if not weights:
        raise ConfigError(f"detector {arch!r} needs weights: a .pt file, 'torchvision:DEFAULT' (from the torch hub "
                          "cache), 'bentoml:<name>:<version>' or 'random'; or use detector='saliency'")
    if weights == "random":
        return None, "random", {}
    if weights.startswith("torchvision:"):
        return _torchvision_cached_weights(arch, weights.split(":", 1)[1])
    if weights.startswith("bentoml:"):
        return _bentoml_weights(weights.split(":", 1)[1])
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"detector weights file {path} does not exist; give a local .pt/.pth state dict")
    return _load_state_dict(path), sha256_file(path), {}


def _load_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-tensor payloads
        raise ConfigError(f"cannot load detector weights {path} with torch.load(weights_only=True): {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def _torchvision_cached_weights(arch: str, enum_name: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    import torch
    from torchvision.models import get_model_weights

    try:
        weights = get_model_weights(arch)[enum_name or "DEFAULT"]
    except (KeyError, ValueError):
        raise ConfigError(f"torchvision has no weights {enum_name!r} for {arch}") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise ConfigError(f"torchvision weights {weights} are not in the local cache ({path}) and cannot be "
                          "downloaded here: copy the file there, pass a local file as weights, or use detector='saliency'")
    categories = tuple(weights.meta.get("categories") or ())
    return _load_state_dict(path), sha256_file(path), {"labels": list(categories), "num_classes": len(categories)}


def _bentoml_weights(tag: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    import bentoml

    try:
        model = bentoml.models.get(tag)
    except Exception as exc:
        raise ConfigError(f"detector model {tag!r} is not in the BentoML model store ({exc})") from None
    files = sorted(Path(model.path).glob("*.pt")) + sorted(Path(model.path).glob("*.pth"))
    if not files:
        raise ConfigError(f"BentoML model {tag!r} holds no .pt/.pth state dict in {model.path}")
    meta = dict(model.info.metadata or {})
    extra = {k: meta[k] for k in ("labels", "num_classes") if k in meta}
    return _load_state_dict(files[0]), sha256_file(files[0]), extra


def load_detector(spec: dict[str, Any] | str | Path, device: str = "cpu") -> Detector:
    """Build a detector from a spec dict, a ``detector.json`` path or a bare name.

    Names: ``saliency``, ``whole`` or a torchvision architecture (then the spec needs ``weights``).
    """
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith(".json")):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"detector spec file {path} does not exist")
        data = read_json(path)
        spec = data.get("spec", data)
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", None)
    if name == WHOLE:
        return WholeImageDetector()
    if name == SaliencyDetector.name:
        unknown = set(spec) - set(SaliencyDetector._PARAMS)
        if unknown:
            raise ConfigError(f"unknown saliency detector option(s) {sorted(unknown)}; known: {SaliencyDetector._PARAMS}")
        return SaliencyDetector(device=device, **spec)
    if name in TORCHVISION_ARCHS:
        return _load_torchvision(name, spec, device)
    raise ConfigError(f"unknown detector {name!r}: use 'saliency', 'whole' or one of {', '.join(TORCHVISION_ARCHS)}")


def _load_torchvision(arch: str, spec: dict[str, Any], device: str) -> TorchvisionDetector:
    state, digest, extra = resolve_detector_weights(arch, spec.get("weights", ""))
    expected = spec.get("weights_sha256")
    if expected and expected != digest:
        raise ConfigError(f"detector weights {spec.get('weights')} have sha256 {digest[:12]}..., but the spec "
                          f"expects {expected[:12]}...: the weights file changed")
    num_classes = int(spec.get("num_classes") or extra.get("num_classes") or 91)
    labels = tuple(spec.get("labels") or extra.get("labels") or ())
    model = build_torchvision_detector(arch, num_classes, int(spec.get("min_size", 0)))
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"weights {spec.get('weights')} do not fit {arch} with {num_classes} classes: "
                              f"{str(exc).splitlines()[0]}") from None
    model.eval().to(device)
    return TorchvisionDetector(arch=arch, weights=spec.get("weights", ""), num_classes=num_classes, labels=labels,
                               classes=tuple(spec.get("classes") or ()), min_size=int(spec.get("min_size", 0)),
                               device=device, weights_sha256=digest, model=model)


# ========================================================================================== stage
class DetectConfig(StageConfig):
    """Parameters of the detect stage (notebooks/02_detect.ipynb)."""

    stage: ClassVar[str] = "detect"

    detector: str = Field("saliency", description="saliency, whole, a torchvision detection architecture or a detector.json path")
    weights: str = Field("", description="torchvision detectors: .pt file, torchvision:DEFAULT (cache only), bentoml:name:version or random")
    policy: Policy = Field("largest", description="crop policy: largest box, all boxes above min_score, or whole image")
    min_score: float = Field(0.2, ge=0.0, le=1.0, description="boxes scoring below this are ignored")
    batch_size: int = Field(32, ge=1, description="images per detector call")
    num_workers: int = Field(2, ge=0, description="threads decoding images ahead of the detector")
    use_cache: bool = Field(True, description="reuse cached detections (keyed by image sha256 and detector)")
    audit_n: int = Field(12, ge=0, description="images shown in the audit figure")
    shard_index: int = Field(0, ge=0, description="this worker's shard")
    num_shards: int = Field(1, ge=1, description="number of shards the stage fans out to")

    def detector_spec(self) -> dict[str, Any]:
        """The detector spec this config asks for (weights only where the detector takes them)."""
        if self.detector.endswith(".json"):
            data = read_json(Path(self.detector))
            return dict(data.get("spec", data))
        if self.detector in TORCHVISION_ARCHS:
            return {"name": self.detector, "weights": self.weights}
        if self.weights:
            raise ConfigError(f"detector {self.detector!r} takes no weights (got weights={self.weights!r})")
        return {"name": self.detector}


@dataclass(frozen=True)
class DetectResult:
    stage_dir: Path
    boxes: "pd.DataFrame"
    metrics: dict[str, Any]
    counts: dict[str, Any]
    audit_path: Path | None = None


def read_catalog_images(cfg: DetectConfig) -> "pd.DataFrame":
    """The usable catalog rows of this shard: product_id, image_sha256, image_path, width, height."""
    import pandas as pd

    path = cfg.upstream_dir("extract") / "catalog.parquet"
    catalog = pd.read_parquet(path)
    needed = {"product_id", "image_sha256", "image_path", "fetch_status"}
    missing = needed - set(catalog.columns)
    if missing:
        raise SchemaError(f"{path} lacks column(s) {sorted(missing)}; re-run the extract stage")
    rows = catalog[catalog["fetch_status"] == "ok"]
    rows = rows[in_shard(rows["product_id"].tolist(), cfg.shard_index, cfg.num_shards)]
    cols = ["product_id", "image_sha256", "image_path"] + [c for c in ("width", "height") if c in rows.columns]
    return rows[cols].sort_values("product_id").reset_index(drop=True)


class DetectionCache:
    """Raw detections per image sha256 for one detector, as append-only Parquet parts."""

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self, shas: set[str]) -> dict[str, tuple[tuple[int, int], list[Box]]]:
        import pandas as pd

        parts = sorted(self.folder.glob("part-*.parquet"))
        if not parts or not shas:
            return {}
        frames = [pd.read_parquet(p).assign(_part=i) for i, p in enumerate(parts)]
        frame = pd.concat(frames, ignore_index=True)
        frame = frame[frame["image_sha256"].isin(shas)]
        # an image detected twice (concurrent shards, a forced re-run): the newest part wins
        frame = frame[frame["_part"] == frame.groupby("image_sha256")["_part"].transform("max")]
        out: dict[str, tuple[tuple[int, int], list[Box]]] = {}
        for sha, group in frame.groupby("image_sha256", sort=False):
            size = (int(group["width"].iloc[0]), int(group["height"].iloc[0]))
            hits = group[group["box_index"] >= 0].sort_values("box_index")
            out[str(sha)] = (size, [Box(float(r.x0), float(r.y0), float(r.x1), float(r.y1), float(r.score),
                                        str(r.label), str(r.method)) for r in hits.itertuples()])
        return out

    def save(self, found: dict[str, tuple[tuple[int, int], list[Box]]]) -> Path | None:
        import pandas as pd

        if not found:
            return None
        rows: list[dict[str, Any]] = []
        for sha, ((width, height), boxes) in found.items():
            if not boxes:  # remember "looked, found nothing" so it is not detected again
                rows.append({"image_sha256": sha, "width": width, "height": height, "box_index": -1, "x0": 0.0,
                             "y0": 0.0, "x1": 0.0, "y1": 0.0, "score": 0.0, "label": "", "method": ""})
            for i, b in enumerate(boxes):
                rows.append({"image_sha256": sha, "width": width, "height": height, "box_index": i, **b.as_dict()})
        frame = pd.DataFrame(rows, columns=list(_CACHE_COLUMNS))
        return write_parquet_atomic(self.folder / f"part-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet",
                                    frame)


def _decode(path: str) -> "Image.Image | BadImageError":
    from niteru.images import load_rgb

    try:
        return load_rgb(path)
    except BadImageError as exc:
        return exc


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def detect_images(detector: Detector, paths: dict[str, str], batch_size: int, num_workers: int
                  ) -> tuple[dict[str, tuple[tuple[int, int], list[Box]]], dict[str, str]]:
    """Detect every image (sha -> path), decoding ahead in threads; returns (found, failures)."""
    from tqdm.auto import tqdm

    found: dict[str, tuple[tuple[int, int], list[Box]]] = {}
    failures: dict[str, str] = {}
    shas = list(paths)
    pool = ThreadPoolExecutor(max_workers=max(1, num_workers))
    try:
        decoded = pool.map(_decode, [paths[s] for s in shas])  # lazy, bounded by the consumer below
        with tqdm(total=len(shas), desc="detect", unit="img") as bar:
            for chunk in _batches(shas, batch_size):
                images, ok = [], []
                for sha in chunk:
                    img = next(decoded)
                    if isinstance(img, BadImageError):
                        failures[sha] = str(img)
                        continue
                    images.append(img)
                    ok.append(sha)
                for sha, img, boxes in zip(ok, images, detector.detect(images)):
                    found[sha] = (img.size, boxes)
                bar.update(len(chunk))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return found, failures


def run(cfg: DetectConfig) -> DetectResult:
    """Detect products in this shard's catalog images and write ``boxes.parquet`` + ``detector.json``."""
    t0 = time.perf_counter()
    rows = read_catalog_images(cfg)
    detector = load_detector(cfg.detector_spec(), device=cfg.resolved_device())
    spec = detector.spec
    key = detector_key(spec)
    cache = DetectionCache(cfg.cache_path / "detections" / key)
    shas = set(rows["image_sha256"].astype(str))
    cached = cache.load(shas) if cfg.use_cache else {}
    todo = {str(r.image_sha256): str(r.image_path) for r in rows.itertuples() if str(r.image_sha256) not in cached}
    log.info("detect: %d images, %d cached, %d to detect with %s", len(shas), len(shas) - len(todo), len(todo), key)
    t_det = time.perf_counter()
    found, failures = detect_images(detector, todo, cfg.batch_size, cfg.num_workers)
    det_seconds = time.perf_counter() - t_det
    if cfg.use_cache:
        cache.save(found)
    results = {**cached, **found}
    boxes = boxes_table(rows, results, cfg.policy, cfg.min_score)
    out_dir = shard_dir(cfg.stage_dir(), cfg.shard_index, cfg.num_shards)
    write_parquet_atomic(out_dir / BOXES_FILE, boxes)
    write_json_atomic(out_dir / DETECTOR_FILE, detector_record(spec, cfg))
    if failures:
        log.warning("detect: %d image(s) could not be decoded and use the whole image: %s", len(failures),
                    "; ".join(list(failures.values())[:3]))
    counts = {"products": int(len(rows)), "images": len(shas), "detected": len(found), "cached": len(shas) - len(todo),
              "decode_failures": len(failures), "boxes": int(len(boxes))}
    metrics = box_metrics(boxes)
    metrics.update(detect_images_per_s=round(len(found) / det_seconds, 2) if found and det_seconds > 0 else None,
                   seconds=round(time.perf_counter() - t0, 3))
    audit = None
    if cfg.audit_n and cfg.num_shards == 1 and len(boxes):
        audit = out_dir / AUDIT_FILE
        save_audit_figure(cfg, boxes, audit)
    write_stage_summary(out_dir, metrics=metrics, counts=counts, detector_key=key,
                        shard={"index": cfg.shard_index, "of": cfg.num_shards})
    return DetectResult(out_dir, boxes, metrics, counts, audit)


def boxes_table(rows: "pd.DataFrame", results: dict[str, tuple[tuple[int, int], list[Box]]], policy: str,
                min_score: float) -> "pd.DataFrame":
    """One row per crop (at least one per product), sorted by product_id then crop_index."""
    import pandas as pd

    records: list[dict[str, Any]] = []
    for r in rows.itertuples():
        sha = str(r.image_sha256)
        if sha in results:
            size, raw = results[sha]
        else:  # undecodable now: keep the product with its whole image (extract's recorded size)
            size, raw = (int(getattr(r, "width", 0) or 0), int(getattr(r, "height", 0) or 0)), []
        for i, b in enumerate(select_crops(raw, policy, min_score, size)):
            records.append({"product_id": str(r.product_id), "image_sha256": sha, "crop_index": i,
                            "x0": float(b.x0), "y0": float(b.y0), "x1": float(b.x1), "y1": float(b.y1),
                            "score": float(b.score), "label": b.label, "method": b.method})
    frame = pd.DataFrame(records, columns=list(BOX_COLUMNS))
    frame["crop_index"] = frame["crop_index"].astype("int64")
    return frame.sort_values(["product_id", "crop_index"], kind="stable").reset_index(drop=True)


def box_metrics(boxes: "pd.DataFrame") -> dict[str, Any]:
    if boxes.empty:
        return {"whole_image_rate": None, "crops_per_product": None, "mean_box_area_fraction": None}
    per_product = boxes.groupby("product_id").size()
    first = boxes[boxes["crop_index"] == 0]
    whole = first["method"] == WHOLE
    return {"whole_image_rate": round(float(whole.mean()), 4),
            "crops_per_product": round(float(per_product.mean()), 4),
            "mean_box_score": round(float(boxes.loc[boxes["method"] != WHOLE, "score"].mean()), 4) if (~whole).any() else None}


def detector_record(spec: dict[str, Any], cfg: DetectConfig) -> dict[str, Any]:
    return {"detector_id": detector_key(spec), "spec": spec, "policy": cfg.policy, "min_score": cfg.min_score}


def merge_shards(cfg: DetectConfig) -> DetectResult:
    """Concatenate the shards' boxes (sorted by product id: deterministic) into the stage folder."""
    import pandas as pd

    stage = cfg.stage_dir()
    dirs, records = read_shard_records(stage, cfg.num_shards, DETECTOR_FILE, "detector_id")
    frames = [pd.read_parquet(d / BOXES_FILE) for d in dirs]
    boxes = pd.concat(frames, ignore_index=True).sort_values(["product_id", "crop_index"], kind="stable")
    boxes = boxes.reset_index(drop=True)
    if boxes.duplicated(["product_id", "crop_index"]).any():
        raise ConfigError("detect shards overlap (a product appears in two shards); re-run them with the same num_shards")
    write_parquet_atomic(stage / BOXES_FILE, boxes)
    write_json_atomic(stage / DETECTOR_FILE, records[0])
    from niteru.runs import read_stage_summary

    counts: dict[str, Any] = {}
    for d in dirs:
        for k, v in read_stage_summary(d).get("counts", {}).items():
            counts[k] = counts.get(k, 0) + v
    metrics = box_metrics(boxes)
    audit = None
    if cfg.audit_n and len(boxes):
        audit = stage / AUDIT_FILE
        save_audit_figure(cfg, boxes, audit)
    write_stage_summary(stage, metrics=metrics, counts=counts, detector_key=records[0]["detector_id"],
                        shard={"merged": cfg.num_shards})
    return DetectResult(stage, boxes, metrics, counts, audit)


# ========================================================================================== audit
def audit_figure(boxes: "pd.DataFrame", image_paths: dict[str, str], n: int = 12, seed: int = 0,
                 cols: int = 4) -> "Figure":
    """A grid of catalog images with their crop boxes (green: detected, orange dashed: whole-image fallback)."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from niteru.images import load_rgb

    products = boxes["product_id"].drop_duplicates()
    products = products.sample(n=min(n, len(products)), random_state=seed).sort_values() if len(products) else products
    rows = max(1, int(np.ceil(len(products) / cols)))
    fig = Figure(figsize=(3 * cols, 3.2 * rows))
    for i, pid in enumerate(products):
        ax = fig.add_subplot(rows, cols, i + 1)
        crops = boxes[boxes["product_id"] == pid]
        sha = str(crops["image_sha256"].iloc[0])
        try:
            ax.imshow(load_rgb(image_paths[sha]))
        except (KeyError, BadImageError):
            ax.text(0.5, 0.5, "unreadable", ha="center", transform=ax.transAxes)
        for c in crops.itertuples():
            whole = c.method == WHOLE
            ax.add_patch(Rectangle((c.x0, c.y0), c.x1 - c.x0, c.y1 - c.y0, fill=False, lw=2,
                                   ec="orange" if whole else "lime", ls="--" if whole else "-"))
        first = crops.iloc[0]
        ax.set_title(f"{pid[:18]}\n{first['method']} {first['score']:.2f}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def save_audit_figure(cfg: DetectConfig, boxes: "pd.DataFrame", dest: Path) -> "Figure":
    from niteru.io import atomic_path

    catalog = read_catalog_images(cfg)
    paths = dict(zip(catalog["image_sha256"].astype(str), catalog["image_path"].astype(str)))
    fig = audit_figure(boxes, paths, n=cfg.audit_n, seed=cfg.seed)
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    return fig


def load_boxes(run_dir: str | Path) -> "pd.DataFrame":
    """The boxes a finished detect stage wrote (for downstream stages and notebooks)."""
    import pandas as pd

    path = Path(run_dir) / "detect" / BOXES_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run the detect stage first")
    return pd.read_parquet(path)
