"""Stage 8's measures as pure functions on arrays: AUC with bootstrap 95 % CIs (and paired
differences), thresholds by Youden's J or a target sensitivity or specificity, sensitivity and
specificity, calibration (ECE and its bins, optionally at another prevalence), and AUCs measured
inside each data source (a pooled AUC across sources rewards telling the sources apart).

Labels may be NaN (a source does not say): each class is scored on the images that know it. A
class without both positives and negatives gets NaN, not a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pneumoscan.labels import FINDINGS, LABELS


def known_pairs(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(y)
    return y[keep].astype(int), p[keep]


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """AUC over the known labels; NaN unless both classes are present."""
    from sklearn.metrics import roc_auc_score

    y, p = known_pairs(np.asarray(y, float), np.asarray(p, float))
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def bootstrap_aucs(y: np.ndarray, scores: Sequence[np.ndarray], n_boot: int, seed: int = 0,
                   groups: np.ndarray | None = None) -> np.ndarray:
    """AUCs of each score on ``n_boot`` resamples of the images (the same resample for every score
    in a draw), as a (draws × scores) array; draws without both classes are left out. ``y`` is 0/1
    with no NaN. The resamples are those of ``rng.integers(0, n, n)`` drawn ``n_boot`` times. A
    resample is a count per image, and its AUC the Mann-Whitney statistic with those counts as
    weights (each positive against the weighted negatives scored below it, ties counting one half),
    which is scikit-learn's ``roc_auc_score`` of the resample to 1e-12: computed for many draws at
    once, without sorting each one (the per-call checks of ``roc_auc_score`` were most of
    ``evaluate``'s time).

    ``groups`` (one key per image, e.g. the patient): resample the groups instead, every image of a
    drawn group counted as often as its group is drawn (the cluster bootstrap: films of one patient
    are not independent, and resampling them one by one makes intervals too narrow). With a group
    per image it is the image resample above, draw for draw."""
    y = np.asarray(y, int)
    n, rng = len(y), np.random.default_rng(seed)
    if groups is None:
        member, g = np.arange(n), n
    else:
        _, member = np.unique(np.asarray(groups), return_inverse=True)
        g = int(member.max()) + 1 if n else 0
    chunk = max(1, 2_000_000 // max(n, g, 1))  # draws held at a time: tens of MB whatever the split's size
    out = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, g, (min(chunk, n_boot - start), g))
        counts = np.bincount((idx + g * np.arange(len(idx))[:, None]).ravel(), minlength=g * len(idx))
        counts = counts.reshape(len(idx), g)[:, member]
        positives, negatives = counts @ y, counts @ (1 - y)
        both = (positives > 0) & (negatives > 0)
        counts, pairs = counts[both], positives[both] * negatives[both]
        per_score = []
        for score in scores:
            order = np.argsort(score, kind="stable")
            ordered = np.asarray(score, float)[order]
            starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # groups of tied scores
            weights = counts[:, order]
            pos = np.add.reduceat(weights * y[order], starts, axis=1)
            neg = np.add.reduceat(weights * (1 - y[order]), starts, axis=1)
            below = np.cumsum(neg, axis=1) - neg
            per_score.append((pos * (below + neg / 2)).sum(axis=1) / pairs)
        out.append(np.stack(per_score, axis=1))
    return np.concatenate(out) if out else np.empty((0, len(scores)))


def known_groups(y: np.ndarray, groups: np.ndarray | None) -> np.ndarray | None:
    """``groups`` of the images whose label is known (None stays None)."""
    return None if groups is None else np.asarray(groups)[~np.isnan(np.asarray(y, float))]


def auc_ci(y: np.ndarray, p: np.ndarray, n_boot: int = 1000, seed: int = 0,
           level: float = 0.95, groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC (resampling images, or ``groups`` of them: patients);
    NaN when undefined."""
    groups = known_groups(y, groups)
    y, p = known_pairs(np.asarray(y, float), np.asarray(p, float))
    if len(np.unique(y)) < 2:
        return (float("nan"), float("nan"))
    stats = bootstrap_aucs(y, [p], n_boot, seed, groups)[:, 0]
    if not len(stats):
        return (float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail)))


