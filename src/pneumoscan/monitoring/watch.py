"""Watching a site from its results store: what arrives (inputs), who it is read for, how far the
masks can be trusted, what the model says (outputs), and how well it is expected to do — per window
of films in stored order, against a reference (the site's first films), with alerts that name what
moved, by how much, since when, and the films to look at.

One row per stored result (:func:`film_row`) holds only what is watched; the tests and estimates
are :mod:`pneumoscan.monitoring.stats`. Every test's p-value is corrected for the number of tests
and windows together (Bonferroni at ``alpha``), and an alert also needs an effect large enough to
matter (:data:`MIN_TVD`, :data:`MIN_KS`), so that a stable stream does not cry wolf.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import numpy as np

from pneumoscan.labels import LABELS
from pneumoscan.monitoring.stats import categorical_shift, continuous_shift, expected_performance, observed_auc

#: Watched categories: name → how to read it from a film row.
CATEGORICAL = {
    "status": "what happened to each film (called, not called, refused by the gate, error)",
    "refusal": "why the input gate refused a film (its first reason), or 'scored'",
    "verdict": "the verdict mix",
    "population": "who the films are read for (adult, paediatric, unknown)",
    "age_source": "where the age came from (DICOM PatientAge, given, estimated)",
    "view": "the view position the header states (PA, AP, none)",
    "modality": "the modality (CR, DX, none for PNG/JPEG)",
    "photometric": "MONOCHROME1 / MONOCHROME2 (an inverting PACS shows here)",
    "bit_depth": "bits per pixel of the input",
    "format": "the container (DICOM, PNG, JPEG)",
}
#: Watched measurements (per film, NaN where absent).
CONTINUOUS = {
    "log_pixels": "image size, log10 of width × height",
    "estimated_age": "the age estimated from the film (films without a stated age)",
    "lung_quality": "lung mask quality",
    "heart_quality": "heart mask quality",
    "ctr": "cardiothoracic ratio",
}
#: Smallest effects worth an alert: total variation distance for categories, KS D for measurements.
MIN_TVD = 0.10
MIN_KS = 0.20


@dataclass
class FilmRow:
    """What is watched of one stored result."""

    result_id: int
    created_at: datetime
    categories: dict[str, str]
    measures: dict[str, float]
    probabilities: dict[str, float]
    thresholds: dict[str, float]
    called: set[str]
    ranks: dict[str, float]


def film_row(result_id: int, created_at: datetime, record: dict[str, Any]) -> FilmRow:
    """The watched fields of one stored record (:meth:`pneumoscan.prediction.Prediction.to_dict`)."""
    image, quality = record.get("image") or {}, record.get("quality") or {}
    population, masks = record.get("population") or {}, record.get("mask_quality") or {}
    measurements = record.get("measurements") or {}
    reasons = quality.get("reasons") or []
    scored = record.get("probabilities") is not None
    categories = {
        "status": str(record.get("status") or ("error" if record.get("error") else "unknown")),
        "refusal": "scored" if scored else (reasons[0].split(":")[0][:60] if reasons else "unreadable"),
        "verdict": str(record.get("verdict") or "none"),
        "population": str(population.get("group") or "none"),
        "age_source": str(population.get("source") or "none"),
        "view": str(image.get("view_position") or "none").upper(),
        "modality": str(image.get("modality") or "none").upper(),
        "photometric": str(image.get("photometric") or "none").upper(),
        "bit_depth": str(image.get("bit_depth") or "none"),
        "format": str(image.get("format") or "none").upper(),
    }
    width, height = image.get("width"), image.get("height")
    measures = {
        "log_pixels": math.log10(width * height) if width and height else math.nan,
        "estimated_age": (float(population["age"]) if population.get("source") == "estimate"
                          and population.get("age") is not None else math.nan),
        "lung_quality": float(masks["lungs"]) if masks.get("lungs") is not None else math.nan,
        "heart_quality": float(masks["heart"]) if masks.get("heart") is not None else math.nan,
        "ctr": float(measurements["cardiothoracic_ratio"]) if measurements.get("cardiothoracic_ratio") is not None else math.nan,
    }
    probabilities = {k: float(v) for k, v in (record.get("probabilities") or {}).items() if v is not None}
    thresholds = {k: float(v) for k, v in (record.get("thresholds") or {}).items() if v is not None}
    ranks = {k: float(v) for k, v in (record.get("rank_scores") or {}).items() if v is not None}
    return FilmRow(result_id, created_at, categories, measures, probabilities, thresholds,
                   set(record.get("findings") or []), ranks)


@dataclass
class Window:
    """A run of films in stored order."""

    index: int
    rows: list[FilmRow]
    label: str = ""
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    performance: dict[str, dict[str, Any]] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def start(self) -> datetime:
        return self.rows[0].created_at

    @property
    def end(self) -> datetime:
        return self.rows[-1].created_at


def cut_windows(rows: list[FilmRow], size: int | None = None, every_days: float | None = None) -> list[Window]:
    """Consecutive windows of ``size`` films, or of ``every_days`` calendar days from the first film."""
    if every_days:
        windows: list[Window] = []
        first = rows[0].created_at
        for row in rows:
            k = int((row.created_at - first).total_seconds() // (every_days * 86400))
            if not windows or windows[-1].index != k:
                windows.append(Window(k, []))
            windows[-1].rows.append(row)
        return windows
    if size is None:
        raise ValueError("cut_windows needs a window size or a number of days")
    return [Window(k, rows[i:i + size]) for k, i in enumerate(range(0, len(rows), size))]


def watched_labels(rows: list[FilmRow]) -> list[str]:
    """The labels scored on any film, in label order."""
    return [label for label in LABELS if any(label in r.probabilities for r in rows)]


#: A watched statistic: its kind (``categorical`` or ``continuous``) and how to read it from a
#: film (None: the film does not count for it, e.g. a label not scored for its population).
Statistic = tuple[str, Callable[[FilmRow], Any]]


def statistics(labels: list[str], ranked: bool) -> dict[str, Statistic]:
    """Every watched statistic by name: the categories and measurements of each film, and per
    label its rank score (or probability, for records without ranks) and whether it was called."""
    out: dict[str, Statistic] = {name: ("categorical", partial(_category, name)) for name in CATEGORICAL}
    out |= {name: ("continuous", partial(_measure, name)) for name in CONTINUOUS}
    for label in labels:
        out[f"{'rank' if ranked else 'probability'}:{label}"] = ("continuous", partial(_score, label, ranked))
        out[f"called:{label}"] = ("categorical", partial(_called, label))
    return out


def _category(name: str, row: FilmRow) -> Any:
    return row.categories[name]


def _measure(name: str, row: FilmRow) -> Any:
    return row.measures[name]


def _score(label: str, ranked: bool, row: FilmRow) -> float:
    return (row.ranks if ranked else row.probabilities).get(label, math.nan)


def _called(label: str, row: FilmRow) -> str | None:
    """Whether the label was called, for films that scored it (None: not scored for its population)."""
    return str(label in row.called) if label in row.probabilities else None


def values_of(rows: list[FilmRow], statistic: Statistic) -> list[Any]:
    """One statistic's values over films, the films it does not count for left out."""
    return [v for v in map(statistic[1], rows) if v is not None]


