"""When a film may be called "normal" (issue 49): per population, the No Finding operating point
whose negative predictive value reaches :data:`NORMAL_NPV_TARGET` out of fold (Wilson lower bound,
at the population's prevalence), chosen and judged on the cross-validation's out-of-fold scores;
a population where no operating point earns it never gets "normal"."""

from __future__ import annotations

from typing import Any

import numpy as np

from pneumoscan.labels import LABELS
from pneumoscan.training.reading_fit import ADULT_CALIBRATION_SOURCE, prevalence_weights

#: The negative predictive value a "normal" call must reach out of fold (issue 49): of the films
#: called normal, at least this share free of every finding, at the population's stated prevalence.
NORMAL_NPV_TARGET = 0.90
#: A normal rule needs at least this many films called normal among those it is chosen on.
MIN_CALLED_NORMAL = 20


def _wilson_lower(share: float, n: float, z: float = 1.645) -> float:
    """The one-sided 95 % Wilson lower bound of a share seen in ``n`` (effective) films."""
    if n <= 0:
        return 0.0
    centre = share + z * z / (2 * n)
    spread = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return float((centre - spread) / (1 + z * z / n))


def _normal_threshold(nf: np.ndarray, diseased: np.ndarray, free: np.ndarray, w: np.ndarray,
                      target: float) -> float | None:
    """The lowest No Finding score (most films decided) at which the films called normal (score at
    or above it, no finding called) are free of findings (weighted) with a one-sided 95 % lower
    bound (Wilson, effective sample size of the weights) of at least ``target``, with at least
    :data:`MIN_CALLED_NORMAL` of them; None when no score gets there. The bound, not the point
    estimate, so that the NPV on films the choice never saw still reaches the target."""
    candidates = np.unique(nf[~diseased])
    for t in candidates:
        called = (nf >= t) & ~diseased
        if called.sum() < MIN_CALLED_NORMAL:
            return None
        ww = w[called]
        n_eff = ww.sum() ** 2 / (ww ** 2).sum()
        if _wilson_lower(float(np.average(free[called], weights=ww)), n_eff) >= target:
            return float(t)
    return None


