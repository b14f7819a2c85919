"""Training the DenseNet-121 classifier (SPEC stage 6) with Lightning, from a crop cache.

- Weighted binary cross-entropy: per-class positive weight = negatives / positives among the
  training split's KNOWN labels; NaN labels (a source does not say) are masked out of the loss.
- Adam (lr 1e-3, betas 0.9/0.999 by default; the thesis's "0.99/0.9" is selectable), LR × 0.1
  when validation loss has not improved for 8 epochs, batch 16, up to 150 epochs.
- Light augmentation on the device, batched: rotation ±7°, translation ±5 %, zoom ±5 %, no flips
  (a flipped chest puts the heart on the wrong side). Its random draws and the shuffling come
  from (seed, epoch, batch), so a resumed run repeats exactly what an uninterrupted one does.
- Sampling balanced so that the model cannot learn the data set instead of the disease: adult
  and paediatric films are drawn equally often, and inside each population a source's share grows
  with the square root of its size (``source_balance`` 0 = every source equal, 1 = as indexed).
- A label is left out of the loss (NaN) for every training image of a source that has only one
  class of it (Shenzhen and Montgomery have no pneumonia, Kermany no effusion): such labels teach
  "this data set means not L", never the finding.
- A label with fewer than ``min_positives`` training positives (after that masking) is left out
  of the loss: it cannot be assessed, and its weighted loss (positive weights of 35–267 for a
  handful of positives) would drown the labels that can be learnt.
- ``freeze_backbone`` fits a new head alone on features of the frozen network, computed once
  (:func:`fit_head`: the first stage of linear-probe-then-fine-tune transfer learning).
- The checkpoint kept is the one with the best within-source validation AUC of Pneumonia (mean
  over the sources that have enough positives and negatives), never pooled validation loss, which
  rewards telling Kermany children from NIH adults. Each label's assessed flag and threshold are
  decided on validation data afterwards (:func:`pneumoscan.training.evaluate.assess_labels`).
- Mixed precision on GPU; ``devices``/``num_nodes`` > 1 runs Lightning DDP.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from pneumoscan.classify import (
    FEATURES,
    KIND,
    ChestClassifier,
    Classifier,
    load_imagenet,
)
from pneumoscan.clinical import ClinicalSpec, drop_fields, fit_spec, table_records
from pneumoscan.crop import ATTENTION_THRESHOLD, attention_box, local_crop
from pneumoscan.labels import LABELS
from pneumoscan.modelfile import checkpoint_callbacks, resumable_checkpoint
from pneumoscan.training.cache import CropCache

#: Within-source validation AUC of these labels chooses the checkpoint.
SELECT_LABELS = ("Pneumonia",)


class CropDataset(Dataset):
    """(uint8 1×S×S crop, float32 labels with NaN, position in this set) from a crop cache."""

    def __init__(self, cache: CropCache, indices: np.ndarray):
        self.cache, self.indices = cache, np.asarray(indices)
        self.labels = cache.table[list(LABELS)].to_numpy(np.float32)[self.indices]
        self.sources = cache.table["source"].astype(str).to_numpy()[self.indices]
        self.weights: np.ndarray | None = None  # N×15 loss weights (view balance), None = all 1

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        crop = self.cache.image(int(self.indices[i]))
        return torch.from_numpy(crop.copy())[None], torch.from_numpy(self.labels[i]), i


def mask_single_class_sources(labels: np.ndarray, sources: np.ndarray) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Training labels with NaN where a source has only positives or only negatives of a label
    (known values), and which labels were masked per source."""
    labels = labels.copy()
    masked: dict[str, list[str]] = {}
    for source in np.unique(sources):
        rows = sources == source
        for j, label in enumerate(LABELS):
            known = labels[rows, j][~np.isnan(labels[rows, j])]
            if len(known) and (known.min() == known.max()):
                labels[rows, j] = np.nan
                masked.setdefault(str(source), []).append(label)
    return labels, masked


def training_labels(labels: np.ndarray, sources: np.ndarray, min_positives: int
                    ) -> tuple[np.ndarray, dict[str, list[str]], list[str]]:
    """The labels the loss sees: NaN where a source has one class only
    (:func:`mask_single_class_sources`) and for every label with fewer than ``min_positives``
    positives left; also what was masked per source and which labels had too few."""
    labels, masked = mask_single_class_sources(labels, sources)
    too_few = [label for j, label in enumerate(LABELS) if np.nansum(labels[:, j] == 1) < min_positives]
    labels[:, [LABELS.index(label) for label in too_few]] = np.nan
    return labels, masked, too_few


def sampling_weights(sources: np.ndarray, source_balance: float = 0.5, adult_share: float = 0.5) -> np.ndarray:
    """Per-image draw probabilities: adult films ``adult_share`` of the draws and paediatric films
    the rest (when both are present); inside a population, a source's share ∝ (its image
    count)^``source_balance``."""
    from pneumoscan.data.manifest import population

    sources = np.asarray(sources).astype(str)
    names, counts = np.unique(sources, return_counts=True)
    share = dict(zip(names, counts.astype(float) ** source_balance))
    pops = {name: population(name) for name in names}
    present = set(pops.values())
    target = {"adult": adult_share, "paediatric": 1 - adult_share} if len(present) == 2 else {p: 1.0 for p in present}
    for pop in present:
        total = sum(share[n] for n in names if pops[n] == pop)
        for n in names:
            if pops[n] == pop:
                share[n] *= target[pop] / total
    per_image = np.array([share[s] / c for s, c in zip(sources, map(dict(zip(names, counts)).get, sources))])
    return per_image / per_image.sum()


class BalancedSampler(Sampler[int]):
    """``epoch_size`` draws with replacement from :func:`sampling_weights`, seeded by
    (seed, epoch) alone, so a resumed run draws what an uninterrupted one would."""

    def __init__(self, weights: np.ndarray, epoch_size: int, seed: int):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.epoch_size, self.seed, self.epoch = int(epoch_size), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.multinomial(self.weights, self.epoch_size, True, generator=generator).tolist())

    def __len__(self) -> int:
        return self.epoch_size


