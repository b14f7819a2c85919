"""What a film's calls rest on besides the scores: the masks' quality, the heart outline and the
cardiothoracic ratio (and when they support or contradict a Cardiomegaly call), and why each
Grad-CAM is shown."""

from __future__ import annotations

from typing import Any

import numpy as np

from pneumoscan.maskquality import MaskQuality
from pneumoscan.measure import PA_CUTOFF, CardiothoracicRatio, cardiothoracic_ratio
from pneumoscan.pipeline import Segmented
from pneumoscan.prediction import Explanation
from pneumoscan.segment import HeartSegmenter, LungSegmenter

#: Why the adult cut-off of the cardiothoracic ratio is not applied to a film.
PAEDIATRIC_CTR_NOTE = ("read as a child's film: the adult cut-off 0.50 does not apply (a child's normal ratio "
                       "reaches about 0.60)")
UNKNOWN_AGE_CTR_NOTE = "the patient's age is not known: read as an adult's, with the adult cut-off 0.50"


#: The finding explained by the heart and thoracic outlines, not by a lung map (the classifier
#: reads lung-masked crops, so no map of its input can show the heart).
OUTLINED = "Cardiomegaly"


def cam_reason(label: str, findings: list[str] | None, asked: list[str] | tuple[str, ...] = ()) -> str:
    """Why a label has a Grad-CAM: it was asked for, it was called, or (``--cam top``, nothing
    called) it is the most probable finding."""
    if label in asked:
        return "asked for"
    if label in (findings or []):
        return "called"
    return "most probable finding; none called"


def outline_explanation(ctr: CardiothoracicRatio, heart: np.ndarray) -> Explanation:
    """A Cardiomegaly call explained by what a reader would measure: the heart outline (its box
    as ``region``) and the ratio of the two widths."""
    ys, xs = np.nonzero(heart)
    region = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None
    return Explanation("outlines", True, "called", region, cardiothoracic_ratio=ctr.value, reason=ctr.reason)


def outline_supports(ctr: Any) -> bool:
    """Whether the measured heart explains a Cardiomegaly call: a trusted ratio above the PA
    cut-off. Otherwise (no trusted ratio, or one at or below 0.50, which no view enlarges into
    a normal heart) the call gets a Grad-CAM of its own, and a contradicting ratio a sentence."""
    return ctr is not None and ctr.value is not None and ctr.value > PA_CUTOFF


def ratio_disagreement(ctr: Any) -> str | None:
    """The sentence a Cardiomegaly call carries when the measured ratio says the heart is not
    enlarged (None when it does not contradict)."""
    if ctr is None or ctr.value is None or ctr.value > PA_CUTOFF:
        return None
    return (f"called from the film's appearance although the measured cardiothoracic ratio {ctr.value:.2f} is "
            f"at or below the {PA_CUTOFF:.2f} cut-off: the heart outline does not support this call (the heart "
            f"mask or the classifier is wrong here; read the film)")


def masks_and_ratio(items: list[Segmented], segmenter: LungSegmenter, heart: HeartSegmenter | None
                    ) -> list[tuple[MaskQuality, np.ndarray | None, CardiothoracicRatio | None]]:
    """For segmented films (``predict`` and ``segment`` both): the masks' quality record
    (:class:`~pneumoscan.maskquality.MaskQuality`), the heart mask and the cardiothoracic ratio (both None
    without a heart model); a mask below its quality threshold gives no ratio and says why."""
    if heart is not None:
        return list(heart_and_ratio(items, segmenter, heart))
    if not items:
        return []
    prepared = np.stack([item.prepared for item in items])
    lung_quality = segmenter.mask_quality(prepared, [item.seg.mask for item in items])
    return [(MaskQuality.of(q, segmenter.quality_rule, None, None), None, None) for q in lung_quality]


def heart_and_ratio(items: list[Segmented], segmenter: LungSegmenter, heart: HeartSegmenter
                    ) -> list[tuple[MaskQuality, np.ndarray, CardiothoracicRatio]]:
    """:func:`masks_and_ratio` with a heart model: every film gets its heart mask and a ratio
    (whose value is None, with the reason, when a mask cannot be trusted)."""
    if not items:
        return []
    prepared = np.stack([item.prepared for item in items])
    lungs = [item.seg.mask for item in items]
    lung_quality = segmenter.mask_quality(prepared, lungs)
    hearts = heart.heart_masks([item.image.pixels for item in items], prepared)
    heart_quality = heart.heart_quality(prepared, hearts, lungs)
    out: list[tuple[MaskQuality, np.ndarray, CardiothoracicRatio]] = []
    for item, mask, lq, hq in zip(items, hearts, lung_quality, heart_quality):
        quality = MaskQuality.of(lq, segmenter.quality_rule, hq, heart.quality_rule)
        ctr = cardiothoracic_ratio(item.seg.mask, mask, item.image.meta.get("view_position"),
                                   lungs_found=not item.seg.fallback, unreliable="; ".join(quality.unreliable) or None)
        out.append((quality, mask, ctr))
    return out
