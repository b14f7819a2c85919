"""Every layer trained in the Lightning loop: resumable at each epoch's end and, every
``checkpoint_minutes``, at the next batch inside an epoch (:class:`ResumableLoader`); DDP across devices and
nodes, mixed precision on a GPU; the LR on a plateau (the thesis) or a cosine schedule with a
warm-up fixed in advance (long runs); after every validation one line of ``progress.jsonl`` with
the figures a long run is watched by (:func:`fold_figures`).
"""

from __future__ import annotations

import json
import math
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from pneumoscan.classify import Classifier
from pneumoscan.explain import head_linears
from pneumoscan.labels import LABELS
from pneumoscan.modelfile import checkpoint_callbacks, read_checkpoint, resumable_checkpoint, timed_checkpoint
from pneumoscan.networks import ChestClassifier, load_imagenet
from pneumoscan.progress import note
from pneumoscan.training.config import TrainConfig
from pneumoscan.training.data import BalancedSampler, CropDataset, ResumableLoader, augment
from pneumoscan.training.fit_loop import adam, plateau_schedule, step_seed
from pneumoscan.training.loss import masked_bce
from pneumoscan.training.metrics import SELECT_LABELS, selection_score


class ClassifierModule(L.LightningModule):
    """The classifier in the Lightning loop: weighted BCE over known labels, seeded augmentation
    per batch (replayable after a resume), the selection score after each validation, Adam with
    the plateau (the thesis) or warm-up-cosine schedule."""

    def __init__(self, cfg: TrainConfig, pos_weight: np.ndarray, val_sources: np.ndarray, hidden: int | None = None,
                 select: tuple[str, ...] = SELECT_LABELS, train_weights: np.ndarray | None = None,
                 progress=None, val_opacity: np.ndarray | None = None):
        super().__init__()
        self.cfg, self.val_sources, self.select = cfg, val_sources, select
        self.train_weights, self.progress, self.val_opacity = train_weights, progress, val_opacity
        self.model = ChestClassifier() if hidden is None else ChestClassifier(hidden=hidden)
        self.register_buffer("pos_weight", torch.from_numpy(pos_weight))
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x):
        return self.model(x)

    def on_train_batch_start(self, batch, batch_idx):
        """With ``frozen_bn``, BatchNorm keeps its running statistics (eval mode) while its scale
        and shift still learn. Set before every batch: Lightning restores each submodule's
        mode around validation and never calls ``train()`` itself, so a mode set once (or in
        an overridden ``train``) does not last — the first long run found that out."""
        if self.cfg.frozen_bn:
            freeze_batchnorm(self.model)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y, idx = batch
        x = x.float() / 255.0
        if self.trainer.training:
            # Augmentation and dropout draw from (seed, epoch, batch, rank) alone, so a batch
            # replayed after a resume is the batch an uninterrupted run saw.
            seed = (step_seed(self.cfg.seed, self.current_epoch, self.trainer.fit_loop.epoch_loop.batch_idx)
                    + 7919 * self.global_rank)
            torch.manual_seed(seed)
            x = augment(x, torch.Generator().manual_seed(seed))
        x = x.contiguous(memory_format=torch.channels_last)  # faster on GPUs and on this CPU too
        return x, y, idx

    def training_step(self, batch, _):
        x, y, idx = batch
        weights = (None if self.train_weights is None
                   else torch.from_numpy(self.train_weights[idx.cpu().numpy()]).to(x.device))
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
        rows = idx.reshape(-1).cpu().numpy()
        sources = self.val_sources[rows]
        score, parts = selection_score(labels, probs, sources, self.select)
        # Every rank logs the same number, so checkpoint selection agrees across DDP ranks.
        self.log("val_select", score, prog_bar=True, sync_dist=False)
        for name, value in parts.items():
            self.log(f"val_auc/{name}", value, sync_dist=False)
        if self.progress is not None and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            opacity = None if self.val_opacity is None else self.val_opacity[rows]
            self.progress(self.current_epoch, float(self.optimizers().param_groups[0]["lr"]),
                          fold_figures(labels, probs, sources, opacity))

    def configure_optimizers(self):
        cfg = self.cfg
        opt = adam(self.parameters(), cfg)
        if cfg.schedule == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            per_epoch = max(1, total // max(1, cfg.epochs))
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: warmup_cosine(step, total, int(cfg.warmup_epochs * per_epoch)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau_schedule(opt, cfg), "monitor": "val_loss"}}