def selection_score(labels: np.ndarray, probs: np.ndarray, sources: np.ndarray,
                    select: tuple[str, ...] = SELECT_LABELS) -> tuple[float, dict[str, float]]:
    """Mean within-source AUC of ``select`` labels (the checkpoint criterion), and its parts."""
    from pneumoscan.training.evaluate import per_source_auc

    parts = {f"{label}/{source}": v["auc"]
             for label in select
             for source, v in per_source_auc(labels[:, LABELS.index(label)],
                                             probs[:, LABELS.index(label)], sources).items()
             if v["auc"] is not None}
    return (float(np.mean(list(parts.values()))) if parts else float("nan")), parts


def trained_labels(labels: np.ndarray) -> tuple[str, ...]:
    """The labels that reach the loss (some training label known)."""
    return tuple(label for j, label in enumerate(LABELS) if (~np.isnan(labels[:, j])).any())


def positive_weights(labels: np.ndarray) -> np.ndarray:
    """negatives / positives per class over known labels; 1 where a class has no positives."""
    known = ~np.isnan(labels)
    pos = np.nansum(labels, axis=0)
    neg = known.sum(axis=0) - pos
    return np.where(pos > 0, neg / np.maximum(pos, 1), 1.0).astype(np.float32)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted BCE over known labels only (NaN targets contribute nothing); ``weights`` N×15
    per image and label (:func:`view_balance_weights`), 1 where not given."""
    known = ~torch.isnan(targets)
    safe = torch.where(known, targets, torch.zeros_like(targets))
    loss = F.binary_cross_entropy_with_logits(logits.float(), safe, pos_weight=pos_weight, reduction="none")
    if weights is not None:
        loss = loss * weights
    return (loss * known).sum() / known.sum().clamp(min=1)


def view_balance_weights(labels: np.ndarray, sources: np.ndarray, views: np.ndarray) -> np.ndarray:
    """N×15 loss weights that make every label independent of the view position inside each
    source: an image of view v with label value y weighs p(y | source) / p(y | source, v).

    Chest X-ray labels follow the view: in the lung-masked NIH films RSNA's opacity is on 48 % of
    AP films and 10 % of PA films (the view alone scores AUC 0.73), while among the NIH originals
    here No Finding is on 62 % of AP films and 30 % of PA ones. A model that learns the view
    instead of the lungs fails where the association turns round; with these weights the view
    predicts nothing in training. Views other than AP and PA, and strata without both classes,
    keep weight 1."""
    weights = np.ones_like(labels, dtype=np.float32)
    views = np.asarray(views).astype(str)
    for source in np.unique(sources):
        inside = np.asarray(sources) == source
        for j in range(labels.shape[1]):
            y = labels[inside, j]
            known = ~np.isnan(y)
            if not known.any():
                continue
            overall = float(np.mean(y[known]))
            if overall in (0.0, 1.0):
                continue
            for view in ("AP", "PA"):
                stratum = inside & (views == view) & ~np.isnan(labels[:, j])
                if stratum.sum() == 0:
                    continue
                rate = float(np.mean(labels[stratum, j]))
                if rate in (0.0, 1.0):
                    continue
                positive = stratum & (labels[:, j] == 1)
                negative = stratum & (labels[:, j] == 0)
                weights[positive, j] = overall / rate
                weights[negative, j] = (1 - overall) / (1 - rate)
    return weights


def augment(x: torch.Tensor, generator: torch.Generator, degrees: float = 7.0,
            translate: float = 0.05, zoom: float = 0.05) -> torch.Tensor:
    """One random small affine per image of a float batch (N×1×S×S), on x's device."""
    n = x.shape[0]
    draws = torch.rand((n, 4), generator=generator).to(x.device) * 2 - 1
    angle = draws[:, 0] * math.radians(degrees)
    scale = 1 + draws[:, 1] * zoom
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, draws[:, 2] * translate * 2], 1),
                         torch.stack([sin, cos, draws[:, 3] * translate * 2], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class TrainConfig:
    cache: str
    out: str
    init: str = "imagenet"  # imagenet | random | path to a PneumoScan classifier file
    weights: str | None = None  # ImageNet weights file (default: torch hub cache)
    epochs: int = 150
    batch_size: int = 16
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    patience: int = 8
    early_stop: int = 0  # 0 = off; else stop after this many epochs without gain in the within-source AUC
    seed: int = 2019
    workers: int = 2
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto: DDP when devices × nodes > 1; or ddp, fsdp (Lightning's names)
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32 on CPU
    frontal_only: bool = True
    source_balance: float = 0.5  # 0: every source drawn equally; 1: as indexed
    adult_share: float = 0.5  # share of draws from adult films (the rest paediatric)
    epoch_size: int = 0  # draws per epoch; 0 = the number of training images
    freeze_backbone: bool = False  # train the head only (linear-probe stage of LP-FT)
    min_positives: int = 50  # labels with fewer training positives are left out of the loss
    resume: bool = True
    arch: str = "densenet121"  # or "agcnn": + attention-guided local branch (pneumoscan.classify)
    clinical: tuple[str, ...] = ()  # patient-information fields fused with the image (manifest columns)
    attention_thresholds: tuple[float, ...] = (ATTENTION_THRESHOLD,)  # AG-CNN: chosen on validation
    field_dropout: float = 0.25  # share of clinical fields hidden per image in training
    max_minutes: float = 0.0  # 0 = no limit; else stop cleanly (best model kept) after this long
    description: str = ""
    train_from: str = ""  # "": every layer; "denseblock3"/"denseblock4": earlier layers frozen, their output computed once
    select: str = "Pneumonia"  # labels whose mean within-source validation AUC picks the checkpoint ("all": every trained label)
    view_balance: bool = False  # weigh the loss so that no label follows the view position (view_balance_weights)


def _module(cfg: TrainConfig, pos_weight: np.ndarray, init_info: dict[str, Any], val_sources: np.ndarray,
            select: tuple[str, ...] = SELECT_LABELS, train_weights: np.ndarray | None = None):
    import lightning as L

    source = None if cfg.init in ("imagenet", "random") else Classifier.load(cfg.init)
    # A checkpoint's head width is kept, so fine-tuning the shipped model (crossval's head is
    # 1024 wide, the loop's default 1000) starts from its head instead of a new one.
    width = {} if source is None else {"hidden": source.model.head[3].in_features}

    class ClassifierModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = ChestClassifier(**width)
            self.register_buffer("pos_weight", torch.from_numpy(pos_weight))
            self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def forward(self, x):
            return self.model(x)

        def on_after_batch_transfer(self, batch, dataloader_idx):
            x, y, idx = batch
            x = x.float() / 255.0
            if self.trainer.training:
                # Augmentation and dropout draw from (seed, epoch, batch, rank) alone, so a batch
                # replayed after a resume is the batch an uninterrupted run saw.
                step_seed = (cfg.seed * 1_000_003 + self.current_epoch * 10_007
                             + self.trainer.fit_loop.epoch_loop.batch_idx + 7919 * self.global_rank)
                torch.manual_seed(step_seed)
                x = augment(x, torch.Generator().manual_seed(step_seed))
            if x.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            return x, y, idx

        def training_step(self, batch, _):
            x, y, idx = batch
            weights = None if train_weights is None else torch.from_numpy(train_weights[idx.cpu().numpy()]).to(x.device)
            loss = masked_bce(self.model(x), y, self.pos_weight, weights)
            self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(x),
                     sync_dist=True)
            return loss

        def validation_step(self, batch, _):
            x, y, idx = batch
            logits = self.model(x)
            loss = masked_bce(logits, y, self.pos_weight)
            self.log("val_loss", loss, prog_bar=True, on_epoch=True, batch_size=len(x), sync_dist=True)
            self._val_outputs.append((torch.sigmoid(logits.float()).detach(), y.detach(), idx.detach()))

        def on_validation_epoch_end(self):
            if not self._val_outputs:
                return
            probs, labels, idx = (torch.cat(parts) for parts in zip(*self._val_outputs))
            self._val_outputs.clear()
            probs, labels, idx = self.all_gather(probs), self.all_gather(labels), self.all_gather(idx)
            probs = probs.reshape(-1, len(LABELS)).cpu().numpy()
            labels = labels.reshape(-1, len(LABELS)).cpu().numpy()
            sources = val_sources[idx.reshape(-1).cpu().numpy()]
            score, parts = selection_score(labels, probs, sources, select)
            # Every rank logs the same number, so checkpoint selection agrees across DDP ranks.
            self.log("val_select", score, prog_bar=True, sync_dist=False)
            for name, value in parts.items():
                self.log(f"val_auc/{name}", value, sync_dist=False)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=cfg.patience)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}

    module = ClassifierModule()
    if cfg.init == "imagenet":
        init_info.update(load_imagenet(module.model, cfg.weights))
    elif cfg.init == "random":
        init_info.update({"init": "random"})
    else:
        module.model.net.features.load_state_dict(source.model.net.features.state_dict())
        same_head = all(a.shape == b.shape for a, b in zip(module.model.head.state_dict().values(),
                                                           source.model.head.state_dict().values()))
        if same_head:  # a head of another shape (an AG-CNN or clinical fusion head) is not carried over
            module.model.head.load_state_dict(source.model.head.state_dict())
        init_info.update({"init": "checkpoint", "from_sha256": source.meta["weights_sha256"],
                          "head": "the checkpoint's" if same_head else "new (the checkpoint's has another shape)"})
    return module


