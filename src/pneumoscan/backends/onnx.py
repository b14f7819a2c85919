"""ONNX export of the models and the ONNX Runtime backend of the predictor (the fast CPU path).

``export_onnx`` writes ``lung_unet.onnx`` (N×1×S×S → lung logits), ``classifier.onnx``
(N×1×S×S crops → logits and the last block's post-ReLU features, for the forward-only
Grad-CAM), ``heart_unet.onnx`` when a heart model is given, and ``pneumoscan_onnx.json`` (the
models' metadata, the classifier head's weights that Grad-CAM needs, the SHA-256 of each
``.onnx`` file, and a SHA-256 over all of that). :func:`load_onnx` checks every hash, the label
order and each model's own metadata hash before returning segmenters and a classifier that the
:class:`~pneumoscan.predict.Predictor` uses like the PyTorch ones (which then checks that they
belong together).

:func:`load_cached` reads only the model files' verified metadata when their export is already in
the per-user cache: no PyTorch network is built, and MONAI (≈ 3 s to import here) is not imported.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumoscan.classify import KIND as CLASSIFIER_KIND
from pneumoscan.classify import Choose, Classifier, ScoringClassifier, check_crops
from pneumoscan.clinical import ClinicalEncoder
from pneumoscan.errors import first_line
from pneumoscan.explain import cam_from_features, head_linears
from pneumoscan.labels import LABELS
from pneumoscan.modelfile import (
    ModelFileError,
    atomic_write_bytes,
    file_sha256,
    load_model,
    metadata_sha256,
)
from pneumoscan.networks import ChestClassifier
from pneumoscan.segment import HEART_KIND, KIND, HeartSegmenter, LungSegmenter, Segmenter

META_FILE = "pneumoscan_onnx.json"
#: How long a process waits for another one exporting the same pair before giving up.
LOCK_TIMEOUT_S = 900


def cache_root() -> Path:
    """Per-user cache of ONNX exports: ``$PNEUMOSCAN_CACHE``, else ``$XDG_CACHE_HOME/pneumoscan``,
    else ``~/.cache/pneumoscan``."""
    if os.environ.get("PNEUMOSCAN_CACHE"):
        return Path(os.environ["PNEUMOSCAN_CACHE"]) / "onnx"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pneumoscan" / "onnx"


def identity(meta: dict[str, Any]) -> str:
    """A model's full identity: the SHA-256 over weights and metadata (weights only for format 1)."""
    return str(meta.get("sha256") or meta.get("weights_sha256"))


def cached_export(seg_path: Path, cls_path: Path, heart_path: Path | None, metas: list[dict[str, Any]], *,
                  progress=None) -> Path:
    """The ONNX export of these model files in the per-user cache, made on first use. The folder is
    named by the models' identities (``metas``, read from the files); a file lock makes a second
    process wait for the first one's export instead of racing it, and the export is written under a
    temporary name and renamed, so a crash never leaves a half export that looks whole.
    ``progress(message)`` is told when an export starts (it takes about half a minute)."""
    from filelock import FileLock, Timeout

    folder = cache_root() / "-".join(identity(meta)[:16] for meta in metas)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock", timeout=LOCK_TIMEOUT_S):
            if not folder.exists():
                if progress:
                    progress(f"preparing the ONNX Runtime models once for these model files in {folder}")
                tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                export_onnx(LungSegmenter.load(seg_path), Classifier.load(cls_path), tmp,
                            heart=HeartSegmenter.load(heart_path) if heart_path else None)
                tmp.rename(folder)
    except Timeout as exc:
        raise ModelFileError(f"another process has held {folder}.lock for {LOCK_TIMEOUT_S} s; if none is "
                             f"exporting, delete the lock file") from exc
    return folder


def load_cached(seg_path: Path, cls_path: Path, heart_path: Path | None = None, *, progress=None
                ) -> tuple[OnnxLungSegmenter, OnnxClassifier, OnnxHeartSegmenter | None]:
    """ONNX Runtime models for these model files, from the cache (exported on first use). Each
    file is read and verified (weights and metadata hashes) as a PyTorch load would; the cached
    export is refused when it fails its hashes or was made from other models."""
    metas = [load_model(seg_path, kind=KIND)[1], load_model(cls_path, kind=CLASSIFIER_KIND, labels=LABELS)[1],
             *([load_model(heart_path, kind=HEART_KIND)[1]] if heart_path else [])]
    folder = cached_export(seg_path, cls_path, heart_path, metas, progress=progress)
    try:
        loaded = load_onnx(folder)
    except ModelFileError as exc:
        raise ModelFileError(f"{exc} — this is the cached export; delete {folder} to have it made again") from exc
    for part, ours, theirs in zip(("lung", "classifier", "heart"), metas, loaded):
        if theirs is None or identity(ours) != identity(theirs.meta):
            raise ModelFileError(f"{folder}: the cached export's {part} model is not the one loaded "
                                 f"(altered cache); delete {folder} to have it made again")
    return loaded


