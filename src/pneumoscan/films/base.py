"""What every reader of a film shares: the error it ends in, the picture it returns and the size
limits checked before decoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pneumoscan.errors import PneumoScanError

#: Bytes a file may hold per allowed pixel (a 32-bit uncompressed film is 4), plus room for the
#: header: larger files are refused before anything is read into memory.
BYTES_PER_PIXEL_CAP, HEADER_ROOM = 4, 16 * 2**20


#: Refuse images above this many pixels before decoding them (decompression bombs). The largest
#: common chest radiographs (43×43 cm detectors at 0.1 mm) are about 4,300 × 4,300 = 18.5 M pixels.
MAX_PIXELS = 64_000_000


#: Below this side length a picture cannot hold a usable chest X-ray.
MIN_SIDE = 64


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


JPEG_MAGIC = b"\xff\xd8\xff"


DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}


DICOM_CODEC_HINT = (
    "install a decoder for it: `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` "
    "(JPEG, JPEG-LS, JPEG 2000) or `pip install python-gdcm`"
)


class XrayReadError(PneumoScanError, ValueError):
    """A file that cannot be read as a chest X-ray; the message says why in plain words."""


@dataclass(frozen=True)
class XrayImage:
    """A decoded X-ray: ``pixels`` is float32 H×W in [0, 1]; ``meta`` describes the file."""

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape  # type: ignore[return-value]


def _check_size(name: str, height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise XrayReadError(
            f"{name}: {width}×{height} = {height * width:,} pixels is above the limit of "
            f"{max_pixels:,} (refused to protect memory; pass a larger max_pixels if it is real)"
        )
    if min(height, width) < MIN_SIDE:
        raise XrayReadError(
            f"{name}: {width}×{height} pixels is too small for a chest X-ray "
            f"(each side must be at least {MIN_SIDE})"
        )


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _to_uint8_or_16(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.uint8 if arr.max() <= 255 else np.uint16)


def _first(value: Any) -> float:
    """Window tags may be multi-valued; the first pair is the default view."""
    if hasattr(value, "__len__") and not isinstance(value, str | bytes):
        value = value[0]
    return float(value)


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def has_dicom_preamble(head: bytes) -> bool:
    """A DICOM Part 10 file whatever its name: "DICM" after the 128-byte preamble (PACS exports
    often have no extension). The one DICOM sniffer of the package."""
    return head[128:132] == b"DICM"
