"""Is it an image we serve? Decoded with Pillow, under its decompression-bomb limit."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

# what the bytes are -> the type we serve them as
_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
MAX_PIXELS = 64_000_000  # 8000 x 8000: far above any generated image, far below a bomb


class NotAnImage(ValueError):
    """The bytes are not a whole image of an allowed type (or are a decompression bomb)."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    content_type: str
    width: int
    height: int


def verify_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Decode `data` fully (a cut or corrupt image fails here, not in a browser)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=list(_TYPES)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise NotAnImage(f"{width}x{height} pixels is more than {max_pixels}")
                kind = _TYPES.get(image.format or "")
                if kind is None:
                    raise NotAnImage(f"format {image.format} is not allowed")
                image.load()
        except NotAnImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise NotAnImage(f"decompression bomb: {exc}") from exc
        except Exception as exc:  # Pillow raises many kinds for bytes it cannot decode
            raise NotAnImage(f"{type(exc).__name__}: {exc}") from exc
    return ImageInfo(content_type=kind, width=width, height=height)
