"""What the reports tabulate: per label whether the model was shown to have learnt it (the
assessment rule), the evaluation's figures, calibration before and after the model's maps,
subgroups (sex, age band, view inside each source) and operating points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pneumoscan.labels import FINDINGS, LABELS
from pneumoscan.training.metrics import (
    auc_ci,
    calibration,
    known_pairs,
    nan_to_none,
    operating_threshold,
    per_source_auc,
    roc_auc,
    sens_spec,
    source_check,
    within_source_summary,
)

#: What "assessed" asks of a label (SPEC, "What every output must say").
MIN_ADULT_TRAIN_POSITIVES = 100


MIN_VAL_PER_CLASS = 10


#: The lower end of the bootstrap 95 % CI of a label's within-source validation AUC must reach this.
MIN_LOWER_AUC = 0.65


#: ... inside an adult source with at least this many validation films: a split of a few dozen
#: films chose the thresholds and flags of a model that then failed on unseen films (AUC 0.58).
MIN_VAL_FILMS = 1000


def assess_labels(val_labels: np.ndarray, val_probs: np.ndarray, val_sources: np.ndarray,
                  train_labels: np.ndarray, train_sources: np.ndarray, *,
                  min_train_positives: int = MIN_ADULT_TRAIN_POSITIVES,
                  min_val_each: int = MIN_VAL_PER_CLASS, min_lower_auc: float = MIN_LOWER_AUC,
                  min_val_films: int = MIN_VAL_FILMS, n_boot: int = 1000, seed: int = 0,
                  method: str = "youden", target: float | None = None,
                  confirm_in: str | None = None, group: str = "adult") -> dict[str, dict[str, Any]]:
    """Per label: was it shown to be learnt, and at which threshold does it operate?

    Assessed = at least ``min_train_positives`` training positives from adult films, and inside
    one adult source with at least ``min_val_films`` validation films holding ``min_val_each``
    positives and negatives, a bootstrap 95 % CI of the AUC whose lower end reaches
    ``min_lower_auc``. The threshold is chosen on that source's validation films by
    :func:`operating_threshold` (Youden's J, or a target sensitivity or specificity); a label not
    assessed has none. With ``confirm_in`` (the source most like the films the model will read,
    too small to assess on its own), a label must also reach ``min_lower_auc`` there (point
    estimate) wherever that source holds ``min_val_each`` positives and negatives of it, and
    its threshold is then chosen there. ``group``: the population whose films count ("adult",
    or "paediatric" for the paediatric reading).
    """
    from pneumoscan.data.manifest import population

    sources = np.asarray(val_sources).astype(str)
    adult_train = np.array([population(s) == group for s in np.asarray(train_sources).astype(str)])
    films = {s: int((sources == s).sum()) for s in set(sources)}
    large = np.array([population(s) == group and films[s] >= min_val_films for s in sources])
    out = {}
    for j, label in enumerate(LABELS):
        train_pos = int((train_labels[adult_train, j] == 1).sum())
        parts = per_source_auc(val_labels[large, j], val_probs[large, j], sources[large], min_val_each,
                               n_boot, seed)
        best = max(parts.items(), key=lambda kv: kv[1]["ci"][0] or 0.0, default=None)
        reasons = []
        if train_pos < min_train_positives:
            reasons.append(f"{train_pos} {group} training positives (< {min_train_positives})")
        if best is None:
            reasons.append(f"no {group} validation source with {min_val_films} films holding {min_val_each} "
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
        if best is not None and not reasons:
            reasons.append(f"AUC {best[1]['auc']} (95 % CI {best[1]['ci'][0]}–{best[1]['ci'][1]}) "
                           f"within {best[0]} validation images ({films[best[0]]} films)")
        out[label] = {"assessed": assessed, "threshold": threshold, "threshold_chosen_in": chosen_in if assessed else None,
                      f"{group}_train_positives": train_pos, "validation": parts, "reason": "; ".join(reasons),
                      "rule": {"min_adult_train_positives": min_train_positives, "min_val_films": min_val_films,
                               "min_val_each": min_val_each, "min_lower_auc": min_lower_auc,
                               "confirmed_in": confirm_in,
                               "threshold": method if target is None else f"{method} {target:g}"}}
    return out


def evaluate_probabilities(labels: np.ndarray, probs: np.ndarray, thresholds: dict[str, float],
                           split: str, n_boot: int = 1000, seed: int = 0,
                           sources: np.ndarray | None = None, patients: np.ndarray | None = None) -> dict[str, Any]:
    """The report's numbers for N×15 labels (NaN unknown) and probabilities; with ``sources``
    (one data-source name per image) each label also gets a :func:`source_check`. With
    ``patients`` (:func:`patient_keys`) every CI resamples patients, not films: a patient's films
    are not independent, and resampling them one by one makes the intervals too narrow."""
    report: dict[str, Any] = {"split": split, "n_images": len(labels), "auc": {}, "auc_ci": {},
                              "per_label": {}, "calibration": {},
                              "ci_resamples": resample_unit(len(labels), patients, n_boot)}
    for j, label in enumerate(LABELS):
        y, p = labels[:, j], probs[:, j]
        auc = roc_auc(y, p)
        low, high = auc_ci(y, p, n_boot, seed, groups=patients)
        threshold = thresholds.get(label)  # None: the model does not assess this label
        sens, spec = sens_spec(y, p, threshold) if threshold is not None else (np.nan, np.nan)
        ece, bins = calibration(y, p)
        report["auc"][label] = nan_to_none(auc)
        report["auc_ci"][label] = [nan_to_none(low), nan_to_none(high)]
        report["per_label"][label] = {
            "threshold": None if threshold is None else round(float(threshold), 4),
            "sensitivity": nan_to_none(sens),
            "specificity": nan_to_none(spec), "positives": int(np.nansum(y == 1)),
            "known": int((~np.isnan(y)).sum()), "ece": nan_to_none(ece)}
        if sources is not None:
            report["per_label"][label].update(source_check(y, p, np.asarray(sources)))
        report["calibration"][label] = bins
        report[label] = report["per_label"][label]  # contract: per label threshold/sens/spec at top level
    finite = [report["auc"][f] for f in FINDINGS if report["auc"][f] is not None]
    report["pooled_mean_auc_14"] = round(float(np.mean(finite)), 4) if finite else None
    if sources is None:  # one source by the caller's word: pooled figures are within-source
        sources = np.array(["(one source)"] * len(labels))
    assessed = [label for label in LABELS if thresholds.get(label) is not None]
    within = within_source_summary(labels, probs, np.asarray(sources), n_boot=n_boot, seed=seed, average=assessed,
                                   groups=patients)
    report["within_source"] = within
    report["mean_auc_14"] = within["mean_auc_findings"]
    report["mean_auc_14_labels"] = within["findings_scored"]
    return report


def calibration_before_after(labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray,
                             assessed: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per assessed label: ECE (10 bins) and Brier score of the raw scores and of the calibrated
    probabilities on these films (at their own prevalence), and the calibrated reliability bins."""
    out = {}
    for label in assessed:
        j = LABELS.index(label)
        y = labels[:, j]
        known = ~np.isnan(y)
        if not known.any():
            continue
        entry: dict[str, Any] = {"films": int(known.sum()), "positives": int((y[known] == 1).sum())}
        for name, p in (("raw", raw[:, j]), ("calibrated", calibrated[:, j])):
            ece, bins = calibration(y, p)
            entry[name] = {"ece": nan_to_none(ece), "brier": round(float(np.mean((p[known] - y[known]) ** 2)), 4)}
        entry["bins"] = calibration(y, calibrated[:, j])[1]
        out[label] = entry
    return out


#: Age bands of the subgroup tables (years; the upper bound exclusive).
AGE_BANDS = ((0, 18, "<18"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))


#: A subgroup cell with fewer positives (or negatives) than this is marked: its figures are noise.
MIN_CELL = 10


#: The operating-point table: thresholds that reach these targets on the evaluated films.
OPERATING_POINTS = (("sensitivity", 0.80), ("sensitivity", 0.90), ("sensitivity", 0.95),
                    ("specificity", 0.90), ("specificity", 0.95))


def patient_keys(rows: Any) -> np.ndarray:
    """The patient of each film (the manifest's ``patient``, already namespaced by data set, e.g.
    ``nih:100``; a film without one counts as a patient of its own)."""
    patients = rows.get("patient")
    if patients is None:
        return ("film:" + rows["path"].astype(str)).to_numpy()
    known = patients.notna() & (patients.astype(str) != "")
    return np.where(known, patients.astype(str), "film:" + rows["path"].astype(str)).astype(str)


def resample_unit(n_images: int, patients: np.ndarray | None, n_boot: int) -> dict[str, Any]:
    """What a report's bootstrap CIs resample, said in the report."""
    if patients is None:
        return {"unit": "images", "count": n_images, "draws": n_boot}
    return {"unit": "patients", "count": len(np.unique(patients)), "draws": n_boot}


def subgroup_values(rows: Any) -> dict[str, np.ndarray]:
    """Per image its sex, age band, view and source ("unknown" where the manifest says nothing),
    and its patient (CIs resample patients)."""
    def text(column: str) -> np.ndarray:
        values = rows[column] if column in rows else [None] * len(rows)
        return np.array([str(v).upper() if isinstance(v, str) and v.strip() else "unknown" for v in values])

    ages = np.asarray(rows["age"] if "age" in rows else [np.nan] * len(rows), float)
    bands = np.array(["unknown"] * len(rows), dtype=object)
    for low, high, name in AGE_BANDS:
        bands[(ages >= low) & (ages < high)] = name
    return {"sex": text("sex"), "age": bands.astype(str), "view": text("view"),
            "source": np.asarray(rows["source"]).astype(str), "patient": patient_keys(rows)}


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
                    patients = groups["patient"][idx] if "patient" in groups else None
                    low, high = (auc_ci(y, p, n_boot, seed, groups=patients) if min(positives, negatives)
                                 else (np.nan, np.nan))
                    sens, spec = sens_spec(y, p, threshold)
                    cell = {"label": label, "source": source, "attribute": attribute, "value": value,
                            "films": int(idx.sum()), "positives": positives, "negatives": negatives,
                            "auc": nan_to_none(roc_auc(y, p)), "auc_ci": [nan_to_none(low), nan_to_none(high)],
                            "sensitivity": nan_to_none(sens), "specificity": nan_to_none(spec),
                            "ece": nan_to_none(calibration(y, p)[0]), "few": min(positives, negatives) < MIN_CELL}
                    if nf_threshold is not None:
                        sick = (groups["source"] == source) & (groups[attribute] == value) & has_finding
                        called_normal = probs[sick, no_finding] >= nf_threshold
                        cell["underdiagnosed"] = nan_to_none(called_normal.mean()) if sick.any() else None
                        cell["films_with_a_finding"] = int(sick.sum())
                    cells.append(cell)
    return cells


def operating_points(labels: np.ndarray, probs: np.ndarray, thresholds: dict[str, float]) -> dict[str, list]:
    """Per assessed label, the threshold reaching each of :data:`OPERATING_POINTS` on these films
    and the sensitivity and specificity it gives here (what ``pneumoscan calibrate`` would pick)."""
    table = {}
    for j, label in enumerate(LABELS):
        y, p = known_pairs(labels[:, j], probs[:, j])
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
