"""What the review page draws, made once when a result is stored: a small JPEG of the film, and in
its pixels the lung and heart outlines (polygons) and one heat map per explained label (a small
PNG with alpha). The page switches them in the browser, so nothing is redrawn on the server and
the store holds a few tens of kilobytes per film, not full-size pictures."""

from __future__ import annotations

import base64

import cv2
import numpy as np

PREVIEW_SIDE = 768
HEAT_SIDE = 96
JPEG_QUALITY = 85
#: Outline simplification, in preview pixels (a polygon of a few dozen points per lung).
OUTLINE_TOLERANCE = 1.5


def preview_scale(shape: tuple[int, int], side: int = PREVIEW_SIDE) -> float:
    """Film pixels per preview pixel (never enlarged)."""
    return max(1.0, max(shape) / side)


def preview_jpeg(pixels: np.ndarray, scale: float) -> tuple[bytes, int, int]:
    """The film (float in [0, 1]) as a greyscale JPEG ``scale`` times smaller, and its size."""
    height, width = (max(1, round(n / scale)) for n in pixels.shape[:2])
    small = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", np.clip(small * 255 + 0.5, 0, 255).astype(np.uint8),
                            [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise ValueError("JPEG encoding failed")
    return data.tobytes(), width, height


def outlines(mask: np.ndarray | None, scale: float) -> list[list[list[int]]]:
    """The outer contours of a binary mask as polygons ([[x, y], …]) in preview pixels."""
    if mask is None or not mask.any():
        return []
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        points = cv2.approxPolyDP(contour.astype(np.float32) / scale, OUTLINE_TOLERANCE, True)
        if len(points) >= 3:
            polygons.append(np.round(points[:, 0]).astype(int).tolist())
    return polygons


#: The most opaque a heat map gets (of 255): a called finding's, and one of a finding not called
#: (drawn faintly, as the overlay draws it, so that it draws the eye less than a call's).
HEAT_ALPHA, FAINT_ALPHA = 170, 60


def heat_png(cam: np.ndarray, side: int = HEAT_SIDE, called: bool = True) -> str:
    """A Grad-CAM map (film size, values in [0, 1]) as a small colour PNG (base64) whose alpha
    grows with the value, so the film shows through where the map is low; the page stretches it
    over the whole film. The map of a finding not ``called`` stays faint even at its peak."""
    scale = max(1.0, max(cam.shape) / side)
    size = (max(1, round(cam.shape[1] / scale)), max(1, round(cam.shape[0] / scale)))
    small = cv2.resize(cam.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    peak = float(small.max()) or 1.0
    value = np.clip(small / peak, 0, 1)
    colour = cv2.applyColorMap((value * 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (np.clip((value - 0.2) / 0.8, 0, 1) * (HEAT_ALPHA if called else FAINT_ALPHA)).astype(np.uint8)
    ok, data = cv2.imencode(".png", np.dstack([colour, alpha]))
    if not ok:  # pragma: no cover
        raise ValueError("PNG encoding failed")
    return base64.b64encode(data.tobytes()).decode()
