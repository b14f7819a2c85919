"""The input gate (between segmentation and classification): is this a frontal chest X-ray at all?

A classifier scores whatever it is given, so a CT slice, a photograph, noise or a film on its side
would get confident "findings". Before classifying, every image is checked on:

- its DICOM tags: the modality must be a projection radiograph (CR, DX, DR, RG, or a secondary
  capture), the body part, when given, the chest, the view not lateral (always applied);
- the picture: at least :data:`MIN_GREY_LEVELS` grey levels, not coloured (an overlay, PneumoScan's
  own included, or a photograph), and not one of PneumoScan's own DICOM results (always applied);
- a learnt check (:class:`FrontalCheck`, the shipped ``frontal_gate.pt``): a logistic regression
  on the measures below and on 8×8 thumbnails of the film and of the lung map, fitted by
  ``tools/gate_fit.py`` on every dev film against rotated, inverted, blank, noise, gradient,
  photograph, CT/MR and lateral images; it is tied to the lung model whose maps it read;
- the rules it replaces where it is missing or meant for another lung model (then ``method`` says
  ``rules``): on the U-Net's map, two lung regions, side by side, of plausible and similar size,
  taller than wide, a confident map; on the picture, lungs darker than the mediastinum (else
  inverted) and the film brighter just below the lungs than just above (else upside down).
  Where the learnt check refuses, the rules that fail are given as its reasons.

:func:`check_frontal_chest` returns a :class:`GateResult` with every measured value and, when the
image is refused, the reasons in words. Pure functions on arrays; rule limits are module constants
chosen on the development data (``tools/gate_report.py`` prints the acceptance per source and
the refusal per kind of non-chest image).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pneumoscan.crop import clean_mask
from pneumoscan.films.dicom import code_string
from pneumoscan.modelfile import (
    ModelFileError,
    load_model,
    save_model,
    shipped_model_path,
)

KIND = "frontal_gate"

#: Modalities of projection radiographs (SC/OT: a film digitised or exported as a picture).
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG", "SC", "OT", "PX"}
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "LUNGS", "PORT CHEST", "TORAX", "THORAX CHEST"}
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "L", "RLD", "LLD"}

# Limits on the U-Net map at its working size (fractions of the image side or area).
# Chosen on the measures of every dev film and the non-chest set (tools/gate_report.py): the
# loosest limits that still refuse at least 95 % of the non-chest set. Looser ones let
# photographs and lateral films through; a learnt check would be needed to go further.
MIN_LUNG_AREA = 0.02         # each lung
TOTAL_LUNG_AREA = (0.08, 0.65)
MIN_AREA_RATIO = 0.15        # smaller lung / larger lung
MAX_CENTRE_DY = 0.3          # vertical offset of the two lungs' centres
CENTRE_Y = (0.15, 0.8)       # both lung centres inside this band
MIN_ASPECT = 0.9             # lung bounding box height / width
MAX_UNCERTAIN = 0.35         # pixels with 0.2 < p < 0.8, per pixel with p ≥ 0.5
MIN_MEDIASTINUM = 0.05       # mediastinum − lungs, mean grey (film in [0, 1], 1 = bone)
MIN_BOX_CONTRAST = 0.03      # rest of the lung box − lungs
BAND = 0.09                  # rows above/below the lungs compared, as a fraction of the side
MIN_BELOW_MINUS_ABOVE = -0.03
UPSIDE_DOWN_Y, UPSIDE_DOWN_LR = 0.55, -0.05  # fallback: low lungs and a larger image-right lung


@dataclass
class GateResult:
    """Whether the image looks like a frontal chest X-ray, with every value measured."""

    frontal_chest: bool
    reasons: list[str] = field(default_factory=list)
    measures: dict[str, Any] = field(default_factory=dict)
    forced: bool = False
    method: str = "rules"

    @property
    def refused_as(self) -> str | None:
        """The refusal in a few words (:func:`refusal_headline`); None when nothing was refused."""
        return refusal_headline(self.reasons) if self.reasons else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"refused_as": self.refused_as}


#: The start of the reason given when the lung model finds fewer than two lungs.
LUNGS_NOT_FOUND = "lungs not found"


def refusal_headline(reasons: list[str]) -> str:
    """A refusal in a few words, for the line a person reads first. When the lung model found no two
    lungs, that is said first: a child's film in a large white field, or an unusual exposure, is
    refused because its lungs were not found, which "not a frontal chest X-ray" would misstate."""
    if any(r.startswith(LUNGS_NOT_FOUND) for r in reasons):
        return "the lungs were not found, so it could not be checked as a frontal chest X-ray"
    return "not a frontal chest X-ray"


#: A radiograph has hundreds of grey levels; a picture with fewer than this is a drawing, a mask
#: or a film destroyed by a broken window (checked on the 8-bit levels of every other pixel).
MIN_GREY_LEVELS = 16


def grey_levels(pixels: np.ndarray) -> int:
    """How many of the 256 eight-bit grey levels a [0, 1] picture uses (every other pixel in
    each direction: no averaging, which would invent levels at the edges of a binary picture)."""
    sample = np.clip(np.asarray(pixels[::2, ::2], np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return int(np.count_nonzero(np.bincount(sample.ravel(), minlength=256)))


#: Above this share of clearly coloured pixels a picture is an overlay or a photograph.
MAX_COLOUR_FRACTION = 0.02


def caption_band(rows: np.ndarray, tolerance: float = 4 / 255) -> tuple[int, float, float]:
    """The band of rows that ``rows`` starts with, drawn as PneumoScan's overlay draws its title
    and caption: one flat level covering at least 15 % of each row (lines of text cover the
    rest), and nothing much darker than it (text is lighter, and its anti-aliased edges blend
    towards the level; a JPEG copy rings a little below it). (Its height in rows, its level, the
    share of its pixels much brighter than the level: the text.)"""
    level = float(np.median(rows[0]))
    at_level = (np.abs(rows - level) <= tolerance).mean(axis=1) >= 0.15
    nothing_darker = (rows >= level - 3 * tolerance).all(axis=1)
    banded = at_level & nothing_darker
    height = len(rows) if banded.all() else int(np.argmin(banded))
    return height, level, float((rows[:height] > level + 0.3).mean()) if height else 0.0


#: A band at least this share of the picture's height (and 10 rows), at both ends, at one level
#: with text on both: PneumoScan's own overlay, grey or not.
MIN_BAND_SHARE = 0.02


def own_overlay(pixels: np.ndarray) -> bool:
    """Whether a picture is framed like PneumoScan's overlay (:mod:`pneumoscan.outputs.overlay`):
    a title band on top and a caption band below, of one flat dark grey (never black: the overlay
    draws them at 24 of 255) with light text on each, each ending where the picture begins.
    Catches a grey copy, which the colour rule cannot; a film's black borders are black."""
    height = len(pixels)
    reach = max(10, height // 6)
    top_rows, top_level, top_text = caption_band(pixels[:reach])
    bottom_rows, bottom_level, bottom_text = caption_band(pixels[::-1][:reach])
    least = max(10, MIN_BAND_SHARE * height)
    return (least <= min(top_rows, bottom_rows) and max(top_rows, bottom_rows) < reach
            and abs(top_level - bottom_level) <= 4 / 255 and 0.02 < top_level < 0.3
            and min(top_text, bottom_text) > 0.002)


def picture_reasons(pixels: np.ndarray, meta: dict[str, Any] | None = None) -> list[str]:
    """Reasons from the picture alone (its grey levels, its colour), applied whatever the learnt
    check says."""
    reasons, levels = [], grey_levels(pixels)
    if levels < MIN_GREY_LEVELS:
        reasons.append(f"only {levels} grey levels (a radiograph has hundreds; a binary, posterised or "
                       f"wrongly windowed picture)")
    if own_overlay(pixels):
        reasons.append("framed like PneumoScan's own overlay (a title and a caption band), not a film")
    colour = float((meta or {}).get("colour_fraction") or 0.0)
    if colour > MAX_COLOUR_FRACTION:
        reasons.append(f"a colour picture ({colour:.0%} of its pixels coloured): an overlay, a screenshot "
                       f"or a photograph, not a radiograph")
    return reasons


def tag_reasons(meta: dict[str, Any]) -> list[str]:
    """Reasons from the DICOM header (none for PNG/JPEG, which carry no such tags)."""
    reasons = ["one of PneumoScan's own results (its manufacturer or description), not a film"] \
        if meta.get("made_by_pneumoscan") else []
    modality = (code_string(meta.get("modality")) or "")
    if modality and modality not in RADIOGRAPH_MODALITIES:
        reasons.append(f"modality {modality} is not a projection radiograph")
    body = (code_string(meta.get("body_part")) or "")
    if body and body not in CHEST_BODY_PARTS:
        reasons.append(f"body part {body} is not the chest")
    view = (code_string(meta.get("view_position")) or "")
    if view in LATERAL_VIEWS:
        reasons.append("lateral view (tag ViewPosition); only frontal films are scored")
    return reasons


def lung_measures(prob: np.ndarray, picture: np.ndarray) -> dict[str, float]:
    """Shape, position, confidence and contrast of the lungs the U-Net sees.

    ``prob``: the U-Net's S×S probability map; ``picture``: the [0, 1] film resized to S×S.
    """
    mask, regions = clean_mask(prob)
    size = float(mask.size)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    comps = sorted(range(1, count), key=lambda i: -stats[i, cv2.CC_STAT_AREA])[:2]
    height, width = mask.shape
    confident = prob >= 0.5
    measures: dict[str, float] = {
        "regions": float(regions),
        "lung_area": float(mask.mean()),
        "uncertain": float(((prob > 0.2) & (prob < 0.8)).sum() / max(confident.sum(), 1)),
    }
    if len(comps) < 2:
        return measures
    areas = [stats[i, cv2.CC_STAT_AREA] / size for i in comps]
    (xa, ya), (xb, yb) = (centroids[i] / (width, height) for i in comps)
    aspects = [stats[i, cv2.CC_STAT_HEIGHT] / max(stats[i, cv2.CC_STAT_WIDTH], 1) for i in comps]
    left, right = sorted(comps, key=lambda i: centroids[i][0])
    x0 = min(stats[i, 0] for i in comps)
    x1 = max(stats[i, 0] + stats[i, 2] for i in comps)
    y0 = min(stats[i, 1] for i in comps)
    y1 = max(stats[i, 1] + stats[i, 3] for i in comps)
    lungs = mask.astype(bool)
    lung_grey = float(picture[lungs].mean())
    box, inside = picture[y0:y1, x0:x1], lungs[y0:y1, x0:x1]
    gap = (stats[left, 0] + stats[left, 2], stats[right, 0])
    band = max(3, int(round(BAND * height)))
    above = picture[max(0, y0 - band):y0, x0:x1]
    below = picture[y1:y1 + band, x0:x1]
    nan = float("nan")
    measures.update({
        "smaller_lung_area": float(min(areas)),
        "area_ratio": float(min(areas) / max(areas)),
        "left_right": float(min(xa, xb) < 0.5 < max(xa, xb)),
        "centre_dy": float(abs(ya - yb)),
        "centre_y_min": float(min(ya, yb)),
        "centre_y_max": float(max(ya, yb)),
        "aspect": float(min(aspects)),
        "centre_y": float((ya + yb) / 2),
        "left_minus_right": float((stats[left, cv2.CC_STAT_AREA] - stats[right, cv2.CC_STAT_AREA])
                                  / (stats[left, cv2.CC_STAT_AREA] + stats[right, cv2.CC_STAT_AREA])),
        "box_contrast": float(box[~inside].mean() - lung_grey) if (~inside).any() else nan,
        "mediastinum_contrast": float(picture[y0:y1, gap[0]:gap[1]].mean() - lung_grey)
        if gap[1] - gap[0] >= 2 else nan,
        "below_minus_above": float(below.mean() - above.mean()) if min(len(above), len(below)) >= 3 else nan,
    })
    return measures


#: The measures the learnt check reads, in this order (a value that could not be measured is 0
#: and flagged by the three ``has_*`` features below).
MEASURES = ("regions", "lung_area", "uncertain", "smaller_lung_area", "area_ratio", "left_right", "centre_dy",
            "centre_y_min", "centre_y_max", "aspect", "centre_y", "left_minus_right", "box_contrast",
            "mediastinum_contrast", "below_minus_above")
THUMB = 8  # the film and the lung map as THUMB×THUMB thumbnails: where things are, at a glance


def gate_features(measures: dict[str, float], prob: np.ndarray, picture: np.ndarray) -> np.ndarray:
    """One feature vector for the learnt check: the lung measures, three "was it measurable"
    flags, the film's thumbnail (standardised, so brightness and contrast do not matter, the
    layout does) and the lung map's thumbnail."""
    values = [measures.get(name, float("nan")) for name in MEASURES]
    flags = [float(np.isfinite(measures.get(name, float("nan"))))
             for name in ("area_ratio", "mediastinum_contrast", "below_minus_above")]
    film = cv2.resize(np.asarray(picture, np.float32), (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
    film = (film - film.mean()) / max(float(film.std()), 1e-3)
    lungs = cv2.resize(np.asarray(prob, np.float32), (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
    return np.concatenate([np.nan_to_num(np.asarray(values, np.float32), nan=0.0), flags, film, lungs]
                          ).astype(np.float32)


def shape_reasons(m: dict[str, float]) -> list[str]:
    """Reasons from :func:`lung_measures` (in the order a person would check them)."""
    if m["regions"] < 2:
        return [f"{LUNGS_NOT_FOUND} ({int(m['regions'])} lung region(s) instead of 2)"]
    checks = [
        (m["smaller_lung_area"] >= MIN_LUNG_AREA and TOTAL_LUNG_AREA[0] <= m["lung_area"] <= TOTAL_LUNG_AREA[1],
         f"lung area implausible ({m['lung_area']:.0%} of the image)"),
        (m["left_right"] == 1 and m["centre_dy"] <= MAX_CENTRE_DY
         and CENTRE_Y[0] <= m["centre_y_min"] and m["centre_y_max"] <= CENTRE_Y[1],
         "the two lung regions are not side by side (rotated film or not a chest)"),
        (m["area_ratio"] >= MIN_AREA_RATIO, f"the two lung regions differ too much in size "
                                             f"(ratio {m['area_ratio']:.2f})"),
        (m["aspect"] >= MIN_ASPECT, "lung regions wider than tall (film on its side?)"),
        (m["uncertain"] <= MAX_UNCERTAIN, f"the lung model is unsure ({m['uncertain']:.0%} uncertain pixels)"),
        (not (m["mediastinum_contrast"] < MIN_MEDIASTINUM) and m["box_contrast"] >= MIN_BOX_CONTRAST,
         "lungs not darker than the mediastinum (inverted film?)"),
        (m["below_minus_above"] >= MIN_BELOW_MINUS_ABOVE if np.isfinite(m["below_minus_above"]) else
         not (m["centre_y"] > UPSIDE_DOWN_Y and m["left_minus_right"] < UPSIDE_DOWN_LR),
         "darker below the lungs than above them (upside-down film?)"),
    ]
    return [reason for ok, reason in checks if not ok]


class FrontalCheck:
    """The learnt check: ``score`` = P(frontal chest film) from :func:`gate_features`; refuse below
    ``threshold``. Stored as a model file (kind ``frontal_gate``) naming the lung model it was
    fitted on (``lung_model_sha256``): its features are that model's maps."""

    def __init__(self, state: dict[str, Any], meta: dict[str, Any]):
        self.mean, self.std, self.weight = (np.asarray(state[k], np.float64) for k in ("mean", "std", "weight"))
        self.bias = float(np.asarray(state["bias"]).reshape(-1)[0])
        self.threshold = float(meta["threshold"])
        self.meta = meta

    @classmethod
    def load(cls, path: str | Path) -> FrontalCheck:
        state, meta = load_model(path, kind=KIND)
        try:
            check = cls({k: v.numpy() for k, v in state.items()}, meta)
            if check.weight.shape != check.mean.shape or check.mean.shape != check.std.shape:
                raise ValueError(f"shapes {check.weight.shape}, {check.mean.shape}, {check.std.shape}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: input gate model unusable ({type(exc).__name__}: {exc})") from exc
        return check

    def save(self, path: str | Path, **meta: Any) -> dict[str, Any]:
        import torch

        state = {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": np.array([self.bias])}
        return save_model(path, {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()},
                          {**self.meta, **meta, "kind": KIND, "threshold": self.threshold})

    def score(self, features: np.ndarray) -> float:
        if features.shape != self.mean.shape:
            raise ModelFileError(f"the input gate model reads {self.mean.shape[0]} features, "
                                 f"this version makes {features.shape[0]}")
        z = float(((features - self.mean) / self.std) @ self.weight + self.bias)
        return float(1.0 / (1.0 + np.exp(-np.clip(z, -50, 50))))


def load_default_check() -> FrontalCheck:
    return FrontalCheck.load(shipped_model_path("frontal_gate.pt"))


def measure(prob: np.ndarray, pixels: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """The lung measures and the learnt check's feature vector of one image, from the U-Net's
    map and the [0, 1] film (brought to the map's size): what the gate decides on and what
    ``tools/gate_fit.py`` fits on."""
    picture = cv2.resize(np.asarray(pixels, np.float32), prob.shape[::-1], interpolation=cv2.INTER_AREA)
    measures = lung_measures(prob, picture)
    return measures, gate_features(measures, prob, picture)


def check_frontal_chest(prob: np.ndarray, pixels: np.ndarray, meta: dict[str, Any] | None = None,
                        learnt: FrontalCheck | None = None) -> GateResult:
    """The gate: DICOM tags first, then the learnt check (or, without one, the rules)."""
    measures, features = measure(prob, pixels)
    rules = shape_reasons(measures)
    reasons = tag_reasons(meta or {}) + picture_reasons(pixels, meta)
    if learnt is None:
        reasons += rules
    else:
        score = learnt.score(features)
        measures["frontal_score"] = score
        if score < learnt.threshold:
            lost = [r for r in rules if r.startswith(LUNGS_NOT_FOUND)]  # the cause a person acts on, first
            reasons += lost + [f"does not look like a frontal chest X-ray to the learnt check (score {score:.2f}, "
                               f"needs {learnt.threshold:.2f})"] + [r for r in rules if r not in lost]
    return GateResult(not reasons, reasons,  # None where a value could not be measured (valid JSON)
                      {k: round(v, 4) if np.isfinite(v) else None for k, v in measures.items()},
                      method="rules" if learnt is None else "learnt")