def select_rows(cache: CropCache, frontal_only: bool) -> dict[str, np.ndarray]:
    """Indices per split of cache rows that carry at least one known label (and frontal views)."""
    table = cache.table
    usable = table[list(LABELS)].notna().any(axis=1).to_numpy().copy()
    if frontal_only:
        lateral = table["view"].fillna("").str.upper().isin({"L", "LL", "RL", "LATERAL", "LAT"})
        usable &= ~lateral.to_numpy()
    return {split: np.flatnonzero(usable & (table["split"] == split).to_numpy())
            for split in ("train", "val", "test")}


def train_classifier(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train; on rank 0 write ``model.pt`` (the checkpoint with the best within-source validation
    AUC, with each label's assessment and threshold) and ``val_report.json``."""
    import lightning as L

    out = Path(cfg.out)
    command_started = time.time()  # --max-minutes bounds the whole command, finalise included
    out.mkdir(parents=True, exist_ok=True)
    cache = CropCache(cfg.cache)
    rows = select_rows(cache, cfg.frontal_only)
    if len(rows["train"]) == 0 or len(rows["val"]) == 0:
        raise ValueError(f"the cache has {len(rows['train'])} training and {len(rows['val'])} "
                         f"validation images with labels; both are needed")
    fused = cfg.arch != "densenet121" or bool(cfg.clinical)
    if fused and not cfg.freeze_backbone:
        raise ValueError("--arch agcnn and --clinical train in stages on frozen DenseNet-121s in this "
                         "version (global branch from --init, local branch a copy of it, then the fusion "
                         "head): add --freeze-backbone")
    spec = fit_spec(cache.table.iloc[rows["train"]], list(cfg.clinical)) if cfg.clinical else None
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    train_set, val_set = CropDataset(cache, rows["train"]), CropDataset(cache, rows["val"])
    train_set.labels, masked, too_few = training_labels(train_set.labels, train_set.sources, cfg.min_positives)
    pos_weight = positive_weights(train_set.labels)
    if cfg.view_balance:
        views = cache.table["view"].fillna("").astype(str).str.upper().to_numpy()[train_set.indices]
        train_set.weights = view_balance_weights(train_set.labels, train_set.sources, views)
    init_info: dict[str, Any] = {}
    select = trained_labels(train_set.labels) if cfg.select == "all" else tuple(cfg.select.split(","))
    unknown_labels = set(select) - set(LABELS)
    if unknown_labels:
        raise ValueError(f"--select names unknown labels {sorted(unknown_labels)}; use label names or 'all'")
    module = _module(cfg, pos_weight, init_info, val_set.sources, select, train_set.weights)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    sampler = BalancedSampler(sampling_weights(train_set.sources, cfg.source_balance, cfg.adult_share),
                              cfg.epoch_size or len(train_set), cfg.seed)

    started = time.time()
    deadline = fit_deadline(cfg, command_started, module.model, len(rows["val"]), cache.size)
    architecture: dict[str, Any] = {"name": cfg.arch}
    if cfg.freeze_backbone:
        model = with_options(module.model, cfg.arch, spec) if fused else module.model
        fitted = fit_head(model, cache, train_set, val_set, sampler, pos_weight, cfg, out, spec, architecture,
                          select, deadline)
        precision = "32-true"
    elif cfg.train_from:
        if fused:
            raise ValueError("--train-from trains the plain DenseNet-121; AG-CNN and --clinical train with "
                             "--freeze-backbone")
        fitted = fit_tail(module.model, cache, train_set, val_set, sampler, pos_weight, cfg, out, select, deadline)
        precision = "32-true"
    else:
        fitted, precision = _fit_all_layers(module, train_set, val_set, sampler, cfg, out, deadline)
        if fitted is None:  # not rank 0
            return None
    model, best_score, epochs_trained, best_epoch = fitted
    table = cache.table
    meta = {
        "kind": KIND, "labels": list(LABELS), "input_size": cache.size,
        "preprocessing": {"crop": cache.config["crop"], "input": "grey crop in [0,1], copied to 3 "
                          "channels, ImageNet mean/std normalisation inside the model",
                          "segmentation_model_sha256": cache.config["segmentation_model_sha256"],
                          "lung_mask": cache.lung_masked,
                          "cache_transport": cache.config.get("transport", "none (crops as prepared)")},
        "init": init_info, "hidden": model.head[3].in_features, "dropout": 0.4, "architecture": architecture,
        **({"clinical": spec.to_dict() | {"field_dropout": cfg.field_dropout}} if spec else {}),
        "training_data": {
            "description": cfg.description or "crop cache " + str(Path(cfg.cache).name),
            "images_per_source": {str(k): int(v) for k, v in
                                  table.iloc[rows["train"]]["source"].value_counts().items()},
            "train_images": int(len(rows["train"])), "val_images": int(len(rows["val"])),
            "split": "patient-wise manifest split (see pneumoscan.data.manifest)",
            "positive_weights": dict(zip(LABELS, map(float, pos_weight))),
            "sampling": {"adult_share": cfg.adult_share, "source_balance": cfg.source_balance,
                         "epoch_size": len(sampler), "view_balance": cfg.view_balance},
            "labels_masked_in_single_class_sources": masked,
            "labels_left_out_of_the_loss": {"min_positives": cfg.min_positives, "labels": too_few},
        },
        "optimiser": {"name": "Adam", "lr": cfg.lr, "betas": list(cfg.betas), "batch_size": cfg.batch_size,
                      "trained": "head only (backbone frozen)" if cfg.freeze_backbone else
                      f"{cfg.train_from} onwards and the head (earlier layers frozen)" if cfg.train_from
                      else "all layers",
                      "plateau_patience": cfg.patience, "precision": precision,
                      "devices": cfg.devices * cfg.num_nodes},
        "selection": {"metric": "mean within-source validation AUC of " + ", ".join(select),
                      "best": None if best_score is None else round(float(best_score), 4)},
        "epochs_trained": int(epochs_trained), "best_epoch": int(best_epoch),
        "train_seconds_this_run": round(time.time() - started, 1),
    }
    return finalise(Classifier(model, meta), cache, rows, out)


def fit_deadline(cfg: TrainConfig, started: float, model: ChestClassifier, n_val: int, size: int) -> float:
    """When the fit must stop so that the whole command ends within ``--max-minutes`` (inf without
    a limit): the limit less the time finalise needs, estimated from one timed forward pass
    (scoring the validation images, twice over for safety, and 30 s for the rest)."""
    if cfg.max_minutes <= 0:
        return float("inf")
    was_training = model.training
    model.eval()
    x = torch.rand(8, 1, size, size)
    with torch.inference_mode():
        model.feature_map(x[:2])
        t0 = time.time()
        model.feature_map(x)
    model.train(was_training)  # the fit that follows must see batch statistics and dropout
    branches = 2 if cfg.arch == "agcnn" else 1
    reserve = 2 * branches * (time.time() - t0) / 8 * n_val + 30
    deadline = started + cfg.max_minutes * 60 - reserve
    if deadline <= time.time():
        raise ValueError(f"--max-minutes {cfg.max_minutes:g} leaves no time to train: scoring the {n_val} "
                         f"validation images at the end alone takes about {reserve / 60:.1f} minutes here")
    return deadline


def make_trainer(cfg: TrainConfig, precision: str, callbacks: list[Any], logger: Any,
                 deadline: float = float("inf")):
    """The Lightning Trainer for ``cfg``: DDP when devices × nodes > 1 unless ``cfg.strategy``
    names one. Its rank and world come from the launcher's environment (torchrun's or SLURM's,
    docs/MULTINODE.md), which Lightning reads here."""
    import lightning as L

    distributed = cfg.devices * cfg.num_nodes > 1
    strategy = ("ddp" if distributed else "auto") if cfg.strategy == "auto" else cfg.strategy
    return L.Trainer(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=strategy, precision=precision, callbacks=callbacks, logger=logger, log_every_n_steps=10,
        enable_model_summary=False,
        max_time=timedelta(seconds=max(1.0, deadline - time.time())) if np.isfinite(deadline) else None,
    )


def _fit_all_layers(module, train_set: CropDataset, val_set: CropDataset, sampler: BalancedSampler,
                    cfg: TrainConfig, out: Path, deadline: float = float("inf")):
    """The Lightning loop (every layer trained): resumable, DDP, mixed precision. Returns
    ((model, best score, epochs trained, best epoch) or None off rank 0, precision)."""
    from lightning.pytorch.callbacks import Callback, EarlyStopping
    from lightning.pytorch.loggers import CSVLogger

    class EpochSeed(Callback):
        def on_train_epoch_start(self, trainer, _):
            sampler.set_epoch(trainer.current_epoch)

    gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    precision = cfg.precision if cfg.precision != "auto" else ("bf16-mixed" if gpu else "32-true")
    checkpoint, latest = checkpoint_callbacks(out / "checkpoints", "val_select")
    callbacks: list[Any] = [checkpoint, latest, EpochSeed()]
    if cfg.early_stop:
        callbacks.append(EarlyStopping(monitor="val_select", mode="max", patience=cfg.early_stop))
    trainer = make_trainer(cfg, precision, callbacks, CSVLogger(out, name="logs", flush_logs_every_n_steps=1),
                           deadline)
    if gpu:
        module = module.to(memory_format=torch.channels_last)
    loader_args = {"num_workers": cfg.workers, "persistent_workers": cfg.workers > 0,
                   "pin_memory": gpu}
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(
        module,
        DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=False, **loader_args),
        DataLoader(val_set, batch_size=max(cfg.batch_size, 32), **loader_args),
        ckpt_path=resumable_checkpoint(last) if cfg.resume else None,
    )
    if not trainer.is_global_zero:
        return None, precision
    best = checkpoint.best_model_path or str(last)
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    model = ChestClassifier()
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
                           if k.startswith("model.")})
    return (model, checkpoint.best_model_score, trainer.current_epoch, ckpt["epoch"]), precision


