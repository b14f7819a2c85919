"""Multi-reader multi-case (MRMC) ROC analysis: readers with and without PneumoScan, analysed as
the FDA's CADe guidance and the literature do.

The Obuchowski–Rockette (OR) model with Hillis's denominator degrees of freedom (Hillis 2007),
on empirical (trapezoidal, Wilcoxon) AUCs, covariances of the reader AUCs estimated by the
jackknife over cases (or by DeLong's method), in the three analyses of the Iowa OR-DBM MRMC
program: random readers and random cases (RRRC), fixed readers and random cases (FRRC), random
readers and fixed cases (RRFC). ``tests/test_mrmc.py`` checks every figure against the program's
own output on the Van Dyke et al. (1993) data set (``../shared/data/mrmc``) to 4 decimals.

Small public face: :func:`read_ratings` (a ratings CSV, an Iowa ``.lrc`` or an iMRMC ``.imrmc``
file, told apart by content) → :class:`Ratings` → :func:`analyse` → a plain dict (what
``study.json`` holds); :func:`write_lrc` and :func:`write_imrmc` hand the data to a statistician.

References: Obuchowski & Rockette, Commun Stat Simul Comput 1995; Hillis, Obuchowski, Schartz &
Berbaum, Stat Med 2005; Hillis, Stat Med 2007; DeLong, DeLong & Clarke-Pearson, Biometrics 1988.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.errors import PneumoScanError


class RatingsError(PneumoScanError, ValueError):
    """A ratings file that cannot be analysed; the message says why."""


#: Leaving one case out must leave an AUC: at least this many cases of each truth.
MIN_CASES_PER_CLASS = 2


def _truth_value(value: str | float, case: str) -> int:
    """A case's truth, 0 or 1 (written as a number), or a refusal that names the case."""
    try:
        number = float(value)
    except ValueError:
        raise RatingsError(f"case {case!r}: truth {value!r} is not 0 or 1") from None
    if number not in (0.0, 1.0):
        raise RatingsError(f"case {case!r}: truth {value!r} is not 0 or 1")
    return int(number)


def _score_value(value: str | float, where: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise RatingsError(f"{where}: score {value!r} is not a number") from None
    if not np.isfinite(number):
        raise RatingsError(f"{where}: score {value!r} is not a finite number")
    return number


@dataclass
class Ratings:
    """``scores[t, r, c]``: treatment t's rating by reader r of case c (higher = more likely
    abnormal); ``truth[c]`` 0 / 1; the names of treatments, readers and cases."""

    scores: np.ndarray
    truth: np.ndarray
    treatments: list[str]
    readers: list[str]
    cases: list[str]
    title: str = ""

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, float)
        self.truth = np.asarray(self.truth, int)
        t, r, c = self.scores.shape
        if (t, r, c) != (len(self.treatments), len(self.readers), len(self.cases)) or len(self.truth) != c:
            raise RatingsError("scores, truth and names disagree in size")
        if t < 2 or r < 2:
            raise RatingsError(f"an MRMC analysis needs at least 2 treatments and 2 readers (got {t} and {r})")
        if not set(np.unique(self.truth)) == {0, 1}:
            raise RatingsError("the cases must include both normal (truth 0) and abnormal (truth 1) ones")
        few = {name: int((self.truth == k).sum()) for k, name in ((0, "normal"), (1, "abnormal"))}
        if min(few.values()) < MIN_CASES_PER_CLASS:
            raise RatingsError(f"too few cases to analyse: {few['normal']} normal and {few['abnormal']} abnormal "
                               f"(the jackknife needs at least {MIN_CASES_PER_CLASS} of each)")
        if not np.isfinite(self.scores).all():
            raise RatingsError("every reader must rate every case under every treatment (a fully crossed design)")


# --- reading and writing the three formats --------------------------------------------------------

def read_ratings(path: str | Path) -> Ratings:
    """A ratings CSV (columns reader, case, treatment, score, truth), an Iowa ``.lrc`` or an iMRMC
    ``.imrmc`` file, told apart by their content."""
    text = Path(path).read_text(errors="replace")
    try:
        if "BEGIN DATA:" in text:
            return _read_imrmc(text)
        first = text.lstrip().splitlines()[0] if text.strip() else ""
        if {"reader", "case", "treatment", "score"} <= {h.strip().lower() for h in first.split(",")}:
            return _read_csv(text)
        if "*" in text and "#" in text:
            return _read_lrc(text)
    except (IndexError, KeyError, TypeError) as exc:  # a file cut short or of another layout
        raise RatingsError(f"{path}: not a readable ratings file (it ends or breaks where a rating was expected: "
                           f"{type(exc).__name__})") from None
    raise RatingsError(f"{path}: not a ratings CSV (reader, case, treatment, score, truth), an Iowa .lrc "
                       f"or an iMRMC .imrmc file")