def window_tests(reference: dict[str, list[Any]], window: list[FilmRow], stats: dict[str, Statistic]
                 ) -> dict[str, dict[str, Any]]:
    """Every test of one window against the reference's values (read once, by statistic)."""
    tests: dict[str, dict[str, Any]] = {}
    for name, statistic in stats.items():
        kind, ref, win = statistic[0], reference[name], values_of(window, statistic)
        tests[name] = {"kind": kind} | (categorical_shift(ref, win) if kind == "categorical"
                                        else continuous_shift(np.array(ref, float), np.array(win, float)))
    return tests


def window_performance(window: list[FilmRow], labels: list[str], truth: dict[int, dict[str, float]]
                       ) -> dict[str, dict[str, Any]]:
    """CBPE per assessed label (films with a threshold for it), beside the AUC against the
    reviewers' labels where the window has enough reviewed films."""
    out = {}
    for label in labels:
        rows = [r for r in window if label in r.thresholds]
        if len(rows) < 2:
            continue
        p = np.array([r.probabilities[label] for r in rows])
        order = np.array([r.ranks.get(label, r.probabilities[label]) for r in rows])
        figures = expected_performance(p, np.array([label in r.called for r in rows]), order)
        reviewed = np.array([truth.get(r.result_id, {}).get(label, math.nan) for r in rows], float)
        figures["reviewed_films"] = int((~np.isnan(reviewed)).sum())
        figures["observed_auc"] = observed_auc(reviewed, order)
        out[label] = figures
    return out


