"""Safe image decoding shared by fetch, detection, embedding and the service."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from niteru.errors import BadImageError

#: Refuse images with more pixels than this (decompression bombs). 64 MP covers any product photo.
DEFAULT_MAX_PIXELS = 64_000_000


def load_rgb(src: bytes | str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image fully and return it as RGB with EXIF orientation applied.

    Raises :class:`BadImageError` for anything that is not a complete, sane image: non-image
    content, truncated files, images over ``max_pixels`` pixels. CMYK, grayscale, palette and
    alpha images are converted to RGB (alpha composited on white, as product photos expect).
    """
    name = "<bytes>" if isinstance(src, (bytes, bytearray)) else str(src)
    try:
        data = bytes(src) if isinstance(src, (bytes, bytearray)) else Path(src).read_bytes()
    except OSError as exc:
        raise BadImageError(f"cannot read image {name}: {exc.strerror or exc}") from None
    if not data:
        raise BadImageError(f"image {name} is empty (0 bytes)")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadImageError(
                    f"image {name} is {width}x{height} = {width * height:,} pixels, over the limit of "
                    f"{max_pixels:,} (possible decompression bomb)"
                )
            img.load()
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(f"{name} is not a recognised image format ({len(data)} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(f"image {name} refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"image {name} is truncated or corrupt: {exc}") from None
    return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")
