"""The record of one film's reading (:class:`Prediction`): what every face shows and the one
writer writes, apart from the :class:`~pneumoscan.predict.Predictor` that makes it; and how a class
name a person types is matched to a label."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoscan.errors import PneumoScanError
from pneumoscan.labels import LABELS

if TYPE_CHECKING:  # the parts' own modules (the record itself stays light to import)
    from pneumoscan.gate import GateResult
    from pneumoscan.maskquality import MaskQuality
    from pneumoscan.measure import Measurements
    from pneumoscan.reading import Population, Verdict

#: Image metadata that may leave the process: technical fields only, never patient identity.
PUBLIC_META = ("format", "height", "width", "bit_depth", "mode", "photometric", "view_position",
               "modality", "transfer_syntax", "inverted", "windowed", "exif_orientation")


#: A :class:`Prediction` field kept with ``keep_arrays`` for pictures: never part of a record.
ARRAY = {"export": False}


@dataclass
class Explanation:
    """Where one label is shown, and why: a Grad-CAM (``method`` "grad-cam": ``peak`` [x, y] and
    ``region`` [x0, y0, x1, y1], where the map reaches half its maximum inside the lung mask, in
    original-image pixels) or, for a Cardiomegaly call the measured heart supports, the heart and
    thoracic outlines (``method`` "outlines": the heart's box as ``region``, the ratio and its
    reason). ``called``: the label is a finding; ``why`` it is shown (called, asked for, the most
    probable); ``note``: a sentence a reader must see with it (a ratio that contradicts the call)."""

    method: str
    called: bool
    why: str
    region: list[int] | None
    peak: list[int] | None = None
    cardiothoracic_ratio: float | None = None
    reason: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "called": self.called, "why": self.why}
        if self.method == "outlines":
            out |= {"region": self.region, "cardiothoracic_ratio": self.cardiothoracic_ratio, "reason": self.reason}
        else:
            out |= {"peak": self.peak, "region": self.region}
        return out | ({"note": self.note} if self.note is not None else {})


def plain(value: Any) -> Any:
    """A record's value as JSON-ready data: a typed part by its ``to_dict``, a dict of parts entry
    by entry, anything else as it is."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


@dataclass
class Prediction:
    """What PneumoScan says about one image. Arrays stay out of :meth:`to_dict`.

    ``probabilities[label]`` is None for a label the model does not assess (also listed in
    ``not_assessed``): the model was never shown to have learnt it, so no number is given and it
    is never a finding. ``thresholds`` holds each assessed label's operating threshold.
    ``cams`` holds one :class:`Explanation` per explained label: every called
    finding gets one, a Grad-CAM (``peak`` [x, y] and ``region`` [x0, y0, x1, y1], where the map
    reaches half its maximum inside the lung mask, in original-image pixels) or, for Cardiomegaly
    when a heart model runs, the heart and thoracic outlines with the measured ratio; ``cam_label``,
    ``cam_peak`` and ``cam_region`` repeat the first Grad-CAM (the one an overlay draws largest).
    ``mask_quality`` says how far the lung and heart masks can be trusted
    (:mod:`pneumoscan.maskquality`); an unreliable heart or lung mask gives no ratio, with the reason.
    ``probabilities`` are calibrated for ``calibrated_for`` (a population named in the model file;
    None: the model carries no calibration, and the numbers are raw scores); ``population`` says
    whether the film was read as an adult's or a child's and why (:mod:`pneumoscan.reading`), and
    which labels are assessed depends on it; ``verdict`` is ``normal``, ``abnormal``,
    ``indeterminate`` or ``no finding called`` (No Finding is never listed beside a finding;
    ``verdict_reason`` says it in words); ``rank_scores`` put every assessed label on one scale
    for all populations (:func:`pneumoscan.reading.rank_scores`: sort and draw ROC curves on
    these, not on the probabilities); ``status`` in
    :meth:`to_dict` is :func:`pneumoscan.reading.status_of`.
    ``local_box`` is an AG-CNN model's attention box on the original image (what its local
    branch read); ``clinical`` says which patient-information fields a model that fuses them was
    given (the values themselves stay out). ``quality`` is the input gate's verdict
    (:class:`pneumoscan.gate.GateResult`): when ``frontal_chest`` is false the image was not scored
    (``probabilities`` and ``findings`` are None) unless the caller forced it, which
    ``quality.forced`` then says.
    """

    path: str | None
    verdict: Verdict | None = None
    verdict_reason: str | None = None
    population: Population | None = None
    probabilities: dict[str, float | None] | None = None
    calibrated_for: str | None = None
    rank_scores: dict[str, float | None] | None = None
    findings: list[str] | None = None
    not_assessed: list[str] | None = None
    thresholds: dict[str, float | None] | None = None
    thresholds_from: str | None = None
    quality: GateResult | None = None
    box: list[int] | None = None
    local_box: list[int] | None = None
    clinical: dict[str, bool] | None = None
    fallback: bool | None = None
    lung_fraction: float | None = None
    image: dict[str, Any] | None = None
    cam_label: str | None = None
    cam_peak: list[int] | None = None
    cam_region: list[int] | None = None
    cams: dict[str, Explanation] | None = None
    mask_quality: MaskQuality | None = None
    measurements: Measurements | None = None
    error: str | None = None
    pixels: np.ndarray | None = field(default=None, repr=False, metadata=ARRAY)
    mask: np.ndarray | None = field(default=None, repr=False, metadata=ARRAY)
    heart: np.ndarray | None = field(default=None, repr=False, metadata=ARRAY)
    cam_maps: dict[str, np.ndarray] | None = field(default=None, repr=False, metadata=ARRAY)

    @property
    def cam(self) -> np.ndarray | None:
        """The full-size map of ``cam_label`` (kept with ``keep_arrays``)."""
        return (self.cam_maps or {}).get(self.cam_label) if self.cam_label else None

    def to_dict(self) -> dict[str, Any]:
        """The record (JSON-ready): every public field in declaration order, its typed parts as
        their dicts, ``status`` after the path; the arrays stay out."""
        from pneumoscan.reading import status_of

        record = {"path": self.path, "status": None} | {
            f.name: plain(getattr(self, f.name)) for f in fields(self)
            if f.name != "path" and f.metadata.get("export", True)}
        record["status"] = status_of(record)
        return record


def resolve_label(name: str) -> str:
    """A class name as typed by a person ("pneumonia", "pleural thickening") → its label."""
    wanted = name.strip().lower().replace(" ", "_")
    for label in LABELS:
        if label.lower().replace(" ", "_") == wanted:
            return label
    raise ValueError(f"unknown class {name!r}; choose 'top' or one of: {', '.join(LABELS)}")


class NotAssessedError(PneumoScanError, ValueError):
    """A Grad-CAM was asked for a label the model does not assess."""