def with_options(plain: ChestClassifier, arch: str, spec: ClinicalSpec | None) -> ChestClassifier:
    """The AG-CNN and/or patient-information model whose global branch (and, for AG-CNN, local
    branch: the paper initialises both alike) starts as ``plain``'s backbone; the head is new."""
    model = ChestClassifier(arch=arch, clinical=spec)
    model.net.features.load_state_dict(plain.net.features.state_dict())
    if model.local is not None:
        model.local.load_state_dict(plain.net.features.state_dict())
    return model


def branch_features(model: ChestClassifier, cache: CropCache, indices: np.ndarray, path: Path,
                    thresholds: tuple[float, ...] = ()) -> dict[str, Any]:
    """Pooled post-ReLU features of cache rows from the frozen branches, computed once and kept
    in ``path`` (a rerun, or a resumed run, does not pay for them twice): ``global`` N×1024 and,
    for each AG-CNN attention threshold, ``local[t]`` N×1024, the local branch's features of the
    attention box cut from the original image (read again, as in prediction)."""
    from tqdm import tqdm

    wanted = [f"local_{t:g}" for t in thresholds]
    if path.exists():
        saved = np.load(path)
        if np.array_equal(saved["indices"], indices) and all(k in saved for k in wanted):
            return {"global": saved["features"], "local": {t: saved[k] for t, k in zip(thresholds, wanted)}}
    model.eval()
    out = np.zeros((len(indices), FEATURES), np.float32)
    local = {t: np.zeros((len(indices), FEATURES), np.float32) for t in thresholds}
    with torch.inference_mode():
        for start in tqdm(range(0, len(indices), 32), desc=f"features {path.stem}", unit="batch"):
            batch = indices[start:start + 32]
            x = torch.from_numpy(cache.images(batch).astype(np.float32) / 255.0)[:, None]
            features = model.feature_map(x)
            out[start:start + len(x)] = features.mean(dim=(2, 3)).numpy()
            maps = features.numpy()
            if thresholds:
                originals = [cache.original(int(i)) for i in batch]
                boxes = [cache.lung_box(int(i)) for i in batch]
                for t in thresholds:
                    crops = [local_crop(pixels, lung, attention_box(m, t, cache.size), cache.size)
                             for pixels, lung, m in zip(originals, boxes, maps)]
                    crops = torch.from_numpy(np.stack(crops).astype(np.float32) / 255.0)[:, None]
                    local[t][start:start + len(x)] = model.local_pooled(crops).numpy()
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, features=out, indices=indices, **{k: local[t] for t, k in zip(thresholds, wanted)})
    tmp.replace(path)
    return {"global": out, "local": local}


