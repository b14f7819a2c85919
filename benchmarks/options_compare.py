"""The classifier's options (AG-CNN, patient information) against the default, on the same split.

    python benchmarks/options_compare.py --manifest runs/manifest.csv --cache runs/cache224_512 \
        --model agcnn=runs/agcnn/model.pt --model clinical=runs/clinical/model.pt

Prints one markdown table (docs/OPTIONS.md holds its output). For each model and each measure: the
AUC with its bootstrap 95 % CI, and against the default the paired bootstrap difference (same
resampled images for both), its 95 % CI and two-sided bootstrap p. Measures:

- adult Pneumonia vs No Finding on the NIH films of the test split, then the same inside PA and
  inside AP films (where view position cannot be the answer);
- Kermany Pneumonia on its validation patients (Kermany has no test patients here: its folder is
  its official training split, pinned to train/val; validation chose each model's epoch and
  thresholds, so this row is not independent);
- every label any of the models assesses, inside each test source with ≥ 10 positives and 10
  negatives;
- where AG-CNN's attention boxes fall on the NIH test films;
- the shortcut references on the first measure's films: view position alone (AP = 1), age alone,
  sex alone (M = 1), and a logistic regression on age, sex and view fitted on the NIH training and
  validation films: what the patient information says without any image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH of a classifier to compare")
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()

    from pneumoscan.classify import Classifier, load_default
    from pneumoscan.labels import LABELS
    from pneumoscan.training.cache import CropCache
    from pneumoscan.training.metrics import MIN_PER_CLASS, auc_ci, auc_difference, roc_auc

    models = {"default": load_default()}
    for spec in args.model:
        name, _, path = spec.partition("=")
        models[name] = Classifier.load(path)
    cache = CropCache(args.cache)
    table = cache.table
    test_rows = np.flatnonzero((table.split == "test").to_numpy())
    kermany_val = np.flatnonzero(((table.source == "kermany") & (table.split == "val")
                                  & table.Pneumonia.notna()).to_numpy())
    rows = np.union1d(test_rows, kermany_val)
    probs = {}
    for name, classifier in models.items():
        print(f"scoring {len(rows)} images with {name} ({classifier.arch}"
              f"{', clinical ' + ','.join(classifier.clinical.names) if classifier.clinical else ''})", file=sys.stderr)
        full = np.full((len(table), len(LABELS)), np.nan, np.float32)
        full[rows] = classifier.predict_proba(cache.images(rows).astype(np.float32) / 255.0, batch_size=32,
                                              **cache.scoring_inputs(classifier, rows))
        probs[name] = full

    lines = ["| measure | images (pos / neg) | " + " | ".join(models) + " |",
             "|---|---|" + "---|" * len(models)]

    def add(measure: str, index: np.ndarray, y: np.ndarray, label: str) -> None:
        j = LABELS.index(label)
        cells = []
        for name in models:
            p = probs[name][index, j]
            low, high = auc_ci(y, p, args.n_boot)
            cell = f"{roc_auc(y, p):.3f} ({low:.3f}–{high:.3f})"
            if name != "default":
                d = auc_difference(y, p, probs["default"][index, j], args.n_boot)
                cell += f"<br>Δ {d['difference']:+.3f} ({d['low']:+.3f}–{d['high']:+.3f}), p = {d['p']:.2f}"
            cells.append(cell)
        lines.append(f"| {measure} | {int(np.nansum(y))} / {int(np.sum(y == 0))} | " + " | ".join(cells) + " |")

    nih = ((table.source == "nih") & (table.split == "test")
           & ((table.Pneumonia == 1) | (table["No Finding"] == 1))).to_numpy()
    task = np.flatnonzero(nih)
    y_task = table.Pneumonia.to_numpy()[task]
    add("adult Pneumonia vs No Finding, NIH test", task, y_task, "Pneumonia")
    views = table.view.to_numpy()[task]
    for view in ("PA", "AP"):
        inside = views == view
        add(f"  same, {view} films only", task[inside], y_task[inside], "Pneumonia")
    add("Kermany Pneumonia, validation patients", kermany_val, table.Pneumonia.to_numpy()[kermany_val], "Pneumonia")
    assessed = [label for label in LABELS if any(label in m.assessed_labels for m in models.values())]
    for label in assessed:
        for source in sorted(table.source.unique()):
            index = np.flatnonzero(((table.source == source) & (table.split == "test")
                                    & table[label].notna()).to_numpy())
            y = table[label].to_numpy()[index]
            if min(np.sum(y == 1), np.sum(y == 0)) >= MIN_PER_CLASS:
                add(f"{label} within {source}, test", index, y, label)

    print("\n".join(lines))
    print()
    print("Patient information alone, on the first row's films (no image):")
    print()
    print("| score | AUC (95 % CI) |\n|---|---|")
    age = table.age.to_numpy(float)[task]
    sex = (table.sex.to_numpy()[task] == "M").astype(float)
    for name, score in (("view position alone (AP = 1)", (views == "AP").astype(float)),
                        ("age alone", age), ("sex alone (M = 1)", sex),
                        ("logistic regression on age, sex, view (fitted on NIH train + val)", clinical_only(table, task))):
        low, high = auc_ci(y_task, score, args.n_boot)
        print(f"| {name} | {roc_auc(y_task, score):.3f} ({low:.3f}–{high:.3f}) |")
    nih_test = np.flatnonzero(((table.source == "nih") & (table.split == "test")).to_numpy())
    for name, classifier in models.items():
        if classifier.arch == "agcnn":
            print(f"\n{name}: " + attention_summary(classifier, cache, nih_test))
    return 0


def attention_summary(classifier, cache, index: np.ndarray) -> str:
    """Where AG-CNN's attention boxes fall on these rows' lung crops."""
    from pneumoscan.crop import attention_box

    maps = classifier._global_maps(cache.images(index).astype(np.float32) / 255.0)
    size = classifier.size
    boxes = np.array([attention_box(m, classifier.attention_threshold, size) for m in maps])
    centre = (boxes[:, 1] + boxes[:, 3]) / 2
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / size ** 2
    return (f"attention boxes on {len(index)} NIH test films: centre in the bottom quarter of the lung "
            f"crop {np.mean(centre > 0.75 * size):.0%}, bottom third {np.mean(centre > 2 * size / 3):.0%}; "
            f"median box {np.median(area):.0%} of the crop")


def clinical_only(table, task: np.ndarray) -> np.ndarray:
    """Pneumonia probability from age, sex and view alone (one-hot codes of the shipped encodings),
    a logistic regression fitted on the NIH training and validation Pneumonia/No Finding films."""
    from sklearn.linear_model import LogisticRegression

    from pneumoscan.clinical import AGE_EDGES, ClinicalSpec, Field, table_records

    spec = ClinicalSpec([Field("age", "numeric", AGE_EDGES), Field("sex", "category", values=("F", "M")),
                         Field("view", "category", values=("AP", "PA"))])

    def onehot(index: np.ndarray) -> np.ndarray:
        codes = spec.encode(table_records(table.iloc[index], spec.names))
        return np.concatenate([np.eye(f.size)[codes[:, k]] for k, f in enumerate(spec.fields)], axis=1)

    fit = np.flatnonzero(((table.source == "nih") & table.split.isin(["train", "val"])
                          & ((table.Pneumonia == 1) | (table["No Finding"] == 1))).to_numpy())
    model = LogisticRegression(max_iter=1000).fit(onehot(fit), table.Pneumonia.to_numpy()[fit].astype(int))
    return model.predict_proba(onehot(task))[:, 1]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    raise SystemExit(main())
