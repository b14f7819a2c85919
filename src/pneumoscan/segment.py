"""Stage 3 (segment): U-Nets that map a CLAHE-enhanced X-ray to a lung (or heart) probability
map, and the inference path from any X-ray to a cleaned lung mask and crop box, or a cleaned heart
mask, on the original picture.

The heart has its own small U-Net (trained on JSRT's SCR masks) rather than a second output of the
lung model: the lung model, and so the classifier's crop, stay bit-identical, and the two share
one preprocessing, so a film is prepared once for both (``docs/HEART.md`` gives the measurements).

Presets: ``small`` (MONAI UNet 16–256 with residual units, 1.6 M parameters, trains on a 2-core
CPU) and ``thesis`` (MONAI BasicUNet 64–1024, the classic 2015 shape, 31 M parameters, for GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Self

import cv2
import numpy as np
import torch
from torch import nn

from pneumoscan.accel import place, resolve_device, run
from pneumoscan.crop import THRESHOLD, LungCrop, clean_mask, lung_crop, scale_box
from pneumoscan.enhance import CLAHE_CLIP_LIMIT, CLAHE_TILE_GRID, clahe
from pneumoscan.maskquality import (
    QualityRule,
    ShapeModel,
    affines,
    agreement,
    combined,
    perturbed,
    restored,
    shape_frame,
)
from pneumoscan.modelfile import (
    ModelFileError,
    load_error,
    load_model,
    save_model,
    shipped_model_path,
)

KIND = "lung-segmentation"
HEART_KIND = "heart-segmentation"
#: The heart's probability threshold; the heart is then one filled component (``heart_mask``).
HEART_THRESHOLD = 0.5
#: A heart smaller than this fraction of the film is no heart (a speck the U-Net hesitated on).
MIN_HEART_FRACTION = 0.01
PRESETS = ("small", "thesis")
DEFAULT_SIZE = 224
#: Mask clean-up runs at no more than this side; the mask is then resized to the original. The
#: U-Net's map is 224 px, so cleaning it at 512 loses nothing: Dice on every masked dev image,
#: and on them upscaled to 1024², is the same at 512 as at 1024 (±0.0002), and the clean-up is
#: 3 ms instead of 9 (``benchmarks/mask_work_side.py``).
WORK_SIDE = 512
DEFAULT_MODEL = "lung_unet_small.pt"
DEFAULT_HEART_MODEL = "heart_unet_small.pt"


def build_unet(preset: str = "small") -> nn.Module:
    """A 1-channel-in, 1-logit-out 2-D U-Net of the named width."""
    from monai.networks.nets import BasicUNet, UNet

    if preset == "small":
        return UNet(spatial_dims=2, in_channels=1, out_channels=1,
                    channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    if preset == "thesis":
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1,
                         features=(64, 128, 256, 512, 1024, 64))
    raise ValueError(f"unknown U-Net preset {preset!r}; choose one of {PRESETS}")


@dataclass(frozen=True)
class Preprocessing:
    """How pixels are prepared for the U-Net; stored with every model and reused verbatim."""

    size: int = DEFAULT_SIZE
    clip_limit: float = CLAHE_CLIP_LIMIT
    tile_grid: tuple[int, int] = CLAHE_TILE_GRID

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """[0, 1] X-ray of any size → CLAHE → size×size float32 in [0, 1]."""
        enhanced = clahe(pixels, self.clip_limit, self.tile_grid)
        return cv2.resize(enhanced, (self.size, self.size), interpolation=cv2.INTER_AREA)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "clip_limit": self.clip_limit, "tile_grid": list(self.tile_grid)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(int(data["size"]), float(data["clip_limit"]), tuple(data["tile_grid"]))


@dataclass(frozen=True)
class Segmentation(LungCrop):
    """A :class:`LungCrop` on the original image plus the U-Net's probability map (size×size)."""

    prob: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]


