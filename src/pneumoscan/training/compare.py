"""Two or more classifiers on the same films (``pneumoscan compare``): per label and per source,
each model's AUC with its bootstrap CI, and each model's paired difference from the first (the
same resampled films for both in every draw) with its CI and a two-sided bootstrap p-value.

Only films every model could score are used, and only inside one source at a time (the
project's rule: no figure may be earned by telling data sets apart). A label enters when at least
one of the models assesses it (or when asked for); whether each one does is said beside its figures.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.labels import LABELS
from pneumoscan.training.evaluate import score_split
from pneumoscan.training.metrics import (
    MIN_PER_CLASS,
    auc_difference,
    nan_to_none,
    per_source_auc,
)
from pneumoscan.training.report import fmt3


def compare_models(manifest: str | Path, split: str, models: list[str | Path], *, cache: str | Path | None = None,
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
    scored, crops_memo = [], {}
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
    assessed = [set(s.classifier.assessed_labels) for s in scored]
    result: dict[str, Any] = {
        "manifest": str(manifest), "split": split, "images": len(common), "n_boot": n_boot,
        "models": [{"file": str(m), "weights_sha256": s.classifier.meta.get("weights_sha256"),
                    "assessed_labels": sorted(a, key=LABELS.index)} for m, s, a in zip(models, scored, assessed)],
        "labels": {}}
    wanted = labels if labels else [label for label in LABELS if any(label in a for a in assessed)]
    for j, label in enumerate(LABELS):
        if label not in wanted:
            continue
        y = truth[:, j]
        parts = [per_source_auc(y, p[:, j], sources, n_boot=n_boot) for _, _, p in aligned]  # same sources each
        per_source = {}
        for source, first in parts[0].items():
            inside = (sources == source) & ~np.isnan(y)
            entry = {"positives": first["positives"], "negatives": first["negatives"], "models": []}
            for k, part in enumerate(parts):
                model_entry = {"auc": part[source]["auc"], "ci": part[source].get("ci", [None, None]), "assessed": label in assessed[k]}
                if k and weights[k] == weights[0]:  # same weights, same scores: nothing to resample
                    model_entry["difference_from_first"] = {"identical_weights": True}
                elif k:
                    diff = auc_difference(y[inside], aligned[k][2][inside, j], aligned[0][2][inside, j], n_boot)
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
              f"{MIN_PER_CLASS} positives and negatives), 95 % bootstrap CI over {result['n_boot']} resamples; the "
              f"difference is each model minus `{names[0]}` on the same resampled films (paired), with its CI and "
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
