"""Stages 4–5 (clean mask, crop): from a lung probability map to a box on the ORIGINAL image.

Pure functions on arrays. The thesis's clean-up is kept (threshold 0.4, morphological opening,
the two largest connected components) and two steps are added: holes are filled (opacities
inside a lung must stay inside the box) and the opening kernel scales with the resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

THRESHOLD = 0.4
#: Opening kernel side as a fraction of the shorter image side (7 px at 512, 3 px at 224).
KERNEL_FRACTION = 0.014
#: A component smaller than this fraction of the image cannot be a lung (specks, labels).
MIN_LUNG_FRACTION = 0.01
#: Margin added on every side of the lung box, as a fraction of the box's width/height.
MARGIN = 0.05
#: AG-CNN's default attention threshold (Guan et al. 2018 chose 0.7 on their validation data;
#: ``train --attention-threshold`` chooses among candidates on ours).
ATTENTION_THRESHOLD = 0.7
#: The local crop is never smaller than this fraction of the lung crop's side (a lone hot
#: feature cell would otherwise give a 32-pixel crop blown up eight times).
MIN_LOCAL_FRACTION = 0.25


@dataclass(frozen=True)
class LungCrop:
    """Where the lungs are. ``box`` is [x0, y0, x1, y1] in pixels of the image the mask covers
    (x1, y1 exclusive); ``fallback`` says the whole image is used because fewer than two lung
    regions were found."""

    mask: np.ndarray  # uint8 0/1, cleaned
    box: tuple[int, int, int, int]
    fallback: bool
    lung_fraction: float
    regions: int


def kernel_size(shape: tuple[int, int], fraction: float = KERNEL_FRACTION) -> int:
    """Odd kernel side proportional to the image (at least 3)."""
    side = max(3, int(round(min(shape) * fraction)))
    return side if side % 2 else side + 1


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected to the border (0/1 uint8 in and out)."""
    padded = np.pad(mask, 1).astype(np.uint8)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    holes = flood == 0
    padded[holes] = 1
    return padded[1:-1, 1:-1]


def clean_mask(prob: np.ndarray, threshold: float = THRESHOLD,
               min_fraction: float = MIN_LUNG_FRACTION, keep: int = 2) -> tuple[np.ndarray, int]:
    """Threshold → opening → fill holes → keep the ``keep`` largest components above
    ``min_fraction`` (two lungs; one heart).

    Returns the 0/1 uint8 mask and how many regions it holds (0 … ``keep``).
    """
    binary: np.ndarray = (prob >= threshold).astype(np.uint8)
    k = kernel_size(binary.shape)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel)
    binary = fill_holes(binary)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(areas)[::-1][:keep]
    kept = [i + 1 for i in order if areas[i] >= min_fraction * binary.size]
    return np.isin(labels, kept).astype(np.uint8), len(kept)


def lung_crop(prob: np.ndarray, threshold: float = THRESHOLD, margin: float = MARGIN,
              min_fraction: float = MIN_LUNG_FRACTION) -> LungCrop:
    """Clean ``prob`` (a probability map at the resolution the box is wanted in) and box both
    lungs with ``margin``; with fewer than two lung regions, the whole image and ``fallback``."""
    mask, regions = clean_mask(prob, threshold, min_fraction)
    height, width = mask.shape
    fraction = float(mask.mean())
    if regions < 2:
        return LungCrop(mask, (0, 0, width, height), True, fraction, regions)
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    box = (max(0, int(np.floor(x0 - dx))), max(0, int(np.floor(y0 - dy))),
           min(width, int(np.ceil(x1 + dx))), min(height, int(np.ceil(y1 + dy))))
    return LungCrop(mask, box, False, fraction, regions)


