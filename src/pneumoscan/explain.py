"""Stage 7 (explain): Grad-CAM on DenseNet-121's last convolutional block, placed back on the
full original image through the crop box.

Grad-CAM (Selvaraju et al.): gradients of the class score with respect to the target layer's
activations, averaged per channel as weights, weighted sum of the activations, ReLU, bilinearly
upsampled, normalised to [0, 1] (after upsampling, as MONAI does, so the peak is exactly 1). :class:`GradCAM` holds its
forward hook only inside a ``with``
block (as pytorch-grad-cam does), so repeated use never piles hooks or activations up.

At the last feature map the channel weights do not depend on position (the head sees only the
global average), so the same map follows from the forward pass alone: :func:`cam_from_features`
computes it from the features and the head's weights, which is what the ONNX path uses.

**Relative to a reference film.** With the thesis's two-layer head the class logit is exactly
``g · pooled + c`` (``g`` the gradient, ``c`` the active units' biases), so the plain map
``ReLU(Σ g_c A_c)`` sums to ``g · pooled``, which is often negative on films whose logit is high
thanks to ``c``: the map is then blank exactly where a finding is called. Given the mean pooled
features ``r`` of the training films (stored with the model, ``explain.reference_features``), the
map is ``ReLU(Σ g_c (A_c − r_c))``, whose sum over positions is ``g · (pooled − r)``, the logit's
rise over the average film: each location shows how much it raises the score above what an
average film's features there would give. A called finding that scores above the average film
therefore always has a non-empty map.
"""

from __future__ import annotations

from typing import cast

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

    def __init__(self, model: nn.Module, target_layer: str = DEFAULT_TARGET,
                 reference: np.ndarray | None = None):
        self.model = model
        self.reference = None if reference is None else torch.as_tensor(np.asarray(reference, np.float32))
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
        if self.reference is not None:
            activation = activation - self.reference.to(activation.device, activation.dtype)[None, :, None, None]
        cam = torch.relu((weights * activation).sum(dim=1)).detach().float().cpu().numpy()
        self._activation = None
        return _normalise(np.stack([cv2.resize(c, (x.shape[-1], x.shape[-2]), interpolation=cv2.INTER_LINEAR)
                                    for c in cam]))


def head_linears(head: nn.Sequential) -> tuple[nn.Linear, nn.Linear]:
    """The thesis head's two Linear layers (Linear, ReLU, Dropout, Linear)."""
    return cast(nn.Linear, head[0]), cast(nn.Linear, head[3])


def head_gradient(pooled: np.ndarray, head: nn.Sequential, class_index: int) -> np.ndarray:
    """d(logit[class]) / d(pooled features) for the thesis head (Linear, ReLU, Dropout, Linear)."""
    first, last = head_linears(head)
    w1 = first.weight.detach().cpu().numpy()
    b1 = first.bias.detach().cpu().numpy()
    w2 = last.weight.detach().cpu().numpy()[class_index]
    active = (pooled @ w1.T + b1) > 0  # N×hidden
    return (active * w2) @ w1  # N×1024


def cam_from_features(features: np.ndarray, head: nn.Sequential, class_index: int,
                      size: tuple[int, int], rest: np.ndarray | None = None,
                      reference: np.ndarray | None = None) -> np.ndarray:
    """Grad-CAM from the forward pass alone: ``features`` N×C×h×w after the last ReLU; ``rest``
    N×R, the rest of a fused head's input (AG-CNN's local features, clinical embeddings);
    ``reference`` C, the features the map is measured against (module docstring)."""
    pooled = features.mean(axis=(2, 3))
    full = pooled if rest is None or rest.shape[1] == 0 else np.concatenate([pooled, rest], axis=1)
    gradient = head_gradient(full, head, class_index)[:, :features.shape[1]]
    weights = gradient / (features.shape[2] * features.shape[3])
    if reference is not None:
        features = features - np.asarray(reference, np.float32)[None, :, None, None]
    cam = np.maximum((weights[:, :, None, None] * features).sum(axis=1), 0).astype(np.float32)
    return _normalise(np.stack([cv2.resize(c, (size[1], size[0]), interpolation=cv2.INTER_LINEAR) for c in cam]))


def within_lungs(heat: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """A lung-masked classifier's map kept to the lung mask it was cropped with (outside it the
    classifier's input was black, so nothing there can be what it looked at), rescaled to [0, 1]."""
    kept = np.where(lung > 0, heat, 0.0).astype(np.float32)
    top = float(kept.max())
    return kept / top if top > 0 else kept


#: The heat map's region: where it reaches this share of its maximum (inside the lungs).
REGION_LEVEL = 0.5


def cam_summary(heat: np.ndarray, lung: np.ndarray, box: tuple[int, int, int, int],
                level: float = REGION_LEVEL) -> tuple[list[int] | None, list[int] | None]:
    """Where a crop-sized heat map points, in original-image pixels: its peak [x, y] and the
    bounding box [x0, y0, x1, y1] of where it reaches ``level`` × its maximum inside ``lung`` (the
    lung mask cut to the same crop). (None, None) for an empty map; the region is None when
    nothing of it lies inside the lungs."""
    from pneumoscan.crop import box_in_original

    if heat.max() <= 0:
        return None, None
    size = heat.shape[0]
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    peak = [int(box[0] + (x + 0.5) * (box[2] - box[0]) / size), int(box[1] + (y + 0.5) * (box[3] - box[1]) / size)]
    inside = (heat >= level * heat.max()) & (lung > 0)
    if not inside.any():
        return peak, None
    ys, xs = np.nonzero(inside)
    region = box_in_original((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), box, size)
    return peak, [int(v) for v in region]


def place_on_original(cam: np.ndarray, box: tuple[int, int, int, int],
                      original_shape: tuple[int, int]) -> np.ndarray:
    """A crop-sized heat map stretched back over its box on a zero map of the original's size."""
    x0, y0, x1, y1 = box
    full = np.zeros(original_shape[:2], np.float32)
    full[y0:y1, x0:x1] = cv2.resize(cam.astype(np.float32), (x1 - x0, y1 - y0),
                                    interpolation=cv2.INTER_LINEAR)
    return full


def heat_on_film(heat: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int],
                 film_shape: tuple[int, int], *, lungs_only: bool, full: bool
                 ) -> tuple[list[int] | None, list[int] | None, np.ndarray | None]:
    """The classifier's crop-sized heat map placed on its film: kept inside the lungs for a
    lung-masked classifier (:func:`within_lungs`), its peak and region in film pixels
    (:func:`cam_summary`), and the full-size map when ``full`` (for overlays)."""
    from pneumoscan.crop import apply_box

    lung = cv2.resize(apply_box(mask, box), heat.shape[::-1], interpolation=cv2.INTER_NEAREST)
    if lungs_only:
        heat = within_lungs(heat, lung)
    peak, region = cam_summary(heat, lung, box)
    return peak, region, place_on_original(heat, box, film_shape) if full else None