def verdict_figures(nf: np.ndarray, diseased: np.ndarray, free: np.ndarray, w: np.ndarray,
                    threshold: np.ndarray | float | None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Each verdict's share of films and its predictive value at weights ``w`` (the stated
    prevalence), with percentile bootstrap intervals (films resampled): ``normal`` NPV (free of
    findings among films called normal), ``abnormal`` PPV (with a finding among films called
    abnormal), and the share left undecided. ``threshold`` per film (out of fold) or one value."""
    t = np.full(len(nf), np.inf) if threshold is None else np.broadcast_to(np.asarray(threshold, float), nf.shape)
    normal = (nf >= t) & ~diseased
    rng = np.random.default_rng(seed)

    def figures(rows: np.ndarray) -> tuple[float, float, float, float, float]:
        ww, fr, no, di = w[rows], free[rows], normal[rows], diseased[rows]
        total = ww.sum()
        npv = np.average(fr[no], weights=ww[no]) if no.any() else np.nan
        ppv = np.average(1 - fr[di], weights=ww[di]) if di.any() else np.nan
        return npv, ppv, ww[no].sum() / total, ww[di].sum() / total, ww[~no & ~di].sum() / total

    point = figures(np.arange(len(nf)))
    draws = np.array([figures(rng.integers(0, len(nf), len(nf))) for _ in range(n_boot)])

    def ci(k: int) -> list[float] | None:
        values = draws[:, k][~np.isnan(draws[:, k])]
        return [round(float(v), 4) for v in np.quantile(values, [0.025, 0.975])] if len(values) else None

    names = ("normal_npv", "abnormal_ppv", "normal_share", "abnormal_share", "undecided_share")
    out: dict[str, Any] = {name: (None if np.isnan(point[k]) else round(float(point[k]), 4))
                           for k, name in enumerate(names)}
    out |= {f"{name}_ci": ci(k) for k, name in enumerate(names) if not np.isnan(point[k])}
    out["films"] = int(len(nf))
    out["called_normal"] = int(normal.sum())
    return out


def fit_normal_rule(nf: np.ndarray, diseased: np.ndarray, free: np.ndarray, folds: np.ndarray,
                    prevalence_free: float | None, population: str, truth: str,
                    target: float = NORMAL_NPV_TARGET) -> dict[str, Any]:
    """A population's rule for calling a film normal, judged out of fold: inside each patient
    fold the threshold is chosen on the other folds' films (:func:`_normal_threshold`) and
    applied to the fold's own; those out-of-fold calls give the NPV the rule is kept by. The rule
    (threshold chosen on every film) is kept only when the out-of-fold NPV reaches ``target``;
    otherwise the population is never called normal and the rule says why. ``nf``: raw
    out-of-fold No Finding scores; ``diseased``: an assessed finding called (out of fold);
    ``free``: 1 for a film free of findings (``truth`` says which label), weighted to
    ``prevalence_free`` (None: the films' own)."""
    w = prevalence_weights(free, prevalence_free)
    per_film = np.full(len(nf), np.inf)
    for f in np.unique(folds):
        held = folds == f
        t = _normal_threshold(nf[~held], diseased[~held], free[~held], w[~held], target)
        per_film[held] = np.inf if t is None else t
    evidence = verdict_figures(nf, diseased, free, w, per_film)
    chosen = _normal_threshold(nf, diseased, free, w, target)
    at = f"at {100 * prevalence_free:.1f} % films free of findings" if prevalence_free is not None else \
        "at the films' own prevalence"
    npv = evidence["normal_npv"]
    keep = chosen is not None and npv is not None and npv >= target
    rule: dict[str, Any] = {
        "threshold": round(chosen, 6) if keep and chosen is not None else None, "npv_target": target, "population": population,
        "truth": truth, "prevalence_free": prevalence_free,
        "protocol": f"threshold chosen on four patient folds (the lowest whose NPV's one-sided 95 % Wilson lower bound "
                    f"reaches the target), calls judged on the fifth, {at}; NPV = share free of findings among films "
                    "called normal (No Finding at or above the threshold and no finding called)",
        "out_of_fold": evidence,
    }
    if keep:
        rule["npv"] = npv
    else:
        best = "no fold found one" if npv is None else f"best {npv:.2f} on {evidence['called_normal']} films"
        rule["reason"] = (f"no No Finding operating point reaches NPV {target:.2f} out of fold for {population}, "
                          f"{at}; {best}")
    return rule


def normal_rules(oof: np.ndarray, labels: np.ndarray, folds: np.ndarray, sources: np.ndarray, ages: np.ndarray,
                 adult_assessment: dict[str, dict[str, Any]], child_assessment: dict[str, dict[str, Any]],
                 progress=print) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The adult and paediatric normal rules (:func:`fit_normal_rule`) from out-of-fold raw
    scores: adults on the NIH originals aged 18 or more at NIH adult prevalence, children on the
    Kermany films at their own; a finding is "called" at each population's assessed thresholds."""
    from pneumoscan.reading import NIH_ADULT_PREVALENCE

    nf = LABELS.index("No Finding")

    def rule(rows: np.ndarray, assessment: dict[str, dict[str, Any]], prevalence: float | None,
             population: str, truth: str) -> dict[str, Any]:
        diseases = [LABELS.index(lab) for lab in LABELS if lab != "No Finding" and (assessment.get(lab) or {}).get("assessed")]
        limits = np.array([assessment[LABELS[j]]["threshold"] for j in diseases])
        called = (oof[rows][:, diseases] >= limits).any(axis=1) if diseases else np.zeros(int(rows.sum()), bool)
        known = ~np.isnan(labels[rows, nf])
        rule = fit_normal_rule(oof[rows, nf][known], called[known], labels[rows, nf][known], folds[rows][known],
                               prevalence, population, truth)
        # the thresholds its NPV was judged at: a file whose findings' thresholds change drops the rule
        rule["fitted_thresholds"] = {LABELS[j]: float(assessment[LABELS[j]]["threshold"]) for j in diseases}
        return rule

    progress("normal rules: choosing and judging the No Finding operating points out of fold …")
    adult_rows = (sources == ADULT_CALIBRATION_SOURCE) & ~(ages < 18)
    child_rows = sources == "kermany"
    adult = rule(adult_rows, adult_assessment, NIH_ADULT_PREVALENCE["No Finding"],
                 f"adults ({ADULT_CALIBRATION_SOURCE} originals aged 18 or more)",
                 "NIH's No Finding label: none of the 14 findings")
    child = rule(child_rows, child_assessment, None, "children (Kermany)",
                 "Kermany's NORMAL class: no pneumonia") if child_rows.any() else None
    return adult, child
