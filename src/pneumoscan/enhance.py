"""Stage 2 (enhance): CLAHE and resizing.

The same :func:`clahe` runs in segmentation training, classifier preparation and inference, so a
model never sees a contrast it was not trained on. Boxes move between frames with
:func:`pneumoscan.crop.scale_box` (the crop is cut from the original, not from the 224 copy).
"""

from __future__ import annotations

import cv2
import numpy as np

#: Defaults for contrast-limited adaptive histogram equalisation (OpenCV's customary values;
#: the thesis names the method, bilinear tile interpolation, but no parameters).
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILE_GRID = (8, 8)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] float → uint8 with rounding (values outside are clipped)."""
    return np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)


def clahe(
    pixels: np.ndarray,
    clip_limit: float = CLAHE_CLIP_LIMIT,
    tile_grid: tuple[int, int] = CLAHE_TILE_GRID,
) -> np.ndarray:
    """CLAHE on a [0, 1] float image; returns float32 in [0, 1].

    Runs on 8 bits: OpenCV's 8-bit CLAHE is ~3 ms at 1024², and every training set here is 8-bit.
    """
    if pixels.ndim != 2:
        raise ValueError(f"clahe expects a 2-D grey image, got shape {pixels.shape}")
    if clip_limit <= 0:
        raise ValueError(f"clip_limit must be positive, got {clip_limit}")
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=tuple(int(t) for t in tile_grid))
    return op.apply(to_uint8(pixels)).astype(np.float32) / 255.0


def resize(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize to ``size`` (square int, or (height, width)) without keeping the aspect ratio,
    as the thesis does; INTER_AREA when shrinking (no aliasing), bilinear when enlarging."""
    height, width = (size, size) if isinstance(size, int) else size
    src_h, src_w = pixels.shape[:2]
    shrinking = height * width < src_h * src_w
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(pixels, (int(width), int(height)), interpolation=interp)
