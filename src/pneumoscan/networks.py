"""The classifier's network (MONAI's separation of networks from what uses them): MONAI's
DenseNet-121 (the torchvision architecture, loading the same ImageNet file ``densenet121-a639ec97.pth``)
with the thesis's head, Linear(1024→1000) → ReLU → Dropout(0.4) → Linear(1000→15); grey crops in
[0, 1] go in, and the 3-channel copy and ImageNet normalisation happen inside the module, so exported
ONNX graphs and every caller share one preprocessing. Its options (AG-CNN's local branch, fused
patient information) and the ImageNet weights, loaded whole or refused."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from pneumoscan.clinical import ClinicalEncoder, ClinicalSpec
from pneumoscan.errors import PneumoScanError
from pneumoscan.labels import LABELS
from pneumoscan.modelfile import file_sha256

IMAGENET_FILE = "densenet121-a639ec97.pth"
IMAGENET_URL = f"https://download.pytorch.org/models/{IMAGENET_FILE}"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_PREFIX = "net.class_layers.out."
ARCHS = ("densenet121", "agcnn")
FEATURES = 1024

# The published file names dense-layer tensors "norm.1.weight"; torchvision's current modules
# say "norm1.weight"; MONAI says "layers.norm1.weight". Both published spellings are accepted.
_DENSE_KEY = re.compile(
    r"^(?P<stem>.*denselayer\d+)\.(?P<op>norm|relu|conv)\.?(?P<n>[12])\.(?P<p>weight|bias|running_mean|running_var)$"
)


class PretrainedWeightsError(PneumoScanError, RuntimeError):
    """ImageNet weights were asked for but cannot be used; the message says what to do."""


def fuse(pooled: torch.Tensor, local_pooled: torch.Tensor | None, clinical: ClinicalEncoder | None,
         codes: torch.Tensor | None) -> torch.Tensor:
    """The fused head's input: [global pooled | local pooled | clinical embeddings]; absent codes
    are all "missing"."""
    parts = [pooled] + ([local_pooled] if local_pooled is not None else [])
    if clinical is not None:
        if codes is None:
            codes = torch.zeros((len(pooled), len(clinical.tables)), dtype=torch.long)
        parts.append(clinical(codes.to(pooled.device)))
    return torch.cat(parts, dim=1)


class ChestClassifier(nn.Module):
    """N×1×S×S crops in [0, 1] → N×15 logits; AG-CNN also takes the N×1×S×S local crops and a
    clinical model the N×F field codes (0 = missing)."""

    mean: torch.Tensor  # registered buffers, declared for the type checker
    std: torch.Tensor
    local: nn.Module | None
    clinical: ClinicalEncoder | None

    def __init__(self, num_labels: int = len(LABELS), hidden: int = 1000, dropout: float = 0.4,
                 arch: str = "densenet121", clinical: ClinicalSpec | None = None):
        super().__init__()
        from monai.networks.nets import DenseNet121

        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
        self.arch = arch
        self.net = DenseNet121(spatial_dims=2, in_channels=3, out_channels=hidden)
        self.local = DenseNet121(spatial_dims=2, in_channels=3, out_channels=1).features \
            if arch == "agcnn" else None
        self.clinical = ClinicalEncoder(clinical) if clinical is not None and clinical.fields else None
        width = FEATURES * (2 if self.local is not None else 1) + (self.clinical.dim if self.clinical else 0)
        self.net.class_layers.out = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_labels),
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def fused(self) -> bool:
        """True when the head reads more than the global branch (AG-CNN or patient information)."""
        return self.local is not None or self.clinical is not None

    @property
    def head(self) -> nn.Sequential:
        return cast(nn.Sequential, self.net.class_layers.out)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std

    def forward(self, x: torch.Tensor, local: torch.Tensor | None = None,
                codes: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fused:
            return self.net(self.normalise(x))
        local_pooled = None
        if self.local is not None:
            if local is None:
                raise ValueError("the AG-CNN classifier needs the local crops as well")
            local_pooled = self.local_pooled(local)
        return self.head(fuse(self.feature_map(x).mean(dim=(2, 3)), local_pooled, self.clinical, codes))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's post-ReLU features (N×1024×s×s): what the head pools, what the
        forward-only Grad-CAM weighs, and where AG-CNN's attention box comes from."""
        return torch.relu(self.net.features(self.normalise(x)))

    def local_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The local branch's pooled post-ReLU features of local crops (N×1024)."""
        if self.local is None:
            raise ValueError("only the AG-CNN classifier has a local branch")
        return torch.relu(self.local(self.normalise(x))).mean(dim=(2, 3))


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
