"""PNG and JPEG films, decoded by OpenCV (the fastest decoder measured here, ``../shared/STACK.md``):
bit depth, EXIF orientation, colour, to [0, 1] grey."""

from __future__ import annotations

import io
import re
from typing import Any

import cv2
import numpy as np

from pneumoscan.films.base import XrayReadError, _as_int, _check_size


def _decode_raster(
    data: bytes, fmt: str, name: str, max_pixels: int
) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image  # header only: size and mode before any pixel is decoded

    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            mode = header.mode
            orientation = _as_int(header.getexif().get(EXIF_ORIENTATION, 1), 1) if fmt == "jpeg" else 1
    except Image.DecompressionBombError as exc:
        raise XrayReadError(f"{name}: refused as a decompression bomb ({exc})") from exc
    except Exception as exc:  # PIL raises many types for broken headers
        detail = re.sub(r"\s*<[^>]*object at 0x[0-9a-f]+>", "", str(exc))  # no memory addresses in messages
        raise XrayReadError(f"{name}: the {fmt.upper()} header is damaged ({detail})") from exc
    _check_size(name, height, width, max_pixels)
    if fmt == "png" and data.rfind(b"IEND") == -1:
        raise XrayReadError(f"{name}: the PNG file is truncated (no end chunk)")
    if fmt == "jpeg" and data[-64:].rfind(b"\xff\xd9") == -1:
        raise XrayReadError(f"{name}: the JPEG file is truncated (no end-of-image marker)")
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise XrayReadError(f"{name}: the {fmt.upper()} data cannot be decoded ({exc})") from exc
    if raw is None:
        raise XrayReadError(f"{name}: the {fmt.upper()} data is corrupt and cannot be decoded")
    colour = 0.0
    if raw.ndim == 3:
        if raw.shape[2] == 4:
            raw = raw[:, :, :3]  # alpha carries no anatomy; NIH's RGBA files are opaque
        if raw.shape[2] == 3:
            colour = colour_fraction(raw)
            raw = cv2.cvtColor(raw, cv2.COLOR_BGR2GRAY)
        else:
            raw = raw[:, :, 0]
    if raw.dtype not in (np.uint8, np.uint16):
        raise XrayReadError(f"{name}: unsupported pixel type {raw.dtype}")
    lo, hi = int(raw.min()), int(raw.max())
    if lo == hi:  # refused before a float copy is made (a small PNG can hold a huge blank picture)
        raise XrayReadError(f"{name}: every pixel has the same value, so the image shows nothing to read")
    if raw.dtype == np.uint8:
        bit_depth, value_range = 8, None
    else:  # 16-bit files often hold 10-14 bit data: scale by the bits the data uses, never by its own min–max
        declared = png_significant_bits(data) if fmt == "png" else None
        bit_depth = declared or significant_bits(hi)
        value_range = [0, 2 ** bit_depth - 1]
    # One float copy, scaled in place: a temporary of the same size would double the peak memory.
    pixels = raw.astype(np.float32)
    del raw
    pixels *= 1.0 / (2 ** bit_depth - 1)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    pixels = exif_upright(pixels, orientation)
    height, width = pixels.shape
    meta = {
        "format": fmt,
        "exif_orientation": orientation,
        "height": int(height),
        "width": int(width),
        "bit_depth": bit_depth,
        "mode": mode,
        "photometric": None,
        "view_position": None,
        "inverted": False,
        "windowed": False,
        "value_range": value_range,
        "colour_fraction": colour,
    }
    return pixels, meta


#: Channels further apart than this (of the channel's full scale) make a pixel "coloured".
COLOUR_STEP = 24 / 255


def colour_fraction(rgb: np.ndarray) -> float:
    """The share of pixels that are clearly coloured (channels apart by over :data:`COLOUR_STEP`),
    on every other pixel: a film stored as RGB is grey (0.0), an overlay with a heat map or a
    photograph is not. The gate refuses coloured pictures."""
    sample = rgb[::2, ::2].astype(np.int32)
    step = COLOUR_STEP * (255 if rgb.dtype == np.uint8 else 65535)
    spread = sample.max(axis=2) - sample.min(axis=2)
    return round(float((spread > step).mean()), 4)


EXIF_ORIENTATION = 0x0112


def significant_bits(highest: int) -> int:
    """The container depth a 16-bit raster's data uses: the least of 8, 10, 12, 14 and 16 bits that
    holds its highest value. Scaling by it (not by the picture's own min–max) gives the same
    picture whether a film is stored in 8 bits, as 8-bit values in 16 bits, or stretched to
    16 bits (×257), and one hot pixel moves the scale only when it crosses a depth."""
    return next(bits for bits in (8, 10, 12, 14, 16) if highest < 2 ** bits)


def png_significant_bits(data: bytes) -> int | None:
    """The grey depth a PNG's ``sBIT`` chunk declares (PNG spec 11.3.3.4), if it has one before
    its image data."""
    at, image = data.find(b"sBIT"), data.find(b"IDAT")
    if at < 4 or (0 <= image < at) or at + 5 > len(data):
        return None
    bits = data[at + 4]
    return int(bits) if 1 <= bits <= 16 else None


def exif_upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF Orientation (1–8) so the picture stands as the camera meant (a phone photo
    of a film is stored sideways with orientation 6 or 8); OpenCV's unchanged decode ignores it."""
    turned = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
              5: lambda a: a.T, 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].T,
              8: lambda a: np.rot90(a, 1)}.get(orientation)
    return np.ascontiguousarray(turned(pixels)) if turned else pixels
