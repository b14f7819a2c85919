"""The statistics a site is watched by, as small pure functions: two-sample tests with their
effect sizes (a shift must be both unlikely by chance and large enough to matter), and
confidence-based performance estimation from calibrated probabilities.

- **Categorical** (population mix, verdict mix, refusals, view, modality, photometric, bit depth):
  chi-square test of homogeneity between the reference's counts and a window's, rare categories
  pooled; effect = total variation distance (half the L1 distance between the two shares).
- **Continuous** (image size, estimated age, mask quality, rank scores): two-sample
  Kolmogorov–Smirnov test; effect = the KS statistic D (largest gap between the two CDFs).
- **Expected performance** (CBPE, NannyML's confidence-based performance estimation): with
  calibrated probabilities p, a film is positive with probability p, so the expected confusion
  matrix at the operating threshold is Σp over calls (true positives), Σ(1−p) over calls (false
  positives), and so on; the expected AUC counts every (positive, negative) pair weighted
  p_i (1 − p_j). It holds only as far as the calibration holds on the window's films.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Categories seen in fewer films of the reference and the window together are pooled as "other"
#: (a chi-square test needs expected counts of about 5).
MIN_CATEGORY = 5


def categorical_shift(reference: list[str], window: list[str]) -> dict[str, Any]:
    """Chi-square homogeneity test of two samples of labels: ``p``, the effect ``tvd``, the
    shares of each category in both, and the category that grew most (``moved``)."""
    from scipy.stats import chi2_contingency

    names = sorted(set(reference) | set(window))
    ref = np.array([reference.count(n) for n in names], float)
    win = np.array([window.count(n) for n in names], float)
    rare = (ref + win) < MIN_CATEGORY
    if rare.any() and (~rare).any():
        names = [n for n, r in zip(names, rare) if not r] + ["other"]
        ref = np.r_[ref[~rare], ref[rare].sum()]
        win = np.r_[win[~rare], win[rare].sum()]
    keep = (ref + win) > 0
    names, ref, win = [n for n, k in zip(names, keep) if k], ref[keep], win[keep]
    ref_share, win_share = ref / max(ref.sum(), 1), win / max(win.sum(), 1)
    out = {"reference": dict(zip(names, np.round(ref_share, 4).tolist())),
           "window": dict(zip(names, np.round(win_share, 4).tolist())),
           "tvd": round(float(0.5 * np.abs(ref_share - win_share).sum()), 4)}
    if len(names) < 2 or ref.sum() == 0 or win.sum() == 0:
        return out | {"p": 1.0, "moved": None}
    p = float(chi2_contingency(np.vstack([ref, win]))[1])
    moved = names[int(np.argmax(win_share - ref_share))]  # the category that grew: its films are the new kind
    return out | {"p": p, "moved": moved}


def continuous_shift(reference: np.ndarray, window: np.ndarray) -> dict[str, Any]:
    """Two-sample KS test (finite values only): ``p``, the effect ``d``, and both medians."""
    from scipy.stats import ks_2samp

    ref = np.asarray(reference, float)
    win = np.asarray(window, float)
    ref, win = ref[np.isfinite(ref)], win[np.isfinite(win)]
    if len(ref) < MIN_CATEGORY or len(win) < MIN_CATEGORY:
        return {"p": 1.0, "d": 0.0, "n": int(len(win)), "reference_median": None, "window_median": None}
    test = ks_2samp(ref, win)
    return {"p": float(test.pvalue), "d": round(float(test.statistic), 4), "n": int(len(win)),
            "reference_median": round(float(np.median(ref)), 4), "window_median": round(float(np.median(win)), 4)}


def expected_auc(p: np.ndarray, order: np.ndarray) -> float | None:
    """The AUC expected when film i is positive with probability ``p[i]``: over all pairs, the
    weight p_i (1 − p_j) of "i positive, j negative", counting the pair as right when i is ranked
    above j by ``order`` (half when tied). O(n log n) by sorting."""
    p, order = np.asarray(p, float), np.asarray(order, float)
    if len(p) < 2:
        return None
    sort = np.argsort(order, kind="stable")
    p, order = p[sort], order[sort]
    negatives_below = np.cumsum(1 - p) - (1 - p)  # weight of negatives strictly earlier in the order
    # ties: films with equal order share their group's negatives as halves
    _, start, counts = np.unique(order, return_index=True, return_counts=True)
    right = 0.0
    for s, c in zip(start, counts):
        group = slice(s, s + c)
        below = negatives_below[s]
        tied_negative = (1 - p[group]).sum()
        right += float((p[group] * (below + 0.5 * (tied_negative - (1 - p[group])))).sum())
    total = float(p.sum() * (1 - p).sum() - (p * (1 - p)).sum())
    return right / total if total > 0 else None


def expected_performance(p: np.ndarray, called: np.ndarray, order: np.ndarray) -> dict[str, Any]:
    """CBPE figures of one label on one window: expected prevalence, sensitivity and specificity
    at the operating threshold (the calls made), and AUC (:func:`expected_auc`)."""
    p, called = np.asarray(p, float), np.asarray(called, bool)
    positives, negatives = p.sum(), (1 - p).sum()
    auc = expected_auc(p, order)
    return {"films": int(len(p)), "expected_prevalence": round(float(p.mean()), 4) if len(p) else None,
            "expected_sensitivity": round(float(p[called].sum() / positives), 4) if positives > 0 else None,
            "expected_specificity": round(float((1 - p)[~called].sum() / negatives), 4) if negatives > 0 else None,
            "expected_auc": None if auc is None else round(auc, 4)}


def observed_auc(truth: np.ndarray, order: np.ndarray, minimum: int = 5) -> float | None:
    """The AUC against reviewers' labels, when the window has at least ``minimum`` of each."""
    from sklearn.metrics import roc_auc_score

    truth, order = np.asarray(truth, float), np.asarray(order, float)
    known = ~np.isnan(truth)
    if (truth[known] == 1).sum() < minimum or (truth[known] == 0).sum() < minimum:
        return None
    return round(float(roc_auc_score(truth[known], order[known])), 4)
