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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.classify import KIND, Classifier
from pneumoscan.clinical import ClinicalSpec, fit_spec
from pneumoscan.explain import head_linears
from pneumoscan.labels import LABELS
from pneumoscan.networks import ChestClassifier
from pneumoscan.training.cache import CropCache
from pneumoscan.training.config import TrainConfig
from pneumoscan.training.data import (
    BalancedSampler,
    CropDataset,
    opacity_of,
    sampling_weights,
    select_rows,
    training_labels,
    view_balance_weights,
)
from pneumoscan.training.finalise import finalise
from pneumoscan.training.fit_all import (
    fit_all_layers,
    lightning_module,
    model_from_checkpoint,
    progress_log,
)
from pneumoscan.training.fit_head import fit_head, with_options
from pneumoscan.training.fit_state import fit_deadline
from pneumoscan.training.fit_tail import fit_tail
from pneumoscan.training.loss import positive_weights, trained_labels


@dataclass
class Inputs:
    """What every fit reads: the cache's rows, their data sets (labels as the loss sees them), the
    positive weights, the labels that choose the checkpoint, the patient-information spec."""

    cache: CropCache
    rows: dict[str, np.ndarray]
    train_set: CropDataset
    val_set: CropDataset
    masked: dict[str, list[str]]
    too_few: list[str]
    pos_weight: np.ndarray
    select: tuple[str, ...]
    spec: ClinicalSpec | None


