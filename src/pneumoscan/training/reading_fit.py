"""Fitting what :mod:`pneumoscan.reading` applies: calibration maps per label and population,
the paediatric reading's assessment, and the age / population estimate — all from the
cross-validation's out-of-fold scores and frozen features, so that every figure here comes from
films the fitted head never saw.

- **Calibration** (:func:`choose_calibration`): Platt scaling and isotonic regression are fitted
  per label on the out-of-fold probabilities of a population's films and judged by a second,
  outer cross-fit over the same patient folds (fit on four folds, measure on the fifth): the
  method with the lower out-of-fold log-loss is kept, its ECE beside it. Films are weighted so
  that each label's positives make up the target prevalence (:func:`prevalence_weights`): the map
  then answers for the named population, not for the enriched sample it was fitted on.
- **Population** (:func:`fit_age_model`): on the frozen pooled features, a ridge regression of
  the age (NIH and COVID-19 collection films with their ages; Kermany films, aged 1–5, at 3)
  and a logistic head telling children's films (Kermany, and NIH films under 18) from adults'
  (NIH and COVID-19 collection films aged 18 or more), both judged out of fold over the same
  patient folds. Its two cut-offs are chosen on those out-of-fold scores: a film is read as a
  child's only where at most :data:`ADULT_MISREAD` of adult NIH films score, and as an adult's
  only below the score that :data:`CHILD_MISREAD` of Kermany films reach; between them it is
  ``unknown``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pneumoscan.labels import LABELS
from pneumoscan.reading import ADULT_AGE, AGE_RANGE, apply_map, logit

#: Share of adult NIH films (out of fold) allowed above the paediatric cut-off.
ADULT_MISREAD = 0.01
#: Share of Kermany films (out of fold) allowed below the adult cut-off.
CHILD_MISREAD = 0.01
#: Nominal age of a Kermany film (the set's children are aged one to five).
KERMANY_AGE = 3.0
METHODS = ("platt", "isotonic")


def prevalence_weights(y: np.ndarray, target: float | None) -> np.ndarray:
    """Per-film weights under which the positives of ``y`` (0/1) make up ``target`` of the
    weight (importance weights for a prior shift); ones when ``target`` is None."""
    y = np.asarray(y, float)
    if target is None:
        return np.ones_like(y)
    share = y.mean()
    if share in (0.0, 1.0):
        return np.ones_like(y)
    return np.where(y == 1, target / share, (1 - target) / (1 - share))


def fit_map(p: np.ndarray, y: np.ndarray, w: np.ndarray, method: str) -> dict[str, Any]:
    """One label's calibration map from raw probabilities ``p``, truths ``y`` and film weights."""
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        fit = LogisticRegression(C=1e4, max_iter=1000).fit(logit(p)[:, None], y, sample_weight=w)
        return {"method": "platt", "a": round(float(fit.coef_[0, 0]), 6), "b": round(float(fit.intercept_[0]), 6)}
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=1e-4, y_max=1 - 1e-4, out_of_bounds="clip").fit(p, y, sample_weight=w)
        return {"method": "isotonic", "x": [round(float(v), 6) for v in iso.X_thresholds_],
                "y": [round(float(v), 6) for v in iso.y_thresholds_]}
    raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")


def weighted_log_loss(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.average(y * np.log(p) + (1 - y) * np.log1p(-p), weights=w))


def cross_fitted(p: np.ndarray, y: np.ndarray, folds: np.ndarray, method: str, target: float | None) -> np.ndarray:
    """Each film's calibrated probability from a map fitted on the other folds' films."""
    out = np.full(len(p), np.nan)
    for f in np.unique(folds):
        held = folds == f
        if len(np.unique(y[~held])) < 2:
            continue
        spec = fit_map(p[~held], y[~held], prevalence_weights(y[~held], target), method)
        out[held] = apply_map(p[held], spec)
    return out


def calibration_figures(p: np.ndarray, y: np.ndarray, target: float | None) -> dict[str, float]:
    """Log-loss, ECE (10 bins) and Brier score at the target prevalence."""
    from pneumoscan.training.metrics import calibration

    w = prevalence_weights(y, target)
    keep = ~np.isnan(p)
    return {"log_loss": round(weighted_log_loss(p[keep], y[keep], w[keep]), 4),
            "ece": round(calibration(y[keep], p[keep], weights=w[keep])[0], 4),
            "brier": round(float(np.average((p[keep] - y[keep]) ** 2, weights=w[keep])), 4)}