def fit_head(model: ChestClassifier, cache: CropCache, train_set: CropDataset, val_set: CropDataset,
             sampler: BalancedSampler, pos_weight: np.ndarray, cfg: TrainConfig, out: Path,
             spec: ClinicalSpec | None = None, architecture: dict[str, Any] | None = None,
             select: tuple[str, ...] = SELECT_LABELS, deadline: float = float("inf")):
    """The linear-probe stage of transfer learning: the head alone (and a clinical model's
    embeddings), on features of the frozen network computed once (no augmentation). Same
    sampling, masked weighted loss, Adam, plateau schedule and within-source checkpoint choice as
    the full loop; features are standardised while fitting and the standardisation is folded into
    the first layer afterwards, so the saved model is the ordinary architecture.

    AG-CNN is trained in the paper's three stages with the branches frozen: (1) the global branch
    is ``--init``'s, (2) the local branch reads the attention box of each threshold in
    ``cfg.attention_thresholds``, (3) a fusion head is fitted per threshold, and the threshold
    with the best validation score is kept (recorded in ``architecture``). Each head fit saves
    its state every epoch and resumes from it. Returns (model, best score, epochs, best epoch)."""
    agcnn = model.local is not None
    thresholds = tuple(cfg.attention_thresholds) if agcnn else ()
    features = {name: branch_features(model, cache, part.indices, out / f"features_{name}.npz", thresholds)
                for name, part in (("train", train_set), ("val", val_set))}
    codes = {name: torch.from_numpy(spec.encode(table_records(cache.table.iloc[part.indices], spec.names)))
             for name, part in (("train", train_set), ("val", val_set))} if spec else None
    fits = {}
    for t in thresholds or (None,):
        x = {name: f["global"] if t is None else np.concatenate([f["global"], f["local"][t]], axis=1)
             for name, f in features.items()}
        fits[t] = _fit_head_once(model, x, codes, train_set, val_set, sampler, pos_weight, cfg, out,
                                 "" if t is None else f"_t{t:g}", select, deadline)
    chosen = max(fits, key=lambda t: fits[t]["score"] if np.isfinite(fits[t]["score"]) else -np.inf)
    fit = fits[chosen]
    model.head.load_state_dict(fit["head"])
    if model.clinical is not None:
        model.clinical.load_state_dict(fit["clinical"])
    if agcnn and architecture is not None:
        architecture.update({
            "attention_threshold": chosen,
            "threshold_validation_scores": {f"{t:g}": round(float(f["score"]), 4) for t, f in fits.items()},
            "local_branch": "DenseNet-121 on the attention box cut from the original image",
            "training": "stage-wise with frozen branches: global branch from --init, local branch a copy "
                        "of it, fusion head fitted per attention threshold; the threshold chosen on validation"})
    with torch.no_grad():  # fold (f - mean) / std into the image-feature columns of the first layer
        first, (mean, std) = model.head[0], fit["standardise"]
        width = len(mean)
        scale = torch.from_numpy(1.0 / std)
        first.bias -= first.weight[:, :width] @ torch.from_numpy(mean * (1.0 / std))
        first.weight[:, :width] *= scale[None, :]
    score = fit["score"]
    return model, (score if np.isfinite(score) else None), cfg.epochs, fit["best_epoch"]


