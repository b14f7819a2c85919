"""The one plain-PyTorch loop behind the head fit (``--freeze-backbone``) and the partial fine-tune
(``--train-from``): the balanced draws, the thesis's masked weighted loss, Adam, the plateau
schedule, the within-source checkpoint choice, and exact resumption, written once. (The
every-layer fit is Lightning's; it shares the optimiser, the schedule and the seed formula.)

Everything random draws from (seed, epoch, batch): the sampler's order from (seed, epoch), dropout
from :func:`step_seed`, so a fit resumed from its saved state repeats an unbroken one.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumoscan.progress import note
from pneumoscan.training.config import TrainConfig
from pneumoscan.training.data import BalancedSampler, CropDataset
from pneumoscan.training.fit_state import save_fit_state, saved_fit_state
from pneumoscan.training.loss import masked_bce
from pneumoscan.training.metrics import selection_score

#: The saved state's layout; a state of another layout is refused as made with other settings.
STATE_FORMAT = 2
LOG_COLUMNS = ["epoch", "train_loss", "val_loss", "val_select", "parts", "seconds"]


def step_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed of one training step (dropout, field dropout): the same in an unbroken and a resumed fit."""
    return seed * 1_000_003 + epoch * 10_007 + batch


def adam(params, cfg: TrainConfig) -> torch.optim.Adam:
    """The thesis's optimiser with ``--lr`` and ``--betas``."""
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))


def plateau_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """LR × 0.1 after ``--patience`` epochs without a lower validation loss (the thesis's schedule)."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=cfg.patience)


def clone_state(modules: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in modules.items()}


@dataclass
class FitLoop:
    """A resumable fit of ``modules`` (what is trained, saved and restored) on the rows of
    ``train_set`` the sampler draws, judged on ``val_set`` after every epoch.

    ``save_every``: for fits whose epochs are long, the state is saved every this many batches
    as well, the deadline is checked after every batch (a rerun resumes at the next one), and
    each epoch shows a progress bar and a line; None: the state at each epoch's end, quietly."""

    modules: dict[str, nn.Module]
    params: list[nn.Parameter]
    cfg: TrainConfig
    sampler: BalancedSampler
    train_set: CropDataset
    val_set: CropDataset
    pos_weight: np.ndarray
    select: tuple[str, ...]
    state_path: Path
    log_path: Path
    settings: dict[str, Any]
    save_every: int | None = None

    def run(self, train_logits: Callable[[np.ndarray, int, int], torch.Tensor],
            val_logits: Callable[[], torch.Tensor], deadline: float = float("inf")) -> dict[str, Any]:
        """Fit until ``cfg.epochs`` (or the deadline); ``train_logits(rows, epoch, batch)`` and
        ``val_logits()`` run the modules. Returns the best epoch's ``score``, ``best_epoch``,
        ``state`` (each module's, None before any validated epoch) and ``epochs`` run."""
        cfg = self.cfg
        self.opt = adam(self.params, cfg)
        self.plateau = plateau_schedule(self.opt, cfg)
        self.settings = self.settings | {"state_format": STATE_FORMAT}
        self.best: dict[str, Any] = {"score": -np.inf, "state": None, "best_epoch": 0}
        epoch, first_batch = self._resume()
        y_train, y_val = torch.from_numpy(self.train_set.labels), torch.from_numpy(self.val_set.labels)
        weight = torch.from_numpy(self.pos_weight)
        with open(self.log_path, "a" if first_batch or epoch else "w", newline="") as handle:
            log = csv.writer(handle)
            if handle.tell() == 0:
                log.writerow(LOG_COLUMNS)
            while epoch < cfg.epochs:
                t0 = time.time()
                losses = self._epoch(epoch, first_batch, train_logits, y_train, weight, deadline)
                if losses is None:  # the deadline, inside the epoch: its state is saved
                    break
                self._train(False)
                with torch.no_grad():
                    logits = val_logits()
                    val_loss = float(masked_bce(logits, y_val, weight))
                score, parts = selection_score(self.val_set.labels, torch.sigmoid(logits).numpy(),
                                               self.val_set.sources, self.select)
                self.plateau.step(val_loss)
                log.writerow([epoch, round(float(np.mean(losses)) if losses else float("nan"), 5), round(val_loss, 5),
                              round(score, 5), json.dumps({k: round(v, 4) for k, v in parts.items()}),
                              round(time.time() - t0, 1)])
                handle.flush()
                # Without a within-source score (too few validation positives) the latest epoch is kept.
                if self.best["state"] is None or not np.isfinite(self.best["score"]) or score > self.best["score"]:
                    self.best = {"score": float(score), "best_epoch": epoch, "state": clone_state(self.modules)}
                epoch, first_batch = epoch + 1, 0
                self._save(epoch, 0)
                if self.save_every is not None:
                    note(f"epoch {epoch - 1}: train loss {np.mean(losses):.4f}, val loss {val_loss:.4f}, selection "
                         f"{score:.4f} (best {self.best['score']:.4f}, epoch {self.best['best_epoch']})")
                elif time.time() > deadline:  # --max-minutes: the best so far is kept; a rerun resumes
                    break
        return self.best | {"epochs": epoch}

    def _epoch(self, epoch: int, first_batch: int, train_logits: Callable[[np.ndarray, int, int], torch.Tensor],
               y_train: torch.Tensor, weight: torch.Tensor, deadline: float) -> list[float] | None:
        """One epoch's steps from ``first_batch`` on: their losses, or None when the deadline
        stopped it inside (fits with ``save_every`` only)."""
        from tqdm import tqdm

        cfg, weights = self.cfg, self.train_set.weights
        self.sampler.set_epoch(epoch)
        order = np.fromiter(self.sampler, np.int64)
        starts = range(0, len(order), cfg.batch_size)
        self._train(True)
        losses: list[float] = []
        steps = range(first_batch, len(starts))
        for k in steps if self.save_every is None else tqdm(steps, desc=f"epoch {epoch}", unit="batch"):
            torch.manual_seed(step_seed(cfg.seed, epoch, k))  # dropout replays exactly
            rows = order[starts[k]:starts[k] + cfg.batch_size]
            loss = masked_bce(train_logits(rows, epoch, k), y_train[rows], weight,
                              None if weights is None else torch.from_numpy(weights[rows]))
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            losses.append(float(loss.detach()))
            late = time.time() > deadline
            if self.save_every is not None and ((k + 1) % self.save_every == 0 or late):
                self._save(epoch, k + 1)
                if late:
                    return None
        return losses

    def _train(self, mode: bool) -> None:
        for module in self.modules.values():
            module.train(mode)

    def _resume(self) -> tuple[int, int]:
        """The epoch and batch to start from: a saved state's, when it was made with these settings."""
        state = saved_fit_state(self.state_path, self.settings, self.cfg.resume, "fit")
        if state is None:
            return 0, 0
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        self.opt.load_state_dict(state["opt"])
        self.plateau.load_state_dict(state["plateau"])
        self.best = state["best"]
        return state["epoch"], state["batch"]

    def _save(self, epoch: int, batch: int) -> None:
        """The state to go on from: the next epoch and batch to run."""
        save_fit_state(self.state_path, {"epoch": epoch, "batch": batch, "settings": self.settings,
                                         "modules": {n: m.state_dict() for n, m in self.modules.items()},
                                         "opt": self.opt.state_dict(), "plateau": self.plateau.state_dict(),
                                         "best": self.best})