def scale_box(box: tuple[int, int, int, int], from_shape: tuple[int, int],
              to_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Map a box between two resolutions of the same picture (outward rounding, clipped)."""
    sy, sx = to_shape[0] / from_shape[0], to_shape[1] / from_shape[1]
    x0, y0, x1, y1 = box
    return (max(0, int(np.floor(x0 * sx))), max(0, int(np.floor(y0 * sy))),
            min(to_shape[1], int(np.ceil(x1 * sx))), min(to_shape[0], int(np.ceil(y1 * sy))))


def crop_resize(pixels: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The classifier's input: the box cut from the original picture, resized to size×size."""
    from pneumoscan.enhance import resize

    return resize(apply_box(pixels, box), size)


def classifier_crop(pixels: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The classifier's input as uint8: training (the crop cache) and prediction both take it from
    here, so the model sees the same picture, quantised the same way, in both."""
    return np.round(np.clip(crop_resize(pixels, box, size), 0.0, 1.0) * 255).astype(np.uint8)


def lungs_only(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The film with 0 outside the lung mask: the input of a classifier trained on lung-masked
    films (``lung_mask`` in its preprocessing), which sees only what lies inside the lungs."""
    return pixels * (mask > 0)


def premasked_crop(film: np.ndarray, mask: np.ndarray, size: int) -> tuple[LungCrop, np.ndarray]:
    """A film that arrives lung-masked (0 outside its mask; :mod:`pneumoscan.data.nih_masked`):
    its mask cleaned like the U-Net's (:func:`lung_crop`), the film kept inside the cleaned mask,
    and the classifier crop of its lung box. Training on such films and predicting with
    ``masked=True`` on unmasked ones give the classifier the same kind of picture."""
    found = lung_crop(mask.astype(np.float32))
    return found, classifier_crop(lungs_only(film, found.mask), found.box, size)


def apply_box(pixels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The pixels inside ``box`` (a view, no copy)."""
    x0, y0, x1, y1 = box
    return pixels[y0:y1, x0:x1]


def attention_box(features: np.ndarray, threshold: float, size: int,
                  min_fraction: float = MIN_LOCAL_FRACTION) -> tuple[int, int, int, int]:
    """AG-CNN's attention-guided box, in pixels of the size×size lung crop: the largest connected
    region where the global branch's heat map (channel-wise maximum of its last post-ReLU feature
    map C×h×w, upsampled and scaled to [0, 1]) reaches ``threshold``, widened about its centre to
    at least ``min_fraction`` of the side."""
    heat = cv2.resize(features.max(axis=0).astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(heat.min()), float(heat.max())
    if hi <= lo:
        return 0, 0, size, size
    binary = ((heat - lo) / (hi - lo) >= threshold).astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    x, y, w, h = stats[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])), :4]
    least = int(np.ceil(min_fraction * size))
    x0, y0 = _widen(int(x), int(w), least, size), _widen(int(y), int(h), least, size)
    return x0[0], y0[0], x0[1], y0[1]


def _widen(start: int, length: int, least: int, size: int) -> tuple[int, int]:
    """[start, start + length) widened about its centre to ``least``, kept inside [0, size)."""
    if length >= least:
        return start, start + length
    begin = min(max(0, start + length // 2 - least // 2), size - least)
    return begin, begin + least


def box_in_original(box: tuple[int, int, int, int], lung_box: tuple[int, int, int, int],
                    size: int) -> tuple[int, int, int, int]:
    """A box in pixels of the size×size lung crop → the same region in the original image (the
    crop is ``lung_box`` stretched to a square), rounded outwards."""
    lx0, ly0, lx1, ly1 = lung_box
    sx, sy = (lx1 - lx0) / size, (ly1 - ly0) / size
    x0, y0, x1, y1 = box
    return (lx0 + int(np.floor(x0 * sx)), ly0 + int(np.floor(y0 * sy)),
            min(lx1, lx0 + max(int(np.ceil(x1 * sx)), int(np.floor(x0 * sx)) + 1)),
            min(ly1, ly0 + max(int(np.ceil(y1 * sy)), int(np.floor(y0 * sy)) + 1)))


def local_crop(pixels: np.ndarray, lung_box: tuple[int, int, int, int], box: tuple[int, int, int, int],
               size: int) -> np.ndarray:
    """AG-CNN's local input: the attention box (crop pixels) cut from the ORIGINAL picture at its
    full resolution, resized and quantised like the lung crop (:func:`classifier_crop`)."""
    return classifier_crop(pixels, box_in_original(box, lung_box, size), size)
