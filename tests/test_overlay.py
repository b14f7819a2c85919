"""The picture for people (OpenCV): heat only where Grad-CAM says, caption lines that fit."""

from __future__ import annotations

import numpy as np

from pneumoscan.outputs.overlay import FONT, prediction_picture, wrap_text


def _film() -> np.ndarray:
    return np.tile(np.linspace(0.2, 0.8, 800, dtype=np.float32), (600, 1))  # above MIN_SIDE: drawn 1:1


def _colour(picture: np.ndarray) -> np.ndarray:
    """Pixels that are not grey."""
    p = picture.astype(int)
    return (np.abs(p[..., 0] - p[..., 1]) + np.abs(p[..., 1] - p[..., 2])) > 30


def test_heat_is_drawn_only_where_the_map_is_and_a_bar_beside_it():
    cam = np.zeros((600, 800), np.float32)
    cam[100:200, 120:240] = 1.0
    picture = prediction_picture(_film(), None, None, False, cam, "Pneumonia", 0.7, caption="Findings: x")
    colour = _colour(picture)
    top = (picture.shape[0] - 600) // 2  # title band above, caption below (similar heights here)
    rows = np.flatnonzero(colour[:, :800].any(axis=1))
    cols = np.flatnonzero(colour[:, :800].any(axis=0))
    assert 110 <= cols.min() and cols.max() <= 250, (cols.min(), cols.max())
    assert rows.max() - rows.min() <= 120 and top <= rows.min()
    assert picture.shape[1] > 800 and colour[:, 800:].sum() > 600 * 10  # the colour bar


def test_no_heat_and_no_bar_without_a_map_and_captions_wrap():
    plain = prediction_picture(_film(), None, None, False, None, None, None)
    assert plain.shape[1] == 800 and not _colour(plain).any()
    text = "Not assessed by this model: " + ", ".join(["Pleural_Thickening"] * 12)
    lines = wrap_text(text, 300, 0.5)
    import cv2

    assert len(lines) > 3 and " ".join(lines) == text
    assert all(cv2.getTextSize(line, FONT, 0.5, 1)[0][0] <= 300 for line in lines)
    tall = prediction_picture(_film(), None, None, False, None, None, None, caption=text)
    assert tall.shape[0] > plain.shape[0] + 3 * 15
