"""Training and evaluating the lung and heart U-Nets (SPEC stage 3) with Lightning.

Lungs: Montgomery (left + right masks merged), Shenzhen and JSRT; heart: JSRT (SCR masks). Images
are split 80/20 per image with a fixed seed, or into ``folds`` hash folds for cross-validation.
The thesis's augmentation (translation 0–20 %, rotation ±15°, zoom 0–20 %) is one MONAI
``RandAffined`` applied to image and mask together. Its random state, and the shuffling, are
derived from (seed, epoch, index), so a run resumed from an epoch checkpoint sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pneumoscan.crop import lung_crop
from pneumoscan.data import JSRT, Montgomery, Shenzhen
from pneumoscan.data.manifest import unit_hash
from pneumoscan.films import read_xray
from pneumoscan.modelfile import checkpoint_callbacks, resumable_checkpoint
from pneumoscan.segment import (
    SEGMENTERS,
    HeartSegmenter,
    Preprocessing,
    Segmenter,
    build_unet,
    heart_mask,
)

SEG_SOURCES = {"montgomery": Montgomery, "shenzhen": Shenzhen, "jsrt": JSRT}


def segmentation_table(sources: Mapping[str, str | Path], val_fraction: float = 0.2,
                       seed: int = 2019, structure: str = "lungs", folds: int = 0,
                       fold: int = 0) -> pd.DataFrame:
    """Rows ``path, source, patient, mask, split`` for every image with a mask of ``structure``.

    With ``folds`` > 1 the images fall into that many hash folds and fold ``fold`` is "val"
    (cross-validation); otherwise a ``val_fraction`` share is "val"."""
    column = SEGMENTERS[structure].mask_column
    tables = []
    for name, root in sources.items():
        if name not in SEG_SOURCES:
            raise ValueError(f"no masks known for source {name!r}")
        table = SEG_SOURCES[name](root).csv
        if column not in table:
            raise ValueError(f"{name} has no {structure} masks")
        table = table[table[column] != ""].assign(source=name, mask=table[column])
        tables.append(table[["path", "source", "patient", "mask"]])
    table = pd.concat(tables, ignore_index=True)
    draws = np.array([unit_hash(seed, p) for p in table.patient])
    if folds > 1:
        table["split"] = np.where(np.floor(draws * folds) == fold, "val", "train")
        return table
    table["split"] = np.where(draws < val_fraction, "val", "train")
    if val_fraction > 0 and not (table.split == "val").any() and len(table) > 1:
        table.loc[int(draws.argmin()), "split"] = "val"  # tiny sets: still validate on something
    return table


def read_mask(spec: str) -> np.ndarray:
    """A 0/1 uint8 mask from one or more ``;``-joined mask files (merged by union)."""
    merged: np.ndarray | None = None
    for path in spec.split(";"):
        mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise ValueError(f"cannot read mask {path}")
        merged = mask if merged is None else np.maximum(merged, mask)
    if merged is None:
        raise ValueError(f"no mask named in {spec!r}")
    return (merged > 127).astype(np.uint8)


def load_arrays(table: pd.DataFrame, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed images (uint8, N×S×S) and masks (uint8 0/1) for the whole table, in memory."""
    from tqdm import tqdm

    size = prep.size
    images = np.empty((len(table), size, size), np.uint8)
    masks = np.empty((len(table), size, size), np.uint8)
    for i, rec in enumerate(tqdm(table.to_dict("records"), desc="loading", unit="img")):
        images[i] = np.round(prep(read_xray(rec["path"]).pixels) * 255)
        mask = read_mask(rec["mask"]).astype(np.float32)
        masks[i] = cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA) >= 0.5
    return images, masks


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch): resumable and reproducible."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class SegDataset(Dataset):
    """In-memory images and masks; the thesis's augmentation when ``augment``."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, augment: bool, seed: int = 0):
        from monai.transforms import RandAffined

        self.images, self.masks, self.augment, self.seed, self.epoch = images, masks, augment, seed, 0
        size = images.shape[-1]
        self.transform = RandAffined(
            keys=("image", "mask"), prob=1.0, rotate_range=math.radians(15),
            translate_range=(0.2 * size, 0.2 * size), scale_range=(0.2, 0.2),
            mode=("bilinear", "nearest"), padding_mode="zeros",
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(self.images[i]).float()[None] / 255.0
        mask = torch.from_numpy(self.masks[i]).float()[None]
        if self.augment:
            self.transform.set_random_state(seed=(self.seed * 7919 + self.epoch * 100_003 + i) % 2**32)
            out = cast(dict[str, Any], self.transform({"image": image, "mask": mask}))  # MetaTensors
            image, mask = out["image"].as_tensor(), out["mask"].as_tensor()
        return image, mask


def _lightning_module(preset: str, lr: float, patience: int, schedule: str, epochs: int):
    import lightning as L
    from monai.losses import DiceLoss

    class SegModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build_unet(preset)
            self.bce, self.dice = nn.BCEWithLogitsLoss(), DiceLoss(sigmoid=True)

        def forward(self, x):
            return self.net(x)

        def _step(self, batch, stage: str):
            x, y = batch
            logits = self.net(x)
            loss = self.bce(logits, y) + self.dice(logits, y)
            self.log(f"{stage}_loss", loss, prog_bar=True, on_epoch=True, on_step=stage == "train",
                     batch_size=len(x))
            if stage == "val":
                pred = (torch.sigmoid(logits) >= 0.5).float()
                inter = (pred * y).sum((1, 2, 3))
                dice = (2 * inter + 1e-6) / (pred.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1e-6)
                self.log("val_dice", dice.mean(), prog_bar=True, on_epoch=True, batch_size=len(x))
            return loss

        def training_step(self, batch, _):
            return self._step(batch, "train")

        def validation_step(self, batch, _):
            self._step(batch, "val")

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=lr)
            if schedule == "cosine":  # fixed: nothing is chosen on the validation images
                return {"optimizer": opt,
                        "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)}
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=patience)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}

    return SegModule()


@dataclass
class SegTrainConfig:
    out: Path
    sources: dict[str, str]
    preset: str = "small"
    size: int = 224
    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    patience: int = 8
    seed: int = 2019
    val_fraction: float = 0.2
    accelerator: str = "auto"
    devices: int = 1
    resume: bool = True
    structure: str = "lungs"
    folds: int = 0
    fold: int = 0
    #: "plateau": learning rate cut on the validation loss and the best validation epoch kept;
    #: "cosine": a fixed schedule and the last epoch kept, so held-out figures choose nothing
    #: (cross-validation) and a final model can train on every image.
    schedule: str = "plateau"


def train_segmentation(cfg: SegTrainConfig) -> dict[str, Any]:
    """Train, keep the best epoch by validation Dice (or the last, with the cosine schedule), write
    ``model.pt`` and ``report.{md,json}``."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**cfg.__dict__, "out": str(out)}, indent=2))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    prep = Preprocessing(size=cfg.size)
    table = segmentation_table(cfg.sources, cfg.val_fraction, cfg.seed, cfg.structure, cfg.folds, cfg.fold)
    table.to_csv(out / "split.csv", index=False)
    images, masks = load_arrays(table, prep)
    train_idx = np.flatnonzero(table.split == "train")
    val_idx = np.flatnonzero(table.split == "val")
    train_set = SegDataset(images[train_idx], masks[train_idx], augment=True, seed=cfg.seed)
    val_set = SegDataset(images[val_idx], masks[val_idx], augment=False)
    sampler = EpochSampler(len(train_set), cfg.seed)

    class EpochSeed(Callback):
        def on_train_epoch_start(self, trainer, _):
            sampler.set_epoch(trainer.current_epoch)
            train_set.set_epoch(trainer.current_epoch)

    ckpt_dir = out / "checkpoints"
    fixed = cfg.schedule == "cosine"
    if not fixed and not len(val_idx):
        raise ValueError("the plateau schedule needs validation images (or use the cosine schedule)")
    checkpoint, latest = checkpoint_callbacks(ckpt_dir, "val_dice")
    trainer = L.Trainer(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices,
        limit_val_batches=1.0 if len(val_idx) else 0,
        callbacks=([] if fixed else [checkpoint]) + [latest, EpochSeed()],
        logger=CSVLogger(out, name="logs", flush_logs_every_n_steps=1),
        log_every_n_steps=5, deterministic=False, enable_model_summary=False,
    )
    module = _lightning_module(cfg.preset, cfg.lr, cfg.patience, cfg.schedule, cfg.epochs)
    last = ckpt_dir / "last.ckpt"
    resume_from = resumable_checkpoint(last) if cfg.resume else None
    started = time.time()
    trainer.fit(
        module,
        DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=0, drop_last=False),
        DataLoader(val_set, batch_size=cfg.batch_size, num_workers=0),
        ckpt_path=resume_from,
    )
    best = (None if fixed else checkpoint.best_model_path) or str(last)
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    net = build_unet(cfg.preset)
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    best_epoch = int(torch.load(best, map_location="cpu", weights_only=True)["epoch"])
    segmenter_class = SEGMENTERS[cfg.structure]
    split = (f"hash fold {cfg.fold} of {cfg.folds} held out (seed {cfg.seed})" if cfg.folds > 1 else
             f"per-image hash split, seed {cfg.seed}, {1 - cfg.val_fraction:.0%}/{cfg.val_fraction:.0%} train/val"
             if len(val_idx) else "every image trained on, none held out")
    meta = {
        "kind": segmenter_class.kind, "preset": cfg.preset,
        "labels": [segmenter_class.label], "threshold": segmenter_class.threshold,
        "parameters": sum(p.numel() for p in net.parameters()),
        "training_data": {name: int((table.source == name).sum()) for name in cfg.sources},
        "split": split,
        "epochs_trained": int(trainer.current_epoch), "best_epoch": best_epoch,
        "train_seconds_this_run": round(time.time() - started, 1),
    }
    segmenter = segmenter_class(net, prep, meta)
    metrics = (evaluate_segmentation(segmenter, table[table.split == "val"], images[val_idx], masks[val_idx])
               if len(val_idx) else {})
    meta["validation"] = metrics
    written = segmenter.save(out / "model.pt")
    write_report(out, written, metrics)
    return written


