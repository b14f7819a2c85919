"""Stage 6 (classify): DenseNet-121 on lung crops → 15 probabilities in SPEC label order.

The network is MONAI's DenseNet-121 (the torchvision architecture, loading the same ImageNet file
``densenet121-a639ec97.pth``) with the thesis's head: Linear(1024→1000) → ReLU → Dropout(0.4) →
Linear(1000→15). Grey crops in [0, 1] go in; the 3-channel copy and ImageNet normalisation happen
inside the module, so exported ONNX graphs and every caller share one preprocessing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumoscan.accel import place, resolve_device, run
from pneumoscan.labels import LABELS
from pneumoscan.modelfile import ModelFileError, file_sha256, load_model, save_model, shipped_model_path

KIND = "chest-classifier"
DEFAULT_SIZE = 224
DEFAULT_MODEL = "chest_densenet121.pt"
IMAGENET_FILE = "densenet121-a639ec97.pth"
IMAGENET_URL = f"https://download.pytorch.org/models/{IMAGENET_FILE}"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_PREFIX = "net.class_layers.out."

# The published file names dense-layer tensors "norm.1.weight"; torchvision's current modules
# say "norm1.weight"; MONAI says "layers.norm1.weight". Both published spellings are accepted.
_DENSE_KEY = re.compile(
    r"^(?P<stem>.*denselayer\d+)\.(?P<op>norm|relu|conv)\.?(?P<n>[12])\.(?P<p>weight|bias|running_mean|running_var)$"
)


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


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for but cannot be used; the message says what to do."""


class ChestClassifier(nn.Module):
    """N×1×S×S crops in [0, 1] → N×15 logits."""

    def __init__(self, num_labels: int = len(LABELS), hidden: int = 1000, dropout: float = 0.4):
        super().__init__()
        from monai.networks.nets import DenseNet121

        self.net = DenseNet121(spatial_dims=2, in_channels=3, out_channels=hidden)
        self.net.class_layers.out = nn.Sequential(
            nn.Linear(1024, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_labels),
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(x))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's post-ReLU features (N×1024×s×s): what the head pools, and what the
        forward-only Grad-CAM weighs."""
        return torch.relu(self.net.features(self.normalise(x)))


def imagenet_weights_path(weights: str | Path | None = None) -> Path:
    """``weights`` if given, else the standard torch hub cache location of the ImageNet file."""
    if weights is not None:
        return Path(weights)
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILE


def backbone_key(published: str) -> str:
    """A published/torchvision DenseNet-121 tensor name → this module's name for it."""
    match = _DENSE_KEY.match(published)
    if match:
        published = f"{match['stem']}.layers.{match['op']}{match['n']}.{match['p']}"
    return "net." + published


def load_imagenet(model: ChestClassifier, weights: str | Path | None = None) -> dict[str, Any]:
    """Load ImageNet DenseNet-121 weights into every tensor but the new head, or fail loudly.

    MONAI's own loader skips tensors whose names or shapes differ without a word; here every
    backbone tensor must be found with the right shape, else nothing is loaded.
    """
    path = imagenet_weights_path(weights)
    if not path.is_file():
        default = imagenet_weights_path()
        raise PretrainedWeightsError(
            f"pretrained ImageNet weights were asked for, but {path} does not exist, and this "
            f"program does not download them. Download {IMAGENET_URL} on a connected machine and "
            f"put it at {default} (the torch hub cache, $TORCH_HOME/hub/checkpoints), or pass "
            f"--weights FILE; or train with --init random."
        )
    try:
        published = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(f"{path}: not a readable weights file ({exc})") from exc
    if not isinstance(published, dict) or not all(isinstance(v, torch.Tensor) for v in published.values()):
        raise PretrainedWeightsError(f"{path}: not a plain state dict of tensors")
    target = model.state_dict()
    renamed = {backbone_key(k): v for k, v in published.items()}
    required = [k for k in target if not k.startswith(HEAD_PREFIX) and not k.endswith("num_batches_tracked")]
    matched = {k: v for k, v in renamed.items() if k in target and target[k].shape == v.shape
               and not k.startswith(HEAD_PREFIX)}
    missing = [k for k in required if k not in matched]
    if missing:
        raise PretrainedWeightsError(
            f"{path}: only {len(required) - len(missing)} of {len(required)} DenseNet-121 backbone "
            f"tensors were found with the right name and shape (first missing: {missing[0]}); "
            f"refusing to train on a partly random backbone"
        )
    model.load_state_dict(matched, strict=False)
    return {"file": path.name, "sha256": file_sha256(path), "tensors_loaded": len(matched),
            "tensors_required": len(required)}


