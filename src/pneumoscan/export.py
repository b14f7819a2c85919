"""ONNX export of both models and the ONNX Runtime backend of the predictor (the fast CPU path).

``export_onnx`` writes ``lung_unet.onnx`` (N×1×S×S → lung logits), ``classifier.onnx``
(N×1×S×S crops → logits and the last block's post-ReLU features, for the forward-only
Grad-CAM) and ``pneumoscan_onnx.json`` (both models' metadata, the classifier head's weights that
Grad-CAM needs, the SHA-256 of each ``.onnx`` file, and a SHA-256 over all of that).
:func:`load_onnx` checks every hash, the label order and each model's own metadata hash before
returning a segmenter and a classifier that the :class:`~pneumoscan.predict.Predictor` uses like
the PyTorch ones (which then checks that the two belong together).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumoscan.classify import Classifier, check_crops
from pneumoscan.explain import cam_from_features
from pneumoscan.labels import LABELS
from pneumoscan.modelfile import ModelFileError, atomic_write_bytes, file_sha256, first_line, metadata_sha256
from pneumoscan.segment import LungSegmenter

META_FILE = "pneumoscan_onnx.json"


class _LogitsAndFeatures(nn.Module):
    """The classifier with its last feature map as a second output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.feature_map(x)
        return self.model.net.class_layers.out(features.mean(dim=(2, 3))), features


def export_onnx(segmenter: LungSegmenter, classifier: Classifier, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seg_size, cls_size = segmenter.preprocessing.size, classifier.size
    paths = {"segmentation": out / "lung_unet.onnx", "classifier": out / "classifier.onnx"}
    with torch.no_grad():
        torch.onnx.export(segmenter.net.eval(), (torch.rand(1, 1, seg_size, seg_size),),
                          str(paths["segmentation"]), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}}, opset_version=17,
                          dynamo=False)
        # The wrapper must be in eval mode itself: export restores the wrapper's mode on every
        # submodule afterwards, and a training-mode wrapper would leave the classifier training.
        torch.onnx.export(_LogitsAndFeatures(classifier.model).eval(), (torch.rand(1, 1, cls_size, cls_size),),
                          str(paths["classifier"]), input_names=["crops"], output_names=["logits", "features"],
                          dynamic_axes={"crops": {0: "n"}, "logits": {0: "n"}, "features": {0: "n"}},
                          opset_version=17, dynamo=False)
    head = classifier.model.net.class_layers.out
    meta = {"segmentation": segmenter.meta | {"preprocessing": segmenter.preprocessing.to_dict()},
            "classifier": classifier.meta,
            "head": {"w1": head[0].weight.detach().tolist(), "b1": head[0].bias.detach().tolist(),
                     "w2": head[3].weight.detach().tolist()},
            "files": {path.name: file_sha256(path) for path in paths.values()}}
    meta["sha256"] = metadata_sha256(meta)
    atomic_write_bytes(out / META_FILE, json.dumps(meta).encode())
    paths["meta"] = out / META_FILE
    return paths


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxLungSegmenter(LungSegmenter):
    """The U-Net through ONNX Runtime; clean-up and boxes are the PyTorch path's own code."""

    def __init__(self, path: Path, preprocessing, meta: dict[str, Any]):
        super().__init__(nn.Identity(), preprocessing, meta)
        self.session = _session(path)

    def probabilities(self, batch: list[np.ndarray]) -> np.ndarray:
        x = np.stack([self.preprocessing(p) for p in batch])[:, None].astype(np.float32)
        logits = self.session.run(None, {"image": x})[0][:, 0]
        return 1.0 / (1.0 + np.exp(-logits))


class OnnxClassifier(Classifier):
    """The classifier through ONNX Runtime, with Grad-CAM from the forward pass alone."""

    def __init__(self, path: Path, meta: dict[str, Any], head: dict[str, list]):
        super().__init__(nn.Identity(), meta)
        self.session = _session(path)
        self.head = nn.Sequential(nn.Linear(1024, len(head["b1"])), nn.ReLU(), nn.Identity(),
                                  nn.Linear(len(head["b1"]), len(head["w2"]), bias=False))
        with torch.no_grad():
            self.head[0].weight.copy_(torch.tensor(head["w1"]))
            self.head[0].bias.copy_(torch.tensor(head["b1"]))
            self.head[3].weight.copy_(torch.tensor(head["w2"]))

    def _run(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.session.run(None, {"crops": np.ascontiguousarray(crops, np.float32)[:, None]})
        return logits, features

    def predict_proba(self, crops: np.ndarray, batch_size: int = 16) -> np.ndarray:
        check_crops(crops, self.size)
        out = [1.0 / (1.0 + np.exp(-self._run(crops[i:i + batch_size])[0]))
               for i in range(0, len(crops), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.thresholds)), np.float32)

    def gradcam(self, crop: np.ndarray, class_index: int) -> np.ndarray:
        _, features = self._run(crop[None])
        return cam_from_features(features, self.head, class_index, crop.shape)[0]


def load_onnx(folder: str | Path) -> tuple[OnnxLungSegmenter, OnnxClassifier]:
    """The exported pair, checked for completeness."""
    from pneumoscan.segment import Preprocessing

    folder = Path(folder)
    missing = [n for n in ("lung_unet.onnx", "classifier.onnx", META_FILE) if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a PneumoScan ONNX export (missing {', '.join(missing)}); "
                                f"run `pneumoscan export --format onnx --out {folder}`")
    meta = verify_export(folder)
    seg_meta = meta["segmentation"]
    try:
        segmenter = OnnxLungSegmenter(folder / "lung_unet.onnx", Preprocessing.from_dict(seg_meta["preprocessing"]),
                                      seg_meta)
        return segmenter, OnnxClassifier(folder / "classifier.onnx", meta["classifier"], meta["head"])
    except Exception as exc:  # ONNX Runtime and a damaged head raise many kinds
        raise ModelFileError(f"{folder}: the ONNX export cannot be loaded ({first_line(exc)})") from exc


def verify_export(folder: Path) -> dict[str, Any]:
    """The export's metadata, after checking it and every file it names; else ModelFileError."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        files, recorded = dict(meta["files"]), meta["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{folder / META_FILE}: damaged or from an older export (re-run "
                             f"`pneumoscan export`): {type(exc).__name__}") from exc
    if metadata_sha256(meta) != recorded:
        raise ModelFileError(f"{folder / META_FILE}: contents do not match their SHA-256 (altered or damaged)")
    for name in ("lung_unet.onnx", "classifier.onnx"):
        if files.get(name) != file_sha256(folder / name):
            raise ModelFileError(f"{folder / name}: does not match the SHA-256 recorded at export "
                                 f"(altered, truncated or from another export)")
    if tuple(meta["classifier"].get("labels", ())) != LABELS:
        raise ModelFileError(f"{folder}: label order differs from this version's")
    for part in ("segmentation", "classifier"):  # each model's own hash, as in its .pt file
        inner = meta[part]
        if "sha256" in inner and inner["sha256"] != metadata_sha256(inner):
            raise ModelFileError(f"{folder}: the {part} model's metadata does not match its SHA-256")
    return meta
