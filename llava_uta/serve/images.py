"""Uploaded images for the web demo: safe opening (clear errors for bad files) and the square preprocessing modes.

    image = prepare(open_upload("upload.png"), "pad", fill=(122, 116, 104))

Modes follow LLaVA's web UI (docs/llava.md#web-demo-preprocessing): "crop" keeps the centre square, "resize"
squashes the image to a square, "pad" extends it to a square with a fill colour (LLaVA's expand2square). Very large
results are then downscaled so that their longer side is at most MAX_SIDE, as LLaVA's server does.
"""

from __future__ import annotations

import os
import warnings
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 50_000_000
MAX_SIDE = 1344
MODES = ("crop", "resize", "pad")

# PIL warns above this many pixels and refuses twice as many; open_upload rejects anything above it itself.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class UploadError(ValueError):
    """An upload that is not a usable image; the message is meant for the user."""


def open_upload(source: str | os.PathLike | IO[bytes], name: str | None = None) -> Image.Image:
    """The fully decoded RGB image in `source` (a path or a binary file), or UploadError saying why it cannot be used.

    `name` is what the error messages call it (default: the file's name).
    """
    name = name or os.path.basename(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise UploadError(_too_large(name, width * height))
                image.load()
                return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise UploadError(_too_large(name, None)) from err
    except UnidentifiedImageError as err:
        raise UploadError(f"{name} is not an image file that can be read (PNG, JPEG, WebP, ...)") from err
    except (OSError, SyntaxError) as err:
        raise UploadError(f"{name} is damaged or truncated: {err}") from err


def _too_large(name: str, pixels: int | None) -> str:
    size = f"{pixels / 1e6:.0f} megapixels, " if pixels else ""
    return f"{name} is too large ({size}the limit is {MAX_PIXELS / 1e6:.0f} megapixels)"


def prepare(image: Image.Image, mode: str, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """`image` made square by `mode` (see the module docstring), then capped at MAX_SIDE pixels a side."""
    width, height = image.size
    if mode == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif mode == "resize":
        side = min(width, height)
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    elif mode == "pad":
        side = max(width, height)
        image = ImageOps.pad(image, (side, side), color=fill)
    else:
        raise ValueError(f"unknown preprocessing mode {mode!r}; choose one of {MODES}")
    if max(image.size) > MAX_SIDE:
        image = image.resize((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    return image
