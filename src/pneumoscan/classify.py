"""Stage 6 (classify): a trained DenseNet-121 (:mod:`pneumoscan.networks`) on lung crops → 15
probabilities in SPEC label order, with its model file's metadata: the assessed labels and their
thresholds, the readings per population, the Grad-CAM reference; in PyTorch (:class:`Classifier`)
or behind another backend (:class:`ScoringClassifier`, ONNX Runtime in :mod:`pneumoscan.backends.onnx`).

Two options of the same model (the thesis's future work; the plain DenseNet-121 stays the default):

- ``arch="agcnn"`` (Guan et al. 2018): the global branch's feature map gives an attention box
  (:func:`pneumoscan.crop.attention_box`), that region is cut from the original image, a second
  DenseNet-121 (the local branch) reads it, and the head reads both branches' pooled features.
- ``clinical``: patient information (:mod:`pneumoscan.clinical`) embedded and put beside the
  image features at the head's input, with a learnt "missing" embedding per field.

The head's input is [global pooled (1024) | local pooled (1024, AG-CNN) | clinical embeddings];
Grad-CAM weighs the global branch's map with the head's gradient at that input.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumoscan.accel import place, resolve_device, run
from pneumoscan.clinical import ClinicalEncoder, ClinicalSpec
from pneumoscan.explain import head_linears
from pneumoscan.labels import LABELS
from pneumoscan.modelfile import (
    ModelFileError,
    load_error,
    load_model,
    save_model,
    shipped_model_path,
)
from pneumoscan.networks import FEATURES, ChestClassifier, fuse

KIND = "chest-classifier"
DEFAULT_SIZE = 224
DEFAULT_MODEL = "chest_densenet121.pt"
def check_crops(crops: np.ndarray, size: int) -> None:
    """Refuse what the classifier was never trained on: wrong shape, or values outside [0, 1]
    (a uint8 crop not divided by 255, say). Such input raises; it is never scored."""
    crops = np.asarray(crops)
    if crops.ndim != 3 or crops.shape[1:] != (size, size):
        raise ValueError(f"classifier input must be N×{size}×{size} crops, got shape {crops.shape}")
    if crops.size and not np.isfinite(crops).all():
        raise ValueError("classifier input must be finite (NaN or infinite values found)")
    if crops.size and (crops.min() < 0 or crops.max() > 1):
        raise ValueError(f"classifier input must be in [0, 1] (got {float(crops.min()):.3g}…"
                         f"{float(crops.max()):.3g}: a uint8 crop not divided by 255?)")


#: ``local_from(i, box)``: crop i's AG-CNN local input (uint8 S×S), the attention box (in crop
#: pixels) cut from its original image.
LocalFrom = Callable[[int, tuple[int, int, int, int]], np.ndarray]
#: ``choose(i, probabilities, pooled)``: the class indices whose Grad-CAMs crop i gets (empty: no
#: map), from its raw probabilities and pooled features (the film's population depends on them).
Choose = Callable[[int, np.ndarray, np.ndarray], list[int]]


class ScoringClassifier:
    """What every backend shares: the metadata (labels, input size, per label whether it was
    shown to be learnt and its threshold), batching, the fused head and the findings. A backend
    implements the runtime protocol: :attr:`backend`, :meth:`_probs_and_pooled` (plain model: crops →
    probabilities and pooled features), :meth:`_global_maps` (crops → the last block's feature maps),
    :meth:`_local_pooled` (AG-CNN's local branch), :meth:`_head_modules` (the fused head and the
    clinical encoder) and :meth:`gradcam`. :class:`Classifier` is PyTorch's;
    :class:`pneumoscan.backends.onnx.OnnxClassifier` is ONNX Runtime's.

    ``assessed[j]`` False means output j was never shown to work: callers must not report it as a
    finding (torchxrayvision's convention for outputs its weights do not cover). A model file
    from before this field existed has every label unassessed, whatever thresholds it stored.
    """

    def __init__(self, meta: dict[str, Any]):
        self.meta = meta
        self.size = int(meta.get("input_size", DEFAULT_SIZE))
        architecture = meta.get("architecture") or {}
        self.arch = str(architecture.get("name", "densenet121"))
        self.attention_threshold = float(architecture.get("attention_threshold", 0.0))
        self.clinical = ClinicalSpec.from_dict(meta["clinical"]) if meta.get("clinical") else None
        reference = (meta.get("explain") or {}).get("reference_features")
        self.cam_reference = None if reference is None else np.asarray(reference, np.float32)
        self._read_assessment()

    # --- the runtime protocol ------------------------------------------------------------------
    @property
    def backend(self) -> str:
        raise NotImplementedError

    def _probs_and_pooled(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _global_maps(self, crops: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _local_pooled(self, local: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def _head_modules(self) -> tuple[nn.Sequential, ClinicalEncoder | None]:
        raise NotImplementedError

    def _gradcam(self, crop: np.ndarray, class_index: int) -> np.ndarray:
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------------------
    @property
    def fused(self) -> bool:
        """True for AG-CNN or patient information: the head reads more than the global branch."""
        return self.arch != "densenet121" or self.clinical is not None

    @property
    def lung_masked(self) -> bool:
        """True when the model learnt from lung-masked crops (0 outside the lung mask): every
        caller must then crop with ``masked=True`` (:func:`pneumoscan.pipeline.segment_and_crop`)."""
        return bool((self.meta.get("preprocessing") or {}).get("lung_mask", False))

    def _read_assessment(self) -> None:
        """``assessed`` and ``thresholds`` (NaN where not assessed) from the metadata, and the
        per-population readings (:func:`pneumoscan.reading.readings`)."""
        from pneumoscan.reading import readings

        assessment = self.meta.get("assessment") or {}
        self.assessed = np.array([bool((assessment.get(lab) or {}).get("assessed")) for lab in LABELS])
        self.thresholds = np.array([(assessment.get(lab) or {}).get("threshold") if a else np.nan
                                    for lab, a in zip(LABELS, self.assessed)], np.float32)
        bad = [lab for lab, a, t in zip(LABELS, self.assessed, self.thresholds) if a and not 0 <= t <= 1]
        if bad:
            raise ModelFileError(f"assessed labels without a threshold in [0, 1]: {bad}")
        try:
            self.readings = readings(self.meta, self.assessed, self.thresholds)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"the model's reading section (populations, calibration) is damaged: {exc}") from exc
        self.age_model = (self.meta.get("reading") or {}).get("age_model")
        self.rank = (self.meta.get("reading") or {}).get("rank")

    @property
    def assessed_labels(self) -> list[str]:
        return [label for label, a in zip(LABELS, self.assessed) if a]

    def set_cam_reference(self, features: np.ndarray, description: str) -> None:
        """Record the pooled features Grad-CAM measures against (:mod:`pneumoscan.explain`)."""
        self.meta["explain"] = {"method": "Grad-CAM at the last block, relative to the mean pooled features "
                                          "of reference films (explain.py)",
                                "reference": description,
                                "reference_features": [round(float(v), 6) for v in features]}
        self.cam_reference = np.asarray(features, np.float32)

    def set_assessment(self, assessment: dict[str, dict[str, Any]]) -> None:
        """Record per-label assessed flags and thresholds (from validation data)."""
        self.meta["assessment"] = assessment
        self.meta["thresholds"] = {label: assessment[label]["threshold"] for label in LABELS}
        self._read_assessment()

    @property
    def thresholds_from(self) -> str:
        """Where the operating thresholds came from, in words (outputs carry it)."""
        source = self.meta.get("threshold_provenance")
        if not source:
            return "the training run's validation split"
        if source.get("method") == "cross-validation":
            return (f"out-of-fold probabilities of {source['folds']}-fold patient-grouped cross-validation over "
                    f"{source['images']} films (head on model {str(source['parent_model_sha256'])[:12]}…)")
        target = "" if source.get("target") is None else f" {source['target']}"
        where = f" of source {source['source']}" if source.get("source") else ""
        return (f"calibrated ({source['method']}{target}) on {source['images']} films{where} of "
                f"{source['manifest']} split {source['split']}, from model {str(source['parent_model_sha256'])[:12]}…")

    def findings(self, probs: np.ndarray, group: str = "adult") -> list[str]:
        """What one row of raw probabilities is reported with for a film of ``group``: the
        assessed labels at or above their threshold, No Finding only when nothing else is
        (:func:`pneumoscan.reading.one_verdict`)."""
        from pneumoscan.reading import one_verdict

        return one_verdict(self.readings[group].called(probs))

    def gradcam(self, crop: np.ndarray, class_index: int) -> np.ndarray:
        """Grad-CAM of one S×S crop for one class (S×S, in [0, 1]); a fused model's comes from
        :meth:`predict_and_explain`, which has its other inputs."""
        if self.fused:
            raise ValueError("a fused model's Grad-CAM needs its other inputs: use predict_and_explain")
        return self._gradcam(crop, class_index)

    def predict_proba(self, crops: np.ndarray, batch_size: int = 16, *, local_from: LocalFrom | None = None,
                      codes: np.ndarray | None = None) -> np.ndarray:
        """N×S×S float crops in [0, 1] → N×15 raw probabilities (assessed or not: evaluation
        needs them all; what a person reads goes through :meth:`findings`). AG-CNN needs
        ``local_from`` and a clinical model takes ``codes`` (:meth:`predict_and_explain`)."""
        check_crops(crops, self.size)
        if not self.fused:
            return self._plain_scores(crops, batch_size)[0]
        out = []
        for start in range(0, len(crops), batch_size):
            part = crops[start:start + batch_size]
            shifted = None if local_from is None else (lambda i, box, s=start: local_from(s + i, box))
            out.append(self._fused(part, None, shifted, None if codes is None else codes[start:start + batch_size])[0])
        return np.concatenate(out) if out else np.zeros((0, len(LABELS)), np.float32)

    def predict_and_explain(self, crops: np.ndarray, choose: Choose, *,
                            local_from: LocalFrom | None = None, codes: np.ndarray | None = None
                            ) -> tuple[np.ndarray, np.ndarray, list[dict[int, np.ndarray]],
                                       list[tuple[int, int, int, int] | None]]:
        """Raw probabilities, the global branch's pooled features (what the age estimate reads),
        for each crop i the Grad-CAM of every class ``choose(i, probabilities, pooled)`` lists
        (class index → map, in that order; empty: no map), and AG-CNN's attention box in crop
        pixels (None for other models).
        ``local_from(i, box)``: crop i's local input, the box cut from its original image
        (:func:`pneumoscan.crop.local_crop`); ``codes``: N×F patient-information codes."""
        if self.fused:
            return self._fused(crops, choose, local_from, codes)
        check_crops(crops, self.size)
        probs, pooled = self._plain_scores(crops)
        return (probs, pooled, [{k: self.gradcam(c, k) for k in choose(i, p, f)}
                                for i, (c, p, f) in enumerate(zip(crops, probs, pooled))], [None] * len(crops))

    def _plain_scores(self, crops: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """A plain model's probabilities and pooled features of checked crops, in batches: the one
        forward path behind :meth:`predict_proba` and :meth:`predict_and_explain`."""
        parts = [self._probs_and_pooled(crops[s:s + batch_size]) for s in range(0, len(crops), batch_size)]
        if not parts:
            return np.zeros((0, len(LABELS)), np.float32), np.zeros((0, FEATURES), np.float32)
        return np.concatenate([p for p, _ in parts]), np.concatenate([f for _, f in parts])

    def _fused(self, crops: np.ndarray, choose: Choose | None,
               local_from: LocalFrom | None, codes: np.ndarray | None):
        """The fused head, the same for every backend: global maps → (AG-CNN: attention boxes →
        local crops → local features) → [pooled | local | clinical] → head; Grad-CAM from the maps."""
        from pneumoscan.crop import attention_box
        from pneumoscan.explain import cam_from_features

        check_crops(crops, self.size)
        maps = self._global_maps(crops)
        boxes: list[tuple[int, int, int, int] | None] = [None] * len(crops)
        local = None
        if self.arch == "agcnn":
            if local_from is None:
                raise ValueError("the AG-CNN classifier needs each crop's original image for its local crop")
            found = [attention_box(m, self.attention_threshold, self.size) for m in maps]
            local = np.stack([local_from(i, b) for i, b in enumerate(found)]).astype(np.float32) / 255.0
            boxes = list(found)
        head, clinical = self._head_modules()
        device = head_linears(head)[0].weight.device
        with torch.inference_mode():
            x = fuse(torch.from_numpy(maps.mean(axis=(2, 3))).to(device),
                     None if local is None else self._local_pooled(local).to(device), clinical,
                     None if codes is None else torch.as_tensor(np.asarray(codes, np.int64)))
            probs = torch.sigmoid(head(x)).float().cpu().numpy()
        pooled, rest = x[:, :FEATURES].float().cpu().numpy(), x[:, FEATURES:].float().cpu().numpy()
        heats = [{} if choose is None else
                 {k: cam_from_features(m[None], head, k, crops.shape[1:], rest=r[None], reference=self.cam_reference)[0]
                  for k in choose(i, p, f)}
                 for i, (m, p, f, r) in enumerate(zip(maps, probs, pooled, rest))]
        return probs, pooled, heats, boxes


class Classifier(ScoringClassifier):
    """A trained :class:`~pneumoscan.networks.ChestClassifier` in PyTorch, with its metadata; the one that can be
    saved, trained further and exported."""

    def __init__(self, model: ChestClassifier, meta: dict[str, Any]):
        super().__init__(meta)
        self.model = model.eval()
        self.device = torch.device("cpu")

    @property
    def backend(self) -> str:
        return f"torch ({self.device})"

    def to(self, device: str | torch.device) -> Classifier:
        """Run on ``device`` (``cuda``: channels_last, bfloat16 autocast)."""
        self.device = resolve_device(device)
        self.model = place(self.model, self.device)
        return self

    @classmethod
    def load(cls, path: str | Path) -> Classifier:
        state, meta = load_model(path, kind=KIND, labels=LABELS)
        arch = str((meta.get("architecture") or {}).get("name", "densenet121"))
        try:
            model = ChestClassifier(hidden=int(meta.get("hidden", 1000)), dropout=float(meta.get("dropout", 0.4)),
                                    arch=arch, clinical=ClinicalSpec.from_dict(meta["clinical"])
                                    if meta.get("clinical") else None)
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"{path}: its architecture cannot be built ({exc})") from exc
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a tensor of the wrong shape (valid hashes do not make weights fit)
            raise ModelFileError(f"{path}: weights do not fit the recorded architecture ({arch}): "
                                 f"{load_error(exc)}") from exc
        if missing or unexpected:
            raise ModelFileError(f"{path}: weights do not fit the recorded architecture ({arch}"
                                 f"{' + patient information' if meta.get('clinical') else ''}: "
                                 f"missing {missing[:3]}, unexpected {unexpected[:3]})")
        return cls(model, meta)

    def save(self, path: str | Path, *, half: bool = False) -> dict[str, Any]:
        meta = {**self.meta, "kind": KIND, "labels": list(LABELS), "input_size": self.size}
        return save_model(path, self.model.state_dict(), meta, half=half)

    @torch.inference_mode()
    def _probs_and_pooled(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(crops, np.float32))[:, None]
        pooled = run(lambda t: self.model.feature_map(t).mean(dim=(2, 3)), x, self.device)
        logits = self.model.head(pooled.to(head_linears(self.model.head)[0].weight.device)).float().cpu()
        return torch.sigmoid(logits).numpy(), pooled.float().numpy()

    @torch.inference_mode()
    def _global_maps(self, crops: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(crops, np.float32))[:, None]
        return run(self.model.feature_map, x, self.device).numpy()

    @torch.inference_mode()
    def _local_pooled(self, local: np.ndarray) -> torch.Tensor:
        return run(self.model.local_pooled, torch.from_numpy(np.ascontiguousarray(local, np.float32))[:, None],
                   self.device)

    def _head_modules(self) -> tuple[nn.Sequential, ClinicalEncoder | None]:
        """The fused head and the clinical encoder (where the model is)."""
        return self.model.head, self.model.clinical

    def _gradcam(self, crop: np.ndarray, class_index: int) -> np.ndarray:
        from pneumoscan.explain import GradCAM

        x = torch.from_numpy(np.ascontiguousarray(crop, np.float32))[None, None].to(self.device)
        with GradCAM(self.model, reference=self.cam_reference) as cam:
            return cam(x, class_index)[0]


def default_model_path() -> Path:
    return shipped_model_path(DEFAULT_MODEL)


def load_default() -> Classifier:
    """The shipped classifier (no network access); see ``models/chest_densenet121.md``."""
    return Classifier.load(default_model_path())