def lightning_module(cfg: TrainConfig, pos_weight: np.ndarray, init_info: dict[str, Any], val_sources: np.ndarray,
                     select: tuple[str, ...] = SELECT_LABELS, train_weights: np.ndarray | None = None,
                     progress=None, val_opacity: np.ndarray | None = None) -> ClassifierModule:
    """A :class:`ClassifierModule` initialised as ``cfg.init`` says (ImageNet, random, or a
    PneumoScan classifier file, whose head width is kept so that fine-tuning the shipped model
    starts from its head); ``init_info`` records where the weights came from."""
    source = None if cfg.init in ("imagenet", "random") else Classifier.load(cfg.init)
    # A checkpoint's head width is kept, so fine-tuning the shipped model (crossval's head is
    # 1024 wide, the loop's default 1000) starts from its head instead of a new one.
    hidden = None if source is None else head_linears(source.model.head)[1].in_features
    module = ClassifierModule(cfg, pos_weight, val_sources, hidden, select, train_weights, progress, val_opacity)
    if source is None:
        init_info.update(load_imagenet(module.model, cfg.weights) if cfg.init == "imagenet" else {"init": "random"})
    else:
        module.model.net.features.load_state_dict(source.model.net.features.state_dict())
        same_head = all(a.shape == b.shape for a, b in zip(module.model.head.state_dict().values(),
                                                           source.model.head.state_dict().values()))
        if same_head:  # a head of another shape (an AG-CNN or clinical fusion head) is not carried over
            module.model.head.load_state_dict(source.model.head.state_dict())
        init_info.update({"init": "checkpoint", "from_sha256": source.meta["weights_sha256"],
                          "head": "the checkpoint's" if same_head else "new (the checkpoint's has another shape)"})
    return module


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """Every BatchNorm layer in eval mode: normalised with its stored statistics, not the batch's.

    Why, for fine-tuning a backbone whose head was fitted on its frozen features: in training
    mode each BatchNorm re-estimates its statistics from batches of 16 of today's crops; the
    shipped backbone's early layers learnt on other crops (unmasked, mostly paediatric), so the
    first layer's running mean moved fourfold within one epoch and the features the head reads
    moved with it (Kermany Pneumonia 0.94 → 0.52 on fold 0 after one epoch at 1.5e-5, docs/ADULT.md)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at ``step`` of ``total``: linear from 1/warmup to 1 over the
    first ``warmup`` steps, then half a cosine down to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def watched_tasks(labels: np.ndarray, sources: np.ndarray, opacity: np.ndarray | None = None
                  ) -> list[tuple[str, str, np.ndarray, int]]:
    """The tasks a long run is watched by, as (key, title, truth, column): ``truth`` per film is 1, 0
    or NaN (not in the task), scored by the probabilities in ``column``. NIH Pneumonia against No
    Finding films on the NIH originals and on the lung-masked copies, the radiologists' opacity
    label (RSNA Lung Opacity against Normal, scored by Pneumonia) where ``opacity`` gives it,
    Cardiomegaly, Effusion, Edema and No Finding on the originals, Kermany Pneumonia."""
    from pneumoscan.training.crossval import against_normal

    pn = LABELS.index("Pneumonia")
    pneumonia = against_normal(labels, ("Pneumonia",))[:, pn]  # crossval's protocol: against No Finding films
    rsna = None if opacity is None else np.where(opacity == "Lung Opacity", 1.0, np.where(opacity == "Normal", 0.0, np.nan))
    tasks = []
    for source, name in (("nih", "originals"), ("nihmasked", "copies")):
        inside = sources == source
        tasks.append((f"pneumonia_vs_no_finding_{name}", f"NIH Pneumonia vs No Finding, {name}",
                      np.where(inside, pneumonia, np.nan), pn))
        if rsna is not None:
            tasks.append((f"opacity_vs_normal_{name}", f"RSNA opacity vs Normal, {name}",
                          np.where(inside, rsna, np.nan), pn))
    for label in ("Cardiomegaly", "Effusion", "Edema", "No Finding"):
        j = LABELS.index(label)
        tasks.append((f"{label.lower().replace(' ', '_')}_originals", f"{label}, originals",
                      np.where(sources == "nih", labels[:, j], np.nan), j))
    tasks.append(("kermany_pneumonia", "Kermany Pneumonia", np.where(sources == "kermany", labels[:, pn], np.nan), pn))
    return tasks


def fold_figures(labels: np.ndarray, probs: np.ndarray, sources: np.ndarray,
                 opacity: np.ndarray | None = None) -> dict[str, Any]:
    """The figures a long run is watched by (AUC, positives / negatives) on its validation films,
    one per :func:`watched_tasks`."""
    from pneumoscan.training.metrics import roc_auc

    out: dict[str, Any] = {}
    for key, _, y, j in watched_tasks(labels, sources, opacity):
        keep = ~np.isnan(y)
        positives, negatives = int((y[keep] == 1).sum()), int((y[keep] == 0).sum())
        auc = roc_auc(y[keep], probs[keep, j]) if positives and negatives else float("nan")
        out[key] = {"auc": None if np.isnan(auc) else round(float(auc), 4), "pos_neg": [positives, negatives]}
    return out


def progress_log(path: Path):
    """``log(epoch, lr, figures)``: one JSON line per validation in ``path`` (appended, so a
    resumed run continues the curve; an epoch validated again after a resume is logged again
    with its time)."""

    def log(epoch: int, lr: float, figures: dict[str, Any]) -> None:
        line = {"epoch": epoch, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "lr": lr, **figures}
        with open(path, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        brief = ", ".join(f"{k} {v['auc']}" for k, v in figures.items() if isinstance(v, dict))
        note(f"epoch {epoch}: {brief}")

    return log


def make_trainer(cfg: TrainConfig, precision: Any, callbacks: list[Any], logger: Any,
                 deadline: float = float("inf")):
    """The Lightning Trainer for ``cfg`` (``precision``: a name Lightning checks itself): DDP when
    devices × nodes > 1 unless ``cfg.strategy`` names one. Its rank and world come from the
    launcher's environment (torchrun's or SLURM's, docs/MULTINODE.md), which Lightning reads here."""
    distributed = cfg.devices * cfg.num_nodes > 1
    strategy = ("ddp" if distributed else "auto") if cfg.strategy == "auto" else cfg.strategy
    return L.Trainer(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=strategy, precision=precision, callbacks=callbacks, logger=logger, log_every_n_steps=10,
        enable_model_summary=False,
        max_time=timedelta(seconds=max(1.0, deadline - time.time())) if np.isfinite(deadline) else None,
    )


