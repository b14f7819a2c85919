"""Stage 8 (evaluate): per-class AUC with bootstrap 95 % CIs, Youden thresholds, sensitivity and
specificity, calibration (ECE, reliability diagram), ROC curves, and the published comparison.

Labels may be NaN (a source does not say): each class is scored on the images that know it.
A class without both positives and negatives in the split gets NaN, not a crash.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.labels import FINDINGS, LABELS

#: Mean AUC over the 14 ChestX-ray14 findings as published (SPEC stage 8), with the split each
#: paper describes. None of them is comparable with a small development set.
PUBLISHED = [
    ("Wang et al. 2017 (ChestX-ray8)", 0.738, "NIH ChestX-ray14, random image split 70/10/20 (as the paper describes)"),
    ("Yao et al. 2017", 0.803, "NIH ChestX-ray14, random split (as the paper describes)"),
    ("Kumar et al. 2018", 0.795, "NIH ChestX-ray14, random split (as the paper describes)"),
    ("Rajpurkar et al. 2017 (CheXNet)", 0.842, "NIH ChestX-ray14, patient-wise random split, no patient overlap"),
    ("Thesis (Jadavpur 2019)", 0.810, "NIH ChestX-ray14; the thesis does not state its split"),
]


def _known(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(y)
    return y[keep].astype(int), p[keep]


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """AUC over the known labels; NaN unless both classes are present."""
    from sklearn.metrics import roc_auc_score

    y, p = _known(np.asarray(y, float), np.asarray(p, float))
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def auc_ci(y: np.ndarray, p: np.ndarray, n_boot: int = 1000, seed: int = 0,
           level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC (resampling images); NaN when undefined."""
    from sklearn.metrics import roc_auc_score

    y, p = _known(np.asarray(y, float), np.asarray(p, float))
    if len(np.unique(y)) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            stats.append(roc_auc_score(y[idx], p[idx]))
    if not stats:
        return (float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail)))


def auc_difference(y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> dict[str, float]:
    """Paired bootstrap of AUC(new) − AUC(old) on the same images (the same resampled images for
    both in every draw): the difference, its percentile CI, and a two-sided bootstrap p-value
    (twice the smaller share of draws on either side of zero)."""
    from sklearn.metrics import roc_auc_score

    keep = ~np.isnan(np.asarray(y, float))
    y, a, b = np.asarray(y, float)[keep].astype(int), np.asarray(p_new, float)[keep], np.asarray(p_old, float)[keep]
    if len(np.unique(y)) < 2:
        return {"difference": float("nan"), "low": float("nan"), "high": float("nan"), "p": float("nan")}
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            diffs.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    diffs = np.asarray(diffs)
    tail = (1 - level) / 2 * 100
    p = min(1.0, 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
    return {"difference": roc_auc(y, a) - roc_auc(y, b), "low": float(np.percentile(diffs, tail)),
            "high": float(np.percentile(diffs, 100 - tail)), "p": p}


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity − 1 (0.5 when undefined)."""
    from sklearn.metrics import roc_curve

    y, p = _known(np.asarray(y, float), np.asarray(p, float))
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thr[best], 0.0), 1.0))


def sens_spec(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    y, p = _known(np.asarray(y, float), np.asarray(p, float))
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
    y, p = _known(np.asarray(y, float), np.asarray(p, float))
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


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error over equal-width bins, and the bins (for the diagram)."""
    y, p = _known(np.asarray(y, float), np.asarray(p, float))
    if len(y) == 0:
        return float("nan"), []
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        inside = which == b
        if inside.any():
            conf, freq = float(p[inside].mean()), float(y[inside].mean())
            ece += inside.mean() * abs(conf - freq)
            table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(inside.sum()),
                          "mean_probability": conf, "observed_rate": freq})
    return float(ece), table


def fmt3(value: float | None) -> str:
    """A figure for a report table: three decimals, "–" when there is none."""
    return "–" if value is None else f"{value:.3f}"