def _assemble(rows: list[tuple[str, str, str, float]], truth: dict[str, int], title: str) -> Ratings:
    """The dense array of a fully crossed design; everything that would make it wrong (a case
    without truth, a cell rated twice, a cell missing) is refused before it is allocated, so a
    small file cannot ask for gigabytes."""
    treatments = list(dict.fromkeys(t for _, _, t, _ in rows))
    readers = list(dict.fromkeys(r for r, _, _, _ in rows))
    cases = list(truth)
    seen: set[tuple[str, str, str]] = set()
    for reader, case, treatment, _ in rows:
        if case not in truth:
            raise RatingsError(f"case {case!r} is rated but has no truth")
        if (reader, case, treatment) in seen:
            raise RatingsError(f"reader {reader!r} rated case {case!r} twice under {treatment!r}: one rating per "
                               f"reader, case and treatment (a correction replaces, it is not a second row)")
        seen.add((reader, case, treatment))
    if len(rows) != len(treatments) * len(readers) * len(cases):
        raise RatingsError(f"every reader must rate every case under every treatment (a fully crossed design): "
                           f"{len(rows):,} ratings for {len(treatments)} treatments × {len(readers)} readers × "
                           f"{len(cases)} cases")
    index = {c: k for k, c in enumerate(cases)}
    t_index, r_index = {t: k for k, t in enumerate(treatments)}, {r: k for k, r in enumerate(readers)}
    scores = np.full((len(treatments), len(readers), len(cases)), np.nan)
    for reader, case, treatment, score in rows:
        scores[t_index[treatment], r_index[reader], index[case]] = score
    return Ratings(scores, np.array([truth[c] for c in cases]), treatments, readers, cases, title)


def _read_imrmc(text: str) -> Ratings:
    head, _, body = text.partition("BEGIN DATA:")
    title = head.strip().splitlines()[0] if head.strip() else ""
    rows, truth = [], {}
    for line in body.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            raise RatingsError(f"iMRMC data line {line!r}: expected reader,case,modality,score")
        reader, case, modality, value = parts
        if reader == "-1" and modality.lower() == "truth":
            truth[case] = _truth_value(value, case)
        else:
            rows.append((reader, case, modality, _score_value(value, f"reader {reader!r}, case {case!r}")))
    return _assemble(rows, truth, title)


def _read_csv(text: str) -> Ratings:
    rows, truth = [], {}
    for row in csv.DictReader(io.StringIO(text)):
        row = {k.strip().lower(): (v or "").strip() for k, v in row.items()}
        rows.append((row["reader"], row["case"], row["treatment"],
                     _score_value(row["score"], f"reader {row['reader']!r}, case {row['case']!r}")))
        if row.get("truth", "") != "":
            value = _truth_value(row["truth"], row["case"])
            if truth.setdefault(row["case"], value) != value:
                raise RatingsError(f"case {row['case']!r} has two truths")
    return _assemble(rows, truth, "")


def _read_lrc(text: str) -> Ratings:
    """Iowa LABMRMC format: a title, then per reader its name, (the first time) the treatment names
    and their rating directions, the normal cases' rows (one column per treatment), ``*``, the
    abnormal cases' rows, ``*``; ``#`` ends the file."""
    lines = [line.rstrip() for line in text.splitlines()]
    title, k = lines[0].strip(), 1
    treatments: list[str] = []
    rows: list[tuple[str, str, str, float]] = []
    truth: dict[str, int] = {}
    while k < len(lines) and lines[k].strip() != "#":
        reader = lines[k].strip()
        k += 1
        if not treatments:
            treatments = [name.strip('"') for name in lines[k].split()]
            directions = lines[k + 1].split()
            if any(d.upper() != "L" for d in directions):
                raise RatingsError("only .lrc files whose larger ratings mean abnormal ('L') are read")
            k += 2
        for label in (0, 1):
            n = 0
            while lines[k].strip() != "*":
                values = lines[k].split()[:len(treatments)]
                case = f"{'abnormal' if label else 'normal'} {n + 1}"
                truth[case] = label
                rows += [(reader, case, t, _score_value(v, f"reader {reader!r}, {case}")) for t, v in zip(treatments, values)]
                n, k = n + 1, k + 1
            k += 1
    return _assemble(rows, truth, title)


