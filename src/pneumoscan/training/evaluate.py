"""``pneumoscan evaluate``: score one split of a labelled manifest and write its report
(:mod:`pneumoscan.training.metrics` measures, :mod:`pneumoscan.training.tables` tabulates,
:mod:`pneumoscan.training.report` writes).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.labels import LABELS
from pneumoscan.progress import note
from pneumoscan.training.report import html_report, write_report, write_scores
from pneumoscan.training.tables import (
    calibration_before_after,
    evaluate_probabilities,
    operating_points,
    patient_keys,
    subgroup_values,
    subgroups,
)


@dataclass
class ScoredSplit:
    """One manifest split scored by one classifier: its rows (labelled, readable), their labels
    (N×15, NaN unknown) and probabilities, and the unreadable paths left out."""

    rows: Any
    labels: np.ndarray
    probs: np.ndarray
    skipped: list[str]
    classifier: Any
    unlabelled: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def dropped(self) -> list[dict[str, str]]:
        """Every film of the split left out, and why (a report lists them)."""
        return ([{"path": p, "reason": "no known label"} for p in self.unlabelled]
                + [{"path": p, "reason": "not the film its sha256 names (replaced or gone)"} for p in self.changed]
                + [{"path": p, "reason": "unreadable or not in the cache"} for p in self.skipped])

    def calibrated(self) -> np.ndarray:
        """The probabilities as every output prints them: each film through the calibration of
        its source's population (adult or paediatric, :mod:`pneumoscan.reading`)."""
        from pneumoscan.data.manifest import population

        groups = np.array([population(s) for s in self.rows["source"].astype(str)])
        out = self.probs.astype(np.float64).copy()
        for group in ("adult", "paediatric"):
            inside = groups == group
            if inside.any():
                out[inside] = self.classifier.readings[group].calibrate(self.probs[inside])
        return out


def films_as_named(rows) -> tuple[Any, list[str]]:
    """Rows whose file is still the film the manifest's ``sha256`` column names (all rows when
    it has none, or for a row whose cell is empty), and the paths of the others: a label must
    never go with whatever file now has the reviewed film's name (``review export`` writes it)."""
    from pneumoscan.data.manifest import path_mismatch

    if "sha256" not in rows:
        return rows, []
    named = rows["sha256"].fillna("").astype(str).str.strip()
    bad = [i for i, (path, sha) in enumerate(zip(rows["path"].astype(str), named)) if sha and path_mismatch(path, sha)]
    return rows.drop(index=bad).reset_index(drop=True), rows["path"].iloc[bad].astype(str).tolist()


def score_split(manifest: str | Path, split: str, *, model: str | Path | None = None,
                cache: str | Path | None = None, seg_model: str | Path | None = None,
                backend: str = "auto", crops_memo: dict | None = None) -> ScoredSplit:
    """Score the labelled images of one split: crops from ``cache`` when given (rows matched by
    path), else read, segmented and cropped here (the predictor's path). ``crops_memo``: crops
    made here are kept in it by (lung model, crop size, masking) and taken from it, so that models
    compared on one split read, segment and crop each film once."""
    import pandas as pd

    from pneumoscan.data.manifest import ManifestError, read_manifest, unique_films
    from pneumoscan.loading import load_models
    from pneumoscan.training.cache import CropCache, crop_paths, scoring_inputs
    from pneumoscan.training.cropstore import CropStore

    segmenter, classifier, _ = load_models(seg_model, model, backend=backend, with_heart=False)
    table = read_manifest(manifest)
    in_split, repeated = unique_films(table[table.split == split])
    if repeated:
        print(f"note: {repeated:,} rows of split {split!r} repeat a film already listed (same path): each film "
              f"is counted once", file=sys.stderr, flush=True)
    labelled = in_split[list(LABELS)].notna().any(axis=1)
    unlabelled = in_split.loc[~labelled, "path"].astype(str).tolist()
    if unlabelled:
        print(f"leaving out {len(unlabelled):,} films of split {split!r} without a known label "
              f"(listed in the report)", file=sys.stderr, flush=True)
    rows = in_split[labelled].reset_index(drop=True)
    rows, changed = films_as_named(rows)
    if changed:
        print(f"leaving out {len(changed):,} films whose file is not the one the manifest's sha256 names "
              f"(listed in the report)", file=sys.stderr, flush=True)
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
        key = (segmenter.meta.get("sha256"), classifier.size, classifier.lung_masked)
        if crops_memo is not None and key in crops_memo:
            note("the films' crops are those already made for the previous model (same lung model and crop)")
            crops, records = crops_memo[key]
        else:
            crops, records = crop_paths(rows["path"].tolist(), segmenter, classifier.size, threads=2,
                                        masked=classifier.lung_masked, sources=rows["source"].astype(str).tolist(),
                                        progress="read, segment, crop",
                                        store=CropStore.for_segmenter(segmenter, classifier.size, classifier.lung_masked))
            if crops_memo is not None:
                crops_memo[key] = crops, records
        ok = np.array([r["error"] == "" for r in records])
        skipped = [r["path"] for r in records if r["error"]]
        rows, crops = rows[ok].reset_index(drop=True), crops[ok]
        boxes = pd.DataFrame([r for r, k in zip(records, ok) if k])[["x0", "y0", "x1", "y1"]]
        inputs = scoring_inputs(classifier, pd.concat([rows, boxes], axis=1), classifier.size)
    note(f"scoring {len(rows):,} crops …")
    probs = classifier.predict_proba(crops.astype(np.float32) / 255.0, **inputs)
    return ScoredSplit(rows, rows[list(LABELS)].to_numpy(np.float32), probs, skipped, classifier, unlabelled, changed)


def evaluate_split(manifest: str | Path, split: str, out: str | Path, *, model: str | Path | None = None,
                   cache: str | Path | None = None, seg_model: str | Path | None = None,
                   n_boot: int = 1000, backend: str = "auto") -> dict[str, Any]:
    """Score one split of a manifest (:func:`score_split`), write the report files, return the report."""
    scored = score_split(manifest, split, model=model, cache=cache, seg_model=seg_model, backend=backend)
    note(f"evaluate: {n_boot} bootstrap resamples per label …")
    thresholds = scored.classifier.meta.get("thresholds") or {}
    report = evaluate_probabilities(scored.labels, scored.probs, thresholds, split, n_boot=n_boot,
                                    sources=scored.rows["source"].to_numpy(), patients=patient_keys(scored.rows))
    report["skipped_unreadable"] = scored.skipped
    report["dropped"] = scored.dropped()
    report["manifest"] = str(manifest)
    report["thresholds_from"] = scored.classifier.thresholds_from
    report["calibrated_for"] = {g: scored.classifier.readings[g].calibrated_for for g in ("adult", "paediatric")}
    report["calibration_after"] = calibration_before_after(scored.labels, scored.probs, scored.calibrated(),
                                                           [lab for lab in LABELS if thresholds.get(lab) is not None])
    note("evaluate: subgroups and operating points …")
    report["subgroups"] = subgroups(scored.labels, scored.probs, thresholds, subgroup_values(scored.rows),
                                    n_boot=max(n_boot // 5, 0))
    report["operating_points"] = operating_points(scored.labels, scored.probs, thresholds)
    write_report(report, scored.labels, scored.probs, out, scored.classifier.meta)
    write_scores(scored.rows, scored.labels, scored.probs, Path(out) / "scores.csv")
    (Path(out) / "report.html").write_text(html_report(Path(out) / "report.md"))
    return report
