"""What the Pneumonia output learns from on the lung-masked RSNA films, judged out of fold on the
NIH originals (Pneumonia vs No Finding, the independent set's question).

    python benchmarks/pneumonia_targets.py --cv ~/runs/cv --cache ~/runs/cache224m --out ~/runs/pneumonia_targets

The 10,424 lung-masked copies (``rsna-nih-masked``) carry two labels of one film: NIH's
report-mined findings and the RSNA challenge's radiologist class (Lung Opacity, Normal, No Lung
Opacity / Not Normal). The shipped head learns Pneumonia from NIH's label against No Finding films
(286 positives among the copies). Tried here, for the copies only (every other film keeps its label):

- ``nih``: as shipped;
- ``rsna``: Lung Opacity (2,942 radiologist positives) against RSNA Normal;
- ``either``: NIH Pneumonia or Lung Opacity against No Finding or RSNA Normal (neither positive).

Each fold's Pneumonia output is refitted with the fold's L2 of ``--cv`` (the other labels do not
change: the loss is a sum over labels) on the same films and weights; the NIH originals of the
scored fold are judged. Paired differences over patients, 95 % CI. Writes ``targets.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adult_eval import DATA, auc_entry, fmt, rsna_classes  # noqa: E402
from adult_levers import load_cv_run  # noqa: E402


def pneumonia_targets(nih_labels: np.ndarray, normal: np.ndarray, rsna: np.ndarray) -> dict[str, np.ndarray]:
    """The Pneumonia column of the lung-masked copies under each labelling (NaN: left out)."""
    opacity, rsna_normal = rsna == "Lung Opacity", rsna == "Normal"
    rsna_only = np.where(opacity, 1.0, np.where(rsna_normal, 0.0, np.nan))
    positive = (nih_labels == 1) | opacity
    either = np.where(positive, 1.0, np.where(normal | rsna_normal, 0.0, np.nan))
    return {"nih": nih_labels, "rsna": rsna_only, "either": either}


def main() -> None:
    import torch

    from pneumoscan.labels import LABELS
    from pneumoscan.training.crossval import fit_linear_head, row_weights
    from pneumoscan.training.data import patient_folds
    from pneumoscan.training.metrics import auc_difference

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cv", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rsna-index", type=Path, default=DATA / "rsna-nih-masked" / "index.csv")
    parser.add_argument("--boot", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    run = load_cv_run(args.cv, args.cache)
    cfg, report, x, table, raw, labels = run.cfg, run.report, run.x, run.table, run.raw, run.labels
    sources, views, patients = run.sources, run.views, run.patients
    j, nf = LABELS.index("Pneumonia"), LABELS.index("No Finding")
    masked = sources == "nihmasked"
    rsna = rsna_classes(table["path"][masked].map(lambda p: Path(p).name).tolist(), args.rsna_index, key="path")
    targets = pneumonia_targets(labels[masked, j], labels[masked, nf] == 1, rsna)
    fold_of = patient_folds(patients, cfg.folds, cfg.seed)
    nih = sources == "nih"
    y = raw[nih, j].astype(float)
    scores: dict[str, np.ndarray] = {}
    for name, column in targets.items():
        trained = labels.copy()
        trained[masked, j] = column
        score = np.full(len(table), np.nan)
        for f, chosen in enumerate(report["folds"]):
            train = fold_of != f
            weights = row_weights(trained[train], sources[train], views[train], cfg, chosen["domain_weight"])
            W, b = fit_linear_head(x[train], trained[train][:, [j]], weights[:, [j]], chosen["l2"])
            score[~train] = x[~train] @ W[0] + b[0]
        scores[name] = score[nih]
        print(f"{name}: {int(np.nansum(column))} positives / {int(np.sum(column == 0))} negatives among the copies; "
              f"NIH originals {fmt(auc_entry(y, scores[name], args.boot))}", file=sys.stderr, flush=True)
    groups = patients[nih]
    result = {"films": int(nih.sum()), "labels_of_the_copies": {
        n: {"positives": int(np.nansum(c)), "negatives": int(np.sum(c == 0))} for n, c in targets.items()},
        "auc": {n: auc_entry(y, s, args.boot) for n, s in scores.items()},
        "vs_nih": {n: auc_difference(y, s, scores["nih"], args.boot, groups=groups)
                   for n, s in scores.items() if n != "nih"}}
    (args.out / "targets.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
