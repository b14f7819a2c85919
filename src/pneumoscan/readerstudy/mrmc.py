"""Multi-reader multi-case (MRMC) ROC analysis: readers with and without PneumoScan, analysed as
the FDA's CADe guidance and the literature do.

The Obuchowski–Rockette (OR) model with Hillis's denominator degrees of freedom (Hillis 2007),
on empirical (trapezoidal, Wilcoxon) AUCs, covariances of the reader AUCs estimated by the
jackknife over cases (or by DeLong's method), in the three analyses of the Iowa OR-DBM MRMC
program: random readers and random cases (RRRC), fixed readers and random cases (FRRC), random
readers and fixed cases (RRFC). ``tests/test_mrmc.py`` checks every figure against the program's
own output on the Van Dyke et al. (1993) data set (``../shared/data/mrmc``) to 4 decimals.

Small public face: :func:`~pneumoscan.readerstudy.ratings.read_ratings` (a ratings CSV, an Iowa
``.lrc`` or an iMRMC ``.imrmc`` file, told apart by content) → :class:`Ratings` → :func:`analyse` →
a plain dict (what ``study.json`` holds); ``write_lrc`` and ``write_imrmc`` hand the data to a
statistician.

References: Obuchowski & Rockette, Commun Stat Simul Comput 1995; Hillis, Obuchowski, Schartz &
Berbaum, Stat Med 2005; Hillis, Stat Med 2007; DeLong, DeLong & Clarke-Pearson, Biometrics 1988.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pneumoscan.readerstudy.ratings import Ratings, RatingsError


def _psi(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mann–Whitney kernel per (treatment, reader): N0×N1 matrices of 1 / 0.5 / 0."""
    normal, abnormal = scores[..., truth == 0], scores[..., truth == 1]
    diff = abnormal[..., None, :] - normal[..., :, None]
    return (diff > 0) + 0.5 * (diff == 0)


