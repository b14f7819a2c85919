"""The end-to-end predictor: read → CLAHE → U-Net → clean mask → crop → DenseNet-121 → Grad-CAM.

One :class:`Predictor` serves the CLI, the REST API and Python callers, so they cannot drift
apart. Inputs that cannot be read give a :class:`Prediction` whose ``error`` says why; the rest of
a batch goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.classify import Classifier
from pneumoscan.crop import crop_resize
from pneumoscan.explain import place_on_original
from pneumoscan.io import XrayImage, XrayReadError, decode_xray, read_xray
from pneumoscan.labels import FINDINGS, LABELS
from pneumoscan.segment import LungSegmenter

#: Image metadata that may leave the process: technical fields only, never patient identity.
PUBLIC_META = ("format", "height", "width", "bit_depth", "mode", "photometric", "view_position",
               "modality", "transfer_syntax", "inverted", "windowed")


@dataclass
class Prediction:
    """What PneumoScan says about one image. Arrays stay out of :meth:`to_dict`."""

    path: str | None
    probabilities: dict[str, float] | None = None
    findings: list[str] | None = None
    box: list[int] | None = None
    fallback: bool | None = None
    lung_fraction: float | None = None
    image: dict[str, Any] | None = None
    cam_label: str | None = None
    error: str | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)
    cam: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "probabilities": self.probabilities, "findings": self.findings,
                "box": self.box, "fallback": self.fallback, "lung_fraction": self.lung_fraction,
                "image": self.image, "cam_label": self.cam_label, "error": self.error}


def resolve_label(name: str) -> str:
    """A class name as typed by a person ("pneumonia", "pleural thickening") → its label."""
    wanted = name.strip().lower().replace(" ", "_")
    for label in LABELS:
        if label.lower().replace(" ", "_") == wanted:
            return label
    raise ValueError(f"unknown class {name!r}; choose 'top' or one of: {', '.join(LABELS)}")


class Predictor:
    """Lung segmenter + classifier, with Grad-CAM on request."""

    def __init__(self, segmenter: LungSegmenter, classifier: Classifier):
        self.segmenter = segmenter
        self.classifier = classifier

    @classmethod
    def from_default(cls) -> Predictor:
        return cls.from_paths()

    @classmethod
    def from_paths(cls, seg: str | Path | None = None, cls_model: str | Path | None = None) -> Predictor:
        from pneumoscan.classify import load_default as load_classifier
        from pneumoscan.segment import load_default as load_segmenter

        return cls(LungSegmenter.load(seg) if seg else load_segmenter(),
                   Classifier.load(cls_model) if cls_model else load_classifier())

    @classmethod
    def from_onnx(cls, folder: str | Path) -> Predictor:
        """Both models through ONNX Runtime (``pneumoscan export --format onnx``)."""
        from pneumoscan.export import load_onnx

        return cls(*load_onnx(folder))

    @property
    def models(self) -> dict[str, Any]:
        """SHA-256 and training summary of both models (for reports and /health)."""
        return {"segmentation": self.segmenter.meta.get("weights_sha256"),
                "classifier": self.classifier.meta.get("weights_sha256"),
                "classifier_input_size": self.classifier.size}

    def predict(self, source: str | Path | bytes | np.ndarray | XrayImage, *, cam: str | None = None,
                name: str | None = None, keep_arrays: bool = False) -> Prediction:
        return self.predict_batch([source], cam=cam, names=[name], keep_arrays=keep_arrays)[0]

    def predict_batch(self, sources: list[Any], *, cam: str | None = None,
                      names: list[str | None] | None = None, keep_arrays: bool = False) -> list[Prediction]:
        """Predictions in input order; ``cam`` is None, "top" (the most probable finding) or a
        class name; ``keep_arrays`` keeps the picture, mask and full-size Grad-CAM heat map for
        overlays (without it only the Grad-CAM class is named, and no heat map is computed)."""
        cam_label = None if cam in (None, "top") else resolve_label(cam)
        names = names or [None] * len(sources)
        results: list[Prediction] = []
        readable: list[tuple[int, XrayImage]] = []
        for i, (source, name) in enumerate(zip(sources, names)):
            label = name or (str(source) if isinstance(source, str | Path) else None)
            try:
                image = self._read(source, label)
            except XrayReadError as exc:
                results.append(Prediction(path=label, error=str(exc)))
                continue
            results.append(Prediction(path=label, image={k: image.meta.get(k) for k in PUBLIC_META}))
            readable.append((i, image))
        if not readable:
            return results
        segs = self.segmenter.segment_batch([image.pixels for _, image in readable])
        crops = np.stack([crop_resize(image.pixels, seg.box, self.classifier.size)
                          for (_, image), seg in zip(readable, segs)]).astype(np.float32)
        probs = self.classifier.predict_proba(crops)
        for (i, image), seg, crop, p in zip(readable, segs, crops, probs):
            result = results[i]
            result.probabilities = {label: round(float(v), 6) for label, v in zip(LABELS, p)}
            result.findings = [label for label, v, t in zip(LABELS, p, self.classifier.thresholds) if v >= t]
            result.box, result.fallback = [int(v) for v in seg.box], bool(seg.fallback)
            result.lung_fraction = round(float(seg.lung_fraction), 4)
            if cam is not None:
                result.cam_label = cam_label or max(FINDINGS, key=lambda f: p[LABELS.index(f)])
            if keep_arrays:
                result.pixels, result.mask = image.pixels, seg.mask
                if result.cam_label is not None:  # the heat map is an array: only made when kept
                    heat = self.classifier.gradcam(crop, LABELS.index(result.cam_label))
                    result.cam = place_on_original(heat, seg.box, image.pixels.shape)
        return results

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
