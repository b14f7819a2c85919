"""Moving a classifier's operating points to a site's own labelled films (``pneumoscan calibrate``).

Thresholds that do not transfer between sites are the commonest complaint about published chest
X-ray models, and vendors recalibrate per site. Here a site scores its own labelled split, picks
each assessed label's threshold by Youden's J or for a target sensitivity or specificity, and
gets a new model file: same weights, new thresholds, re-hashed, recording where the thresholds
came from (method, target, images and a hash of their list, the parent model). Which labels are
assessed does not change: that is a claim about what the model learnt, not about a site.

The probabilities can be moved to the site as well (:mod:`pneumoscan.reading`): ``prevalence``
shifts each adult calibration map's log-odds from the population it was fitted for to the site's
prevalence of the label (Saerens et al. 2002), and ``refit`` fits a new Platt map on the site's
own films (at their prevalence, or at ``prevalence`` where given). Either way the records then
say that their probabilities are calibrated for this site.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.labels import LABELS
from pneumoscan.training.evaluate import score_split
from pneumoscan.training.metrics import (
    METHODS,
    known_pairs,
    operating_threshold,
    sens_spec,
)

#: A label keeps its threshold when the local films hold fewer positives or negatives than this.
MIN_EACH = 10


def achieved(y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Sensitivity and specificity at ``threshold`` with percentile bootstrap 95 % CIs (images resampled)."""
    y, p = known_pairs(np.asarray(y, float), np.asarray(p, float))
    sens, spec = sens_spec(y, p, threshold)
    rng = np.random.default_rng(seed)
    draws = np.array([sens_spec(y[idx], p[idx], threshold) for idx in
                      (rng.integers(0, len(y), len(y)) for _ in range(n_boot))])

    def ci(column: np.ndarray) -> list[float]:
        column = column[~np.isnan(column)]
        return [round(float(np.percentile(column, 2.5)), 4), round(float(np.percentile(column, 97.5)), 4)]

    return {"sensitivity": round(sens, 4), "sensitivity_ci": ci(draws[:, 0]), "specificity": round(spec, 4),
            "specificity_ci": ci(draws[:, 1]), "positives": int((y == 1).sum()), "negatives": int((y == 0).sum())}