def train_classifier(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train; on rank 0 write ``model.pt`` (the checkpoint with the best within-source validation
    AUC, with each label's assessment and threshold) and ``val_report.json``."""
    out = Path(cfg.out)
    command_started = time.time()  # --max-minutes bounds the whole command, finalise included
    out.mkdir(parents=True, exist_ok=True)
    inputs = training_inputs(cfg)
    init_info: dict[str, Any] = {}
    val_opacity = opacity_of(inputs.cache.table.iloc[inputs.rows["val"]], cfg.opacity_index) \
        if cfg.opacity_index else None
    module = lightning_module(cfg, inputs.pos_weight, init_info, inputs.val_set.sources, inputs.select,
                              inputs.train_set.weights, progress_log(out / "progress.jsonl"), val_opacity)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    sampler = BalancedSampler(sampling_weights(inputs.train_set.sources, cfg.source_balance, cfg.adult_share),
                              cfg.epoch_size or len(inputs.train_set), cfg.seed)
    started = time.time()
    deadline = fit_deadline(cfg, command_started, module.model, len(inputs.rows["val"]), inputs.cache.size)
    architecture: dict[str, Any] = {"name": cfg.arch}
    source_checkpoint: dict[str, Any] | None = None  # --from-checkpoint: which one
    if cfg.freeze_backbone:
        model = with_options(module.model, cfg.arch, inputs.spec) if fused(cfg) else module.model
        fitted = fit_head(model, inputs.cache, inputs.train_set, inputs.val_set, sampler, inputs.pos_weight, cfg, out,
                          inputs.spec, architecture, inputs.select, deadline)
        precision = "32-true"
    elif cfg.train_from:
        fitted = fit_tail(module.model, inputs.cache, inputs.train_set, inputs.val_set, sampler, inputs.pos_weight,
                          cfg, out, inputs.select, deadline)
        precision = "32-true"
    elif cfg.from_checkpoint:
        fitted, source_checkpoint = model_from_checkpoint(cfg, head_linears(module.model.head)[1].in_features)
        precision = "32-true"
    else:
        fitted, precision = fit_all_layers(module, inputs.train_set, inputs.val_set, sampler, cfg, out, deadline)
        if fitted is None:  # not rank 0
            return None
    model, best_score, epochs_trained, best_epoch = fitted
    meta = model_meta(cfg, inputs, model, init_info, architecture, len(sampler)) | {
        "optimiser": optimiser_meta(cfg, precision),
        "selection": {"metric": "mean within-source validation AUC of " + ", ".join(inputs.select),
                      "best": None if best_score is None else round(float(best_score), 4)},
        "epochs_trained": int(epochs_trained), "best_epoch": int(best_epoch),
        **({"from_checkpoint": source_checkpoint} if source_checkpoint else {}),
        "train_seconds_this_run": round(time.time() - started, 1),
    }
    return finalise(Classifier(model, meta), inputs.cache, inputs.rows, out)


def fused(cfg: TrainConfig) -> bool:
    """An AG-CNN or patient-information model (a fusion head on frozen branches)."""
    return cfg.arch != "densenet121" or bool(cfg.clinical)


def training_inputs(cfg: TrainConfig) -> Inputs:
    """The rows and data sets a fit reads, checked against the options (both splits present, a
    fused model only with --freeze-backbone, --select naming labels); seeds everything."""
    import lightning as L

    if cfg.schedule not in ("plateau", "cosine"):
        raise ValueError(f"--schedule {cfg.schedule!r}: choose plateau or cosine")
    cache = CropCache(cfg.cache)
    rows = select_rows(cache, cfg.frontal_only, cfg.val_fold, cfg.folds, cfg.fold_seed)
    if len(rows["train"]) == 0 or len(rows["val"]) == 0:
        raise ValueError(f"the cache has {len(rows['train'])} training and {len(rows['val'])} "
                         f"validation images with labels; both are needed")
    if fused(cfg) and not cfg.freeze_backbone:
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
    select = trained_labels(train_set.labels) if cfg.select == "all" else tuple(cfg.select.split(","))
    unknown_labels = set(select) - set(LABELS)
    if unknown_labels:
        raise ValueError(f"--select names unknown labels {sorted(unknown_labels)}; use label names or 'all'")
    return Inputs(cache, rows, train_set, val_set, masked, too_few, pos_weight, select, spec)


def model_meta(cfg: TrainConfig, inputs: Inputs, model: ChestClassifier, init_info: dict[str, Any],
               architecture: dict[str, Any], epoch_size: int) -> dict[str, Any]:
    """The model file's record of what the model is and what it learnt from."""
    cache, rows = inputs.cache, inputs.rows
    return {
        "kind": KIND, "labels": list(LABELS), "input_size": cache.size,
        "preprocessing": {"crop": cache.config["crop"], "input": "grey crop in [0,1], copied to 3 "
                          "channels, ImageNet mean/std normalisation inside the model",
                          "segmentation_model_sha256": cache.config["segmentation_model_sha256"],
                          "lung_mask": cache.lung_masked,
                          "cache_transport": cache.config.get("transport", "none (crops as prepared)")},
        "init": init_info, "hidden": head_linears(model.head)[1].in_features, "dropout": 0.4,
        "architecture": architecture,
        **({"clinical": inputs.spec.to_dict() | {"field_dropout": cfg.field_dropout}} if inputs.spec else {}),
        "training_data": {
            "description": cfg.description or "crop cache " + str(Path(cfg.cache).name),
            "images_per_source": {str(k): int(v) for k, v in
                                  cache.table.iloc[rows["train"]]["source"].value_counts().items()},
            "train_images": int(len(rows["train"])), "val_images": int(len(rows["val"])),
            "split": "patient-wise manifest split (see pneumoscan.data.manifest)",
            "positive_weights": dict(zip(LABELS, map(float, inputs.pos_weight))),
            "sampling": {"adult_share": cfg.adult_share, "source_balance": cfg.source_balance,
                         "epoch_size": epoch_size, "view_balance": cfg.view_balance},
            "labels_masked_in_single_class_sources": inputs.masked,
            "labels_left_out_of_the_loss": {"min_positives": cfg.min_positives, "labels": inputs.too_few},
        },
    }


def optimiser_meta(cfg: TrainConfig, precision: str) -> dict[str, Any]:
    """How the weights were fitted: optimiser, schedule, what was trained, on what."""
    return {"name": "Adam", "lr": cfg.lr, "betas": list(cfg.betas), "batch_size": cfg.batch_size,
            "trained": "head only (backbone frozen)" if cfg.freeze_backbone else
            f"{cfg.train_from} onwards and the head (earlier layers frozen)" if cfg.train_from
            else "all layers",
            "plateau_patience": cfg.patience, "precision": precision, "schedule": cfg.schedule,
            "frozen_batchnorm_statistics": cfg.frozen_bn,
            "devices": cfg.devices * cfg.num_nodes}
