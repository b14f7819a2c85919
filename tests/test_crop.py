"""Stages 4–5 on hand-made masks: clean-up, two-lung box, fallback, mapping back to the original."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pneumoscan.crop import (
    MARGIN,
    apply_box,
    clean_mask,
    fill_holes,
    kernel_size,
    lung_crop,
    scale_box,
)


def _two_lungs(size: int = 224) -> np.ndarray:
    prob = np.zeros((size, size), np.float32)
    cv2.ellipse(prob, (70, 110), (30, 60), 0, 0, 360, 0.9, -1)   # x 40..100, y 50..170
    cv2.ellipse(prob, (155, 105), (28, 55), 0, 0, 360, 0.8, -1)  # x 127..183, y 50..160
    return prob


def test_two_blobs_and_specks_give_the_box_of_the_blobs():
    prob = _two_lungs()
    rng = np.random.default_rng(0)
    for x, y in rng.integers(0, 224, size=(30, 2)):
        prob[y, x] = 1.0  # single-pixel specks
    prob[5:9, 200:204] = 1.0  # a 4×4 speck in a corner
    crop = lung_crop(prob, margin=0.0)
    assert not crop.fallback and crop.regions == 2
    assert crop.box == pytest.approx((40, 50, 184, 171), abs=2)
    assert crop.mask[7, 202] == 0  # specks removed


def test_margin_widens_the_box_and_stays_inside_the_image():
    tight = lung_crop(_two_lungs(), margin=0.0).box
    wide = lung_crop(_two_lungs(), margin=MARGIN).box
    assert wide[0] < tight[0] and wide[2] > tight[2] and wide[1] < tight[1] and wide[3] > tight[3]
    edge = np.zeros((100, 100), np.float32)
    edge[0:60, 0:30] = 1
    edge[0:60, 60:100] = 1
    box = lung_crop(edge, margin=0.5).box
    assert box[0] == 0 and box[1] == 0 and box[2] == 100 and box[3] <= 100


def test_one_blob_falls_back_to_the_whole_image():
    prob = np.zeros((224, 224), np.float32)
    cv2.ellipse(prob, (70, 110), (30, 60), 0, 0, 360, 0.9, -1)
    crop = lung_crop(prob)
    assert crop.fallback and crop.regions == 1 and crop.box == (0, 0, 224, 224)


def test_empty_and_below_threshold_fall_back():
    assert lung_crop(np.zeros((224, 224), np.float32)).fallback
    assert lung_crop(_two_lungs() * 0.4 - 0.01).fallback  # everything under the 0.4 threshold


def test_threshold_is_inclusive_at_point_four():
    prob = (_two_lungs() > 0).astype(np.float32) * 0.4
    assert not lung_crop(prob).fallback


def test_tiny_second_component_is_not_a_lung():
    prob = np.zeros((224, 224), np.float32)
    cv2.ellipse(prob, (70, 110), (30, 60), 0, 0, 360, 0.9, -1)
    prob[20:30, 180:190] = 0.9  # 100 px < 1 % of the image
    assert lung_crop(prob).fallback


def test_holes_inside_a_lung_are_filled():
    prob = _two_lungs()
    prob[100:120, 60:80] = 0.0  # an opacity the U-Net missed
    mask, regions = clean_mask(prob)
    assert regions == 2 and mask[110, 70] == 1
    ring = np.zeros((20, 20), np.uint8)
    ring[5:15, 5:15] = 1
    ring[8:12, 8:12] = 0
    assert fill_holes(ring)[10, 10] == 1 and fill_holes(ring)[0, 0] == 0


def test_three_regions_keep_the_two_largest():
    prob = _two_lungs()
    prob[190:215, 20:50] = 0.9  # a third, smaller region (arm gap) of 750 px
    crop = lung_crop(prob, margin=0.0)
    assert crop.regions == 2 and crop.mask[200, 30] == 0 and crop.box[3] < 180


def test_kernel_scales_with_resolution():
    assert kernel_size((224, 224)) == 3
    assert kernel_size((1024, 1024)) == 15
    assert kernel_size((4000, 3000)) % 2 == 1 and kernel_size((4000, 3000)) > 35


def test_box_maps_back_to_the_original_resolution():
    assert scale_box((56, 112, 112, 224), (224, 224), (1000, 800)) == (200, 500, 400, 1000)
    assert scale_box((0, 0, 224, 224), (224, 224), (1024, 1024)) == (0, 0, 1024, 1024)
    image = np.arange(100 * 80).reshape(100, 80)
    assert apply_box(image, (10, 20, 30, 60)).shape == (40, 20)