def calibrate(manifest: str | Path, split: str, out: str | Path, *, method: str, target: float | None = None,
              model: str | Path | None = None, source: str | None = None, cache: str | Path | None = None,
              seg_model: str | Path | None = None, n_boot: int = 1000, prevalence: dict[str, float] | None = None,
              refit: bool = False) -> dict[str, Any]:
    """Write a copy of the classifier with thresholds chosen on one split (optionally one source)
    of a labelled manifest (scored in PyTorch, so the copy holds the very weights); returns per
    label the old and new threshold and what the new one achieves there."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    for written_here in (Path(out), Path(out).with_suffix(".md")):  # checked before minutes of scoring
        if written_here.exists():
            raise ValueError(f"{written_here} exists; choose a new file name (a model file and its card "
                             f"are never overwritten)")
    scored = score_split(manifest, split, model=model, cache=cache, seg_model=seg_model, backend="torch")
    keep = np.ones(len(scored.rows), bool) if source is None else (scored.rows["source"] == source).to_numpy()
    if not keep.any():
        raise ValueError(f"split {split!r} has no readable labelled images from source {source!r} "
                         f"(sources there: {sorted(scored.rows['source'].unique())})")
    classifier = scored.classifier
    parent = {k: classifier.meta.get(k) for k in ("weights_sha256", "sha256")}
    paths = sorted(scored.rows["path"][keep].astype(str))
    provenance = {"method": method, "target": target, "manifest": Path(manifest).name, "split": split,
                  "source": source, "images": len(paths),
                  "images_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
                  "parent_model_sha256": parent["sha256"], "parent_weights_sha256": parent["weights_sha256"]}
    assessment = {label: dict(classifier.meta["assessment"][label]) for label in LABELS}
    results = {}
    for j, label in enumerate(LABELS):
        entry = assessment[label]
        if not entry.get("assessed"):
            continue
        y, p = scored.labels[keep, j], scored.probs[keep, j]
        known = ~np.isnan(y)
        positives, negatives = int((y[known] == 1).sum()), int((y[known] == 0).sum())
        old = float(entry["threshold"])
        if min(positives, negatives) < MIN_EACH:
            results[label] = {"old": old, "new": old, "changed": False,
                              "why": f"kept: {positives} positives / {negatives} negatives here (need {MIN_EACH} of each)"}
            continue
        new = operating_threshold(y, p, method, target)  # unrounded: rounding could lose the target
        entry["threshold"] = new
        entry["threshold_source"] = {**provenance, "achieved": achieved(y, p, new, n_boot)}
        results[label] = {"old": old, "new": new, "changed": True, **entry["threshold_source"]["achieved"]}
    if (results.get("No Finding") or {}).get("changed"):
        # the site chose its own No Finding operating point: the file's normal rule (an NPV judged
        # on NIH films) gives way to it
        classifier.meta.get("reading", {}).get("populations", {}).get("adult", {}).pop("normal", None)
    classifier.set_assessment(assessment)
    classifier.meta["threshold_provenance"] = provenance
    if prevalence or refit:
        site = f"films of {Path(manifest).name} split {split}" + (f" source {source}" if source else "")
        move_calibration(classifier, scored.labels[keep], scored.probs[keep], prevalence or {}, refit, site)
    written = classifier.save(out, half=True)  # shipped files store float16: the same weights either way
    if written["weights_sha256"] != parent["weights_sha256"]:
        written = classifier.save(out)
    if written["weights_sha256"] != parent["weights_sha256"]:
        Path(out).unlink()
        raise ValueError("the calibrated copy's weights differ from the parent's; nothing written")
    shown = classifier.readings["adult"].shown_thresholds()  # the same operating points as predict prints them
    for label, r in results.items():
        r["new_shown"] = shown.get(label)
    result = {"model": str(out), "sha256": written["sha256"], "provenance": provenance, "labels": results,
              "skipped_unreadable": scored.skipped,
              "calibrated_for": classifier.readings["adult"].calibrated_for}
    result["warnings"] = weak_operating_points(result)
    Path(out).with_suffix(".md").write_text(card(result, classifier.thresholds_from))
    return result


def move_calibration(classifier, labels: np.ndarray, probs: np.ndarray, prevalence: dict[str, float], refit: bool,
                     site: str) -> None:
    """The adult reading's calibration moved to a site: each assessed label's map refitted on the
    site's films (``refit``) or shifted to the site's ``prevalence`` of it; ``calibrated_for``
    then names the site."""
    from pneumoscan.reading import NIH_ADULT_PREVALENCE, prior_shift
    from pneumoscan.training.reading_fit import fit_map, prevalence_weights

    unknown = set(prevalence) - set(LABELS)
    if unknown:
        raise ValueError(f"--prevalence names unknown labels {sorted(unknown)}")
    bad = {k: v for k, v in prevalence.items() if not 0 < v < 1}
    if bad:
        raise ValueError(f"--prevalence must lie strictly between 0 and 1: {bad}")
    reading = classifier.meta.setdefault("reading", {})
    adult = reading.setdefault("populations", {}).setdefault("adult", {})
    maps = dict(adult.get("calibration") or {})
    for j, label in enumerate(LABELS):
        if not classifier.assessed[j]:
            continue
        y, p = labels[:, j], probs[:, j]
        known = ~np.isnan(y)
        if refit:
            if min(int((y[known] == 1).sum()), int((y[known] == 0).sum())) < MIN_EACH:
                continue  # too few films here: the label keeps its map
            target = prevalence.get(label)
            maps[label] = {**fit_map(p[known], y[known], prevalence_weights(y[known], target), "platt"),
                           "prevalence": round(float(target if target is not None else y[known].mean()), 5)}
        elif label in prevalence:
            spec = dict(maps.get(label) or {"method": "platt", "a": 1.0, "b": 0.0})
            was = spec.get("prevalence", NIH_ADULT_PREVALENCE[label])
            spec["shift"] = round(float(spec.get("shift", 0.0)) + prior_shift(was, prevalence[label]), 6)
            spec["prevalence"] = prevalence[label]
            maps[label] = spec
    adult["calibration"] = maps
    how = "refitted on" if refit else "shifted to the label prevalences given for"
    adult["calibrated_for"] = f"{site} ({how} them)"
    classifier._read_assessment()


def weak_operating_points(result: dict[str, Any]) -> list[str]:
    """One line per label whose new threshold gives a sensitivity or a specificity below 0.5 on
    the site's films: a target met by giving up the other side."""
    lines = []
    for label, r in result["labels"].items():
        if r["changed"] and min(r["sensitivity"], r["specificity"]) < 0.5:
            lines.append(f"warning: {label} at {r['new']:.4f} has sensitivity {r['sensitivity']:.2f} and specificity "
                         f"{r['specificity']:.2f} on these films: one of them is below 0.5")
    return lines


def card(result: dict[str, Any], thresholds_from: str) -> str:
    """A short card beside the calibrated file: where its thresholds came from and what they achieve."""
    source = result["provenance"]
    lines = [f"# Calibrated classifier `{Path(result['model']).name}`", "",
             f"Same weights as model `{source['parent_model_sha256']}` (weights "
             f"`{source['parent_weights_sha256']}`); thresholds {thresholds_from}.", "",
             f"Films: {source['images']} (SHA-256 of their sorted paths `{source['images_sha256']}`).", "",
             "Thresholds are on the raw score scale (what `evaluate` and `calibrate` compare); `predict`, the "
             "overlay and the pages show the same operating points on the calibrated scale (last column).", "",
             "| label | old threshold (raw) | new threshold (raw) | sensitivity (95 % CI) | specificity (95 % CI) | "
             "positives / negatives | as predict shows it (calibrated) |",
             "|---|---|---|---|---|---|---|"]
    for label, r in result["labels"].items():
        calibrated = "–" if r.get("new_shown") is None else f"{r['new_shown']:.4g}"
        if r["changed"]:
            lines.append(f"| {label} | {r['old']:.4f} | {r['new']:.4f} | {r['sensitivity']:.3f} "
                         f"({r['sensitivity_ci'][0]:.3f}–{r['sensitivity_ci'][1]:.3f}) | {r['specificity']:.3f} "
                         f"({r['specificity_ci'][0]:.3f}–{r['specificity_ci'][1]:.3f}) | {r['positives']} / {r['negatives']} "
                         f"| {calibrated} |")
        else:
            lines.append(f"| {label} | {r['old']:.4f} | unchanged | – | – | {r['why']} | {calibrated} |")
    lines += ["", f"Probabilities are calibrated for: {result.get('calibrated_for') or 'nothing (raw scores)'}.",
              *[f"- {w}" for w in result.get("warnings", [])],
              "", "These rates are measured on the films that chose the thresholds: expect less on new films.",
              "Which labels are assessed is the parent model's (see its card)."]
    return "\n".join(lines) + "\n"
