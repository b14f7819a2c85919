"""Stage 7 (explain): Grad-CAM on DenseNet-121's last convolutional block, placed back on the
full original image through the crop box.

Grad-CAM (Selvaraju et al.): gradients of the class score with respect to the target layer's
activations, averaged per channel as weights, weighted sum of the activations, ReLU, normalised
to [0, 1], bilinearly upsampled. :class:`GradCAM` holds its forward hook only inside a ``with``
block (as pytorch-grad-cam does), so repeated use never piles hooks or activations up.

At the last feature map the channel weights do not depend on position (the head sees only the
global average), so the same map follows from the forward pass alone: :func:`cam_from_features`
computes it from the features and the head's weights, which is what the ONNX path uses.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

DEFAULT_TARGET = "net.class_layers.relu"  # DenseNet-121's last block, after its final BN + ReLU


def _normalise(cam: np.ndarray) -> np.ndarray:
    lo = cam.min(axis=(-2, -1), keepdims=True)
    hi = cam.max(axis=(-2, -1), keepdims=True)
    return np.where(hi > lo, (cam - lo) / np.maximum(hi - lo, 1e-12), 0.0).astype(np.float32)


class GradCAM:
    """``with GradCAM(model) as cam: maps = cam(x, class_index)`` → N×H×W in [0, 1] at x's size."""

    def __init__(self, model: nn.Module, target_layer: str = DEFAULT_TARGET):
        self.model = model
        modules = dict(model.named_modules())
        if target_layer not in modules:
            raise ValueError(f"no layer {target_layer!r} in the model")
        self.layer = modules[target_layer]
        self._handle = None
        self._activation: torch.Tensor | None = None

    def __enter__(self) -> GradCAM:
        self._handle = self.layer.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._activation = None, None

    def _keep(self, _module, _inputs, output) -> None:
        self._activation = output

    def __call__(self, x: torch.Tensor, class_index: int) -> np.ndarray:
        if self._handle is None:
            raise RuntimeError("use GradCAM inside a `with` block")
        with torch.enable_grad():
            x = x.detach().requires_grad_(False)
            logits = self.model(x)
            activation = self._activation
            score = logits[:, class_index].sum()
            (grads,) = torch.autograd.grad(score, activation)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * activation).sum(dim=1)).detach().float().cpu().numpy()
        self._activation = None
        return np.stack([cv2.resize(c, (x.shape[-1], x.shape[-2]), interpolation=cv2.INTER_LINEAR)
                         for c in _normalise(cam)])


def head_gradient(pooled: np.ndarray, head: nn.Sequential, class_index: int) -> np.ndarray:
    """d(logit[class]) / d(pooled features) for the thesis head (Linear, ReLU, Dropout, Linear)."""
    w1 = head[0].weight.detach().cpu().numpy()
    b1 = head[0].bias.detach().cpu().numpy()
    w2 = head[3].weight.detach().cpu().numpy()[class_index]
    active = (pooled @ w1.T + b1) > 0  # N×hidden
    return (active * w2) @ w1  # N×1024


def cam_from_features(features: np.ndarray, head: nn.Sequential, class_index: int,
                      size: tuple[int, int], rest: np.ndarray | None = None) -> np.ndarray:
    """Grad-CAM from the forward pass alone: ``features`` N×C×h×w after the last ReLU; ``rest``
    N×R, the rest of a fused head's input (AG-CNN's local features, clinical embeddings)."""
    pooled = features.mean(axis=(2, 3))
    full = pooled if rest is None or rest.shape[1] == 0 else np.concatenate([pooled, rest], axis=1)
    gradient = head_gradient(full, head, class_index)[:, :features.shape[1]]
    weights = gradient / (features.shape[2] * features.shape[3])
    cam = np.maximum((weights[:, :, None, None] * features).sum(axis=1), 0)
    return np.stack([cv2.resize(c, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
                     for c in _normalise(cam)])


def place_on_original(cam: np.ndarray, box: tuple[int, int, int, int],
                      original_shape: tuple[int, int]) -> np.ndarray:
    """A crop-sized heat map stretched back over its box on a zero map of the original's size."""
    x0, y0, x1, y1 = box
    full = np.zeros(original_shape[:2], np.float32)
    full[y0:y1, x0:x1] = cv2.resize(cam.astype(np.float32), (x1 - x0, y1 - y0),
                                    interpolation=cv2.INTER_LINEAR)
    return full
