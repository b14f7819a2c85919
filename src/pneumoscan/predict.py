"""The end-to-end predictor: read → CLAHE → U-Net → clean mask → crop → DenseNet-121 → Grad-CAM,
with the heart U-Net and the cardiothoracic ratio beside the classifier, over the one read →
segment → crop path (:func:`pneumoscan.pipeline.read_segment_crop`). Its record is
:class:`pneumoscan.prediction.Prediction`; what the calls rest on besides the scores,
:mod:`pneumoscan.evidence`; the models it loads, :mod:`pneumoscan.loading`.

One :class:`Predictor` serves the CLI, the REST API and Python callers, so they cannot drift
apart. Inputs that cannot be read give a :class:`Prediction` whose ``error`` says why; the rest of
a batch goes on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.classify import ScoringClassifier
from pneumoscan.clinical import values_from
from pneumoscan.crop import (
    box_in_original,
    local_crop,
)
from pneumoscan.evidence import (
    OUTLINED,
    PAEDIATRIC_CTR_NOTE,
    UNKNOWN_AGE_CTR_NOTE,
    cam_reason,
    masks_and_ratio,
    outline_explanation,
    outline_supports,
    ratio_disagreement,
)
from pneumoscan.explain import heat_on_film
from pneumoscan.films import XrayImage, XrayReadError, decode_xray, display_name, read_xray
from pneumoscan.gate import FrontalCheck, check_frontal_chest, load_default_check
from pneumoscan.labels import FINDINGS, LABELS
from pneumoscan.loading import load_heart, load_models
from pneumoscan.maskquality import MaskQuality
from pneumoscan.measure import CardiothoracicRatio, Measurements
from pneumoscan.modelfile import ModelFileError
from pneumoscan.pipeline import Cropped, Segmented, read_segment_crop
from pneumoscan.prediction import PUBLIC_META, Explanation, NotAssessedError, Prediction, resolve_label
from pneumoscan.reading import (
    Group,
    Population,
    adult_only_labels,
    estimate_population,
    population_from_age,
    rank_scores,
    verdict_of,
    verdict_reason,
)
from pneumoscan.segment import HeartSegmenter, LungSegmenter


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


@dataclass
class ExplanationPlan:
    """One batch's choice of maps, made while the classifier runs: who each film is read for
    (decided once, from its stated age or else estimated from its features: the choice of maps
    needs it before the reading does) and which labels get a Grad-CAM."""

    classifier: ScoringClassifier
    cam: str | None
    asked: list[str]
    stated: list[tuple[float, str] | None]
    ratios: list[CardiothoracicRatio | None]
    populations: dict[int, Population] = field(default_factory=dict)

    def population(self, i: int, pooled: np.ndarray) -> Population:
        if i not in self.populations:
            age = self.stated[i]
            self.populations[i] = (population_from_age(*age) if age is not None
                                   else estimate_population(pooled, self.classifier.age_model))
        return self.populations[i]

    def maps_of(self, i: int, p: np.ndarray, pooled: np.ndarray) -> list[int]:
        """The labels given a Grad-CAM: the ones asked for first, then every called finding by
        calibrated probability (Cardiomegaly's explanation is the heart outline when the ratio
        supports it); with 'top' and nothing called, the most probable finding assessed for the
        population."""
        if self.cam is None:
            return []
        reading = self.classifier.readings[self.population(i, pooled).group]
        shown = reading.calibrate(p[None])[0]  # "most probable" as the reader sees the numbers
        known = [f for f in FINDINGS if reading.assessed[LABELS.index(f)]]
        called = sorted((f for f in reading.called(p) if f in known), key=lambda f: -shown[LABELS.index(f)])
        chosen = [f for f in called if not (f == OUTLINED and outline_supports(self.ratios[i]))]
        if self.asked:
            chosen = self.asked + [f for f in chosen if f not in self.asked]
        elif not called and known:
            chosen = [max(known, key=lambda f: shown[LABELS.index(f)])]
        return [LABELS.index(f) for f in chosen]


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
        """Check a Grad-CAM request up front: None, "top", or assessed labels (any spelling; several
        comma-separated, e.g. a reader study's targets, each then mapped first, in that order)."""
        if cam is None or cam.strip().lower() in ("top", "none"):
            return None if cam is None or cam.strip().lower() == "none" else "top"
        labels = list(dict.fromkeys(resolve_label(part) for part in cam.split(",") if part.strip()))
        unassessed = [label for label in labels if label not in self.classifier.assessed_labels]
        if unassessed or not labels:
            raise NotAssessedError(
                f"{', '.join(unassessed) or repr(cam)} is not assessed by this model, so its heat map would show "
                f"nothing learnt; choose 'top' or one of: {', '.join(self.classifier.assessed_labels) or '(none)'}")
        return ",".join(labels)

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
        → crop path, :func:`~pneumoscan.pipeline.read_segment_crop`)."""
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
        asked = [] if cam in (None, "top") else cam.split(",")
        results, scored = self._gate(chunk, keep_arrays, force)
        if not scored:
            return results
        crops = np.stack([item.crop for _, item in scored]).astype(np.float32) / 255.0
        measured = masks_and_ratio([item for _, item in scored], self.segmenter, self.heart)
        plan = ExplanationPlan(classifier, cam, asked, [stated_age(item.image.meta, item.source[2]) for _, item in scored],
                               [ratio for _, _, ratio in measured])
        codes = None
        if classifier.clinical is not None:
            names = classifier.clinical.names
            codes = classifier.clinical.encode([values_from(item.image.meta, item.source[2], names)
                                                for _, item in scored])

        def local_from(i: int, box: tuple[int, int, int, int]) -> np.ndarray:
            item = scored[i][1]
            return local_crop(item.image.pixels, item.seg.box, box, classifier.size)

        probs, pooled, heats, local_boxes = classifier.predict_and_explain(crops, plan.maps_of, local_from=local_from,
                                                                           codes=codes)
        adult_only = adult_only_labels(classifier.readings)
        for k, ((result, item), p, heat, local) in enumerate(zip(scored, probs, heats, local_boxes)):
            if local is not None:
                result.local_box = [int(v) for v in box_in_original(local, item.seg.box, classifier.size)]
            if codes is not None and classifier.clinical is not None:
                result.clinical = classifier.clinical.present(codes[k])
            self._reading(result, p, plan.population(k, pooled[k]), adult_only)
            self._explain(result, item, heat, asked, keep_arrays)
        self._measure(scored, measured, keep_arrays)
        return results

    def _gate(self, chunk: list[Cropped], keep_arrays: bool, force: bool
              ) -> tuple[list[Prediction], list[tuple[Prediction, Segmented]]]:
        """One Prediction per input (an unreadable one carries its error) and the films the input
        gate lets through (every readable film with ``force``), each with its gate verdict, crop box
        and (``keep_arrays``) its pixels and lung mask."""
        results = [Prediction(path=_label(*item.source[:2]), error=item.error) for item in chunk]
        scored = []
        for result, cropped in zip(results, chunk):
            item = cropped.segmented()
            if item is None:  # unreadable: its error is said
                continue
            image, seg = item.image, item.seg
            gate = check_frontal_chest(seg.prob, image.pixels, image.meta, self.frontal_check)
            gate.forced = force and not gate.frontal_chest
            result.image = {k: image.meta.get(k) for k in PUBLIC_META}
            result.quality = gate
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
        result.population = who
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

    def _explain(self, result: Prediction, item: Segmented, heat: dict[int, np.ndarray], asked: list[str],
                 keep_arrays: bool) -> None:
        """The film's Grad-CAM maps on the film: peak, region and why each is shown."""
        explained = {LABELS[j]: heat_on_film(h, item.seg.mask, item.seg.box, item.image.pixels.shape,
                                             lungs_only=self.classifier.lung_masked, full=keep_arrays)
                     for j, h in heat.items()}
        result.cams = {label: Explanation("grad-cam", label in (result.findings or []),
                                          cam_reason(label, result.findings, asked), region, peak=peak)
                       for label, (peak, region, _) in explained.items()}
        if explained:
            result.cam_label = next(iter(explained))
            result.cam_peak, result.cam_region = explained[result.cam_label][:2]
        if keep_arrays:
            result.cam_maps = {label: full for label, (_, _, full) in explained.items() if full is not None}

    @staticmethod
    def _measure(scored: list[tuple[Prediction, Segmented]],
                 measured: list[tuple[MaskQuality, np.ndarray | None, CardiothoracicRatio | None]],
                 keep_arrays: bool) -> None:
        """Each scored film's mask quality, heart mask and cardiothoracic ratio
        (:func:`masks_and_ratio`), and a Cardiomegaly call's explanation: the heart outline when
        the ratio supports it, else its Grad-CAM with the contradicting ratio in a sentence."""
        for (result, _), (quality, heart, ctr) in zip(scored, measured):
            result.mask_quality = quality
            if ctr is None or heart is None:  # (no heart model: neither)
                continue
            measurements = result.measurements = Measurements(ctr)
            group = result.population.group if result.population else None
            if group != Group.ADULT and ctr.value is not None:
                measurements.cutoff_applies = group != Group.PAEDIATRIC
                measurements.cutoff_note = UNKNOWN_AGE_CTR_NOTE if measurements.cutoff_applies else PAEDIATRIC_CTR_NOTE
            if OUTLINED in (result.findings or []):
                if outline_supports(ctr) and OUTLINED not in (result.cams or {}):  # an asked-for map stays
                    result.cams = {**(result.cams or {}), OUTLINED: outline_explanation(ctr, heart)}
                measurements.call_note = ratio_disagreement(ctr)
                if measurements.call_note and result.cams and OUTLINED in result.cams:
                    result.cams[OUTLINED].note = measurements.call_note
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
