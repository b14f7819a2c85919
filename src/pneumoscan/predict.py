"""The end-to-end predictor: read → CLAHE → U-Net → clean mask → crop → DenseNet-121 → Grad-CAM,
with the heart U-Net and the cardiothoracic ratio beside the classifier; and the one read →
segment → crop path (:func:`read_segment_crop`) that predict, prepare and segment all run.

One :class:`Predictor` serves the CLI, the REST API and Python callers, so they cannot drift
apart. Inputs that cannot be read give a :class:`Prediction` whose ``error`` says why; the rest of
a batch goes on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from itertools import islice, repeat
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.classify import Classifier, ScoringClassifier
from pneumoscan.clinical import values_from
from pneumoscan.crop import (
    box_in_original,
    classifier_crop,
    local_crop,
    lungs_only,
)
from pneumoscan.errors import PneumoScanError
from pneumoscan.explain import heat_on_film
from pneumoscan.gate import FrontalCheck, check_frontal_chest, load_default_check
from pneumoscan.io import XrayImage, XrayReadError, decode_xray, display_name, read_xray
from pneumoscan.labels import FINDINGS, LABELS
from pneumoscan.measure import PA_CUTOFF, cardiothoracic_ratio
from pneumoscan.modelfile import ModelFileError
from pneumoscan.reading import (
    Population,
    adult_only_labels,
    estimate_population,
    population_from_age,
    rank_scores,
    verdict_of,
    verdict_reason,
)
from pneumoscan.segment import HeartSegmenter, LungSegmenter

#: Why the adult cut-off of the cardiothoracic ratio is not applied to a film.
PAEDIATRIC_CTR_NOTE = ("read as a child's film: the adult cut-off 0.50 does not apply (a child's normal ratio "
                       "reaches about 0.60)")
UNKNOWN_AGE_CTR_NOTE = "the patient's age is not known: read as an adult's, with the adult cut-off 0.50"

#: Image metadata that may leave the process: technical fields only, never patient identity.
PUBLIC_META = ("format", "height", "width", "bit_depth", "mode", "photometric", "view_position",
               "modality", "transfer_syntax", "inverted", "windowed", "exif_orientation")


#: What a :class:`Prediction` keeps with ``keep_arrays`` for pictures: never part of a record.
ARRAY_FIELDS = ("pixels", "mask", "heart", "cam_maps")


@dataclass
class Prediction:
    """What PneumoScan says about one image. Arrays stay out of :meth:`to_dict`.

    ``probabilities[label]`` is None for a label the model does not assess (also listed in
    ``not_assessed``): the model was never shown to have learnt it, so no number is given and it
    is never a finding. ``thresholds`` holds each assessed label's operating threshold.
    ``cams`` holds one explanation per explained label (:func:`explanations`): every called
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
    given (the values themselves stay out). ``quality`` is the input gate's verdict (:mod:`pneumoscan.gate`): when
    ``frontal_chest`` is
    false the image was not scored (``probabilities`` and ``findings`` are None) unless the caller
    forced it, which ``quality["forced"]`` then says.
    """

    path: str | None
    verdict: str | None = None
    verdict_reason: str | None = None
    population: dict[str, Any] | None = None
    probabilities: dict[str, float | None] | None = None
    calibrated_for: str | None = None
    rank_scores: dict[str, float | None] | None = None
    findings: list[str] | None = None
    not_assessed: list[str] | None = None
    thresholds: dict[str, float | None] | None = None
    thresholds_from: str | None = None
    quality: dict[str, Any] | None = None
    box: list[int] | None = None
    local_box: list[int] | None = None
    clinical: dict[str, bool] | None = None
    fallback: bool | None = None
    lung_fraction: float | None = None
    image: dict[str, Any] | None = None
    cam_label: str | None = None
    cam_peak: list[int] | None = None
    cam_region: list[int] | None = None
    cams: dict[str, dict[str, Any]] | None = None
    mask_quality: dict[str, Any] | None = None
    measurements: dict[str, Any] | None = None
    error: str | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)
    heart: np.ndarray | None = field(default=None, repr=False)
    cam_maps: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def cam(self) -> np.ndarray | None:
        """The full-size map of ``cam_label`` (kept with ``keep_arrays``)."""
        return (self.cam_maps or {}).get(self.cam_label) if self.cam_label else None

    def to_dict(self) -> dict[str, Any]:
        """Every public field in declaration order, ``status`` after the path; the arrays stay out."""
        from pneumoscan.reading import status_of

        record = {"path": self.path, "status": None} | {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "path" and f.name not in ARRAY_FIELDS}
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


def segment_and_crop(images: list[np.ndarray], segmenter, size: int, batch: int = 16,
                     prepared: np.ndarray | None = None, masked: bool = False) -> tuple[list, np.ndarray]:
    """Segment [0, 1] grey pictures in batches and cut each one's classifier crop: the one
    segment → crop path behind ``predict``, ``prepare`` and ``evaluate``. ``prepared``: the
    U-Net inputs if already computed; ``masked``: black out everything outside the lung mask
    (:func:`pneumoscan.crop.lungs_only`) before cropping. Returns the segmentations and N×size×size uint8 crops."""
    segs = []
    for start in range(0, len(images), batch):
        segs.extend(segmenter.segment_batch(images[start:start + batch], None if prepared is None
                                            else prepared[start:start + batch]))
    crops = np.zeros((len(images), size, size), np.uint8)
    for i, (pixels, seg) in enumerate(zip(images, segs)):
        crops[i] = classifier_crop(lungs_only(pixels, seg.mask) if masked else pixels, seg.box, size)
    return segs, crops


@dataclass
class Cropped:
    """One input on the read → segment → crop path: the image (None if unreadable, with ``error``
    saying why), its segmentation and its uint8 classifier crop."""

    source: Any
    image: Any = None            # pneumoscan.io.XrayImage
    error: str | None = None
    prepared: np.ndarray | None = None  # the U-Nets' input, made on the decoding thread
    seg: Any = None              # pneumoscan.segment.Segmentation
    crop: np.ndarray | None = None


def read_segment_crop(sources: Iterable[Any], segmenter, size: int, *, batch: int = 16, threads: int = 2,
                      read: Callable[[Any], Any] | None = None, masked: bool = False) -> Iterator[list[Cropped]]:
    """The one read → segment → crop path (predict, prepare, segment, evaluate): decoding runs on
    ``threads`` threads ahead of the U-Net, which runs in batches of ``batch``; yields each batch
    in input order. ``read`` turns a source into an XrayImage (default: ``read_xray``) and may
    raise XrayReadError, which becomes the item's ``error``; ``masked`` as :func:`segment_and_crop`."""
    from pneumoscan.io import read_ahead

    read = read or read_xray

    def load(source: Any) -> Cropped:  # runs on a decoding thread: OpenCV releases the GIL
        try:
            image = read(source)
        except XrayReadError as exc:
            return Cropped(source, error=str(exc))
        return Cropped(source, image=image, prepared=segmenter.preprocessing(image.pixels))

    loaded = read_ahead(load, sources, threads=threads, ahead=2 * batch)
    while chunk := list(islice(loaded, batch)):
        readable = [c for c in chunk if c.image is not None]
        segs, crops = segment_and_crop([c.image.pixels for c in readable], segmenter, size, batch,
                                       np.stack([c.prepared for c in readable]) if readable else None,
                                       masked=masked)
        for item, seg, crop in zip(readable, segs, crops):
            item.seg, item.crop = seg, crop
        yield chunk


