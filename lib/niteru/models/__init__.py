"""Model code for backbones whose weights ship without an architecture (see :mod:`niteru.backbones`)."""

from niteru.models.efficientnet_lite import (
    EfficientNetLite0,
    EfficientNetLite0Features,
    efficientnet_lite0,
    shipped_weights_path,
)

__all__ = ["EfficientNetLite0", "EfficientNetLite0Features", "efficientnet_lite0", "shipped_weights_path"]