class _LogitsAndFeatures(nn.Module):
    """The classifier with its last feature map as a second output (a fused model: the feature
    map alone; its head runs after the local branch, outside the graph)."""

    def __init__(self, model: ChestClassifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        features = self.model.feature_map(x)
        if self.model.fused:
            return features
        return self.model.head(features.mean(dim=(2, 3))), features


class _LocalPooled(nn.Module):
    """AG-CNN's local branch: local crops → pooled features."""

    def __init__(self, model: ChestClassifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.local_pooled(x)


def _export(module: nn.Module, size: int, path: Path, inputs: str, outputs: list[str]) -> None:
    # The wrapper must be in eval mode itself: export restores the wrapper's mode on every
    # submodule afterwards, and a training-mode wrapper would leave the model training.
    torch.onnx.export(module.eval(), (torch.rand(1, 1, size, size),), str(path), input_names=[inputs],
                      output_names=outputs, dynamic_axes={name: {0: "n"} for name in [inputs, *outputs]},
                      opset_version=17, dynamo=False)


def head_weights(model: ChestClassifier) -> dict[str, Any]:
    """What the ONNX path needs of the head outside the graphs: the weights Grad-CAM reads, and
    for a fused model the whole head and the clinical embedding tables (it runs them itself)."""
    first, last = head_linears(model.head)
    out = {"w1": first.weight.detach().tolist(), "b1": first.bias.detach().tolist(),
           "w2": last.weight.detach().tolist()}
    if model.fused:
        out["b2"] = last.bias.detach().tolist()
        out["clinical"] = [t.weight.detach().tolist() for t in model.clinical.embeddings] if model.clinical else []
    return out


def export_onnx(segmenter: LungSegmenter, classifier: Classifier, out: str | Path,
                heart: HeartSegmenter | None = None) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seg_size, cls_size = segmenter.preprocessing.size, classifier.size
    paths = {"segmentation": out / "lung_unet.onnx", "classifier": out / "classifier.onnx"}
    fused = classifier.model.fused
    with torch.no_grad(), warnings.catch_warnings():
        # MONAI's instance norm has no running statistics, so "train=True" is what eval does anyway.
        warnings.filterwarnings("ignore", message=".*instance_norm.*")
        # The tracer's notes on shape arithmetic and the exporter's deprecation notice say nothing
        # a user can act on; the export is verified against PyTorch by the tests.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*ONNX export.*")
        _export(segmenter.net, seg_size, paths["segmentation"], "image", ["logits"])
        _export(_LogitsAndFeatures(classifier.model), cls_size, paths["classifier"], "crops",
                ["features"] if fused else ["logits", "features"])
        if classifier.model.local is not None:
            paths["local"] = out / "local.onnx"
            _export(_LocalPooled(classifier.model), cls_size, paths["local"], "crops", ["pooled"])
        if heart is not None:
            paths["heart"] = out / "heart_unet.onnx"
            _export(heart.net, heart.preprocessing.size, paths["heart"], "image", ["logits"])
    meta: dict[str, Any] = {"segmentation": segmenter.meta | {"preprocessing": segmenter.preprocessing.to_dict()},
            "classifier": classifier.meta, "head": head_weights(classifier.model),
            **({"heart": heart.meta | {"preprocessing": heart.preprocessing.to_dict()}} if heart else {}),
            "files": {path.name: file_sha256(path) for path in paths.values()}}
    meta["sha256"] = metadata_sha256(meta)
    atomic_write_bytes(out / META_FILE, json.dumps(meta).encode())
    paths["meta"] = out / META_FILE
    return paths


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function without overflow warnings for large negative logits."""
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def ort_session(path: Path):
    """An ONNX Runtime CPU session for one exported model, quiet (errors only)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # A cluster worker owns one core (pneumoscan.apps.cluster sets this); otherwise all cores.
    options.intra_op_num_threads = int(os.environ.get("PNEUMOSCAN_ORT_THREADS", "0"))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _OnnxMaps(Segmenter):
    """A U-Net through ONNX Runtime; clean-up, boxes and mask quality are the PyTorch path's own code."""

    def __init__(self, path: Path, preprocessing, meta: dict[str, Any]):
        super().__init__(nn.Identity(), preprocessing, meta)
        self.session = ort_session(path)

    def probabilities(self, batch: list[np.ndarray], prepared: np.ndarray | None = None) -> np.ndarray:
        x = self.inputs(batch, prepared)[:, None].astype(np.float32)
        logits = self.session.run(None, {"image": x})[0][:, 0]
        return sigmoid(logits)

    def save(self, path: str | Path, **_: Any) -> dict[str, Any]:
        raise TypeError("an ONNX Runtime segmenter holds no PyTorch weights to save; save the model file it "
                        "was exported from")

    def to(self, device: str | torch.device):
        if str(device) != "cpu":
            raise ValueError("the ONNX Runtime backend runs on the CPU; use --backend torch for a GPU")
        return self


class OnnxLungSegmenter(_OnnxMaps, LungSegmenter):
    """The lung U-Net through ONNX Runtime."""


class OnnxHeartSegmenter(_OnnxMaps, HeartSegmenter):
    """The heart U-Net through ONNX Runtime (with the TTA re-readings of its mask quality, the
    heaviest U-Net work of a film)."""


class OnnxClassifier(ScoringClassifier):
    """The classifier through ONNX Runtime (the runtime protocol of
    :class:`~pneumoscan.classify.ScoringClassifier`), with Grad-CAM from the forward pass alone. A
    fused model (AG-CNN, patient information) runs its graphs for the feature maps and its small
    head here, through the shared fused path the PyTorch backend runs. It has no PyTorch network:
    nothing to save or train."""

    def __init__(self, folder: Path, meta: dict[str, Any], head: dict[str, list]):
        super().__init__(meta)
        self.session = ort_session(folder / "classifier.onnx")
        self.local_session = ort_session(folder / "local.onnx") if self.arch == "agcnn" else None
        w1 = torch.tensor(head["w1"])
        fused = "b2" in head
        self.head = nn.Sequential(nn.Linear(w1.shape[1], w1.shape[0]), nn.ReLU(), nn.Identity(),
                                  nn.Linear(w1.shape[0], len(head["w2"]), bias=fused))
        self.encoder = ClinicalEncoder(self.clinical) if self.clinical is not None else None
        first, last = head_linears(self.head)
        with torch.no_grad():
            first.weight.copy_(w1)
            first.bias.copy_(torch.tensor(head["b1"]))
            last.weight.copy_(torch.tensor(head["w2"]))
            if fused:
                last.bias.copy_(torch.tensor(head["b2"]))
            for table, weights in zip(self.encoder.embeddings if self.encoder else [], head.get("clinical", [])):
                table.weight.copy_(torch.tensor(weights))

    @property
    def backend(self) -> str:
        return "onnx"

    def _run(self, crops: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {"crops": np.ascontiguousarray(crops, np.float32)[:, None]})

    def _probs_and_pooled(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self._run(crops)
        return sigmoid(logits), features.mean(axis=(2, 3))

    def _global_maps(self, crops: np.ndarray) -> np.ndarray:
        return self._run(crops)[-1]

    def _local_pooled(self, local: np.ndarray) -> torch.Tensor:
        if self.local_session is None:
            raise ValueError("only an AG-CNN model has a local branch")
        return torch.from_numpy(self.local_session.run(None, {"crops": np.ascontiguousarray(local, np.float32)[:, None]})[0])

    def _head_modules(self) -> tuple[nn.Sequential, ClinicalEncoder | None]:
        return self.head, self.encoder

    def _gradcam(self, crop: np.ndarray, class_index: int) -> np.ndarray:
        features = self._global_maps(crop[None])
        return cam_from_features(features, self.head, class_index, crop.shape, reference=self.cam_reference)[0]

    def predict_and_explain(self, crops: np.ndarray, choose: Choose, *,
                            local_from=None, codes: np.ndarray | None = None):
        """One forward pass gives all three: the maps come from the features it already computed."""
        if self.fused:
            return self._fused(crops, choose, local_from, codes)
        check_crops(crops, self.size)
        logits, features = self._run(crops)
        probs, pooled = sigmoid(logits), features.mean(axis=(2, 3))
        return (probs, pooled, [{k: cam_from_features(f[None], self.head, k, crops.shape[1:], reference=self.cam_reference)[0]
                                 for k in choose(i, p, g)}
                                for i, (f, p, g) in enumerate(zip(features, probs, pooled))],
                [None] * len(crops))


def load_onnx(folder: str | Path) -> tuple[OnnxLungSegmenter, OnnxClassifier, OnnxHeartSegmenter | None]:
    """The exported models, checked for completeness (the heart None when the export has none)."""
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
        heart = meta.get("heart")
        return (segmenter, OnnxClassifier(folder, meta["classifier"], meta["head"]),
                OnnxHeartSegmenter(folder / "heart_unet.onnx", Preprocessing.from_dict(heart["preprocessing"]), heart)
                if heart else None)
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
    for name in sorted({"lung_unet.onnx", "classifier.onnx", *(["heart_unet.onnx"] if "heart" in meta else []),
                        *files}):
        if not (folder / name).is_file() or files.get(name) != file_sha256(folder / name):
            raise ModelFileError(f"{folder / name}: does not match the SHA-256 recorded at export "
                                 f"(altered, truncated or from another export)")
    if tuple(meta["classifier"].get("labels", ())) != LABELS:
        raise ModelFileError(f"{folder}: label order differs from this version's")
    for part in ("segmentation", "classifier", "heart"):  # each model's own hash, as in its .pt file
        inner = meta.get(part) or {}
        if "sha256" in inner and inner["sha256"] != metadata_sha256(inner):
            raise ModelFileError(f"{folder}: the {part} model's metadata does not match its SHA-256")
    return meta
