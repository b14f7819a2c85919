"""How far a U-Net's mask can be trusted, estimated at prediction time from the film alone.

Automatic masks fail silently (CheXmask, Gaggion et al. 2024, publishes a per-mask quality for
that reason). The estimate here is **test-time-augmentation agreement**: the U-Net reads the same
prepared film again under small changes it learnt to ignore (zoom ±10 %, shifts of 8 % of the
side, rotations of ±8°; its training augmentation covers them), each map is warped back onto the
film, and the quality is the mean Dice between the film's own mask and those re-read masks. A
mask the model is sure of comes back nearly unchanged (quality near 1); a heart drawn over the
spine or lungs cut by an effusion move with every nudge. It needs no second model and no labels,
costs one batch of K extra U-Net passes per film, and works for any mask compared against the
model's re-readings (:func:`agreement`), including one the model did not draw.

A heart mask is also judged by a shape prior (:class:`ShapeModel`): a heart the model re-reads
consistently can still be consistently wrong, and the prior catches hearts not shaped or placed
like one. Which estimate a model uses (``estimate``: the agreement, the prior, or their mean) and
the threshold below which a mask is called unreliable are chosen in ``tools/fit_mask_quality.py``
on JSRT films each judged by a model that never saw them, against the soft Dice of the map (no
extra pass), and stored in the model file (``mask_quality``) with where they came from
(docs/HEART.md gives the figures: the lungs use the agreement, the heart the mean).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import cv2
import numpy as np

#: (rotation in degrees, zoom, shift x, shift y as a fraction of the side) of each re-reading:
#: the candidates, and what a model file without its own ``mask_quality.transforms`` uses.
TRANSFORMS: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 0.9, 0.0, 0.0), (0.0, 1.1, 0.0, 0.0), (8.0, 1.0, 0.0, 0.0), (-8.0, 1.0, 0.0, 0.0),
    (0.0, 1.0, 0.08, 0.0), (0.0, 1.0, -0.08, 0.0), (0.0, 1.0, 0.0, 0.08), (0.0, 1.0, 0.0, -0.08))


def method(transforms=TRANSFORMS, shape: bool = False) -> str:
    """What a model file says of its quality estimate (with ``shape``: averaged with the heart
    shape prior's fidelity)."""
    tta = (f"test-time augmentation agreement (mean Dice of the mask with {len(transforms)} re-readings: "
           f"{', '.join(describe(t) for t in transforms)})")
    return f"mean of the {tta} and a heart shape prior's fidelity (3 modes, lungs' frame)" if shape else tta


def describe(transform: tuple[float, float, float, float]) -> str:
    """One re-reading in words: 'zoom 0.9', 'rotation +8°', 'shift +8 % x'."""
    angle, zoom, dx, dy = transform
    words = [f"zoom {zoom:g}"] if zoom != 1 else []
    words += [f"rotation {angle:+g}°"] if angle else []
    words += [f"shift {100 * v:+g} % {axis}" for v, axis in ((dx, "x"), (dy, "y")) if v]
    return " ".join(words) or "identity"


def affines(size: int, transforms=TRANSFORMS) -> list[np.ndarray]:
    """2×3 affine matrices about the centre of a size×size input, one per transform."""
    out = []
    for angle, zoom, dx, dy in transforms:
        matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, zoom)
        matrix[:, 2] += (dx * size, dy * size)
        out.append(matrix)
    return out