def auc_difference(y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95, groups: np.ndarray | None = None) -> dict[str, float]:
    """Paired bootstrap of AUC(new) − AUC(old) on the same images (the same resampled images, or
    ``groups`` of them, for both in every draw): the difference, its percentile CI, and a
    two-sided bootstrap p-value (twice the smaller share of draws on either side of zero)."""
    keep = ~np.isnan(np.asarray(y, float))
    groups = None if groups is None else np.asarray(groups)[keep]
    y, a, b = np.asarray(y, float)[keep].astype(int), np.asarray(p_new, float)[keep], np.asarray(p_old, float)[keep]
    if len(np.unique(y)) < 2:
        return {"difference": float("nan"), "low": float("nan"), "high": float("nan"), "p": float("nan")}
    both = bootstrap_aucs(y, [a, b], n_boot, seed, groups)
    diffs = both[:, 0] - both[:, 1]
    tail = (1 - level) / 2 * 100
    p = min(1.0, 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
    return {"difference": roc_auc(y, a) - roc_auc(y, b), "low": float(np.percentile(diffs, tail)),
            "high": float(np.percentile(diffs, 100 - tail)), "p": p}


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity − 1 (0.5 when undefined)."""
    from sklearn.metrics import roc_curve

    y, p = known_pairs(np.asarray(y, float), np.asarray(p, float))
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thr[best], 0.0), 1.0))


def sens_spec(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    y, p = known_pairs(np.asarray(y, float), np.asarray(p, float))
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else float("nan")
    spec = float((~pred[neg]).mean()) if neg.any() else float("nan")
    return sens, spec


METHODS = ("youden", "sensitivity", "specificity")


def operating_threshold(y: np.ndarray, p: np.ndarray, method: str, target: float | None = None) -> float:
    """The threshold for ``method``: Youden's J; or the highest threshold whose sensitivity reaches
    ``target``; or the lowest whose specificity reaches ``target`` (on these films). The cut lies
    halfway between two films' scores, never on one, so float noise cannot flip a call."""
    y, p = known_pairs(np.asarray(y, float), np.asarray(p, float))
    if method == "youden":
        return youden_threshold(y, p)
    if target is None or not 0 < target < 1:
        raise ValueError(f"--target-{method} must be between 0 and 1")
    if method == "sensitivity":  # halfway below the score of the positive that makes the target
        edge = np.sort(p[y == 1])[::-1][int(np.ceil(target * (y == 1).sum())) - 1]
        below = p[p < edge]
        return float((edge + below.max()) / 2 if below.size else edge)
    if method == "specificity":  # halfway above the score of the negative that makes the target
        edge = np.sort(p[y == 0])[int(np.ceil(target * (y == 0).sum())) - 1]
        above = p[p > edge]
        return float((edge + above.min()) / 2 if above.size else np.nextafter(edge, np.inf))
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10, weights: np.ndarray | None = None
                ) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error over equal-width bins, and the bins (for the diagram).
    ``weights`` (per film) measure it at another prevalence than the sample's
    (:func:`pneumoscan.training.reading_fit.prevalence_weights`)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    w = np.ones_like(y) if weights is None else np.asarray(weights, float)
    known = ~np.isnan(y) & ~np.isnan(p)
    y, p, w = y[known], p[known], w[known]
    if len(y) == 0:
        return float("nan"), []
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece, table, total = 0.0, [], w.sum()
    for b in range(bins):
        inside = which == b
        if inside.any() and w[inside].sum() > 0:
            conf, freq = float(np.average(p[inside], weights=w[inside])), float(np.average(y[inside], weights=w[inside]))
            ece += w[inside].sum() / total * abs(conf - freq)
            table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(inside.sum()),
                          "mean_probability": conf, "observed_rate": freq})
    return float(ece), table


def nan_to_none(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 4)