def flag(window: Window, tests: dict[str, dict[str, Any]], stats: dict[str, Statistic], n_tests: int,
         alpha: float) -> list[dict[str, Any]]:
    """The alerts of one window: tests whose Bonferroni-corrected p-value (over ``n_tests``, every
    test of every window) is below ``alpha`` and whose effect is at least the minimum."""
    alerts = []
    for name, test in tests.items():
        corrected = min(1.0, test["p"] * n_tests)
        test["p_corrected"] = corrected
        effect = test.get("tvd", 0.0) if test["kind"] == "categorical" else test.get("d", 0.0)
        needed = MIN_TVD if test["kind"] == "categorical" else MIN_KS
        if corrected >= alpha or effect < needed:
            continue
        get = stats[name][1]
        if test["kind"] == "categorical":
            moved = test.get("moved")
            what = (f"{name}: '{moved}' {test['reference'].get(moved, 0):.0%} of the reference films → "
                    f"{test['window'].get(moved, 0):.0%} (total variation {effect:.2f})")
            films = [r.result_id for r in window.rows if get(r) == moved]
        else:
            what = (f"{name}: median {test['reference_median']:.3g} → {test['window_median']:.3g} (KS D {effect:.2f}, "
                    f"{test['n']} films)")
            # the films furthest from the reference median in the direction it moved
            sign = 1 if (test["window_median"] or 0) >= (test["reference_median"] or 0) else -1
            scored = [(sign * get(r), r.result_id) for r in window.rows if np.isfinite(get(r))]
            films = [i for _, i in sorted(scored, reverse=True)]
        alerts.append({"window": window.index, "since": window.start.isoformat(), "until": window.end.isoformat(),
                       "statistic": name, "what": what, "effect": effect, "p_corrected": corrected,
                       "films": films[:20], "review_links": [f"/review#result={i}" for i in films[:20]]})
    return alerts


def monitor(rows: list[FilmRow], *, reference: int = 500, window: int | None = 100, every_days: float | None = None,
            alpha: float = 0.01, truth: dict[int, dict[str, float]] | None = None) -> dict[str, Any]:
    """Reference (the first ``reference`` films), windows after it, their tests, estimates and
    alerts, as the ``monitor.json`` dictionary."""
    if len(rows) <= reference:
        raise ValueError(f"{len(rows)} stored results: the reference takes the first {reference}, so nothing is "
                         f"left to watch (give a smaller --reference, or wait for more films)")
    ref, rest = rows[:reference], rows[reference:]
    labels = watched_labels(rows)
    stats = statistics(labels, ranked=any(r.ranks for r in ref))
    reference_values = {name: values_of(ref, statistic) for name, statistic in stats.items()}
    windows = cut_windows(rest, window, every_days)
    tests = [window_tests(reference_values, w.rows, stats) for w in windows]
    n_tests = max(1, sum(len(t) for t in tests))
    truth = truth or {}
    for w, t in zip(windows, tests):
        w.tests = t
        w.performance = window_performance(w.rows, labels, truth)
        w.alerts = flag(w, t, stats, n_tests, alpha)
    return {
        "reference": {"films": len(ref), "since": ref[0].created_at.isoformat(), "until": ref[-1].created_at.isoformat(),
                      "performance": window_performance(ref, labels, truth)},
        "settings": {"window": window, "every_days": every_days, "alpha": alpha, "tests": n_tests,
                     "correction": f"Bonferroni over all {n_tests} tests of all windows",
                     "min_effect": {"categorical_tvd": MIN_TVD, "continuous_ks_d": MIN_KS}},
        "labels": labels,
        "windows": [{"index": w.index, "films": len(w.rows), "since": w.start.isoformat(), "until": w.end.isoformat(),
                     "tests": w.tests, "performance": w.performance, "alerts": w.alerts} for w in windows],
        "alerts": [a for w in windows for a in w.alerts],
    }
