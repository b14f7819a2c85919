"""Two or more classifiers on the same films (``pneumoscan compare``): per label and per source,
each model's AUC with its bootstrap CI, and each model's paired difference from the first (the
same resampled patients for both in every draw: a patient's films are drawn together) with its CI
and a two-sided bootstrap p-value.

Only films every model could score are used, and only inside one source at a time (the
project's rule: no figure may be earned by telling data sets apart). A label enters when at least
one of the models assesses it (or when asked for); whether each one does is said beside its figures.

``compare --crossval`` compares ``pneumoscan crossval`` runs instead, on their out-of-fold
probabilities (nothing is scored again): the figures a long run is watched by
(:func:`pneumoscan.training.fit_all.watched_tasks`), optionally on some folds only (a backbone
trained on folds 1–4 is judged on fold 0 alone).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.labels import LABELS
from pneumoscan.training.evaluate import ScoredSplit, score_split
from pneumoscan.training.metrics import (
    MIN_PER_CLASS,
    auc_ci,
    auc_difference,
    nan_to_none,
    per_source_auc,
    roc_auc,
)
from pneumoscan.training.report import fmt3
from pneumoscan.training.tables import patient_keys


def compare_models(manifest: str | Path, split: str, models: Sequence[str | Path], *, cache: str | Path | None = None,
                   seg_model: str | Path | None = None, n_boot: int = 1000, backend: str = "auto",
                   labels: list[str] | None = None) -> dict[str, Any]:
    """The comparison as a dict (see the module's docstring); ``labels``: the labels to compare
    (default: those at least one model assesses)."""
    if len(models) < 2:
        raise ValueError("compare needs at least two model files")
    unknown = sorted(set(labels or []) - set(LABELS))
    if unknown:
        raise ValueError(f"unknown label(s) {', '.join(unknown)}; choose from {', '.join(LABELS)}")
    from dataclasses import replace

    from pneumoscan.classify import Classifier
    from pneumoscan.progress import note

    classifiers = [Classifier.load(model) for model in models]
    weights = [c.meta.get("weights_sha256") for c in classifiers]
    scored: list[ScoredSplit] = []
    crops_memo: dict[Any, Any] = {}
    for k, model in enumerate(models):
        twin = weights.index(weights[k])
        if twin < k:  # the same network (a calibrated copy, say): its raw scores are the twin's
            print(f"compare: model {k + 1} ({Path(model).name}) has the weights of model {twin + 1}: "
                  f"its scores are that model's, not computed again", file=sys.stderr, flush=True)
            scored.append(replace(scored[twin], classifier=classifiers[k]))
            continue
        note(f"compare: scoring model {k + 1} of {len(models)} ({Path(model).name}) …")
        scored.append(score_split(manifest, split, model=model, cache=cache, seg_model=seg_model, backend=backend,
                                  crops_memo=crops_memo))
    common = sorted(set.intersection(*(set(s.rows["path"]) for s in scored)))
    aligned = []
    for s in scored:
        where = {p: i for i, p in enumerate(s.rows["path"])}
        index = np.array([where[p] for p in common], int)
        aligned.append((s.rows.iloc[index].reset_index(drop=True), s.labels[index], s.probs[index]))
    rows, truth = aligned[0][0], aligned[0][1]
    sources = rows["source"].astype(str).to_numpy()
    patients = patient_keys(rows)
    assessed = [set(s.classifier.assessed_labels) for s in scored]
    result: dict[str, Any] = {
        "manifest": str(manifest), "split": split, "images": len(common), "n_boot": n_boot,
        "resampled": f"patients ({len(set(patients))})",
        "models": [{"file": str(m), "weights_sha256": s.classifier.meta.get("weights_sha256"),
                    "assessed_labels": sorted(a, key=LABELS.index)} for m, s, a in zip(models, scored, assessed)],
        "labels": {}}
    wanted = labels if labels else [label for label in LABELS if any(label in a for a in assessed)]
    for j, label in enumerate(LABELS):
        if label not in wanted:
            continue
        y = truth[:, j]
        parts = [per_source_auc(y, p[:, j], sources, n_boot=n_boot, groups=patients) for _, _, p in aligned]
        per_source = {}
        for source, first in parts[0].items():
            inside = (sources == source) & ~np.isnan(y)
            entry = {"positives": first["positives"], "negatives": first["negatives"], "models": []}
            for k, part in enumerate(parts):
                model_entry = {"auc": part[source]["auc"], "ci": part[source].get("ci", [None, None]),
                               "assessed": label in assessed[k]}
                if k and weights[k] == weights[0]:  # same weights, same scores: nothing to resample
                    model_entry["difference_from_first"] = {"identical_weights": True}
                elif k:
                    diff = auc_difference(y[inside], aligned[k][2][inside, j], aligned[0][2][inside, j], n_boot,
                                          groups=patients[inside])
                    model_entry["difference_from_first"] = {key: nan_to_none(v) for key, v in diff.items()}
                entry["models"].append(model_entry)
            per_source[source] = entry
        result["labels"][label] = per_source
    return result


def markdown(result: dict[str, Any]) -> str:
    """compare.md: one table, a row per label, source and model."""
    fmt = fmt3
    names = [Path(m["file"]).name for m in result["models"]]
    lines = [(f"# Comparison on split `{result['split']}` of `{Path(result['manifest']).name}` "
              f"({result['images']} films every model scored)"), "",
             ("AUC inside each source (at least "
              f"{MIN_PER_CLASS} positives and negatives), 95 % bootstrap CI over {result['n_boot']} resamples of "
              f"{result['resampled']}; the difference is each model minus `{names[0]}` on the same resamples (paired), "
              "with its CI and "
              "two-sided bootstrap p."), "",
             "| label | source | pos / neg | model | assessed | AUC (95 % CI) | difference from the first (95 % CI), p |",
             "|---|---|---|---|---|---|---|"]
    for label, sources in result["labels"].items():
        for source, entry in sources.items():
            for name, m in zip(names, entry["models"]):
                d = m.get("difference_from_first")
                lines.append(f"| {label} | {source} | {entry['positives']} / {entry['negatives']} | {name} | "
                             f"{'yes' if m['assessed'] else 'no'} | {fmt(m['auc'])} ({fmt(m['ci'][0])}–{fmt(m['ci'][1])}) | "
                             + ("identical weights: the same scores, no difference to test" if d and d.get("identical_weights")
                                else f"{d['difference']:+.3f} ({fmt(d['low'])}–{fmt(d['high'])}), p = {fmt(d['p'])}"
                                if d and d["difference"] is not None else "–") + " |")
    if not result["labels"]:
        lines.append("| – | – | – | – | – | no label any model assesses has enough films here | – |")
    return "\n".join(lines) + "\n"


def compare_crossval(runs: Sequence[str | Path], *, folds: list[int] | None = None, opacity_index: str | Path | None = None,
                     n_boot: int = 1000) -> dict[str, Any]:
    """``crossval`` runs on their out-of-fold probabilities: each watched task's AUC with its CI and
    each run's paired difference from the first, resampling patients; only films every run scored
    and, with ``folds``, only those folds. The runs must have drawn the same folds (folds, seed)."""
    import json

    import pandas as pd

    from pneumoscan.training.cache import CropCache
    from pneumoscan.training.data import opacity_of
    from pneumoscan.training.fit_all import watched_tasks

    if len(runs) < 2:
        raise ValueError("compare --crossval needs at least two crossval run folders")
    configs, frames = [], []
    for run in map(Path, runs):
        if not (run / "oof.csv").is_file() or not (run / "config.json").is_file():
            raise ValueError(f"{run}: not a finished crossval run (no oof.csv and config.json there)")
        configs.append(json.loads((run / "config.json").read_text()))
        frames.append(pd.read_csv(run / "oof.csv"))
    drawn = {(c.get("folds"), c.get("seed")) for c in configs}
    if len(drawn) > 1:
        raise ValueError(f"the runs drew different folds (folds, seed: {sorted(drawn)}): their out-of-fold films differ")
    common = sorted(set.intersection(*(set(f["path"]) for f in frames)))
    frames = [f.drop_duplicates("path").set_index("path").loc[common] for f in frames]
    if any(not np.array_equal(f["fold"].to_numpy(), frames[0]["fold"].to_numpy()) for f in frames[1:]):
        raise ValueError("a film sits in different folds in different runs: they were not cross-validated alike")
    table = CropCache(configs[0]["cache"]).table.drop_duplicates("path").set_index("path")
    missing = sorted(set(common) - set(table.index))
    if missing:
        raise ValueError(f"{len(missing)} films of the runs are not in {configs[0]['cache']} (e.g. {missing[0]})")
    fold = frames[0]["fold"].to_numpy()
    unknown = sorted(set(folds or []) - set(fold.tolist()))
    if unknown:
        known = ", ".join(map(str, sorted(set(fold.tolist()))))
        raise ValueError(f"--fold {', '.join(map(str, unknown))}: the runs' folds are {known}")
    keep = np.isin(fold, folds) if folds else np.ones(len(common), bool)
    rows = table.loc[common].reset_index()[keep].reset_index(drop=True)
    labels = rows[list(LABELS)].to_numpy(np.float32)
    probs = [f[list(LABELS)].to_numpy(float)[keep] for f in frames]
    sources, patients = rows["source"].astype(str).to_numpy(), patient_keys(rows)
    opacity = opacity_of(rows, opacity_index) if opacity_index else None
    result: dict[str, Any] = {
        "runs": [{"folder": str(run), "backbone": c.get("backbone"), "cache": c.get("cache")} for run, c in zip(runs, configs)],
        "folds": sorted(set(fold[keep].tolist())), "films": int(keep.sum()), "n_boot": n_boot,
        "resampled": f"patients ({len(set(patients))})", "tasks": {}}
    for key, title, y, j in watched_tasks(labels, sources, opacity):
        inside = ~np.isnan(y)
        positives, negatives = int((y[inside] == 1).sum()), int((y[inside] == 0).sum())
        if min(positives, negatives) < MIN_PER_CLASS:
            continue
        entry: dict[str, Any] = {"title": title, "positives": positives, "negatives": negatives, "runs": []}
        for k, p in enumerate(probs):
            low, high = auc_ci(y[inside], p[inside, j], n_boot, groups=patients[inside])
            run_entry: dict[str, Any] = {"auc": nan_to_none(roc_auc(y[inside], p[inside, j])),
                                         "ci": [nan_to_none(low), nan_to_none(high)]}
            if k:
                diff = auc_difference(y[inside], p[inside, j], probs[0][inside, j], n_boot, groups=patients[inside])
                run_entry["difference_from_first"] = {key_: nan_to_none(v) for key_, v in diff.items()}
            entry["runs"].append(run_entry)
        result["tasks"][key] = entry
    return result


def p_value(p: float, n_boot: int) -> str:
    """A bootstrap p for a table: never "0.000", which n_boot draws cannot show."""
    return f"p < {1 / n_boot:.2g}" if p == 0 else f"p = {p:.3f}"


def crossval_markdown(result: dict[str, Any]) -> str:
    """compare.md of ``compare --crossval``: a row per task, the runs side by side."""
    names = [Path(r["folder"]).name for r in result["runs"]]
    head = " | ".join(f"{n} AUC (95 % CI)" for n in names) + " | " + " | ".join(f"{n} − {names[0]} (95 % CI), p"
                                                                               for n in names[1:])
    title = (f"# Out-of-fold comparison of {len(names)} crossval runs ({result['films']} films of fold(s) "
             f"{', '.join(map(str, result['folds']))})")
    method = (f"95 % bootstrap CIs over {result['n_boot']} resamples of {result['resampled']}; differences are "
              "paired (the same resampled patients for both runs), with a two-sided bootstrap p.")
    lines = [title, "", method, "", f"| task | pos / neg | {head} |", "|---|---|" + "---|" * (2 * len(names) - 1)]
    for entry in result["tasks"].values():
        cells = [f"{fmt3(r['auc'])} ({fmt3(r['ci'][0])}–{fmt3(r['ci'][1])})" for r in entry["runs"]]
        cells += [f"{d['difference']:+.3f} ({fmt3(d['low'])} to {fmt3(d['high'])}), {p_value(d['p'], result['n_boot'])}"
                  if (d := r["difference_from_first"])["difference"] is not None else "–" for r in entry["runs"][1:]]
        lines.append(f"| {entry['title']} | {entry['positives']:,} / {entry['negatives']:,} | " + " | ".join(cells) + " |")
    if not result["tasks"]:
        lines.append("| no task has enough films here | – |" + " – |" * (2 * len(names) - 1))
    return "\n".join(lines) + "\n"