def fit_all_layers(module, train_set: CropDataset, val_set: CropDataset, sampler: BalancedSampler,
                    cfg: TrainConfig, out: Path, deadline: float = float("inf")):
    """The Lightning loop (every layer trained): resumable, DDP, mixed precision. Returns
    ((model, best score, epochs trained, best epoch) or None off rank 0, precision)."""
    from lightning.pytorch.callbacks import Callback, EarlyStopping
    from lightning.pytorch.loggers import CSVLogger

    class EpochSeed(Callback):
        def on_train_epoch_start(self, trainer, _):
            sampler.set_epoch(trainer.current_epoch)

    class StoppedStaysStopped(Callback):
        """A run resumed after its stopping rule fired (killed before ``model.pt`` was written) stops
        again at once: Lightning restores the rule's count but not its decision, and would train
        one more epoch than the uninterrupted run."""

        def on_train_start(self, trainer, _):
            if any(isinstance(c, EarlyStopping) and c.wait_count >= c.patience for c in trainer.callbacks):
                note("the stopping rule had already fired: no more epochs")
                trainer.should_stop = True

    gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    precision = cfg.precision if cfg.precision != "auto" else ("bf16-mixed" if gpu else "32-true")
    checkpoint, latest = checkpoint_callbacks(out / "checkpoints", "val_select")
    callbacks: list[Any] = [checkpoint, latest, EpochSeed(), StoppedStaysStopped()]
    if cfg.checkpoint_minutes > 0:
        callbacks.append(timed_checkpoint(out / "checkpoints", cfg.checkpoint_minutes))
    if cfg.early_stop:
        callbacks.append(EarlyStopping(monitor="val_select", mode="max", patience=cfg.early_stop))
    trainer = make_trainer(cfg, precision, callbacks, CSVLogger(out, name="logs", flush_logs_every_n_steps=1),
                           deadline)
    # channels_last: 20–35 % more training images/s than NCHW on the 2-core CPU as well
    # (benchmarks/train_bench.py --all-modes), and the layout GPUs' bf16 kernels want.
    module = module.to(memory_format=torch.channels_last)
    loader_args: dict[str, Any] = {"num_workers": cfg.workers, "persistent_workers": cfg.workers > 0,
                                   "pin_memory": gpu}
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(
        module,
        ResumableLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=False, **loader_args),
        DataLoader(val_set, batch_size=max(cfg.batch_size, 32), **loader_args),
        ckpt_path=resumable_checkpoint(last) if cfg.resume else None,
    )
    if not trainer.is_global_zero:
        return None, precision
    ckpt = read_checkpoint(checkpoint.best_model_path or last)
    model = checkpoint_model(ckpt, module.model.head[3].in_features)  # the width it trained with (--init keeps a file's)
    return (model, checkpoint.best_model_score, trainer.current_epoch, ckpt["epoch"]), precision