BACKENDS = ("auto", "onnx", "torch")


def heart_model_path(path: str | Path | None = None) -> Path | None:
    """``path``, else the shipped heart model; None if none is installed (the predictions then
    carry no cardiothoracic ratio)."""
    from pneumoscan.segment import default_heart_model_path

    if path is not None:
        return Path(path)
    try:
        return default_heart_model_path()
    except FileNotFoundError:
        return None


def load_heart(path: str | Path | None = None, device: str = "cpu") -> HeartSegmenter | None:
    """The heart model (:func:`heart_model_path`) in PyTorch on ``device``, or None."""
    found = heart_model_path(path)
    return None if found is None else HeartSegmenter.load(found).to(device)


def load_models(seg: str | Path | None = None, cls_model: str | Path | None = None, *, backend: str = "auto",
                device: str = "cpu", progress: Callable[[str], None] | None = None,
                heart: str | Path | None = None, with_heart: bool = True
                ) -> tuple[LungSegmenter, ScoringClassifier, HeartSegmenter | None]:
    """The lung model, the classifier and (``with_heart``) the heart model (:func:`heart_model_path`),
    verified from their files, then on ``backend``: ``onnx`` (ONNX Runtime, exported once per
    set of model files into the per-user cache, and from then on loaded without building the
    PyTorch networks), ``torch`` (PyTorch on ``device``), or ``auto``: ONNX Runtime on the CPU when
    it is installed (about twice PyTorch's speed here, same outputs to 1e-4), PyTorch otherwise
    or on a GPU."""
    from pneumoscan.classify import default_model_path as default_classifier
    from pneumoscan.segment import default_model_path as default_segmenter

    check_backend(backend, device)
    seg_path = Path(seg) if seg else default_segmenter()
    cls_path = Path(cls_model) if cls_model else default_classifier()
    heart_path = heart_model_path(heart) if with_heart else None
    if backend == "auto":
        backend = "onnx" if str(device) == "cpu" and _onnx_installed() else "torch"
    if backend == "onnx":
        from pneumoscan.backends.onnx import load_cached

        return load_cached(seg_path, cls_path, heart_path, progress=progress)
    return (LungSegmenter.load(seg_path).to(device), Classifier.load(cls_path).to(device),
            load_heart(heart_path, device) if heart_path else None)


