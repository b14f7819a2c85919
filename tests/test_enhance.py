"""Stage 2: CLAHE and scale-tracking resize."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pneumoscan.enhance import clahe, resize, to_uint8
from pneumoscan.films import read_xray

from conftest import needs_data


def test_clahe_matches_opencv_and_stays_in_range():
    rng = np.random.default_rng(0)
    image = (rng.random((256, 256)) * 0.3 + 0.2).astype(np.float32)  # low contrast
    out = clahe(image, clip_limit=3.0, tile_grid=(4, 4))
    expected = cv2.createCLAHE(3.0, (4, 4)).apply(to_uint8(image)) / 255.0
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert out.std() > image.std()  # contrast was raised


@needs_data
def test_clahe_raises_local_contrast_on_real_xray(nih_png):
    pixels = read_xray(nih_png).pixels
    out = clahe(pixels)
    assert out.shape == pixels.shape
    tile = slice(300, 400)
    assert out[tile, tile].std() > pixels[tile, tile].std()


def test_clahe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        clahe(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="clip_limit"):
        clahe(np.zeros((8, 8), np.float32), clip_limit=0)


def test_resize_shrinks_without_keeping_the_aspect_ratio():
    image = np.zeros((1000, 800), np.float32)
    image[500:, :400] = 1.0
    small = resize(image, 224)
    assert small.shape == (224, 224)
    assert small[112:, :112].mean() == pytest.approx(1.0) and small[:112].max() == 0.0


def test_resize_to_rectangle_and_enlarging():
    out = resize(np.ones((64, 64), np.float32), (128, 256))
    assert out.shape == (128, 256)
    np.testing.assert_allclose(out, 1.0)