def choose_calibration(p: np.ndarray, y: np.ndarray, folds: np.ndarray, target: float | None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One label's map (fitted on every film) by the method with the lower cross-fitted log-loss,
    and the evidence: each method's out-of-fold log-loss, ECE and Brier score, and the raw
    scores' own, all at the target prevalence."""
    known = ~np.isnan(y) & ~np.isnan(p)
    p, y, folds = np.asarray(p, float)[known], np.asarray(y, float)[known], folds[known]
    evidence: dict[str, Any] = {"films": len(y), "positives": int(y.sum()),
                                "sample_prevalence": round(float(y.mean()), 4),
                                "target_prevalence": target, "uncalibrated": calibration_figures(p, y, target)}
    for method in METHODS:
        evidence[method] = calibration_figures(cross_fitted(p, y, folds, method, target), y, target)
    best = min(METHODS, key=lambda m: evidence[m]["log_loss"])
    evidence["chosen"] = best
    return fit_map(p, y, prevalence_weights(y, target), best), evidence


def population_calibration(oof: np.ndarray, labels: np.ndarray, folds: np.ndarray, rows: np.ndarray,
                           assessed: list[str], prevalence: dict[str, float] | None
                           ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Maps and evidence for the ``assessed`` labels over the films ``rows`` (a boolean mask),
    each at ``prevalence[label]`` (None: the sample's own)."""
    maps, evidence = {}, {}
    for label in assessed:
        j = LABELS.index(label)
        target = None if prevalence is None else prevalence[label]
        maps[label], evidence[label] = choose_calibration(oof[rows, j], labels[rows, j], folds[rows], target)
        maps[label]["prevalence"] = target if target is not None else evidence[label]["sample_prevalence"]
    return maps, evidence


def assess_population(oof: np.ndarray, labels: np.ndarray, sources: np.ndarray, rows: np.ndarray,
                      group: str, method: str, target: float | None) -> dict[str, dict[str, Any]]:
    """The assessment rule of :func:`pneumoscan.training.evaluate.assess_labels`, applied to the
    films of one population (``rows``)."""
    from pneumoscan.training.tables import assess_labels

    return assess_labels(labels[rows], oof[rows], sources[rows], labels[rows], sources[rows],
                         method=method, target=target, group=group)


def _ridge_age(x: np.ndarray, age: np.ndarray, alpha: float):
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x, age)


def _child_head(x: np.ndarray, child: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced")).fit(x, child)


def _raw_linear(pipe) -> tuple[np.ndarray, float]:
    """(w, b) on the raw features of a StandardScaler → linear model pipeline."""
    scaler, model = pipe[0], pipe[-1]
    coef = np.ravel(model.coef_) / scaler.scale_
    intercept = float(np.ravel([model.intercept_])[0] - coef @ scaler.mean_)
    return coef, intercept


def fit_age_model(x: np.ndarray, ages: np.ndarray, sources: np.ndarray, folds: np.ndarray, *,
                  alpha: float = 100.0, c: float = 1.0, progress=print) -> dict[str, Any]:
    """The ``age_model`` section (age regression and paediatric head on raw pooled features, the
    two cut-offs), its out-of-fold evidence inside. ``ages``: years, NaN where unknown."""
    from pneumoscan.training.metrics import auc_ci

    kermany = sources == "kermany"
    target_age = np.where(kermany, KERMANY_AGE, ages)
    with_age = ~np.isnan(target_age)
    child = np.where(kermany | (ages < ADULT_AGE), 1.0, np.where(ages >= ADULT_AGE, 0.0, np.nan))
    with_group = ~np.isnan(child)
    age_oof, child_oof = np.full(len(x), np.nan), np.full(len(x), np.nan)
    for f in np.unique(folds):
        held, rest = folds == f, folds != f
        age_oof[held] = _ridge_age(x[rest & with_age], target_age[rest & with_age], alpha).predict(x[held])
        child_oof[held] = _child_head(x[rest & with_group], child[rest & with_group], c).predict_proba(x[held])[:, 1]
        progress(f"age model: fold {f + 1}/{len(np.unique(folds))} scored")
    age_oof = np.clip(age_oof, *AGE_RANGE)
    nih = np.isin(sources, ("nih", "nihmasked"))
    adult_nih = nih & (ages >= ADULT_AGE)
    paediatric_at = float(np.quantile(child_oof[adult_nih], 1 - ADULT_MISREAD))
    adult_below = min(float(np.quantile(child_oof[kermany], CHILD_MISREAD)), paediatric_at)

    def read(scores: np.ndarray) -> dict[str, float]:
        return {"paediatric": round(float((scores >= paediatric_at).mean()), 4),
                "adult": round(float((scores < adult_below).mean()), 4),
                "unknown": round(float(((scores >= adult_below) & (scores < paediatric_at)).mean()), 4)}

    originals = sources == "nih"
    evidence = {
        "protocol": f"out of fold, {len(np.unique(folds))} folds grouped by patient (the cross-validation's)",
        "age_mae_years": {
            "adult_nih_originals": round(float(np.abs(age_oof - ages)[originals & (ages >= ADULT_AGE)].mean()), 2),
            "adult_nih_originals_films": int((originals & (ages >= ADULT_AGE)).sum()),
            "adult_nih_all": round(float(np.abs(age_oof - ages)[adult_nih].mean()), 2),
            "adult_nih_all_films": int(adult_nih.sum())},
        "paediatric_vs_adult_auc": {
            "kermany_vs_adult_nih": auc_ci(np.r_[np.ones(kermany.sum()), np.zeros(adult_nih.sum())],
                                           np.r_[child_oof[kermany], child_oof[adult_nih]]),
            "nih_under_18_vs_adult_nih": auc_ci((ages[nih & with_group] < ADULT_AGE).astype(float),
                                                child_oof[nih & with_group])},
        "read_as": {"kermany": read(child_oof[kermany]), "adult_nih_originals": read(child_oof[originals & (ages >= ADULT_AGE)]),
                    "adult_nih_all": read(child_oof[adult_nih]),
                    "nih_under_18": read(child_oof[nih & (ages < ADULT_AGE)]),
                    **{name: read(child_oof[sources == name]) for name in ("shenzhen", "montgomery", "covid", "actualmed")
                       if (sources == name).any()}},
        "films": {"with_age": int(with_age.sum()), "with_group": int(with_group.sum()),
                  "kermany": int(kermany.sum()), "nih_under_18": int((nih & (ages < ADULT_AGE)).sum())},
    }
    progress("age model: fitting on every film …")
    w_age, b_age = _raw_linear(_ridge_age(x[with_age], target_age[with_age], alpha))
    w_child, b_child = _raw_linear(_child_head(x[with_group], child[with_group], c))
    model = {
        "reads": "the classifier's pooled features (global average of the last block, post-ReLU)",
        "age": {"w": [round(float(v), 7) for v in w_age], "b": round(b_age, 5), "method": f"ridge (alpha {alpha:g}, "
                f"standardised features), NIH and COVID-19 collection ages, Kermany films at {KERMANY_AGE:g} y"},
        "paediatric": {"w": [round(float(v), 7) for v in w_child], "b": round(b_child, 5),
                       "paediatric_at": round(paediatric_at, 5), "adult_below": round(adult_below, 5),
                       "method": f"logistic (C {c:g}, balanced classes): Kermany and NIH films under 18 against "
                                 "NIH and COVID-19 collection films aged 18 or more",
                       "cut_offs": f"paediatric at or above the score {100 * (1 - ADULT_MISREAD):g} % of adult NIH "
                                   f"films stay below, adult below the score {100 * CHILD_MISREAD:g} % of Kermany "
                                   "films fall under (out of fold); unknown between"},
        "evidence": evidence,
    }
    return model


#: Where each population's films come from in the cross-validation, and what it is calibrated for.
ADULT_CALIBRATION_SOURCE = "nih"
PAEDIATRIC_POPULATION = ("paediatric frontal chest films like Kermany's (Guangzhou, children aged 1–5) at that "
                         "set's own prevalence (its training split: 74 % pneumonia)")


def fit_reading(classifier, x: np.ndarray, table, oof: np.ndarray, folds: np.ndarray, *, method: str = "specificity",
                target: float | None = 0.9, progress=print) -> dict[str, Any]:
    """Add the ``reading`` section to a cross-validated classifier (in place) and return it:
    adult calibration maps (on the NIH originals' out-of-fold scores, at NIH adult prevalence),
    the paediatric assessment, thresholds and calibration (on the Kermany films' out-of-fold
    scores), and the age model (:func:`fit_age_model`). ``table``: the cache rows behind ``x``
    and ``oof`` (raw labels, source, age)."""
    from pneumoscan.reading import NIH_ADULT_POPULATION, NIH_ADULT_PREVALENCE
    from pneumoscan.training.tables import MIN_ADULT_TRAIN_POSITIVES

    labels = table[list(LABELS)].to_numpy(np.float64)
    sources = table["source"].astype(str).to_numpy()
    ages = table["age"].to_numpy(np.float64) if "age" in table else np.full(len(table), np.nan)
    adult_rows = (sources == ADULT_CALIBRATION_SOURCE) & ~(ages < 18)
    progress(f"calibrating the adult reading on {int(adult_rows.sum())} {ADULT_CALIBRATION_SOURCE} films out of fold …")
    adult_maps, adult_evidence = population_calibration(oof, labels, folds, adult_rows, classifier.assessed_labels,
                                                        NIH_ADULT_PREVALENCE)
    child_rows = sources == "kermany"
    paediatric = assess_population(oof, labels, sources, child_rows, "paediatric", method, target) \
        if child_rows.any() else {label: {"assessed": False, "threshold": None, "reason": "no paediatric films"}
                                  for label in LABELS}
    child_assessed = [label for label in LABELS if paediatric[label]["assessed"]]
    progress(f"paediatric reading: {', '.join(child_assessed) or 'nothing'} assessed on {int(child_rows.sum())} films")
    child_maps, child_evidence = population_calibration(oof, labels, folds, child_rows, child_assessed, None)
    age_model = fit_age_model(x, ages, sources, folds, progress=progress)
    from pneumoscan.training.normal_rule import normal_rules  # it reads this module's calibration weights

    adult_normal, child_normal = normal_rules(oof, labels, folds, sources, ages, classifier.meta["assessment"],
                                              paediatric, progress)
    scores = head_scores(classifier, x)
    reading = {
        "populations": {
            "adult": {"calibrated_for": NIH_ADULT_POPULATION, "calibration": adult_maps,
                      "calibration_evidence": adult_evidence,
                      "calibrated_on": f"out-of-fold probabilities of the {ADULT_CALIBRATION_SOURCE} films aged 18 "
                                       "or more, weighted to NIH adult prevalence",
                      "assessment": "the model's top-level assessment", "normal": adult_normal},
            "paediatric": {"calibrated_for": PAEDIATRIC_POPULATION, "calibration": child_maps,
                           "calibration_evidence": child_evidence, "assessment": paediatric,
                           "calibrated_on": "out-of-fold probabilities of the Kermany films at their own prevalence",
                           "rule": f"as the adult one, inside the paediatric films (≥ {MIN_ADULT_TRAIN_POSITIVES} "
                                   f"training positives, {method} {target} out of fold)",
                           **({"normal": child_normal} if child_normal else {})},
        },
        "age_model": age_model,
        "rank": rank_section(scores, sources),
    }
    classifier.meta["reading"] = reading
    classifier._read_assessment()
    return reading


def head_scores(classifier, x: np.ndarray) -> np.ndarray:
    """The classifier's own raw probabilities from pooled features (its head, in float32)."""
    import torch

    head, _ = classifier._head_modules()
    with torch.no_grad():
        return torch.sigmoid(head.float().eval()(torch.as_tensor(x, dtype=torch.float32))).numpy()


def rank_section(scores: np.ndarray, sources: np.ndarray) -> dict[str, Any]:
    """``reading.rank``: per label, the knots that turn a raw score into its percentile among the
    development films (:func:`pneumoscan.reading.rank_knots`)."""
    from pneumoscan.reading import rank_knots

    counts = ", ".join(f"{name} {int((sources == name).sum()):,}" for name in sorted(set(sources)))
    return {"reference": f"the raw scores of this model's head on its {len(scores):,} development films, every "
                         f"source and population together ({counts})",
            "meaning": "percentile (0-100) of the film's raw score among those films; the same scale for every "
                       "population, for sorting and ROC curves, not a probability",
            "knots": {label: rank_knots(scores[:, j]) for j, label in enumerate(LABELS)}}