def check_backend(backend: str, device: str) -> None:
    """Refuse a backend or device this machine cannot give (ValueError, one sentence) before any
    model loads: :func:`load_models` asks first, and so does ``predict`` before it reads inputs."""
    from pneumoscan.accel import resolve_device

    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "onnx":
        if str(device) != "cpu":
            raise ValueError("--backend onnx runs on the CPU; use --backend torch for --device cuda")
        if not _onnx_installed():
            raise ValueError("--backend onnx needs the onnx extra: pip install 'pneumoscan[onnx]'")
    resolve_device(device)


def _onnx_installed() -> bool:
    from importlib.util import find_spec

    return all(find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def stated_age(meta: Mapping[str, Any], given: Mapping[str, Any] | None) -> tuple[float, str] | None:
    """The age a film comes with, in years, and where from: an ``age`` the caller gave (CSV,
    form field) first, else DICOM PatientAge; None when neither holds a valid age."""
    from pneumoscan.clinical import parse_age

    if given and (age := parse_age(given.get("age"))) is not None:
        return age, "given"
    if (age := parse_age(meta.get("patient_age"))) is not None:
        return age, "PatientAge"
    return None


def _label(source: Any, name: str | None) -> str | None:
    """What a prediction's ``path`` says: the given name, else the path, else nothing."""
    return name or (display_name(source) if isinstance(source, str | Path) else None)


def matching_check(lung_model_sha256: str | None) -> FrontalCheck | None:
    """The shipped learnt gate check if it was fitted on this lung model's maps; otherwise None
    (the gate falls back to its rules, says so in ``quality.method``, and warns once here)."""
    check = load_default_check()
    if check.meta.get("lung_model_sha256") == lung_model_sha256:
        return check
    warnings.warn(f"the shipped input gate was fitted on lung model {str(check.meta.get('lung_model_sha256'))[:12]}…, "
                  f"not on the loaded {str(lung_model_sha256)[:12]}…; the gate uses its rules only "
                  f"(refit it with tools/gate_fit.py)", stacklevel=3)
    return None


#: The finding explained by the heart and thoracic outlines, not by a lung map (the classifier
#: reads lung-masked crops, so no map of its input can show the heart).
OUTLINED = "Cardiomegaly"


def cam_reason(label: str, findings: list[str] | None, asked: str | None) -> str:
    """Why a label has a Grad-CAM: it was asked for, it was called, or (``--cam top``, nothing
    called) it is the most probable finding."""
    if label == asked:
        return "asked for"
    if label in (findings or []):
        return "called"
    return "most probable finding; none called"


def outline_explanation(ctr: Any, heart: np.ndarray) -> dict[str, Any]:
    """A Cardiomegaly call explained by what a reader would measure: the heart outline (its box
    as ``region``) and the ratio of the two widths."""
    ys, xs = np.nonzero(heart)
    region = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None
    return {"method": "outlines", "called": True, "why": "called", "region": region,
            "cardiothoracic_ratio": ctr.value, "reason": ctr.reason}


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


def mask_quality_record(lungs: float, lung_rule: Any, heart: float | None, heart_rule: Any) -> dict[str, Any]:
    """``mask_quality`` of a record: each mask's quality, its threshold, and the reasons of the
    masks below theirs (:mod:`pneumoscan.maskquality`)."""
    from pneumoscan.maskquality import unreliable_reason

    unreliable = [unreliable_reason(name, q, rule) for name, q, rule in (("lung", lungs, lung_rule), ("heart", heart, heart_rule))
                  if rule is not None and rule.reliable(q) is False]
    return {"lungs": lungs, "heart": heart,
            "thresholds": {"lungs": lung_rule.threshold, "heart": heart_rule.threshold if heart_rule else None},
            "unreliable": unreliable}


def masks_and_ratio(items: list[Cropped], segmenter: LungSegmenter, heart: HeartSegmenter | None
                    ) -> list[tuple[dict[str, Any], np.ndarray | None, Any]]:
    """For segmented films (``predict`` and ``segment`` both): the masks' quality record
    (:func:`mask_quality_record`), the heart mask and the cardiothoracic ratio (both None
    without a heart model); a mask below its quality threshold gives no ratio and says why."""
    if not items:
        return []
    prepared = np.stack([item.prepared for item in items])
    lungs = [item.seg.mask for item in items]
    lung_quality = segmenter.mask_quality(prepared, lungs)
    if heart is None:
        return [(mask_quality_record(q, segmenter.quality_rule, None, None), None, None) for q in lung_quality]
    hearts = heart.heart_masks([item.image.pixels for item in items], prepared)
    heart_quality = heart.heart_quality(prepared, hearts, lungs)
    out = []
    for item, mask, lq, hq in zip(items, hearts, lung_quality, heart_quality):
        quality = mask_quality_record(lq, segmenter.quality_rule, hq, heart.quality_rule)
        ctr = cardiothoracic_ratio(item.seg.mask, mask, item.image.meta.get("view_position"),
                                   lungs_found=not item.seg.fallback, unreliable="; ".join(quality["unreliable"]) or None)
        out.append((quality, mask, ctr))
    return out


class Predictor:
    """Lung segmenter + classifier, with Grad-CAM on request."""

    def __init__(self, segmenter: LungSegmenter, classifier: ScoringClassifier, *, allow_model_mismatch: bool = False,
                 frontal_check: FrontalCheck | None = None, heart: HeartSegmenter | None = None):
        trained_on = (classifier.meta.get("preprocessing") or {}).get("segmentation_model_sha256")
        used = segmenter.meta.get("weights_sha256")
        if trained_on != used and not allow_model_mismatch:
            raise ModelFileError(
                f"the classifier was trained on crops from lung model {str(trained_on)[:12]}…, but lung "
                f"model {str(used)[:12]}… is loaded: its crops would differ from what the classifier "
                f"learnt. Use the matching lung model, or pass --allow-model-mismatch to run anyway")
        self.segmenter = segmenter
        self.classifier = classifier
        self.model_mismatch = trained_on != used
        self.frontal_check = frontal_check or matching_check(used)
        if heart is not None and heart.preprocessing != segmenter.preprocessing:
            raise ModelFileError("the heart model's preprocessing differs from the lung model's; "
                                 "they must read the same prepared film")
        self.heart = heart

    @classmethod
    def from_default(cls, *, backend: str = "auto", device: str = "cpu") -> Predictor:
        return cls.from_paths(backend=backend, device=device)

    @classmethod
    def from_paths(cls, seg: str | Path | None = None, cls_model: str | Path | None = None, *,
                   allow_model_mismatch: bool = False, backend: str = "auto", device: str = "cpu",
                   progress: Callable[[str], None] | None = None, heart: str | Path | None = None) -> Predictor:
        """The models from their files (the shipped ones by default), on the fastest backend
        (:func:`load_models`), the heart model with them when one is installed."""
        segmenter, classifier, heart_model = load_models(seg, cls_model, backend=backend, device=device,
                                                         progress=progress, heart=heart)
        return cls(segmenter, classifier, allow_model_mismatch=allow_model_mismatch, heart=heart_model)

    @classmethod
    def from_onnx(cls, folder: str | Path, *, allow_model_mismatch: bool = False) -> Predictor:
        """The models of an export (``pneumoscan export --format onnx``) through ONNX Runtime; an
        export without a heart model runs the shipped one in PyTorch."""
        from pneumoscan.backends.onnx import load_onnx

        segmenter, classifier, heart = load_onnx(folder)
        return cls(segmenter, classifier, allow_model_mismatch=allow_model_mismatch, heart=heart or load_heart())

    @property
    def models(self) -> dict[str, Any]:
        """SHA-256 and training summary of the models (for reports, /health, and what a resumed
        run or the results store compares): ``files`` holds each model's SHA-256 over weights *and*
        metadata, so a calibrated copy (same weights, other thresholds) is another set of models."""
        return {"backend": self.classifier.backend,
                "files": {"segmentation": self.segmenter.meta.get("sha256"),
                          "heart_segmentation": self.heart.meta.get("sha256") if self.heart else None,
                          "classifier": self.classifier.meta.get("sha256")},
                "segmentation": self.segmenter.meta.get("weights_sha256"),
                "heart_segmentation": self.heart.meta.get("weights_sha256") if self.heart else None,
                "classifier": self.classifier.meta.get("weights_sha256"),
                "classifier_input_size": self.classifier.size,
                "classifier_architecture": self.classifier.arch,
                "clinical_fields": self.classifier.clinical.names if self.classifier.clinical else [],
                "assessed_labels": self.classifier.assessed_labels,
                "thresholds_from": self.classifier.thresholds_from}

    def run_identity(self, force: bool = False) -> dict[str, Any]:
        """What makes this predictor's answers what they are (the models, not the backend that
        runs them, and ``force``): a resumed run and the results store compare it."""
        return {"models": {k: v for k, v in self.models.items() if k != "backend"}, "force": force}

    def cam_class(self, cam: str | None) -> str | None:
        """Check a Grad-CAM request up front: None, "top" or an assessed label (any spelling)."""
        if cam is None or cam.strip().lower() in ("top", "none"):
            return None if cam is None or cam.strip().lower() == "none" else "top"
        label = resolve_label(cam)
        if label not in self.classifier.assessed_labels:
            raise NotAssessedError(
                f"{label} is not assessed by this model, so its heat map would show nothing learnt; "
                f"choose 'top' or one of: {', '.join(self.classifier.assessed_labels) or '(none)'}")
        return label

    def predict(self, source: str | Path | bytes | np.ndarray | XrayImage, *, cam: str | None = None,
                name: str | None = None, keep_arrays: bool = False, force: bool = False,
                clinical: Mapping[str, Any] | None = None) -> Prediction:
        return self.predict_batch([source], cam=cam, names=[name], keep_arrays=keep_arrays, force=force,
                                  clinical=[clinical])[0]

    def predict_batch(self, sources: list[Any], *, cam: str | None = None,
                      names: list[str | None] | None = None, keep_arrays: bool = False,
                      force: bool = False, clinical: list[Mapping[str, Any] | None] | None = None
                      ) -> list[Prediction]:
        """Predictions in input order; ``cam`` is None, "top" (the most probable assessed
        finding) or an assessed class name (any capitalisation); ``keep_arrays`` keeps the picture,
        mask and full-size Grad-CAM heat map for overlays (without it only the Grad-CAM class is
        named, and no heat map is computed); ``force`` scores images the input gate refuses
        (marked in ``quality``); ``clinical``: per source, patient information for a model that
        fuses it (field → raw value; DICOM tags fill what is not given)."""
        return list(self.predict_many(sources, names=names, cam=cam, keep_arrays=keep_arrays, force=force,
                                      batch_size=max(1, len(sources)), threads=0, clinical=clinical))

    def predict_many(self, sources: Iterable[Any], *, names: Iterable[str | None] | None = None,
                     cam: str | None = None, keep_arrays: bool = False, force: bool = False,
                     batch_size: int = 8, threads: int = 2,
                     clinical: Iterable[Mapping[str, Any] | None] | None = None) -> Iterator[Prediction]:
        """:meth:`predict_batch` over any number of sources, yielded in input order as each batch
        is done; decoding runs on ``threads`` threads ahead of the models (the one read → segment
        → crop path, :func:`read_segment_crop`)."""
        cam = self.cam_class(cam)
        triples = zip(sources, names if names is not None else repeat(None),
                      clinical if clinical is not None else repeat(None))
        for chunk in read_segment_crop(triples, self.segmenter, self.classifier.size, batch=batch_size,
                                       threads=threads, read=lambda t: self._read(t[0], _label(t[0], t[1])),
                                       masked=self.classifier.lung_masked):
            yield from self._score(chunk, cam, keep_arrays, force)

    def _score(self, chunk: list[Cropped], cam: str | None, keep_arrays: bool, force: bool) -> list[Prediction]:
        """Gate, classify, read for the film's population and explain one batch from the read →
        segment → crop path."""
        classifier = self.classifier
        cam_label = None if cam in (None, "top") else cam
        results, scored = self._gate(chunk, keep_arrays, force)
        if not scored:
            return results
        crops = np.stack([item.crop for _, item in scored]).astype(np.float32) / 255.0
        measured = masks_and_ratio([item for _, item in scored], self.segmenter, self.heart)
        stated = [stated_age(item.image.meta, item.source[2]) for _, item in scored]
        populations: dict[int, Population] = {}  # film i's, decided once (the map's choice needs it first)

        def population(i: int, pooled: np.ndarray) -> Population:
            if i not in populations:
                populations[i] = (population_from_age(*stated[i]) if stated[i] is not None
                                  else estimate_population(pooled, classifier.age_model))
            return populations[i]

        def maps_of(i: int, p: np.ndarray, pooled: np.ndarray) -> list[int]:
            """The labels given a Grad-CAM: the one asked for first, then every called finding by
            calibrated probability (Cardiomegaly's explanation is the heart outline when a heart model runs);
            with 'top' and nothing called, the most probable finding assessed for the population."""
            if cam is None:
                return []
            reading = classifier.readings[population(i, pooled).group]
            shown = reading.calibrate(p[None])[0]  # "most probable" as the reader sees the numbers
            known = [f for f in FINDINGS if reading.assessed[LABELS.index(f)]]
            called = sorted((f for f in reading.called(p) if f in known), key=lambda f: -shown[LABELS.index(f)])
            chosen = [f for f in called if not (f == OUTLINED and outline_supports(measured[i][2]))]
            if cam_label is not None:
                chosen = [cam_label] + [f for f in chosen if f != cam_label]
            elif not called and known:
                chosen = [max(known, key=lambda f: shown[LABELS.index(f)])]
            return [LABELS.index(f) for f in chosen]

        codes = None
        if classifier.clinical is not None:
            names = classifier.clinical.names
            codes = classifier.clinical.encode([values_from(item.image.meta, item.source[2], names)
                                                for _, item in scored])

        def local_from(i: int, box: tuple[int, int, int, int]) -> np.ndarray:
            item = scored[i][1]
            return local_crop(item.image.pixels, item.seg.box, box, classifier.size)

        probs, pooled, heats, local_boxes = classifier.predict_and_explain(crops, maps_of, local_from=local_from,
                                                                           codes=codes)
        adult_only = adult_only_labels(classifier.readings)
        for k, ((result, item), p, heat, local) in enumerate(zip(scored, probs, heats, local_boxes)):
            if local is not None:
                result.local_box = [int(v) for v in box_in_original(local, item.seg.box, classifier.size)]
            if codes is not None:
                result.clinical = classifier.clinical.present(codes[k])
            self._reading(result, p, population(k, pooled[k]), adult_only)
            self._explain(result, item, heat, cam_label, keep_arrays)
        self._measure(scored, measured, keep_arrays)
        return results

    def _gate(self, chunk: list[Cropped], keep_arrays: bool, force: bool
              ) -> tuple[list[Prediction], list[tuple[Prediction, Cropped]]]:
        """One Prediction per input (an unreadable one carries its error) and the films the input
        gate lets through (every readable film with ``force``), each with its gate verdict, crop box
        and (``keep_arrays``) its pixels and lung mask."""
        results = [Prediction(path=_label(*item.source[:2]), error=item.error) for item in chunk]
        scored = []
        for result, item in zip(results, chunk):
            if item.image is None:
                continue
            image, seg = item.image, item.seg
            gate = check_frontal_chest(seg.prob, image.pixels, image.meta, self.frontal_check)
            gate.forced = force and not gate.frontal_chest
            result.image = {k: image.meta.get(k) for k in PUBLIC_META}
            result.quality = gate.to_dict()
            result.box, result.fallback = [int(v) for v in seg.box], bool(seg.fallback)
            result.lung_fraction = round(float(seg.lung_fraction), 4)
            if keep_arrays:
                result.pixels, result.mask = image.pixels, seg.mask
            if gate.frontal_chest or force:
                scored.append((result, item))
        return results, scored

    def _reading(self, result: Prediction, p: np.ndarray, who: Population, adult_only: set[str]) -> None:
        """The film's reading for its population: calibrated probabilities, thresholds, findings,
        verdict and rank scores from the raw probabilities ``p``."""
        classifier = self.classifier
        reading = classifier.readings[who.group]
        shown = reading.calibrate(p[None])[0]
        result.population = who.to_dict()
        result.calibrated_for = reading.calibrated_for
        result.probabilities = {label: round(float(v), 6) if a else None
                                for label, v, a in zip(LABELS, shown, reading.assessed)}
        result.not_assessed = [label for label, a in zip(LABELS, reading.assessed) if not a]
        result.thresholds = reading.shown_thresholds()
        result.thresholds_from = classifier.thresholds_from
        result.findings = classifier.findings(p, who.group)
        result.verdict = verdict_of(result.findings, True, reading.normal_possible)
        result.verdict_reason = verdict_reason(result.verdict, reading, result.findings, adult_only)
        result.rank_scores = rank_scores(p, classifier.rank, reading.assessed)

    def _explain(self, result: Prediction, item: Cropped, heat: dict[int, np.ndarray], cam_label: str | None,
                 keep_arrays: bool) -> None:
        """The film's Grad-CAM maps on the film: peak, region and why each is shown."""
        explained = {LABELS[j]: heat_on_film(h, item.seg.mask, item.seg.box, item.image.pixels.shape,
                                             lungs_only=self.classifier.lung_masked, full=keep_arrays)
                     for j, h in heat.items()}
        result.cams = {label: {"method": "grad-cam", "called": label in result.findings,
                               "why": cam_reason(label, result.findings, cam_label),
                               "peak": peak, "region": region}
                       for label, (peak, region, _) in explained.items()}
        if explained:
            result.cam_label = next(iter(explained))
            result.cam_peak, result.cam_region = explained[result.cam_label][:2]
        if keep_arrays:
            result.cam_maps = {label: full for label, (_, _, full) in explained.items()}

    @staticmethod
    def _measure(scored: list[tuple[Prediction, Cropped]], measured: list[tuple[dict[str, Any], Any, Any]],
                 keep_arrays: bool) -> None:
        """Each scored film's mask quality, heart mask and cardiothoracic ratio
        (:func:`masks_and_ratio`), and a Cardiomegaly call's explanation: the heart outline when
        the ratio supports it, else its Grad-CAM with the contradicting ratio in a sentence."""
        for (result, _), (quality, heart, ctr) in zip(scored, measured):
            result.mask_quality = quality
            if ctr is None:
                continue
            result.measurements = ctr.to_dict()
            if (result.population or {}).get("group") != "adult" and ctr.value is not None:
                paediatric = (result.population or {}).get("group") == "paediatric"
                if paediatric:
                    result.measurements["ctr_above_pa_cutoff"] = None
                result.measurements["ctr_cutoff_note"] = PAEDIATRIC_CTR_NOTE if paediatric else UNKNOWN_AGE_CTR_NOTE
            if OUTLINED in (result.findings or []):
                if outline_supports(ctr) and OUTLINED not in (result.cams or {}):  # an asked-for map stays
                    result.cams = {**(result.cams or {}), OUTLINED: outline_explanation(ctr, heart)}
                note = ratio_disagreement(ctr)
                if note:
                    result.measurements["ctr_call_note"] = note
                    if OUTLINED in (result.cams or {}):
                        result.cams[OUTLINED]["note"] = note
            if keep_arrays:
                result.heart = heart

    @staticmethod
    def _read(source: Any, name: str | None) -> XrayImage:
        if isinstance(source, XrayImage):
            return source
        if isinstance(source, bytes):
            return decode_xray(source, name=name or "<upload>")
        if isinstance(source, np.ndarray):
            pixels = np.asarray(source, np.float32)
            if pixels.ndim != 2 or not np.isfinite(pixels).all():
                raise XrayReadError(f"{name or 'array'}: expected a finite 2-D grey image")
            if pixels.min() < 0 or pixels.max() > 1 or pixels.max() == pixels.min():
                raise XrayReadError(f"{name or 'array'}: pixel values must span part of [0, 1]")
            return XrayImage(pixels, {"format": "array", "height": pixels.shape[0], "width": pixels.shape[1]})
        return read_xray(source)
