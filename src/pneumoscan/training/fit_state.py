"""What the three fits share: their resumable state (refused when made with other settings,
written atomically) and the deadline that ``--max-minutes`` sets.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pneumoscan.networks import ChestClassifier
from pneumoscan.training.config import TrainConfig

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