def _nan_to_none(value: float) -> float | None:
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
    return {"negatives_from_sources_without_positives": _nan_to_none(share),
            "auc_within_sources": _nan_to_none(roc_auc(y[inside], p[inside])),
            "sources_with_positives": sorted(map(str, with_pos))}


#: A per-source AUC counts only with at least this many positives and negatives in that source.
MIN_PER_CLASS = 5
#: What "assessed" asks of a label (SPEC, "What every output must say").
MIN_ADULT_TRAIN_POSITIVES = 100
MIN_VAL_PER_CLASS = 10
#: The lower end of the bootstrap 95 % CI of a label's within-source validation AUC must reach this.
MIN_LOWER_AUC = 0.65
#: ... inside an adult source with at least this many validation films: a split of a few dozen
#: films chose the thresholds and flags of a model that then failed on unseen films (AUC 0.58).
MIN_VAL_FILMS = 1000


def per_source_auc(y: np.ndarray, p: np.ndarray, sources: np.ndarray, min_each: int = MIN_PER_CLASS,
                   n_boot: int = 0, seed: int = 0) -> dict[str, dict[str, Any]]:
    """AUC of one label inside each source that has ``min_each`` positives and negatives:
    no figure here can be earned by telling one data set from another."""
    y, p, sources = np.asarray(y, float), np.asarray(p, float), np.asarray(sources).astype(str)
    out = {}
    for source in sorted(set(sources[~np.isnan(y)])):
        inside = (sources == source) & ~np.isnan(y)
        pos, neg = int((y[inside] == 1).sum()), int((y[inside] == 0).sum())
        if min(pos, neg) < min_each:
            continue
        entry: dict[str, Any] = {"auc": _nan_to_none(roc_auc(y[inside], p[inside])), "positives": pos,
                                 "negatives": neg}
        if n_boot:
            entry["ci"] = [_nan_to_none(v) for v in auc_ci(y[inside], p[inside], n_boot, seed)]
        out[source] = entry
    return out


def within_source_summary(labels: np.ndarray, probs: np.ndarray, sources: np.ndarray,
                          min_each: int = MIN_PER_CLASS, n_boot: int = 0, seed: int = 0,
                          average: Sequence[str] | None = None) -> dict[str, Any]:
    """The headline: per label the image-weighted mean of its per-source AUCs, and their mean
    over the findings in ``average`` (the labels the model assesses; None: every finding) that
    have one. Labels without such a figure are left out, never pooled."""
    per_label: dict[str, Any] = {}
    for j, label in enumerate(LABELS):
        parts = per_source_auc(labels[:, j], probs[:, j], sources, min_each, n_boot, seed)
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


