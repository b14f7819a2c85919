"""The training data: crop-cache rows as a dataset, which rows train and validate (the
manifest's split, or a patient fold of ``crossval``'s), the labels the loss sees, the balanced
sampler and its source weights, the view-balancing loss weights and the batched augmentation.

Why the sampling is balanced: so that the model cannot learn the data set instead of the disease
(adult and paediatric films drawn at ``adult_share``, inside each population a source's share ∝
its size^``source_balance``). Why labels are masked per source: a source that has only one
class of a label (Shenzhen has no pneumonia, Kermany no effusion) teaches "this data set means
not L". Augmentation: rotation ±7°, translation ±5 %, zoom ±5 %, no flips (a flipped chest puts
the heart on the wrong side); its draws come from (seed, epoch, batch), so a resumed run repeats
exactly what an uninterrupted one does.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from pneumoscan.labels import LABELS
from pneumoscan.training.cache import CropCache


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


def select_rows(cache: CropCache, frontal_only: bool, val_fold: int = -1, folds: int = 5,
                fold_seed: int = 2026) -> dict[str, np.ndarray]:
    """Indices per split of cache rows that carry at least one known label (and frontal views).
    With ``val_fold`` ≥ 0 the manifest's split is set aside: that patient fold (the folds of
    ``crossval``) is the validation split and every other labelled film trains, so that a
    fine-tuned backbone is judged on the films crossval's fold k scores."""
    table = cache.table
    usable = table[list(LABELS)].notna().any(axis=1).to_numpy().copy()
    if frontal_only:
        lateral = table["view"].fillna("").str.upper().isin({"L", "LL", "RL", "LATERAL", "LAT"})
        usable &= ~lateral.to_numpy()
    if val_fold >= 0:
        if val_fold >= folds:
            raise ValueError(f"--val-fold {val_fold}: choose 0 … {folds - 1}")
        fold = patient_folds(table["patient"].astype(str).to_numpy(), folds, fold_seed)
        return {"train": np.flatnonzero(usable & (fold != val_fold)), "val": np.flatnonzero(usable & (fold == val_fold)),
                "test": np.zeros(0, int)}
    return {split: np.flatnonzero(usable & (table["split"] == split).to_numpy())
            for split in ("train", "val", "test")}


def patient_folds(patients: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold of each film from a hash of (seed, patient key): a patient's films share a fold, and
    adding films never moves a patient to another fold."""
    from pneumoscan.data.manifest import unit_hash

    return np.array([min(int(unit_hash(seed, str(p)) * folds), folds - 1) for p in patients])


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


class _SkipFirst:
    """A batch sampler that leaves out the first ``n`` batches of its passes (their indices are
    drawn, their images never read)."""

    def __init__(self, base: Any, n: int):
        self.base, self.n = base, n

    def __iter__(self):
        return itertools.islice(iter(self.base), self.n, None)

    def __len__(self) -> int:
        return len(self.base)


class ResumableLoader(DataLoader):
    """A training DataLoader that Lightning checkpoints in the middle of an epoch (it has
    ``state_dict``/``load_state_dict``, Lightning's "stateful loader" interface).

    Why: an epoch of a long CPU run is an hour, and a session's end kills the process; resuming
    from the last epoch's end threw that hour away. The state is (sampler epoch, batches handed
    out in it). A pass of the same epoch started after ``load_state_dict`` skips those batches,
    so with a sampler seeded by the epoch alone (:class:`BalancedSampler`) and augmentation by
    (epoch, batch) the resumed pass trains exactly the batches the broken one had left. The pass
    starts lazily (on the first ``next``), after Lightning has set the sampler's epoch, which also
    keeps worker processes from drawing a resumed run's first epoch with the sampler's epoch 0."""

    _given = 0  # batches handed out in the current pass
    _pending: tuple[int, int] | None = None  # (epoch, batches) of a checkpoint not yet resumed
    _skip_next = 0  # batches the pass being started leaves out

    @property
    def _epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._given}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._pending = (int(state["epoch"]), int(state["batches"]))

    @property
    def _index_sampler(self):
        base = super()._index_sampler
        return _SkipFirst(base, self._skip_next) if self._skip_next else base

    def __iter__(self):
        pending, self._pending = self._pending, None
        skip = pending[1] if pending and pending[0] == self._epoch and pending[1] < len(self) else 0
        self._skip_next = skip
        try:
            batches = super().__iter__()  # reads _index_sampler once, here
        finally:
            self._skip_next = 0
        self._given = skip
        try:
            for batch in batches:
                self._given += 1
                yield batch
        finally:
            if skip and self.persistent_workers:
                self._iterator = None  # it skips on every pass; the next epoch needs a whole one


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


def opacity_of(table, index_csv: str | Path) -> np.ndarray:
    """RSNA's radiologist class ("Lung Opacity", "Normal", "No Lung Opacity / Not Normal", or ""
    where a film was not an RSNA image) per cache row, from ``rsna-nih-masked/index.csv``: the
    lung-masked copies by their file name, the NIH originals by their NIH image name."""
    import pandas as pd

    index = pd.read_csv(index_csv, usecols=["path", "nih_image", "rsna_class"])
    by_copy = dict(zip(index["path"].map(lambda p: Path(p).name), index["rsna_class"]))
    by_original = dict(zip(index["nih_image"].astype(str), index["rsna_class"]))
    names = table["path"].map(lambda p: Path(str(p)).name)
    return np.array([by_copy.get(n, "") if s == "nihmasked" else by_original.get(n, "") if s == "nih" else ""
                     for n, s in zip(names, table["source"].astype(str))], dtype=object)
