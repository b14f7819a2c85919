"""The options of ``pneumoscan train`` as one record (saved beside every run as ``config.json``),
checked when it is made: a Python caller gets the same one-line refusals as the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pneumoscan.crop import ATTENTION_THRESHOLD


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
    checkpoint_minutes: float = 15.0  # every-layer fit: also save last.ckpt this often inside an epoch (0 = at epochs' ends only)
    max_minutes: float = 0.0  # 0 = no limit; else stop cleanly (best model kept) after this long
    description: str = ""
    train_from: str = ""  # "": every layer; "denseblock3"/"denseblock4": earlier layers frozen, their output computed once
    select: str = "Pneumonia"  # labels whose mean within-source validation AUC picks the checkpoint ("all": every trained label)
    view_balance: bool = False  # weigh the loss so that no label follows the view position (view_balance_weights)
    frozen_bn: bool = False  # every-layer fit: BatchNorm keeps its running statistics (fine-tuning a fitted backbone)
    # plateau: LR × 0.1 after `patience` epochs without gain (the thesis); cosine: warm-up then cosine to 0
    schedule: str = "plateau"
    warmup_epochs: float = 0.0  # cosine: linear warm-up over this many epochs
    # ≥ 0: validate on this patient fold (crossval's folds) and train on the others, ignoring the manifest split
    val_fold: int = -1
    folds: int = 5
    fold_seed: int = 2026  # crossval's default seed, so that fold k is crossval's fold k
    opacity_index: str = ""  # rsna-nih-masked/index.csv: adds the radiologists' opacity label to progress.jsonl
    from_checkpoint: str = ""  # a .ckpt of an every-layer run with these options: model.pt from it, no training

    def __post_init__(self) -> None:
        """Refuse options that cannot work together, before anything is loaded (ValueError)."""
        from pneumoscan.networks import ARCHS
        from pneumoscan.training.fit_tail import TRAIN_FROM

        problems = [
            (self.init not in ("imagenet", "random") and not Path(self.init).is_file(),
             f"--init must be imagenet, random or an existing model file, got {self.init!r}"),
            (self.strategy not in ("auto", "ddp", "fsdp"), f"--strategy must be auto, ddp or fsdp, got {self.strategy!r}"),
            (self.arch not in ARCHS, f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}"),
            (bool(self.train_from) and self.train_from not in TRAIN_FROM,
             f"--train-from must be one of {', '.join(TRAIN_FROM)}, got {self.train_from!r}"),
            (bool(self.from_checkpoint) and (self.freeze_backbone or bool(self.train_from)),
             "--from-checkpoint takes the model of an every-layer run's checkpoint: it excludes --freeze-backbone "
             "and --train-from"),
            (bool(self.train_from) and self.freeze_backbone,
             "--train-from and --freeze-backbone exclude each other (the first trains the last blocks, the second "
             "the head alone)"),
            (not all(0 < t < 1 for t in self.attention_thresholds),
             f"--attention-threshold must be in (0, 1), got {list(self.attention_thresholds)}"),
            (len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas),
             f"--betas must be two numbers in [0, 1) like 0.9,0.999, got {list(self.betas)}"),
            (not 0 <= self.adult_share <= 1, f"--adult-share must be in [0, 1], got {self.adult_share}"),
            (self.schedule not in ("plateau", "cosine"), f"--schedule must be plateau or cosine, got {self.schedule!r}"),
        ]
        wrong = [message for bad, message in problems if bad]
        if wrong:
            raise ValueError("; ".join(wrong))
