"""Measurements on the film from the masks: the cardiothoracic ratio (CTR).

Definition implemented (Danzer 1919; the mask-based form used by automated CTR methods, e.g.
Chamveha et al. 2020, arXiv:2002.07468): **heart width** is the heart mask's widest horizontal
extent (the rightmost minus the leftmost heart pixel, i.e. the right plus the left cardiac
diameters about any midline); **thoracic width** is the widest horizontal inner extent of the
thorax, taken as the widest row of the two-lung mask (its leftmost to its rightmost lung pixel);
CTR = heart width / thoracic width. Both widths are horizontal on the same grid, so the ratio does
not depend on the pixel spacing. An enlarged heart on a PA film is a CTR above 0.50; an AP film
magnifies the heart, so that cut-off is not applied to it here.

Pure functions on 0/1 masks; an implausible mask, or one the mask-quality estimate distrusts,
gives no value and says why, never a number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

#: The textbook cut-off on a PA film (Danzer 1919).
PA_CUTOFF = 0.50
#: CTRs outside this range come from a wrong mask, not from a heart (adult films: about 0.35–0.75).
PLAUSIBLE_CTR = (0.25, 0.85)
#: The heart's share of the lung-and-heart area outside this range is a failed heart mask.
PLAUSIBLE_HEART_SHARE = (0.05, 0.45)
DEFINITION = ("heart width (widest horizontal extent of the heart mask) / thoracic width (widest "
              "horizontal extent of the two-lung mask), Danzer 1919")


@dataclass(frozen=True)
class CardiothoracicRatio:
    """The CTR and the two widths it came from, or ``value`` None with ``reason``.

    ``heart_line`` and ``thorax_line`` are (y, x0, x1) on the original image (x1 inclusive), for
    drawing; ``enlarged`` applies :data:`PA_CUTOFF` on PA films only (None otherwise)."""

    value: float | None
    reason: str | None = None
    heart_width: int | None = None
    thorax_width: int | None = None
    heart_line: tuple[int, int, int] | None = None
    thorax_line: tuple[int, int, int] | None = None
    enlarged: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"cardiothoracic_ratio": self.value, "cardiothoracic_ratio_reason": self.reason,
                "heart_width_px": self.heart_width, "thoracic_width_px": self.thorax_width,
                "heart_line": list(self.heart_line) if self.heart_line else None,
                "thoracic_line": list(self.thorax_line) if self.thorax_line else None,
                "ctr_above_pa_cutoff": self.enlarged}


@dataclass
class Measurements:
    """A film's ``measurements``: its cardiothoracic ratio, whether the PA cut-off is applied to
    it (not for a child's film, whose normal ratio is larger), and the sentences a reader must see
    with it: why the cut-off is not applied (``cutoff_note``), and a Cardiomegaly call the ratio
    contradicts (``call_note``)."""

    ratio: CardiothoracicRatio
    cutoff_applies: bool = True
    cutoff_note: str | None = None
    call_note: str | None = None

    @property
    def above_cutoff(self) -> bool | None:
        """Whether the ratio is above the PA cut-off, where the cut-off applies to this film."""
        return self.ratio.enlarged if self.cutoff_applies else None

    def to_dict(self) -> dict[str, Any]:
        out = self.ratio.to_dict() | {"ctr_above_pa_cutoff": self.above_cutoff}
        if self.cutoff_note is not None:
            out["ctr_cutoff_note"] = self.cutoff_note
        if self.call_note is not None:
            out["ctr_call_note"] = self.call_note
        return out


def heart_extent(heart: np.ndarray) -> tuple[int, int, int]:
    """(y, x0, x1) of the heart's widest horizontal extent; y is the mean row of the two extreme
    pixels (they need not share a row)."""
    ys, xs = np.nonzero(heart)
    left, right = xs.argmin(), xs.argmax()
    return int(round((ys[left] + ys[right]) / 2)), int(xs[left]), int(xs[right])


def thorax_extent(lungs: np.ndarray) -> tuple[int, int, int]:
    """(y, x0, x1) of the widest row of the lung mask (leftmost to rightmost lung pixel)."""
    present = lungs.any(1)
    first = np.where(present, lungs.argmax(1), 0)
    last = np.where(present, lungs.shape[1] - 1 - lungs[:, ::-1].argmax(1), -1)
    y = int(np.argmax(last - first))
    return y, int(first[y]), int(last[y])


def cardiothoracic_ratio(lungs: np.ndarray, heart: np.ndarray, view: str | None = None, *,
                         lungs_found: bool = True, unreliable: str | None = None) -> CardiothoracicRatio:
    """The CTR from a cleaned two-lung mask and a cleaned heart mask on the same grid, or None
    with the reason when the masks cannot give a trustworthy one (``lungs_found`` False: the
    lung segmentation fell back to the whole film; ``unreliable``: why the mask-quality estimate
    distrusts a mask, :mod:`pneumoscan.maskquality`)."""
    if not lungs_found:
        return CardiothoracicRatio(None, "lungs not found")
    if not heart.any():
        return CardiothoracicRatio(None, "no heart found")
    if unreliable:
        return CardiothoracicRatio(None, unreliable)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(lungs.astype(np.uint8), connectivity=8)
    if count - 1 < 2:
        return CardiothoracicRatio(None, "two lungs not found")
    two = 1 + np.argsort(stats[1:, cv2.CC_STAT_AREA])[::-1][:2]
    lung_x = sorted(float(centroids[i][0]) for i in two)
    heart_x = float(np.nonzero(heart)[1].mean())
    if not lung_x[0] < heart_x < lung_x[1]:
        return CardiothoracicRatio(None, "the heart is not between the lungs")
    share = heart.sum() / (heart.sum() + np.isin(labels, two).sum())
    if not PLAUSIBLE_HEART_SHARE[0] <= share <= PLAUSIBLE_HEART_SHARE[1]:
        return CardiothoracicRatio(None, f"implausible heart size ({share:.0%} of heart and lungs)")
    heart_line, thorax_line = heart_extent(heart), thorax_extent(lungs > 0)
    heart_width = heart_line[2] - heart_line[1] + 1
    thorax_width = thorax_line[2] - thorax_line[1] + 1
    ratio = heart_width / thorax_width
    if not PLAUSIBLE_CTR[0] <= ratio <= PLAUSIBLE_CTR[1]:
        return CardiothoracicRatio(None, f"implausible ratio {ratio:.2f} (masks failed)")
    enlarged = bool(ratio > PA_CUTOFF) if (view or "").upper() == "PA" else None
    return CardiothoracicRatio(round(float(ratio), 4), None, int(heart_width), int(thorax_width),
                               heart_line, thorax_line, enlarged)
