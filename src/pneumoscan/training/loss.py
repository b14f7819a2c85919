"""The loss: the thesis's weighted binary cross-entropy over known labels.

Per-class positive weight = negatives / positives among the training split's KNOWN labels; NaN
labels (a source does not say) are masked out of the loss, not counted as negatives; optional
per-film, per-label weights (source and view balancing) multiply each term.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pneumoscan.labels import LABELS


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