def assess_labels(val_labels: np.ndarray, val_probs: np.ndarray, val_sources: np.ndarray,
                  train_labels: np.ndarray, train_sources: np.ndarray, *,
                  min_train_positives: int = MIN_ADULT_TRAIN_POSITIVES,
                  min_val_each: int = MIN_VAL_PER_CLASS, min_lower_auc: float = MIN_LOWER_AUC,
                  min_val_films: int = MIN_VAL_FILMS, n_boot: int = 1000, seed: int = 0,
                  method: str = "youden", target: float | None = None,
                  confirm_in: str | None = None) -> dict[str, dict[str, Any]]:
    """Per label: was it shown to be learnt, and at which threshold does it operate?

    Assessed = at least ``min_train_positives`` training positives from adult films, and inside
    one adult source with at least ``min_val_films`` validation films holding ``min_val_each``
    positives and negatives, a bootstrap 95 % CI of the AUC whose lower end reaches
    ``min_lower_auc``. The threshold is chosen on that source's validation films by
    :func:`operating_threshold` (Youden's J, or a target sensitivity or specificity); a label not
    assessed has none. With ``confirm_in`` (the source most like the films the model will read,
    too small to assess on its own), a label must also reach ``min_lower_auc`` there (point
    estimate) wherever that source holds ``min_val_each`` positives and negatives of it, and
    its threshold is then chosen there.
    """
    from pneumoscan.data.manifest import population

    sources = np.asarray(val_sources).astype(str)
    adult_train = np.array([population(s) == "adult" for s in np.asarray(train_sources).astype(str)])
    films = {s: int((sources == s).sum()) for s in set(sources)}
    large = np.array([population(s) == "adult" and films[s] >= min_val_films for s in sources])
    out = {}
    for j, label in enumerate(LABELS):
        train_pos = int((train_labels[adult_train, j] == 1).sum())
        parts = per_source_auc(val_labels[large, j], val_probs[large, j], sources[large], min_val_each,
                               n_boot, seed)
        best = max(parts.items(), key=lambda kv: kv[1]["ci"][0] or 0.0, default=None)
        reasons = []
        if train_pos < min_train_positives:
            reasons.append(f"{train_pos} adult training positives (< {min_train_positives})")
        if best is None:
            reasons.append(f"no adult validation source with {min_val_films} films holding {min_val_each} "
                           f"positives and negatives")
        elif not (best[1]["ci"][0] or 0.0) >= min_lower_auc:
            reasons.append(f"validation AUC {best[1]['auc']} in {best[0]}: its 95 % CI reaches down to "
                           f"{best[1]['ci'][0]} (below {min_lower_auc})")
        confirm = per_source_auc(val_labels[sources == confirm_in, j], val_probs[sources == confirm_in, j],
                                 sources[sources == confirm_in], min_val_each, n_boot, seed) if confirm_in else {}
        for name, entry in confirm.items():
            parts[name] = entry
            if (entry["auc"] or 0.0) < min_lower_auc:
                reasons.append(f"AUC {entry['auc']} in {name} ({entry['positives']} positives), the films most like "
                               f"those it will read (below {min_lower_auc})")
        assessed = not reasons
        threshold = None
        chosen_in = next(iter(confirm), best[0] if best else None)  # the films it will read, when they can
        if assessed:
            inside = sources == chosen_in
            threshold = round(operating_threshold(val_labels[inside, j], val_probs[inside, j], method, target), 6)
        out[label] = {"assessed": assessed, "threshold": threshold, "threshold_chosen_in": chosen_in if assessed else None,
                      "adult_train_positives": train_pos,
                      "validation": parts, "reason": "; ".join(reasons) if reasons else
                      f"AUC {best[1]['auc']} (95 % CI {best[1]['ci'][0]}–{best[1]['ci'][1]}) "
                      f"within {best[0]} validation images ({films[best[0]]} films)",
                      "rule": {"min_adult_train_positives": min_train_positives, "min_val_films": min_val_films,
                               "min_val_each": min_val_each, "min_lower_auc": min_lower_auc,
                               "confirmed_in": confirm_in,
                               "threshold": method if target is None else f"{method} {target:g}"}}
    return out


def evaluate_probabilities(labels: np.ndarray, probs: np.ndarray, thresholds: dict[str, float],
                           split: str, n_boot: int = 1000, seed: int = 0,
                           sources: np.ndarray | None = None) -> dict[str, Any]:
    """The report's numbers for N×15 labels (NaN unknown) and probabilities; with ``sources``
    (one data-source name per image) each label also gets a :func:`source_check`."""
    report: dict[str, Any] = {"split": split, "n_images": int(len(labels)), "auc": {}, "auc_ci": {},
                              "per_label": {}, "calibration": {}}
    for j, label in enumerate(LABELS):
        y, p = labels[:, j], probs[:, j]
        auc = roc_auc(y, p)
        low, high = auc_ci(y, p, n_boot, seed)
        threshold = thresholds.get(label)  # None: the model does not assess this label
        sens, spec = sens_spec(y, p, threshold) if threshold is not None else (np.nan, np.nan)
        ece, bins = calibration(y, p)
        report["auc"][label] = _nan_to_none(auc)
        report["auc_ci"][label] = [_nan_to_none(low), _nan_to_none(high)]
        report["per_label"][label] = {
            "threshold": None if threshold is None else round(float(threshold), 4),
            "sensitivity": _nan_to_none(sens),
            "specificity": _nan_to_none(spec), "positives": int(np.nansum(y == 1)),
            "known": int((~np.isnan(y)).sum()), "ece": _nan_to_none(ece)}
        if sources is not None:
            report["per_label"][label].update(source_check(y, p, np.asarray(sources)))
        report["calibration"][label] = bins
        report[label] = report["per_label"][label]  # contract: per label threshold/sens/spec at top level
    finite = [report["auc"][f] for f in FINDINGS if report["auc"][f] is not None]
    report["pooled_mean_auc_14"] = round(float(np.mean(finite)), 4) if finite else None
    if sources is None:  # one source by the caller's word: pooled figures are within-source
        sources = np.array(["(one source)"] * len(labels))
    assessed = [label for label in LABELS if thresholds.get(label) is not None]
    within = within_source_summary(labels, probs, np.asarray(sources), n_boot=n_boot, seed=seed, average=assessed)
    report["within_source"] = within
    report["mean_auc_14"] = within["mean_auc_findings"]
    report["mean_auc_14_labels"] = within["findings_scored"]
    return report