def perturbed(prepared: np.ndarray, matrices: list[np.ndarray]) -> np.ndarray:
    """N×S×S prepared inputs → (N·K)×S×S: each film under each of the K warps, film-major."""
    size = prepared.shape[-1]
    return np.stack([cv2.warpAffine(x, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
                     for x in prepared for m in matrices]).astype(np.float32)


def restored(probs: np.ndarray, matrices: list[np.ndarray]) -> np.ndarray:
    """(N·K)×S×S maps of warped inputs → N×K×S×S maps warped back onto each film's own grid."""
    size, k = probs.shape[-1], len(matrices)
    back = [cv2.warpAffine(p, cv2.invertAffineTransform(matrices[i % k]), (size, size),
                           flags=cv2.INTER_LINEAR, borderValue=0) for i, p in enumerate(probs)]
    return np.stack(back).reshape(-1, k, size, size)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0


def agreement(mask: np.ndarray, rereadings: np.ndarray, threshold: float) -> float:
    """Mean Dice between ``mask`` (any grid; resized to the maps' S×S) and each K×S×S re-read
    probability map thresholded at ``threshold``."""
    size = rereadings.shape[-1]
    if mask.shape != (size, size):
        mask = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    mine = mask > 0
    return float(np.mean([dice(mine, r >= threshold) for r in rereadings]))


#: The heart shape prior's frame (side × side, inside the lungs' bounding box) and its modes.
SHAPE_SIDE = 32
SHAPE_MODES = 3


def shape_frame(lungs: np.ndarray, heart: np.ndarray, side: int = SHAPE_SIDE) -> np.ndarray | None:
    """The heart mask in the lungs' frame: cut to the lung mask's bounding box and resized to
    side × side (area-weighted), so that position and size are relative to the thorax, which is
    what a heart shape prior can judge; None without lungs."""
    ys, xs = np.nonzero(lungs)
    if len(xs) == 0:
        return None
    cut = heart[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    return cv2.resize(cut, (side, side), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class ShapeModel:
    """A point-distribution model of hearts in the lungs' frame (Cootes et al. 1995, on pixels):
    the mean frame and the first principal modes of the training hearts. A heart that the model
    can rebuild from a few modes looks like a heart where a heart should be; a blob over the spine,
    or an outline running across a lung, cannot be rebuilt. It is a statistic of the training
    masks (a mean and three directions), not a copy of any of them."""

    mean: np.ndarray   # side*side
    modes: np.ndarray  # k × side*side, orthonormal rows

    @classmethod
    def fit(cls, frames: np.ndarray, modes: int = SHAPE_MODES) -> ShapeModel:
        flat = frames.reshape(len(frames), -1).astype(np.float64)
        mean = flat.mean(axis=0)
        _, _, components = np.linalg.svd(flat - mean, full_matrices=False)
        return cls(mean.astype(np.float32), components[:modes].astype(np.float32))

    def fidelity(self, frame: np.ndarray | None) -> float:
        """Dice between a heart frame and its rebuilding from the modes (0 without a frame)."""
        if frame is None:
            return 0.0
        x = frame.reshape(-1) - self.mean
        rebuilt = self.mean + self.modes.T @ (self.modes @ x)
        return dice(frame.reshape(-1) > 0.5, rebuilt > 0.5)

    def to_dict(self) -> dict[str, Any]:
        return {"side": int(round(np.sqrt(self.mean.size))), "mean": [round(float(v), 5) for v in self.mean],
                "modes": [[round(float(v), 5) for v in row] for row in self.modes]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeModel:
        return cls(np.asarray(data["mean"], np.float32), np.asarray(data["modes"], np.float32))


#: How a heart mask's quality is made of its two estimates (the model file names one).
ESTIMATES: dict[str, Callable[[float, float], float]] = {"tta": lambda tta, shape: tta, "shape": lambda tta, shape: shape,
             "mean": lambda tta, shape: (tta + shape) / 2, "min": min}


def combined(estimate: str, tta: float, shape: float) -> float:
    """A mask's quality from its TTA agreement and its shape fidelity, as ``estimate`` names."""
    if estimate not in ESTIMATES:
        raise ValueError(f"unknown mask-quality estimate {estimate!r}; one of {', '.join(ESTIMATES)}")
    return float(ESTIMATES[estimate](tta, shape))


@dataclass(frozen=True)
class QualityRule:
    """A model's quality threshold and where it came from (the model file's ``mask_quality``);
    ``threshold`` None: the model carries none, the quality is reported and nothing is judged."""

    threshold: float | None = None
    chosen_on: str | None = None
    #: the re-readings the threshold was chosen with (a threshold holds only for them)
    transforms: tuple[tuple[float, float, float, float], ...] = TRANSFORMS

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> QualityRule:
        section = meta.get("mask_quality") or {}
        value = section.get("threshold")
        transforms = tuple(tuple(float(v) for v in t) for t in section.get("transforms") or TRANSFORMS)
        if not transforms or any(len(t) != 4 for t in transforms):
            raise ValueError("mask_quality.transforms: expected a list of [rotation, zoom, shift x, shift y]")
        return cls(None if value is None else float(value), section.get("chosen_on"),
                   cast(tuple[tuple[float, float, float, float], ...], transforms))

    def reliable(self, quality: float | None) -> bool | None:
        if quality is None or self.threshold is None:
            return None
        return quality >= self.threshold


@dataclass(frozen=True)
class MaskQuality:
    """A film's ``mask_quality``: each mask's quality estimate (``heart`` None without a heart
    model), the thresholds they are held to, and why a mask below its threshold is not trusted."""

    lungs: float
    heart: float | None
    thresholds: dict[str, float | None]
    unreliable: list[str]

    @classmethod
    def of(cls, lungs: float, lung_rule: QualityRule, heart: float | None, heart_rule: QualityRule | None
           ) -> MaskQuality:
        """Each mask's quality against its rule; the reasons of the masks below theirs."""
        unreliable = [unreliable_reason(name, q, rule) for name, q, rule in
                      (("lung", lungs, lung_rule), ("heart", heart, heart_rule))
                      if q is not None and rule is not None and rule.reliable(q) is False]
        return cls(lungs, heart, {"lungs": lung_rule.threshold, "heart": heart_rule.threshold if heart_rule else None},
                   unreliable)

    def to_dict(self) -> dict[str, Any]:
        return {"lungs": self.lungs, "heart": self.heart, "thresholds": dict(self.thresholds),
                "unreliable": list(self.unreliable)}

    def caption(self) -> str:
        """Each mask's quality in words, and which masks are not to be trusted (pictures' captions)."""
        values = ", ".join(f"{name} {q:.2f}" for name, q in (("lungs", self.lungs), ("heart", self.heart))
                           if q is not None)
        return f"Mask quality: {values}" + (f" - {'; '.join(self.unreliable).upper()}" if self.unreliable else "")


def unreliable_reason(structure: str, quality: float, rule: QualityRule) -> str:
    """The words a record, an overlay and an SR use for a mask below its threshold."""
    return f"{structure} mask unreliable (quality {quality:.3f} < {rule.threshold:.3f})"