def _fit_head_once(model: ChestClassifier, features: dict[str, np.ndarray], codes: dict[str, torch.Tensor] | None,
                   train_set: CropDataset, val_set: CropDataset, sampler: BalancedSampler,
                   pos_weight: np.ndarray, cfg: TrainConfig, out: Path, tag: str,
                   select: tuple[str, ...] = SELECT_LABELS, deadline: float = float("inf")) -> dict[str, Any]:
    """One head fit on fixed image features (+ clinical codes), resumable from ``head_state{tag}.pt``
    (everything random draws from (seed, epoch, batch), so a resumed fit repeats an unbroken one)."""
    import csv

    torch.manual_seed(cfg.seed)
    mean, std = features["train"].mean(0), features["train"].std(0) + 1e-6
    z = {name: torch.from_numpy((f - mean) / std) for name, f in features.items()}
    head = model.head
    for layer in (head[0], head[3]):
        layer.reset_parameters()  # a new head: the one loaded was fitted to another population
    params = list(head.parameters())
    if model.clinical is not None:
        for table in model.clinical.tables:
            table.reset_parameters()
        params += list(model.clinical.parameters())

    def head_input(name: str, rows: torch.Tensor | slice, epoch: int, k: int) -> torch.Tensor:
        if model.clinical is None:
            return z[name][rows]
        c = codes[name][rows]
        if name == "train" and cfg.field_dropout > 0:
            c = drop_fields(c, cfg.field_dropout, torch.Generator().manual_seed(cfg.seed * 7 + epoch * 10_007 + k))
        return torch.cat([z[name][rows], model.clinical(c)], dim=1)

    y_train, y_val = torch.from_numpy(train_set.labels), torch.from_numpy(val_set.labels)
    weight = torch.from_numpy(pos_weight)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=cfg.patience)
    state_path = out / f"head_state{tag}.pt"
    best: dict[str, Any] = {"score": -np.inf, "head": None, "clinical": None, "best_epoch": 0}
    first_epoch = 0
    # What a resumed fit must share with the one it continues (the epoch count may grow).
    settings = {"lr": cfg.lr, "betas": list(cfg.betas), "batch_size": cfg.batch_size, "seed": cfg.seed,
                "patience": cfg.patience, "epoch_size": len(sampler), "field_dropout": cfg.field_dropout,
                "features": list(features["train"].shape), "labels": train_set.labels.shape[0]}
    state = saved_fit_state(state_path, settings, cfg.resume, "head fit")
    if state is not None:
        head.load_state_dict(state["head"])
        if model.clinical is not None:
            model.clinical.load_state_dict(state["clinical"])
        opt.load_state_dict(state["opt"])
        plateau.load_state_dict(state["plateau"])
        best, first_epoch = state["best"], state["epoch"] + 1
    with open(out / f"head_metrics{tag}.csv", "a" if first_epoch else "w", newline="") as handle:
        log = csv.writer(handle)
        if not first_epoch:
            log.writerow(["epoch", "train_loss", "val_loss", "val_select", "parts"])
        for epoch in range(first_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
            head.train()
            losses = []
            for k, start in enumerate(range(0, len(order), cfg.batch_size)):
                torch.manual_seed(cfg.seed * 1_000_003 + epoch * 10_007 + k)  # dropout replays exactly
                batch = order[start:start + cfg.batch_size]
                loss = masked_bce(head(head_input("train", batch, epoch, k)), y_train[batch], weight,
                                  None if train_set.weights is None else torch.from_numpy(train_set.weights[batch.numpy()]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            head.eval()
            with torch.no_grad():
                logits = head(head_input("val", slice(None), epoch, 0))
                val_loss = float(masked_bce(logits, y_val, weight))
            score, parts = selection_score(val_set.labels, torch.sigmoid(logits).numpy(), val_set.sources, select)
            plateau.step(val_loss)
            log.writerow([epoch, round(np.mean(losses), 5), round(val_loss, 5), round(score, 5), json.dumps(parts)])
            handle.flush()
            # Without a within-source score (too few validation positives) the latest epoch is kept.
            if best["head"] is None or not np.isfinite(best["score"]) or score > best["score"]:
                best = {"score": float(score), "best_epoch": epoch,
                        "head": {k: v.clone() for k, v in head.state_dict().items()},
                        "clinical": None if model.clinical is None else
                        {k: v.clone() for k, v in model.clinical.state_dict().items()}}
            state = {"epoch": epoch, "settings": settings, "head": head.state_dict(), "opt": opt.state_dict(),
                     "plateau": plateau.state_dict(), "best": best,
                     "clinical": None if model.clinical is None else model.clinical.state_dict()}
            save_fit_state(state_path, state)
            if time.time() > deadline:  # --max-minutes: the best head so far is kept; a rerun resumes
                break
    return best | {"standardise": (mean, std)}


#: Blocks a partial fine-tune may start from (earlier layers frozen, their output computed once).
TRAIN_FROM = ("denseblock3", "denseblock4")


def split_backbone(model: ChestClassifier, start: str) -> tuple[torch.nn.Sequential, torch.nn.Sequential]:
    """DenseNet-121's feature layers before ``start`` (frozen: the stem) and from it on (trained:
    the tail, which ends with ``norm5``); both share the model's own modules."""
    features = model.net.features
    names = [name for name, _ in features.named_children()]
    if start not in TRAIN_FROM:
        raise ValueError(f"--train-from must be one of {', '.join(TRAIN_FROM)}, got {start!r}")
    k = names.index(start)
    return (torch.nn.Sequential(*[getattr(features, n) for n in names[:k]]),
            torch.nn.Sequential(*[getattr(features, n) for n in names[k:]]))


def stem_features(model: ChestClassifier, stem: torch.nn.Module, cache: CropCache, indices: np.ndarray,
                  path: Path, batch: int = 32, deadline: float = float("inf")) -> np.ndarray:
    """The frozen stem's output for cache rows (float16, memory-mapped in ``path``), computed once
    and resumable: ``path.json`` records how many rows are done, written after the rows. Past
    ``deadline`` it stops with what is done saved, and says so."""
    from tqdm import tqdm

    mark = path.with_suffix(".json")
    model.eval()
    with torch.inference_mode():
        shape = tuple(stem(model.normalise(torch.zeros(1, 1, cache.size, cache.size))).shape[1:])
    info = {"rows": int(len(indices)), "shape": list(shape), "indices_sha256": _digest(indices)}
    done = 0
    if path.exists() and mark.exists():
        saved = json.loads(mark.read_text())
        if {k: saved.get(k) for k in info} == info:
            done = int(saved["done"])
    if done == 0:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(indices), *shape)).flush()
    array = np.load(path, mmap_mode="r+")
    with torch.inference_mode(), tqdm(total=len(indices), initial=done, desc=f"frozen layers {path.stem}",
                                      unit="img") as bar:
        for start in range(done, len(indices), batch):
            rows = indices[start:start + batch]
            x = torch.from_numpy(cache.images(rows).astype(np.float32) / 255.0)[:, None]
            x = model.normalise(x).contiguous(memory_format=torch.channels_last)  # about 1.5× faster on CPU
            array[start:start + len(rows)] = stem(x).float().numpy().astype(np.float16)
            late = time.time() > deadline
            if (start // batch) % 20 == 19 or start + batch >= len(indices) or late:
                array.flush()
                mark.write_text(json.dumps(info | {"done": start + len(rows)}))
            bar.update(len(rows))
            if late and start + batch < len(indices):
                raise ValueError(f"--max-minutes ran out while computing the frozen layers' output "
                                 f"({start + len(rows)} of {len(indices)} images done and kept); rerun "
                                 f"the same command to go on")
    return np.load(path, mmap_mode="r")


def _digest(indices: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()


def fit_tail(model: ChestClassifier, cache: CropCache, train_set: CropDataset, val_set: CropDataset,
             sampler: BalancedSampler, pos_weight: np.ndarray, cfg: TrainConfig, out: Path,
             select: tuple[str, ...], deadline: float = float("inf")):
    """Fine-tune the last dense blocks and the head (``cfg.train_from`` onwards) on the frozen
    stem's output, computed once: on a 2-core CPU the stem is most of DenseNet-121's cost, so
    training from ``denseblock3`` runs at about 20 images/s against 3 for every layer.

    Same sampling, masked weighted loss, Adam, plateau schedule and within-source checkpoint
    choice as the full loop; no augmentation (the stem's output is fixed). Resumes exactly from
    ``tail_state.pt``, saved every ``SAVE_EVERY`` batches and at each epoch's end: the batch
    order and dropout draw from (seed, epoch, batch) alone. Returns (model, best score, epochs,
    best epoch)."""
    import csv

    from tqdm import tqdm

    stem, tail = split_backbone(model, cfg.train_from)
    x = {name: stem_features(model, stem, cache, part.indices, out / f"stem_{cfg.train_from}_{name}.npy",
                             deadline=deadline)
         for name, part in (("train", train_set), ("val", val_set))}
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for module in (tail, model.head) for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)

    def logits(h: torch.Tensor) -> torch.Tensor:
        return model.net.class_layers(tail(h))

    y_train, y_val = torch.from_numpy(train_set.labels), torch.from_numpy(val_set.labels)
    weight = torch.from_numpy(pos_weight)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=cfg.patience)
    state_path = out / "tail_state.pt"
    settings = {"lr": cfg.lr, "betas": list(cfg.betas), "batch_size": cfg.batch_size, "seed": cfg.seed,
                "patience": cfg.patience, "epoch_size": len(sampler), "train_from": cfg.train_from,
                "init": cfg.init, "labels": int(train_set.labels.shape[0]), "select": list(select),
                "view_balance": cfg.view_balance}
    best: dict[str, Any] = {"score": -np.inf, "state": None, "best_epoch": 0}
    epoch, first_batch = 0, 0
    state = saved_fit_state(state_path, settings, cfg.resume, "fit")
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        plateau.load_state_dict(state["plateau"])
        best, epoch, first_batch = state["best"], state["epoch"], state["batch"]

    def save(next_epoch: int, next_batch: int) -> None:
        save_fit_state(state_path, {"epoch": next_epoch, "batch": next_batch, "settings": settings,
                                    "model": model.state_dict(), "opt": opt.state_dict(),
                                    "plateau": plateau.state_dict(), "best": best})

    log_path = out / "tail_metrics.csv"
    stopped = False
    with open(log_path, "a" if log_path.exists() and cfg.resume else "w", newline="") as handle:
        log = csv.writer(handle)
        if handle.tell() == 0:
            log.writerow(["epoch", "train_loss", "val_loss", "val_select", "parts", "seconds"])
        while epoch < cfg.epochs and not stopped:
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
            batches = range(0, len(order), cfg.batch_size)
            tail.train()
            model.head.train()
            losses, t0 = [], time.time()
            for k in tqdm(range(first_batch, len(batches)), desc=f"epoch {epoch}", unit="batch"):
                torch.manual_seed(cfg.seed * 1_000_003 + epoch * 10_007 + k)  # dropout replays exactly
                rows = order[batches[k]:batches[k] + cfg.batch_size].numpy()
                h = torch.from_numpy(np.asarray(x["train"][np.sort(rows)], np.float32))
                h = h[np.argsort(np.argsort(rows))]  # memory-map reads in file order, batch in draw order
                loss = masked_bce(logits(h), y_train[rows], weight,
                                  None if train_set.weights is None else torch.from_numpy(train_set.weights[rows]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if (k + 1) % SAVE_EVERY == 0:
                    save(epoch, k + 1)
                if time.time() > deadline:
                    save(epoch, k + 1)
                    stopped = True
                    break
            if stopped:
                break
            tail.eval()
            model.head.eval()
            with torch.no_grad():
                val_logits = torch.cat([logits(torch.from_numpy(np.asarray(x["val"][i:i + 128], np.float32)))
                                        for i in range(0, len(x["val"]), 128)])
                val_loss = float(masked_bce(val_logits, y_val, weight))
            score, parts = selection_score(val_set.labels, torch.sigmoid(val_logits).numpy(), val_set.sources,
                                           select)
            plateau.step(val_loss)
            log.writerow([epoch, round(float(np.mean(losses)) if losses else float("nan"), 5), round(val_loss, 5),
                          round(score, 5), json.dumps({k: round(v, 4) for k, v in parts.items()}),
                          round(time.time() - t0, 1)])
            handle.flush()
            if best["state"] is None or not np.isfinite(best["score"]) or score > best["score"]:
                best = {"score": float(score), "best_epoch": epoch,
                        "state": {k: v.clone() for k, v in model.state_dict().items()}}
            epoch, first_batch = epoch + 1, 0
            save(epoch, 0)
            print(f"epoch {epoch - 1}: train loss {np.mean(losses):.4f}, val loss {val_loss:.4f}, "
                  f"selection {score:.4f} (best {best['score']:.4f}, epoch {best['best_epoch']})", flush=True)
    if best["state"] is None:
        raise ValueError("the time limit ended the fit before one epoch was validated; allow more "
                         "--max-minutes (the run resumes where it stopped)")
    model.load_state_dict(best["state"])
    for p in model.parameters():
        p.requires_grad_(True)
    score = best["score"]
    return model, (score if np.isfinite(score) else None), epoch, best["best_epoch"]


#: Training films whose mean pooled features are Grad-CAM's reference (explain.py).
REFERENCE_FILMS = 512


def reference_films(rows: np.ndarray, sources: np.ndarray) -> tuple[np.ndarray, bool]:
    """Which of ``rows`` (one source name each) Grad-CAM's reference is the mean of: up to
    ``REFERENCE_FILMS`` drawn with seed 0, from the adult films when there are any (and whether
    there were)."""
    from pneumoscan.data.manifest import population

    adult = np.array([population(str(s)) == "adult" for s in sources], bool)
    pool = np.asarray(rows)[adult] if adult.any() else np.asarray(rows)
    return np.sort(np.random.default_rng(0).permutation(pool)[:REFERENCE_FILMS]), bool(adult.any())

#: A partial fine-tune saves its state every this many batches (and at each epoch's end).
SAVE_EVERY = 100


def saved_fit_state(path: Path, settings: dict[str, Any], resume: bool, kind: str) -> dict[str, Any] | None:
    """A resumable fit's saved state (None when there is none or ``resume`` is off), refused when
    it was made with other ``settings``."""
    if not (resume and path.exists()):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("settings") != settings:
        raise ValueError(f"{path} holds a {kind} made with other settings; use a new --out, "
                         f"or --no-resume to start this one again")
    return state


def save_fit_state(path: Path, state: dict[str, Any]) -> None:
    """Write a fit's state under a temporary name and rename it: a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def finalise(classifier: Classifier, cache: CropCache, rows: dict[str, np.ndarray], out: str | Path
             ) -> dict[str, Any]:
    """Decide each label's assessed flag and threshold on the validation rows, record the
    validation figures and Grad-CAM's reference features, and write ``model.pt`` and
    ``val_report.json`` into ``out``."""
    from tqdm import tqdm

    from pneumoscan.training.evaluate import assess_labels, evaluate_probabilities

    table, out = cache.table, Path(out)
    val_probs = np.concatenate([
        classifier.predict_proba(cache.images(part).astype(np.float32) / 255.0, batch_size=64,
                                 **cache.scoring_inputs(classifier, part))
        for part in tqdm(np.array_split(rows["val"], max(1, len(rows["val"]) // 256)),
                         desc="finalise: scoring validation images", unit="chunk")])
    val_labels = table.iloc[rows["val"]][list(LABELS)].to_numpy(np.float32)
    val_sources = table.iloc[rows["val"]]["source"].astype(str).to_numpy()
    train_sources = table.iloc[rows["train"]]["source"].astype(str).to_numpy()
    train_labels, _ = mask_single_class_sources(  # count only the positives the loss saw
        table.iloc[rows["train"]][list(LABELS)].to_numpy(np.float32), train_sources)
    print("finalise: assessing each label (bootstrap CIs) and writing the model …", file=sys.stderr, flush=True)
    assessment = assess_labels(val_labels, val_probs, val_sources, train_labels, train_sources)
    classifier.set_assessment(assessment)
    sample, adult = reference_films(rows["train"], train_sources)
    with torch.inference_mode():
        pooled = [classifier.model.feature_map(torch.from_numpy(cache.images(part).astype(np.float32) / 255.0)[:, None])
                  .mean(dim=(2, 3)) for part in np.array_split(sample, max(1, len(sample) // 64))]
    classifier.set_cam_reference(torch.cat(pooled).mean(dim=0).numpy(),
                                 f"mean of {len(sample)} {'adult ' if adult else ''}training films")
    report = evaluate_probabilities(val_labels, val_probs, classifier.meta["thresholds"], split="val",
                                    sources=val_sources)
    classifier.meta["validation"] = {"within_source": report["within_source"], "n_images": report["n_images"],
                                     "pooled_auc_not_a_finding_measure": report["auc"]}
    written = classifier.save(out / "model.pt")
    (out / "val_report.json").write_text(json.dumps(report, indent=2))
    return written