def write_report(report: dict[str, Any], labels: np.ndarray, probs: np.ndarray, out: str | Path,
                 model_meta: dict[str, Any] | None = None) -> None:
    """``report.json``, ``report.md``, ``roc.png`` and ``reliability.png`` in ``out`` (with the
    operating points and subgroups when the report has them)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _plot_roc(labels, probs, out / "roc.png",
              [label for label in LABELS if report["per_label"][label]["threshold"] is not None])
    _plot_reliability(report, out / "reliability.png")
    within = report["within_source"]
    fmt = fmt3
    assessment = (model_meta or {}).get("assessment") or {}
    lines = [f"# Evaluation on split `{report['split']}` ({report['n_images']} images)", ""]
    if model_meta:
        lines += [f"Model: weights SHA-256 `{model_meta.get('weights_sha256', '?')[:16]}…`, input "
                  f"{model_meta.get('input_size')} px, trained on "
                  f"{model_meta.get('training_data', {}).get('description', '?')}. Assessed labels: "
                  + (", ".join(l for l in LABELS if (assessment.get(l) or {}).get("assessed")) or "none")
                  + ".", ""]
    mean = within["mean_auc_findings"]
    lines += ["## Headline: AUC measured inside each data source", "",
              (f"Mean AUC over {_count(within['findings_scored'], 'assessed finding')} "
               f"({', '.join(within['findings_scored'])}; the other {14 - len(within['findings_scored'])} "
               f"are not averaged), each measured inside the sources that have at "
               f"least {within['min_per_class']} positives and negatives: **{mean:.3f}**."
               if mean is not None else
               f"No finding the model assesses has {within['min_per_class']} positives and negatives inside "
               f"one source of this split, so no mean AUC is reported (a pooled figure would measure the "
               f"data sets, and unassessed labels are never averaged)."),
              "", "| label | source | positives / negatives | AUC | 95 % CI | assessed by the model |",
              "|---|---|---|---|---|---|"]
    for label, entry in within["per_label"].items():
        flag = "yes" if (assessment.get(label) or {}).get("assessed") else "no"
        for source, v in entry["sources"].items():
            ci = v.get("ci") or [None, None]
            lines.append(f"| {label} | {source} | {v['positives']} / {v['negatives']} | {fmt(v['auc'])} | "
                         f"{fmt(ci[0])}–{fmt(ci[1])} | {flag} |")
    lines += ["", "## Detail: pooled over every source of the split", "",
              "Pooled AUCs mix data sets: where a label's positives and negatives come from different "
              "sources they reward telling the sources apart. They are not finding measures.", "",
              "| label | positives / known | pooled AUC | 95 % CI | threshold | sensitivity | specificity | ECE |",
              "|---|---|---|---|---|---|---|---|"]
    for label in LABELS:
        pl, ci = report["per_label"][label], report["auc_ci"][label]
        lines.append(f"| {label} | {pl['positives']} / {pl['known']} | {fmt(report['auc'][label])} | "
                     f"{fmt(ci[0])}–{fmt(ci[1])} | "
                     f"{'not assessed' if pl['threshold'] is None else format(pl['threshold'], '.3f')} | "
                     f"{fmt(pl['sensitivity'])} | {fmt(pl['specificity'])} | {fmt(pl['ece'])} |")
    confounded = [label for label in LABELS
                  if (report["per_label"][label].get("negatives_from_sources_without_positives") or 0) > 0.5
                  and report["auc"][label] is not None]
    if confounded:
        lines += ["", "**Source warning.** For " + ", ".join(confounded) + ", more than half of the "
                  "negatives come from data sources that have no positive for that label, so the pooled "
                  "AUC above rewards telling the sources apart rather than finding the disease."]
    lines += operating_point_lines(report.get("operating_points") or {})
    lines += subgroup_lines(report.get("subgroups") or [])
    lines += ["", "## Published mean AUCs on NIH ChestX-ray14 (for orientation, not comparable)", "",
              "| method | mean AUC (14 findings) | data and split |", "|---|---|---|"]
    lines += [f"| {name} | {auc:.3f} | {split} |" for name, auc, split in PUBLISHED]
    lines += [f"| this model | {fmt(mean)} | within-source mean over {_count(within['findings_scored'], 'assessed finding')}, "
              f"split `{report['split']}` of the given manifest ({within['images']} images) |", "",
              "Thresholds are Youden-optimal on validation images of adult sources, stored with the model; "
              "labels the model does not assess have none.", ""]
    (out / "report.md").write_text("\n".join(lines))


def operating_point_lines(table: dict[str, list]) -> list[str]:
    """report.md's operating-point table."""
    if not table:
        return []
    lines = ["", "## Operating points on these films", "",
             ("Thresholds that reach each target here, and what they give; `pneumoscan calibrate` writes a "
              "model with one of them. Chosen on the films they are measured on: expect less on new films."), "",
             "| label | target | threshold | sensitivity | specificity |", "|---|---|---|---|---|"]
    for label, rows in table.items():
        lines += [f"| {label} | {r['target']} | {r['threshold']:.4f} | {r['sensitivity']:.3f} | {r['specificity']:.3f} |"
                  for r in rows]
    return lines