def checkpoint_model(ckpt: dict[str, Any], hidden: int) -> ChestClassifier:
    """The classifier inside a Lightning checkpoint of this loop (its ``model.`` weights)."""
    model = ChestClassifier(hidden=hidden)
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
                           if k.startswith("model.")})
    return model


#: Options a checkpoint's run must share with ``--from-checkpoint``'s: the films it validates on
#: (the model's assessment) must be films the checkpoint never trained on.
SAME_FILMS = ("cache", "val_fold", "folds", "fold_seed", "frontal_only")


def model_from_checkpoint(cfg: TrainConfig, hidden: int) -> tuple[tuple[ChestClassifier, None, int, int], dict[str, Any]]:
    """``--from-checkpoint``: the model of one checkpoint of a run with these options, untrained
    further (a long run's last epoch rather than its best by the validation fold, which would
    then also judge it; or an interim look at a run still going), as ``fit_all_layers`` returns
    it, and what the model file records of the checkpoint. Refused when the checkpoint's run (its
    ``config.json`` beside ``checkpoints/``) validated on other films."""
    from pneumoscan.errors import first_line
    from pneumoscan.modelfile import ModelFileError, file_sha256

    def differs(key: str, theirs: Any, ours: Any) -> bool:
        if key == "cache":  # the same folder, however its path was written
            return Path(theirs).resolve() != Path(ours).resolve()
        return str(theirs) != str(ours)

    path = Path(cfg.from_checkpoint)
    beside = path.parent.parent / "config.json"
    if beside.is_file():
        run = json.loads(beside.read_text())
        differ = [k for k in SAME_FILMS if k in run and differs(k, run[k], getattr(cfg, k))]
        if differ:
            raise ValueError(f"--from-checkpoint {path}: its run had other {', '.join(differ)} "
                             f"({', '.join(f'{k}={run[k]!r}' for k in differ)}), so its validation films are not "
                             f"these; pass that run's options")
    try:
        ckpt = read_checkpoint(path)
        model = checkpoint_model(ckpt, hidden)
    except Exception as exc:  # truncated, foreign or another network's checkpoint
        raise ModelFileError(f"--from-checkpoint {path}: not a checkpoint of this classifier's every-layer "
                             f"training ({first_line(exc, 160)})") from exc
    epoch, step = int(ckpt["epoch"]), int(ckpt.get("global_step", -1))
    note(f"model from checkpoint {path} (epoch {epoch}, step {step}); no training")
    info = {"file": str(path), "sha256": file_sha256(path), "epoch": epoch, "global_step": step,
            "note": "epoch counts from 0; a checkpoint saved inside an epoch holds that epoch's first steps"}
    return (model, None, epoch, epoch), info