def dice_iou_acc(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """Dice, IoU and pixel accuracy of two 0/1 masks (empty vs empty counts as perfect)."""
    from pneumoscan.maskquality import dice

    p, t = pred.astype(bool), truth.astype(bool)
    union = (p | t).sum()
    iou = 1.0 if union == 0 else (p & t).sum() / union
    return dice(p, t), float(iou), float((p == t).mean())


def cleaned(segmenter: Segmenter, prob: np.ndarray) -> tuple[np.ndarray, bool]:
    """The pipeline's cleaned mask for a probability map, and whether it fell back (no lungs or
    no heart found)."""
    if isinstance(segmenter, HeartSegmenter):
        mask = heart_mask(prob, prob.shape)
        return mask, not mask.any()
    found = lung_crop(prob)
    return found.mask, found.fallback


def evaluate_segmentation(segmenter: Segmenter, table: pd.DataFrame,
                          images: np.ndarray | None = None, masks: np.ndarray | None = None,
                          batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Mean Dice / IoU / pixel accuracy per source at the model's input size, for the raw mask
    (probability ≥ 0.5) and the cleaned one (the pipeline's threshold and clean-up)."""
    if images is None or masks is None:
        images, masks = load_arrays(table, segmenter.preprocessing)
    rows = []
    net = segmenter.net.eval()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start:start + batch_size]).float()[:, None] / 255.0
            probs = torch.sigmoid(net(x))[:, 0].numpy()
            for j, prob in enumerate(probs):
                truth = masks[start + j]
                mask, fallback = cleaned(segmenter, prob)
                rows.append((*dice_iou_acc(prob >= 0.5, truth), *dice_iou_acc(mask, truth), fallback))
    frame = pd.DataFrame(rows, columns=["dice", "iou", "pixel_accuracy", "clean_dice", "clean_iou",
                                        "clean_pixel_accuracy", "fallback"])
    frame["source"] = table.source.to_numpy()
    result = {}
    for source, part in [*frame.groupby("source"), ("all", frame)]:
        result[str(source)] = {"images": int(len(part)),
                               **{c: round(float(part[c].mean()), 4) for c in frame.columns
                                  if c not in ("source",)}}
    return result


def write_report(out: Path, meta: dict[str, Any], metrics: dict[str, dict[str, float]]) -> None:
    structure = meta["labels"][0]
    (out / "report.json").write_text(json.dumps({"model": meta, "validation": metrics}, indent=2))
    lines = ["| source | images | Dice | IoU | pixel acc. | Dice (cleaned) | IoU (cleaned) | fallback |",
             "|---|---|---|---|---|---|---|---|"]
    for source, m in metrics.items():
        lines.append(f"| {source} | {m['images']} | {m['dice']:.4f} | {m['iou']:.4f} | "
                     f"{m['pixel_accuracy']:.4f} | {m['clean_dice']:.4f} | {m['clean_iou']:.4f} | "
                     f"{m['fallback']:.1%} |")
    if not metrics:
        lines = ["No held-out images: the model learnt from every image given (a cross-validation of "
                 "the same settings says how it does on films it did not see)."]
    (out / "report.md").write_text(f"# {structure.capitalize()} segmentation: validation\n\n"
                                   + "\n".join(lines) + "\n")