def write_imrmc(ratings: Ratings, path: str | Path) -> None:
    """The iMRMC input format (FDA's iMRMC program and its R package)."""
    lines = [ratings.title or "PneumoScan reader study", f"N0:{int((ratings.truth == 0).sum())}",
             f"N1:{int((ratings.truth == 1).sum())}", f"NR:{len(ratings.readers)}", f"NM:{len(ratings.treatments)}",
             "BEGIN DATA:"]
    lines += [f"-1,{case},truth,{label}" for case, label in zip(ratings.cases, ratings.truth)]
    for t, treatment in enumerate(ratings.treatments):
        for r, reader in enumerate(ratings.readers):
            lines += [f"{reader},{case},{treatment},{score:.6f}" for case, score in zip(ratings.cases, ratings.scores[t, r])]
    Path(path).write_text("\n".join(lines) + "\n")


def write_lrc(ratings: Ratings, path: str | Path) -> None:
    """The Iowa OR-DBM MRMC program's .lrc format (larger ratings = abnormal)."""
    lines = [ratings.title or "PneumoScan reader study"]
    for r, reader in enumerate(ratings.readers):
        lines.append(reader)
        if r == 0:
            lines += ["   ".join(f'"{t}"' for t in ratings.treatments), "   ".join("L" for _ in ratings.treatments)]
        for label in (0, 1):
            for c in np.flatnonzero(ratings.truth == label):
                lines.append("   ".join(f"{ratings.scores[t, r, c]:.6f}" for t in range(len(ratings.treatments))))
            lines.append("*")
    lines.append("#")
    Path(path).write_text("\n".join(lines) + "\n")


# --- AUCs and their covariances ---------------------------------------------------------------

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
    sums = {"var": [], "cov1": [], "cov2": [], "cov3": []}
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