def subgroup_lines(cells: list[dict[str, Any]]) -> list[str]:
    """report.md's subgroup table (each cell inside one source)."""
    if not cells:
        return []
    fmt = fmt3
    under = "underdiagnosed" in cells[0]
    lines = ["", "## Subgroups (inside each source)", "",
             (f"Cells marked * hold fewer than {MIN_CELL} positives or negatives: read them as noise. "
              + ("*Under-diagnosed*: the share of films with a labelled finding that the model calls "
                 "\"No Finding\"." if under else "")), "",
             ("| label | source | subgroup | films | pos / neg | AUC (95 % CI) | sensitivity | specificity | ECE |"
              + (" under-diagnosed (films) |" if under else "")),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if under else "")]
    for c in cells:
        ci = c["auc_ci"]
        auc = fmt(c["auc"]) + (f" ({fmt(ci[0])}–{fmt(ci[1])})" if None not in ci else "")
        row = (f"| {c['label']} | {c['source']} | {c['attribute']} {c['value']}{' *' if c['few'] else ''} | "
               f"{c['films']} | {c['positives']} / {c['negatives']} | {auc} | "
               f"{fmt(c['sensitivity'])} | {fmt(c['specificity'])} | {fmt(c['ece'])} |")
        if under:
            row += f" {fmt(c.get('underdiagnosed'))} ({c.get('films_with_a_finding', 0)}) |"
        lines.append(row)
    return lines