class Segmenter:
    """A trained U-Net with its preprocessing and model kind; turns X-rays into probability maps.

    Each subclass names its ``structure`` (as ``train-seg --structure`` does), the source-table
    column holding its masks, its ``label`` in the model file and the threshold its clean-up uses."""

    kind = KIND
    structure = "lungs"
    mask_column = "mask"
    label = "lung"
    threshold = THRESHOLD

    def __init__(self, net: nn.Module, preprocessing: Preprocessing, meta: dict[str, Any]):
        self.net = net.eval()
        self.preprocessing = preprocessing
        self.meta = meta
        self.device = torch.device("cpu")
        try:
            self.quality_rule  # noqa: B018 - a malformed mask_quality section is refused at load, not mid-batch
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{self.label} model metadata unusable: {exc}") from exc

    def to(self, device: str | torch.device) -> Self:
        """Run on ``device`` (``cuda``: channels_last, bfloat16 autocast)."""
        self.device = resolve_device(device)
        self.net = place(self.net, self.device)
        return self

    @classmethod
    def load(cls, path: str | Path) -> Self:
        state, meta = load_model(path, kind=cls.kind)
        try:
            net = build_unet(meta["preset"])
            preprocessing = Preprocessing.from_dict(meta["preprocessing"])
            missing, unexpected = net.load_state_dict(state, strict=False)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelFileError(f"{path}: {cls.label} model metadata or weights unusable "
                                 f"({type(exc).__name__}: {load_error(exc)})") from exc
        if missing or unexpected:
            raise ModelFileError(f"{path}: weights do not fit the {meta['preset']} U-Net "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return cls(net, preprocessing, meta)

    def save(self, path: str | Path, *, half: bool = False, **extra: Any) -> dict[str, Any]:
        meta = {**self.meta, **extra, "kind": self.kind,
                "preprocessing": self.preprocessing.to_dict()}
        return save_model(path, self.net.state_dict(), meta, half=half)

    def inputs(self, batch: list[np.ndarray], prepared: np.ndarray | None = None) -> np.ndarray:
        """The U-Net's N×size×size input: ``prepared`` when the caller already ran
        :attr:`preprocessing` (e.g. on its decoding threads), else computed here."""
        return prepared if prepared is not None else np.stack([self.preprocessing(p) for p in batch])

    @torch.inference_mode()
    def probabilities(self, batch: list[np.ndarray], prepared: np.ndarray | None = None) -> np.ndarray:
        """Probability maps (N×size×size) for [0, 1] X-rays of any sizes."""
        x = torch.from_numpy(self.inputs(batch, prepared))[:, None]
        return torch.sigmoid(run(self.net, x, self.device))[:, 0].numpy()

    @property
    def quality_rule(self) -> QualityRule:
        """The model file's mask-quality threshold and its origin (none: quality is only reported)."""
        return QualityRule.from_meta(self.meta)

    def mask_quality(self, prepared: np.ndarray, masks: list[np.ndarray], transforms=None) -> list[float]:
        """Each film's mask quality (:func:`pneumoscan.maskquality.agreement`): ``masks`` (any
        grid, e.g. the cleaned masks on the original) against the U-Net's re-readings of its
        ``prepared`` input, in one batch, under ``transforms`` (default: those its model file's
        threshold was chosen with, :class:`~pneumoscan.maskquality.QualityRule`)."""
        if len(masks) == 0:
            return []
        matrices = affines(prepared.shape[-1], transforms or self.quality_rule.transforms)
        back = restored(self.probabilities([], perturbed(prepared, matrices)), matrices)
        return [round(agreement(m, r, self.threshold), 4) for m, r in zip(masks, back)]


class LungSegmenter(Segmenter):
    """The lung U-Net: lung masks and crop boxes."""

    def segment(self, pixels: np.ndarray) -> Segmentation:
        return self.segment_batch([pixels])[0]

    def segment_batch(self, batch: list[np.ndarray], prepared: np.ndarray | None = None) -> list[Segmentation]:
        """Mask (original size) and lung box (original pixels) for each X-ray."""
        return [locate_lungs(prob, pixels.shape) for prob, pixels in
                zip(self.probabilities(batch, prepared), batch)]


def locate_lungs(prob: np.ndarray, original_shape: tuple[int, int], work_side: int = WORK_SIDE) -> Segmentation:
    """Upsample a probability map towards the original size (at most ``work_side`` on the long
    side), clean it, box it, and express mask and box in the original image's pixels."""
    prob_work = to_work_grid(prob, original_shape, work_side)
    found = lung_crop(prob_work)
    mask = to_original_grid(found.mask, original_shape)
    box = scale_box(found.box, prob_work.shape, original_shape[:2])
    return Segmentation(mask=mask, box=box, fallback=found.fallback,
                        lung_fraction=found.lung_fraction, regions=found.regions, prob=prob)


class HeartSegmenter(Segmenter):
    """The heart U-Net: one cleaned heart mask per film, on the original grid."""

    kind = HEART_KIND
    structure = "heart"
    mask_column = "heart"
    label = "heart"
    threshold = HEART_THRESHOLD

    @cached_property
    def shape_model(self) -> ShapeModel | None:
        """The heart shape prior stored with the model (``mask_quality.shape_model``), if any."""
        stored = (self.meta.get("mask_quality") or {}).get("shape_model")
        return None if stored is None else ShapeModel.from_dict(stored)

    def heart_quality(self, prepared: np.ndarray, hearts: list[np.ndarray], lungs: list[np.ndarray]) -> list[float]:
        """Each heart mask's quality: its TTA agreement (:meth:`mask_quality`) and, where the
        model carries a shape prior, how well the prior rebuilds it inside the lungs' frame,
        combined as the model file's ``mask_quality.estimate`` says (:func:`combined`)."""
        tta = self.mask_quality(prepared, hearts)
        if self.shape_model is None:
            return tta
        estimate = self.meta["mask_quality"].get("estimate", "tta")
        return [round(combined(estimate, t, self.shape_model.fidelity(shape_frame(lung, heart))), 4)
                for t, heart, lung in zip(tta, hearts, lungs)]

    def heart_masks(self, batch: list[np.ndarray], prepared: np.ndarray | None = None) -> list[np.ndarray]:
        """0/1 uint8 heart masks, each the size of its film (all zero where no heart was found)."""
        return [heart_mask(prob, pixels.shape) for prob, pixels in
                zip(self.probabilities(batch, prepared), batch)]


def heart_mask(prob: np.ndarray, original_shape: tuple[int, int], work_side: int = WORK_SIDE) -> np.ndarray:
    """The map upsampled towards the original (at most ``work_side``, as the lungs), then
    threshold → opening → fill holes → the largest component, on the original grid."""
    mask, _ = clean_mask(to_work_grid(prob, original_shape, work_side), HEART_THRESHOLD, MIN_HEART_FRACTION, keep=1)
    return to_original_grid(mask, original_shape)


def to_work_grid(prob: np.ndarray, original_shape: tuple[int, int], work_side: int = WORK_SIDE) -> np.ndarray:
    """A probability map upsampled (bilinear) to the original's shape, shrunk to at most
    ``work_side`` on the long side: masks are cleaned there (see :data:`WORK_SIDE`)."""
    height, width = original_shape[:2]
    factor = min(1.0, work_side / max(height, width))
    work = (max(1, round(height * factor)), max(1, round(width * factor)))
    return cv2.resize(prob, (work[1], work[0]), interpolation=cv2.INTER_LINEAR)


def to_original_grid(mask: np.ndarray, original_shape: tuple[int, int]) -> np.ndarray:
    """A mask cleaned on the work grid, on the original's pixels (nearest neighbour)."""
    height, width = original_shape[:2]
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


#: The segmenter of each structure ``train-seg --structure`` names.
SEGMENTERS: dict[str, type[Segmenter]] = {cls.structure: cls for cls in (LungSegmenter, HeartSegmenter)}


def default_model_path() -> Path:
    return shipped_model_path(DEFAULT_MODEL)


def load_default() -> LungSegmenter:
    """The shipped small U-Net (no network access); see ``models/lung_unet_small.md``."""
    return LungSegmenter.load(default_model_path())


def default_heart_model_path() -> Path:
    return shipped_model_path(DEFAULT_HEART_MODEL)


def load_default_heart() -> HeartSegmenter:
    """The shipped heart U-Net; see ``models/heart_unet_small.md``."""
    return HeartSegmenter.load(default_heart_model_path())