def analyse(ratings: Ratings, *, covariance: str = "jackknife", alpha: float = 0.05) -> dict[str, Any]:
    """The OR analysis of every pair of treatments (the first pair's figures also at the top
    level: ``auc``, ``rrrc``, ``frrc``, ``rrfc``), reader AUCs, ANOVA, variance components."""
    from scipy import stats

    scores, truth = ratings.scores, ratings.truth
    t, r, c = scores.shape
    auc = trapezoidal_auc(scores, truth)  # t×r
    cov = {"jackknife": jackknife_covariance, "delong": delong_covariance}[covariance](scores, truth)
    pooled = _average_covariances(cov, t, r)
    var, cov1, cov2, cov3 = pooled.var, pooled.cov1, pooled.cov2, pooled.cov3
    mean_t, mean_r, grand = auc.mean(axis=1), auc.mean(axis=0), auc.mean()
    ms_t = r * ((mean_t - grand) ** 2).sum() / (t - 1)
    ms_r = t * ((mean_r - grand) ** 2).sum() / (r - 1)
    ms_tr = ((auc - mean_t[:, None] - mean_r[None, :] + grand) ** 2).sum() / ((t - 1) * (r - 1))
    ms_r_each = [((auc[i] - mean_t[i]) ** 2).sum() / (r - 1) for i in range(t)]
    single = [_average_covariances(cov, t, r, treatments=[i]) for i in range(t)]
    var_tr = ms_tr - var + cov1 + cov2 - cov3
    var_r = (ms_r - var_tr - var - (t - 1) * cov1 + cov2 + (t - 1) * cov3) / t
    z = stats.norm.ppf(1 - alpha / 2)

    # random readers, random cases (Hillis 2007)
    den = ms_tr + r * max(cov2 - cov3, 0.0)
    if not (var > 0 and ms_tr > 0 and den > 0):
        # all ratings tied, or readers' AUCs that agree exactly across treatments: no error term
        raise RatingsError("these ratings cannot be analysed: the AUCs do not vary between readers and treatments "
                           f"(error variance {var:.3g}, treatment × reader mean square {ms_tr:.3g}), for example "
                           "because every rating is the same")
    ddf = den ** 2 / (ms_tr ** 2 / ((t - 1) * (r - 1)))
    f = ms_t / den
    rrrc = {"F": f, "ndf": t - 1, "ddf": ddf, "p": float(stats.f.sf(f, t - 1, ddf)), "error_term": den,
            "pairs": [], "single": []}
    # fixed readers, random cases
    den_fr = var - cov1 + (r - 1) * max(cov2 - cov3, 0.0)
    chi2 = (t - 1) * ms_t / den_fr
    frrc = {"chi2": chi2, "df": t - 1, "p": float(stats.chi2.sf(chi2, t - 1)), "pairs": [], "single": [], "readers": []}
    # random readers, fixed cases
    f_fc = ms_t / ms_tr
    rrfc = {"F": f_fc, "ndf": t - 1, "ddf": (t - 1) * (r - 1), "p": float(stats.f.sf(f_fc, t - 1, (t - 1) * (r - 1))),
            "pairs": [], "single": []}
    for a in range(t):
        for b in range(a + 1, t):
            diff = mean_t[a] - mean_t[b]
            se = np.sqrt(2 / r * den)
            tq = stats.t.ppf(1 - alpha / 2, ddf)
            rrrc["pairs"].append({"pair": [ratings.treatments[a], ratings.treatments[b]], "difference": diff,
                                  "stderr": se, "df": ddf, "t": diff / se,
                                  "p": float(2 * stats.t.sf(abs(diff / se), ddf)), "ci": _ci(diff, se, tq)})
            se = np.sqrt(2 / r * den_fr)
            frrc["pairs"].append({"pair": [ratings.treatments[a], ratings.treatments[b]], "difference": diff,
                                  "stderr": se, "z": diff / se, "p": float(2 * stats.norm.sf(abs(diff / se))),
                                  "ci": _ci(diff, se, z)})
            se = np.sqrt(2 / r * ms_tr)
            df = (t - 1) * (r - 1)
            rrfc["pairs"].append({"pair": [ratings.treatments[a], ratings.treatments[b]], "difference": diff,
                                  "stderr": se, "df": df, "t": diff / se,
                                  "p": float(2 * stats.t.sf(abs(diff / se), df)),
                                  "ci": _ci(diff, se, stats.t.ppf(1 - alpha / 2, df))})
            for j in range(r):
                own = _average_covariances(cov, t, r, treatments=[a, b], readers=[j])
                d = auc[a, j] - auc[b, j]
                se = np.sqrt(2 * (own.var - own.cov1))
                frrc["readers"].append({"reader": ratings.readers[j], "pair": [ratings.treatments[a], ratings.treatments[b]],
                                        "difference": d, "stderr": se, "z": d / se,
                                        "p": float(2 * stats.norm.sf(abs(d / se))), "ci": _ci(d, se, z),
                                        "var_error": own.var, "cov1": own.cov1})
    for i in range(t):
        name, m, own = ratings.treatments[i], mean_t[i], single[i]
        den_i = ms_r_each[i] + r * max(own.cov2, 0.0)
        se, df = np.sqrt(den_i / r), den_i ** 2 / (ms_r_each[i] ** 2 / (r - 1))
        rrrc["single"].append({"treatment": name, "auc": m, "stderr": se, "df": df, "cov2": own.cov2,
                               "ci": _ci(m, se, stats.t.ppf(1 - alpha / 2, df))})
        se = np.sqrt((own.var + (r - 1) * max(own.cov2, 0.0)) / r)
        frrc["single"].append({"treatment": name, "auc": m, "stderr": se, "var_error": own.var, "cov2": own.cov2,
                               "ci": _ci(m, se, z)})
        se = np.sqrt(ms_r_each[i] / r)
        rrfc["single"].append({"treatment": name, "auc": m, "ms_r": ms_r_each[i], "stderr": se, "df": r - 1,
                               "ci": _ci(m, se, stats.t.ppf(1 - alpha / 2, r - 1))})
    result = {
        "design": {"treatments": ratings.treatments, "readers": ratings.readers, "cases": c,
                   "normal": int((truth == 0).sum()), "abnormal": int((truth == 1).sum()),
                   "auc": "empirical (trapezoidal / Wilcoxon)", "covariance": covariance},
        "reader_auc": {ratings.treatments[i]: {ratings.readers[j]: auc[i, j] for j in range(r)} for i in range(t)},
        "auc": {ratings.treatments[i]: mean_t[i] for i in range(t)},
        "anova": {"T": {"SS": ms_t * (t - 1), "df": t - 1, "MS": ms_t}, "R": {"SS": ms_r * (r - 1), "df": r - 1, "MS": ms_r},
                  "TR": {"SS": ms_tr * (t - 1) * (r - 1), "df": (t - 1) * (r - 1), "MS": ms_tr},
                  "R_within_treatment": {ratings.treatments[i]: ms_r_each[i] for i in range(t)}},
        "or_components": {"var_r": var_r, "var_tr": var_tr, "cov1": cov1, "cov2": cov2, "cov3": cov3, "var_error": var,
                          "corr1": cov1 / var, "corr2": cov2 / var, "corr3": cov3 / var},
        "dbm_components": {"var_r": var_r, "var_c": c * cov3, "var_tr": var_tr, "var_tc": c * (cov2 - cov3),
                           "var_rc": c * (cov1 - cov3), "var_trc_error": c * (var - cov1 - cov2 + cov3)},
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