def trapezoidal_auc(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Empirical AUC (ties count one half) of every leading index of ``scores`` (..., cases)."""
    return _psi(np.asarray(scores, float), np.asarray(truth)).mean(axis=(-2, -1))


def jackknife_aucs(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """AUCs with each case left out in turn: (..., cases), in case order."""
    psi = _psi(scores, truth)
    n0, n1 = psi.shape[-2:]
    total = psi.sum(axis=(-2, -1))
    out = np.empty(scores.shape, float)
    out[..., truth == 0] = (total[..., None] - psi.sum(axis=-1)) / ((n0 - 1) * n1)
    out[..., truth == 1] = (total[..., None] - psi.sum(axis=-2)) / (n0 * (n1 - 1))
    return out


def jackknife_covariance(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(t·r)×(t·r) covariance of the reader AUCs by the jackknife over cases, (c−1)/c Σ…."""
    t, r, c = scores.shape
    pseudo = jackknife_aucs(scores, truth).reshape(t * r, c)
    dev = pseudo - pseudo.mean(axis=1, keepdims=True)
    return (c - 1) / c * dev @ dev.T


def delong_covariance(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(t·r)×(t·r) covariance of the reader AUCs by DeLong's structural components."""
    t, r, _ = scores.shape
    psi = _psi(scores, truth).reshape(t * r, *_psi(scores[:1, :1], truth).shape[-2:])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=2)  # per abnormal case, per normal case
    n1, n0 = v10.shape[1], v01.shape[1]
    return np.cov(v10) / n1 + np.cov(v01) / n0


@dataclass(frozen=True)
class _Covariances:
    var: float
    cov1: float
    cov2: float
    cov3: float


def _average_covariances(cov: np.ndarray, t: int, r: int, treatments=None, readers=None) -> _Covariances:
    """OR's Var(error), Cov1 (same reader, other treatment), Cov2 (same treatment, other reader)
    and Cov3 (both differ), averaged over the treatments and readers given (default: all)."""
    treatments = range(t) if treatments is None else treatments
    readers = range(r) if readers is None else readers
    sums: dict[str, list[float]] = {"var": [], "cov1": [], "cov2": [], "cov3": []}
    for i in range(t):
        for j in range(r):
            for i2 in range(t):
                for j2 in range(r):
                    if not (i in treatments and i2 in treatments and j in readers and j2 in readers):
                        continue
                    key = ("var" if i == i2 and j == j2 else "cov1" if j == j2 else "cov2" if i == i2 else "cov3")
                    sums[key].append(cov[i * r + j, i2 * r + j2])
    mean = {k: float(np.mean(v)) if v else 0.0 for k, v in sums.items()}
    return _Covariances(mean["var"], mean["cov1"], mean["cov2"], mean["cov3"])


# --- the analysis -------------------------------------------------------------------------------

def _ci(estimate: float, stderr: float, quantile: float) -> list[float]:
    return [estimate - quantile * stderr, estimate + quantile * stderr]


@dataclass
class _Anova:
    """What every test of :func:`analyse` reads: the reader AUCs (t×r), the averaged OR
    covariances, the mean squares, and the critical values' level."""

    ratings: Ratings
    auc: np.ndarray
    cov: np.ndarray
    pooled: Any
    mean_t: np.ndarray
    ms_t: float
    ms_r: float
    ms_tr: float
    ms_r_each: list[float]
    alpha: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.auc.shape


def _anova(ratings: Ratings, covariance: str, alpha: float) -> _Anova:
    """Reader AUCs, their OR covariances (``jackknife`` or ``delong``) and the ANOVA mean squares."""
    scores, truth = ratings.scores, ratings.truth
    t, r, _ = scores.shape
    auc = trapezoidal_auc(scores, truth)  # t×r
    cov = {"jackknife": jackknife_covariance, "delong": delong_covariance}[covariance](scores, truth)
    mean_t, mean_r, grand = auc.mean(axis=1), auc.mean(axis=0), auc.mean()
    return _Anova(ratings, auc, cov, _average_covariances(cov, t, r), mean_t,
                  ms_t=r * ((mean_t - grand) ** 2).sum() / (t - 1),
                  ms_r=t * ((mean_r - grand) ** 2).sum() / (r - 1),
                  ms_tr=((auc - mean_t[:, None] - mean_r[None, :] + grand) ** 2).sum() / ((t - 1) * (r - 1)),
                  ms_r_each=[((auc[i] - mean_t[i]) ** 2).sum() / (r - 1) for i in range(t)], alpha=alpha)


def _global_tests(a: _Anova) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The test of equal treatments for random readers and cases (Hillis 2007), fixed readers, and
    fixed cases; refused when the ratings leave no error term."""
    from scipy import stats

    t, r = a.shape
    p = a.pooled
    den = a.ms_tr + r * max(p.cov2 - p.cov3, 0.0)
    if not (p.var > 0 and a.ms_tr > 0 and den > 0):
        # all ratings tied, or readers' AUCs that agree exactly across treatments: no error term
        raise RatingsError("these ratings cannot be analysed: the AUCs do not vary between readers and treatments "
                           f"(error variance {p.var:.3g}, treatment × reader mean square {a.ms_tr:.3g}), for example "
                           "because every rating is the same")
    ddf = den ** 2 / (a.ms_tr ** 2 / ((t - 1) * (r - 1)))
    f = a.ms_t / den
    rrrc = {"F": f, "ndf": t - 1, "ddf": ddf, "p": float(stats.f.sf(f, t - 1, ddf)), "error_term": den,
            "pairs": [], "single": []}
    den_fr = p.var - p.cov1 + (r - 1) * max(p.cov2 - p.cov3, 0.0)
    chi2 = (t - 1) * a.ms_t / den_fr
    frrc = {"chi2": chi2, "df": t - 1, "p": float(stats.chi2.sf(chi2, t - 1)), "pairs": [], "single": [], "readers": [],
            "error_term": den_fr}
    f_fc = a.ms_t / a.ms_tr
    rrfc = {"F": f_fc, "ndf": t - 1, "ddf": (t - 1) * (r - 1), "p": float(stats.f.sf(f_fc, t - 1, (t - 1) * (r - 1))),
            "pairs": [], "single": []}
    return rrrc, frrc, rrfc


def _pairs(a: _Anova, rrrc: dict[str, Any], frrc: dict[str, Any], rrfc: dict[str, Any]) -> None:
    """Each pair of treatments' difference under the three analyses, and per reader (fixed readers)."""
    from scipy import stats

    t, r = a.shape
    names, z = a.ratings.treatments, stats.norm.ppf(1 - a.alpha / 2)
    for i in range(t):
        for k in range(i + 1, t):
            pair, diff = [names[i], names[k]], a.mean_t[i] - a.mean_t[k]
            se, ddf = np.sqrt(2 / r * rrrc["error_term"]), rrrc["ddf"]
            rrrc["pairs"].append({"pair": pair, "difference": diff, "stderr": se, "df": ddf, "t": diff / se,
                                  "p": float(2 * stats.t.sf(abs(diff / se), ddf)),
                                  "ci": _ci(diff, se, stats.t.ppf(1 - a.alpha / 2, ddf))})
            se = np.sqrt(2 / r * frrc["error_term"])
            frrc["pairs"].append({"pair": pair, "difference": diff, "stderr": se, "z": diff / se,
                                  "p": float(2 * stats.norm.sf(abs(diff / se))), "ci": _ci(diff, se, z)})
            se, df = np.sqrt(2 / r * a.ms_tr), (t - 1) * (r - 1)
            rrfc["pairs"].append({"pair": pair, "difference": diff, "stderr": se, "df": df, "t": diff / se,
                                  "p": float(2 * stats.t.sf(abs(diff / se), df)),
                                  "ci": _ci(diff, se, stats.t.ppf(1 - a.alpha / 2, df))})
            for j in range(r):
                own = _average_covariances(a.cov, t, r, treatments=[i, k], readers=[j])
                d = a.auc[i, j] - a.auc[k, j]
                se = np.sqrt(2 * (own.var - own.cov1))
                frrc["readers"].append({"reader": a.ratings.readers[j], "pair": pair, "difference": d, "stderr": se,
                                        "z": d / se, "p": float(2 * stats.norm.sf(abs(d / se))), "ci": _ci(d, se, z),
                                        "var_error": own.var, "cov1": own.cov1})


def _singles(a: _Anova, rrrc: dict[str, Any], frrc: dict[str, Any], rrfc: dict[str, Any]) -> None:
    """Each treatment's AUC with its interval under the three analyses."""
    from scipy import stats

    t, r = a.shape
    z = stats.norm.ppf(1 - a.alpha / 2)
    for i in range(t):
        name, m, own = a.ratings.treatments[i], a.mean_t[i], _average_covariances(a.cov, t, r, treatments=[i])
        den_i = a.ms_r_each[i] + r * max(own.cov2, 0.0)
        se, df = np.sqrt(den_i / r), den_i ** 2 / (a.ms_r_each[i] ** 2 / (r - 1))
        rrrc["single"].append({"treatment": name, "auc": m, "stderr": se, "df": df, "cov2": own.cov2,
                               "ci": _ci(m, se, stats.t.ppf(1 - a.alpha / 2, df))})
        se = np.sqrt((own.var + (r - 1) * max(own.cov2, 0.0)) / r)
        frrc["single"].append({"treatment": name, "auc": m, "stderr": se, "var_error": own.var, "cov2": own.cov2,
                               "ci": _ci(m, se, z)})
        se = np.sqrt(a.ms_r_each[i] / r)
        rrfc["single"].append({"treatment": name, "auc": m, "ms_r": a.ms_r_each[i], "stderr": se, "df": r - 1,
                               "ci": _ci(m, se, stats.t.ppf(1 - a.alpha / 2, r - 1))})


def analyse(ratings: Ratings, *, covariance: str = "jackknife", alpha: float = 0.05) -> dict[str, Any]:
    """The OR analysis of every pair of treatments (the first pair's figures also at the top
    level: ``auc``, ``rrrc``, ``frrc``, ``rrfc``), reader AUCs, ANOVA, variance components."""
    a = _anova(ratings, covariance, alpha)
    rrrc, frrc, rrfc = _global_tests(a)
    _pairs(a, rrrc, frrc, rrfc)
    _singles(a, rrrc, frrc, rrfc)
    frrc.pop("error_term")
    t, r = a.shape
    c = ratings.scores.shape[2]
    p = a.pooled
    var_tr = a.ms_tr - p.var + p.cov1 + p.cov2 - p.cov3
    var_r = (a.ms_r - var_tr - p.var - (t - 1) * p.cov1 + p.cov2 + (t - 1) * p.cov3) / t
    names = ratings.treatments
    result = {
        "design": {"treatments": names, "readers": ratings.readers, "cases": c,
                   "normal": int((ratings.truth == 0).sum()), "abnormal": int((ratings.truth == 1).sum()),
                   "auc": "empirical (trapezoidal / Wilcoxon)", "covariance": covariance},
        "reader_auc": {names[i]: {ratings.readers[j]: a.auc[i, j] for j in range(r)} for i in range(t)},
        "auc": {names[i]: a.mean_t[i] for i in range(t)},
        "anova": {"T": {"SS": a.ms_t * (t - 1), "df": t - 1, "MS": a.ms_t},
                  "R": {"SS": a.ms_r * (r - 1), "df": r - 1, "MS": a.ms_r},
                  "TR": {"SS": a.ms_tr * (t - 1) * (r - 1), "df": (t - 1) * (r - 1), "MS": a.ms_tr},
                  "R_within_treatment": {names[i]: a.ms_r_each[i] for i in range(t)}},
        "or_components": {"var_r": var_r, "var_tr": var_tr, "cov1": p.cov1, "cov2": p.cov2, "cov3": p.cov3,
                          "var_error": p.var, "corr1": p.cov1 / p.var, "corr2": p.cov2 / p.var, "corr3": p.cov3 / p.var},
        "dbm_components": {"var_r": var_r, "var_c": c * p.cov3, "var_tr": var_tr, "var_tc": c * (p.cov2 - p.cov3),
                           "var_rc": c * (p.cov1 - p.cov3), "var_trc_error": c * (p.var - p.cov1 - p.cov2 + p.cov3)},
        "rrrc": rrrc, "frrc": frrc, "rrfc": rrfc,
    }
    return _plain(result)


def _plain(value: Any) -> Any:
    """Numpy numbers → floats, recursively (the result is written as JSON)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