def html_report(markdown_path: Path) -> str:
    """report.html: report.md as a page, with the ROC and reliability plots beside it (the same
    numbers; tables from the Markdown, so the two cannot disagree)."""
    import html as escaping

    blocks, table = [], []

    def flush() -> None:
        if table:
            head, *body = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table if not set(r) <= set("|-")]
            blocks.append("<table><tr>" + "".join(f"<th>{escaping.escape(c)}</th>" for c in head) + "</tr>"
                          + "".join("<tr>" + "".join(f"<td>{escaping.escape(c)}</td>" for c in r) + "</tr>"
                                    for r in body) + "</table>")
            table.clear()

    for line in markdown_path.read_text().splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            blocks.append(f"<h{level}>{escaping.escape(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            blocks.append(f"<p>{escaping.escape(line).replace('**', '')}</p>")
    flush()
    blocks.insert(2, '<p><img src="roc.png" alt="ROC curves"> <img src="reliability.png" alt="reliability"></p>')
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>PneumoScan evaluation</title>"
            "<style>body{font:14px system-ui,sans-serif;margin:1.5em;max-width:75em} table{border-collapse:collapse;"
            "margin:.5em 0} td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left} img{width:32em}"
            "</style></head><body>" + "\n".join(blocks) + "</body></html>\n")