def source_check(y: np.ndarray, p: np.ndarray, sources: np.ndarray) -> dict[str, Any]:
    """How much of a label's AUC could be telling sources apart rather than findings.

    ``negatives_from_sources_without_positives``: the share of negatives that come from sources
    with no positive at all for this label (a Kermany "normal" scored against an NIH finding, say).
    ``auc_within_sources``: the AUC over the sources that do have positives only.
    """
    known = ~np.isnan(y)
    y, p, sources = y[known], p[known], sources[known]
    with_pos = set(sources[y == 1])
    neg = y == 0
    share = float(np.isin(sources[neg], list(with_pos), invert=True).mean()) if neg.any() else float("nan")
    inside = np.isin(sources, list(with_pos))
    return {"negatives_from_sources_without_positives": nan_to_none(share),
            "auc_within_sources": nan_to_none(roc_auc(y[inside], p[inside])),
            "sources_with_positives": sorted(map(str, with_pos))}


#: A per-source AUC counts only with at least this many positives and negatives in that source.
MIN_PER_CLASS = 5


def per_source_auc(y: np.ndarray, p: np.ndarray, sources: np.ndarray, min_each: int = MIN_PER_CLASS,
                   n_boot: int = 0, seed: int = 0, groups: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """AUC of one label inside each source that has ``min_each`` positives and negatives:
    no figure here can be earned by telling one data set from another (CIs resample ``groups``,
    e.g. patients, when given)."""
    y, p, sources = np.asarray(y, float), np.asarray(p, float), np.asarray(sources).astype(str)
    out = {}
    for source in sorted(set(sources[~np.isnan(y)])):
        inside = (sources == source) & ~np.isnan(y)
        pos, neg = int((y[inside] == 1).sum()), int((y[inside] == 0).sum())
        if min(pos, neg) < min_each:
            continue
        entry: dict[str, Any] = {"auc": nan_to_none(roc_auc(y[inside], p[inside])), "positives": pos,
                                 "negatives": neg}
        if n_boot:
            entry["ci"] = [nan_to_none(v) for v in auc_ci(y[inside], p[inside], n_boot, seed,
                                                          groups=None if groups is None else np.asarray(groups)[inside])]
        out[source] = entry
    return out


def within_source_summary(labels: np.ndarray, probs: np.ndarray, sources: np.ndarray,
                          min_each: int = MIN_PER_CLASS, n_boot: int = 0, seed: int = 0,
                          average: Sequence[str] | None = None, groups: np.ndarray | None = None) -> dict[str, Any]:
    """The headline: per label the image-weighted mean of its per-source AUCs, and their mean
    over the findings in ``average`` (the labels the model assesses; None: every finding) that
    have one. Labels without such a figure are left out, never pooled. CIs resample ``groups``
    (patients) when given."""
    per_label: dict[str, Any] = {}
    for j, label in enumerate(LABELS):
        parts = per_source_auc(labels[:, j], probs[:, j], sources, min_each, n_boot, seed, groups=groups)
        if parts:
            weights = np.array([v["positives"] + v["negatives"] for v in parts.values()], float)
            aucs = np.array([v["auc"] for v in parts.values()], float)
            per_label[label] = {"auc": round(float((aucs * weights).sum() / weights.sum()), 4),
                                "sources": parts, "images": int(weights.sum())}
    wanted = FINDINGS if average is None else [f for f in FINDINGS if f in set(average)]
    findings = [f for f in wanted if f in per_label]
    return {"per_label": per_label,
            "mean_auc_findings": round(float(np.mean([per_label[f]["auc"] for f in findings])), 4)
            if findings else None,
            "findings_scored": findings, "averaged_over": "assessed findings" if average is not None
            else "every finding", "min_per_class": min_each,
            "images": int(max((v["images"] for v in per_label.values()), default=0))}


#: Within-source validation AUC of these labels chooses the checkpoint.
SELECT_LABELS = ("Pneumonia",)


def selection_score(labels: np.ndarray, probs: np.ndarray, sources: np.ndarray,
                    select: tuple[str, ...] = SELECT_LABELS) -> tuple[float, dict[str, float]]:
    """Mean within-source AUC of ``select`` labels (the checkpoint criterion), and its parts."""
    parts = {f"{label}/{source}": v["auc"]
             for label in select
             for source, v in per_source_auc(labels[:, LABELS.index(label)],
                                             probs[:, LABELS.index(label)], sources).items()
             if v["auc"] is not None}
    return (float(np.mean(list(parts.values()))) if parts else float("nan")), parts