class Classifier:
    """A trained :class:`ChestClassifier` with its metadata (labels, input size, and per label
    whether it was shown to be learnt and its threshold).

    ``assessed[j]`` False means output j was never shown to work: callers must not report it as a
    finding (torchxrayvision's convention for outputs its weights do not cover). A model file
    from before this field existed has every label unassessed, whatever thresholds it stored.
    """

    def __init__(self, model: ChestClassifier, meta: dict[str, Any]):
        self.model = model.eval()
        self.meta = meta
        self.size = int(meta.get("input_size", DEFAULT_SIZE))
        self.device = torch.device("cpu")
        self._read_assessment()

    @property
    def backend(self) -> str:
        return f"torch ({self.device})"

    def to(self, device: str | torch.device) -> Classifier:
        """Run on ``device`` (``cuda``: channels_last, bfloat16 autocast)."""
        self.device = resolve_device(device)
        self.model = place(self.model, self.device)
        return self

    def _read_assessment(self) -> None:
        """``assessed`` and ``thresholds`` (NaN where not assessed) from the metadata."""
        assessment = self.meta.get("assessment") or {}
        self.assessed = np.array([bool((assessment.get(l) or {}).get("assessed")) for l in LABELS])
        self.thresholds = np.array([(assessment.get(l) or {}).get("threshold") if a else np.nan
                                    for l, a in zip(LABELS, self.assessed)], np.float32)
        bad = [l for l, a, t in zip(LABELS, self.assessed, self.thresholds) if a and not 0 <= t <= 1]
        if bad:
            raise ModelFileError(f"assessed labels without a threshold in [0, 1]: {bad}")

    @property
    def assessed_labels(self) -> list[str]:
        return [label for label, a in zip(LABELS, self.assessed) if a]

    def set_assessment(self, assessment: dict[str, dict[str, Any]]) -> None:
        """Record per-label assessed flags and thresholds (from validation data)."""
        self.meta["assessment"] = assessment
        self.meta["thresholds"] = {label: assessment[label]["threshold"] for label in LABELS}
        self._read_assessment()

    def findings(self, probs: np.ndarray) -> list[str]:
        """Assessed labels at or above their threshold, for one row of probabilities."""
        return [label for label, p, t, a in zip(LABELS, probs, self.thresholds, self.assessed) if a and p >= t]

    @classmethod
    def load(cls, path: str | Path) -> Classifier:
        state, meta = load_model(path, kind=KIND, labels=LABELS)
        model = ChestClassifier(hidden=int(meta.get("hidden", 1000)), dropout=float(meta.get("dropout", 0.4)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelFileError(f"{path}: weights do not fit DenseNet-121 + head "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return cls(model, meta)

    def save(self, path: str | Path, *, half: bool = False) -> dict[str, Any]:
        meta = {**self.meta, "kind": KIND, "labels": list(LABELS), "input_size": self.size}
        return save_model(path, self.model.state_dict(), meta, half=half)

    @torch.inference_mode()
    def predict_proba(self, crops: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """N×S×S float crops in [0, 1] → N×15 raw probabilities (assessed or not: evaluation
        needs them all; what a person reads goes through :meth:`findings`)."""
        check_crops(crops, self.size)
        out = []
        for start in range(0, len(crops), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[start:start + batch_size], np.float32))[:, None]
            out.append(torch.sigmoid(run(self.model, x, self.device)).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(LABELS)), np.float32)

    def predict_and_explain(self, crops: np.ndarray, choose: Callable[[np.ndarray], int | None]
                            ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Probabilities, and for each crop the Grad-CAM of the class ``choose(probabilities)``
        names (None: no map)."""
        probs = self.predict_proba(crops)
        return probs, [None if (k := choose(p)) is None else self.gradcam(c, k) for c, p in zip(crops, probs)]

    def gradcam(self, crop: np.ndarray, class_index: int) -> np.ndarray:
        """Grad-CAM of one S×S crop for one class (S×S, in [0, 1])."""
        from pneumoscan.explain import GradCAM

        x = torch.from_numpy(np.ascontiguousarray(crop, np.float32))[None, None].to(self.device)
        with GradCAM(self.model) as cam:
            return cam(x, class_index)[0]


def default_model_path() -> Path:
    return shipped_model_path(DEFAULT_MODEL)


def load_default() -> Classifier:
    """The shipped classifier (no network access); see ``models/chest_densenet121.md``."""
    return Classifier.load(default_model_path())