def _count(items: Sequence[str], noun: str) -> str:
    """"1 assessed finding", "3 assessed findings"."""
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _plot_roc(labels: np.ndarray, probs: np.ndarray, path: Path, assessed: Sequence[str] | None = None) -> None:
    """ROC curves, one colour per label; labels the model does not assess are thin and dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(7, 7))
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: no two labels share one
    for j, label in enumerate(LABELS):
        y, p = _known(labels[:, j], probs[:, j])
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, p)
            shown = assessed is None or label in assessed
            ax.plot(fpr, tpr, lw=2.0 if shown else 0.9, ls="-" if shown else ":", color=colours[j % 20],
                    label=f"{label} ({roc_auc(labels[:, j], probs[:, j]):.2f})" + ("" if shown else ", not assessed"))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC curves", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_reliability(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for label in LABELS:
        bins = report["calibration"][label]
        if bins and report["auc"][label] is not None:
            ax.plot([b["mean_probability"] for b in bins], [b["observed_rate"] for b in bins], "o-",
                    ms=3, lw=1, label=f"{label} (ECE {report['per_label'][label]['ece']:.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Reliability",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


#: Age bands of the subgroup tables (years; the upper bound exclusive).
AGE_BANDS = ((0, 18, "<18"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))
#: A subgroup cell with fewer positives (or negatives) than this is marked: its figures are noise.
MIN_CELL = 10
#: The operating-point table: thresholds that reach these targets on the evaluated films.
OPERATING_POINTS = (("sensitivity", 0.80), ("sensitivity", 0.90), ("sensitivity", 0.95),
                    ("specificity", 0.90), ("specificity", 0.95))


def subgroup_values(rows: Any) -> dict[str, np.ndarray]:
    """Per image its sex, age band, view and source ("unknown" where the manifest says nothing)."""
    def text(column: str) -> np.ndarray:
        values = rows[column] if column in rows else [None] * len(rows)
        return np.array([str(v).upper() if isinstance(v, str) and v.strip() else "unknown" for v in values])

    ages = np.asarray(rows["age"] if "age" in rows else [np.nan] * len(rows), float)
    bands = np.array(["unknown"] * len(rows), dtype=object)
    for low, high, name in AGE_BANDS:
        bands[(ages >= low) & (ages < high)] = name
    return {"sex": text("sex"), "age": bands.astype(str), "view": text("view"),
            "source": np.asarray(rows["source"]).astype(str)}


def subgroups(labels: np.ndarray, probs: np.ndarray, thresholds: dict[str, float], groups: dict[str, np.ndarray],
              n_boot: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """Per assessed label, per source, per subgroup (sex, age band, view): films, positives,
    negatives, AUC with a bootstrap CI, sensitivity and specificity at the model's threshold, ECE,
    and ``few`` when the cell holds fewer than :data:`MIN_CELL` positives or negatives. Cells are
    measured inside one source (pooled cells would measure the data sets). Where the model
    assesses "No Finding": ``underdiagnosed``, the share of films with a labelled finding that it
    calls "No Finding" (Seyyed-Kalantari et al., Nat Med 2021), with the films it is counted on."""
    cells = []
    no_finding = LABELS.index("No Finding")
    nf_threshold = thresholds.get("No Finding")
    has_finding = labels[:, no_finding] == 0  # a labelled finding (NaN: the source does not say)
    for j, label in enumerate(LABELS):
        threshold = thresholds.get(label)
        if threshold is None:
            continue
        known = ~np.isnan(labels[:, j])
        for source in sorted(set(groups["source"])):
            in_source = known & (groups["source"] == source)
            for attribute in ("sex", "age", "view"):
                for value in sorted(set(groups[attribute][in_source])):
                    idx = in_source & (groups[attribute] == value)
                    y, p = labels[idx, j], probs[idx, j]
                    positives, negatives = int((y == 1).sum()), int((y == 0).sum())
                    low, high = auc_ci(y, p, n_boot, seed) if min(positives, negatives) else (np.nan, np.nan)
                    sens, spec = sens_spec(y, p, threshold)
                    cell = {"label": label, "source": source, "attribute": attribute, "value": value,
                            "films": int(idx.sum()), "positives": positives, "negatives": negatives,
                            "auc": _nan_to_none(roc_auc(y, p)), "auc_ci": [_nan_to_none(low), _nan_to_none(high)],
                            "sensitivity": _nan_to_none(sens), "specificity": _nan_to_none(spec),
                            "ece": _nan_to_none(calibration(y, p)[0]), "few": min(positives, negatives) < MIN_CELL}
                    if nf_threshold is not None:
                        sick = (groups["source"] == source) & (groups[attribute] == value) & has_finding
                        called_normal = probs[sick, no_finding] >= nf_threshold
                        cell["underdiagnosed"] = _nan_to_none(called_normal.mean()) if sick.any() else None
                        cell["films_with_a_finding"] = int(sick.sum())
                    cells.append(cell)
    return cells


def operating_points(labels: np.ndarray, probs: np.ndarray, thresholds: dict[str, float]) -> dict[str, list]:
    """Per assessed label, the threshold reaching each of :data:`OPERATING_POINTS` on these films
    and the sensitivity and specificity it gives here (what ``pneumoscan calibrate`` would pick)."""
    table = {}
    for j, label in enumerate(LABELS):
        y, p = _known(labels[:, j], probs[:, j])
        if thresholds.get(label) is None or min((y == 1).sum(), (y == 0).sum()) < MIN_CELL:
            continue
        rows = []
        for method, target in OPERATING_POINTS:
            t = operating_threshold(y, p, method, target)
            sens, spec = sens_spec(y, p, t)
            rows.append({"target": f"{method} {target:.2f}", "threshold": round(t, 4),
                         "sensitivity": round(sens, 4), "specificity": round(spec, 4)})
        table[label] = rows
    return table


def write_scores(rows: Any, labels: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """``scores.csv``: one line per evaluated film, its manifest fields, each label's truth (empty
    where unknown) and probability; what a reader needs to recompute any figure."""
    keep = [c for c in ("path", "source", "patient", "split", "sex", "age", "view") if c in rows]
    table = rows[keep].reset_index(drop=True).copy()
    for j, label in enumerate(LABELS):
        table[f"y_{label}"] = labels[:, j]
        table[f"p_{label}"] = np.round(probs[:, j], 6)
    table.to_csv(path, index=False, float_format="%.6g")


@dataclass
class ScoredSplit:
    """One manifest split scored by one classifier: its rows (labelled, readable), their labels
    (N×15, NaN unknown) and probabilities, and the unreadable paths left out."""

    rows: Any
    labels: np.ndarray
    probs: np.ndarray
    skipped: list[str]
    classifier: Any


def score_split(manifest: str | Path, split: str, *, model: str | Path | None = None,
                cache: str | Path | None = None, seg_model: str | Path | None = None,
                backend: str = "auto") -> ScoredSplit:
    """Score the labelled images of one split: crops from ``cache`` when given (rows matched by
    path), else read, segmented and cropped here (the predictor's path)."""
    import pandas as pd

    from pneumoscan.data.manifest import ManifestError, read_manifest
    from pneumoscan.predict import load_models
    from pneumoscan.training.cache import CropCache, crop_paths, scoring_inputs

    segmenter, classifier = load_models(seg_model, model, backend=backend)
    table = read_manifest(manifest)
    rows = table[(table.split == split) & table[list(LABELS)].notna().any(axis=1)].reset_index(drop=True)
    if rows.empty:
        raise ManifestError(f"{manifest}: split {split!r} has no labelled images "
                            f"(splits present: {sorted(table.split.unique())})")
    if cache is not None:
        crop_cache = CropCache(cache)
        if crop_cache.size != classifier.size:
            raise ValueError(f"cache crops are {crop_cache.size} px but the model takes {classifier.size} px")
        if crop_cache.lung_masked != classifier.lung_masked:
            raise ValueError(f"the cache's crops are {'' if crop_cache.lung_masked else 'not '}lung-masked but the "
                             f"model learnt from {'' if classifier.lung_masked else 'un'}masked crops; prepare "
                             f"a cache {'with' if classifier.lung_masked else 'without'} --lung-mask")
        where = {p: i for i, p in enumerate(crop_cache.table["path"])}
        found = rows["path"].map(where)
        skipped = rows.loc[found.isna(), "path"].tolist()
        rows = rows[found.notna()].reset_index(drop=True)
        crops = crop_cache.images(found.dropna().astype(int))
        inputs = crop_cache.scoring_inputs(classifier, found.dropna().astype(int).to_numpy())
    else:
        print(f"reading, segmenting and cropping {len(rows):,} images …", file=sys.stderr, flush=True)
        crops, records = crop_paths(rows["path"].tolist(), segmenter, classifier.size, threads=2,
                                    masked=classifier.lung_masked, sources=rows["source"].astype(str).tolist())
        ok = np.array([r["error"] == "" for r in records])
        skipped = [r["path"] for r in records if r["error"]]
        rows, crops = rows[ok].reset_index(drop=True), crops[ok]
        boxes = pd.DataFrame([r for r, k in zip(records, ok) if k])[["x0", "y0", "x1", "y1"]]
        inputs = scoring_inputs(classifier, pd.concat([rows, boxes], axis=1), classifier.size)
    print(f"scoring {len(rows):,} crops …", file=sys.stderr, flush=True)
    probs = classifier.predict_proba(crops.astype(np.float32) / 255.0, **inputs)
    return ScoredSplit(rows, rows[list(LABELS)].to_numpy(np.float32), probs, skipped, classifier)


def evaluate_split(manifest: str | Path, split: str, out: str | Path, *, model: str | Path | None = None,
                   cache: str | Path | None = None, seg_model: str | Path | None = None,
                   n_boot: int = 1000, backend: str = "auto") -> dict[str, Any]:
    """Score one split of a manifest (:func:`score_split`), write the report files, return the report."""
    scored = score_split(manifest, split, model=model, cache=cache, seg_model=seg_model, backend=backend)
    print(f"evaluate: {n_boot} bootstrap resamples per label …", file=sys.stderr, flush=True)
    thresholds = scored.classifier.meta.get("thresholds") or {}
    report = evaluate_probabilities(scored.labels, scored.probs, thresholds, split, n_boot=n_boot,
                                    sources=scored.rows["source"].to_numpy())
    report["skipped_unreadable"] = scored.skipped
    report["manifest"] = str(manifest)
    print("evaluate: subgroups and operating points …", file=sys.stderr, flush=True)
    report["subgroups"] = subgroups(scored.labels, scored.probs, thresholds, subgroup_values(scored.rows),
                                    n_boot=max(n_boot // 5, 0))
    report["operating_points"] = operating_points(scored.labels, scored.probs, thresholds)
    write_report(report, scored.labels, scored.probs, out, scored.classifier.meta)
    write_scores(scored.rows, scored.labels, scored.probs, Path(out) / "scores.csv")
    (Path(out) / "report.html").write_text(html_report(Path(out) / "report.md"))
    return report
