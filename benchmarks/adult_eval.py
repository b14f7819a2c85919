"""Issue 14's targets for a classifier, on the patient-wise dev split of ../shared/data.

    python benchmarks/adult_eval.py --manifest runs/manifest.csv --cache runs/cache224 [--model M]

Prints one table:
- adult Pneumonia vs No Finding (NIH films of the test split: Pneumonia = 1 against No Finding = 1)
  AUC with its bootstrap 95 % CI, and the AUC of the view position alone (AP = 1) on the same
  films, so that nobody mistakes the portable-film shortcut for progress;
- Kermany Pneumonia AUC on the validation patients;
- on NIH "No Finding" films of the test split, through the whole predictor (input gate
  included), the median and maximum number of findings listed, and how many the gate refused;
- every label the model assesses, with its within-source validation evidence.
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
    parser.add_argument("--model", type=Path, default=None, help="classifier file (default: shipped)")
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()

    from pneumoscan.cache import CropCache
    from pneumoscan.classify import Classifier, load_default
    from pneumoscan.evaluate import auc_ci, roc_auc
    from pneumoscan.labels import LABELS
    from pneumoscan.predict import Predictor

    classifier = Classifier.load(args.model) if args.model else load_default()
    cache = CropCache(args.cache)
    table = cache.table
    j = LABELS.index("Pneumonia")
    rows = []

    def scored(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.flatnonzero(mask)
        probs = classifier.predict_proba(cache.images(index).astype(np.float32) / 255.0, batch_size=32)
        return index, probs

    nih_test = ((table.source == "nih") & (table.split == "test")
                & ((table.Pneumonia == 1) | (table["No Finding"] == 1))).to_numpy()
    index, probs = scored(nih_test)
    y = table.Pneumonia.to_numpy()[index]
    low, high = auc_ci(y, probs[:, j], args.n_boot)
    rows.append(("adult Pneumonia vs No Finding, NIH test split", f"{int(y.sum())} / {int((1 - y).sum())}",
                 f"{roc_auc(y, probs[:, j]):.3f} ({low:.3f}–{high:.3f})"))
    view = (table.view.to_numpy()[index] == "AP").astype(float)
    vlow, vhigh = auc_ci(y, view, args.n_boot)
    rows.append(("  same films, view position alone (AP = 1)", "", f"{roc_auc(y, view):.3f} ({vlow:.3f}–{vhigh:.3f})"))
    for v in ("PA", "AP"):
        inside = table.view.to_numpy()[index] == v
        if len(np.unique(y[inside])) == 2:
            rows.append((f"  same task, {v} films only", f"{int(y[inside].sum())} / {int((1 - y[inside]).sum())}",
                         f"{roc_auc(y[inside], probs[inside, j]):.3f}"))
    kermany_val = ((table.source == "kermany") & (table.split == "val") & table.Pneumonia.notna()).to_numpy()
    index, probs = scored(kermany_val)
    y = table.Pneumonia.to_numpy()[index]
    low, high = auc_ci(y, probs[:, j], args.n_boot)
    rows.append(("Kermany Pneumonia, validation patients", f"{int(y.sum())} / {int((1 - y).sum())}",
                 f"{roc_auc(y, probs[:, j]):.3f} ({low:.3f}–{high:.3f})"))

    predictor = Predictor.from_paths(cls_model=args.model) if args.model else Predictor.from_default()
    normals = table.loc[(table.source == "nih") & (table.split == "test") & (table["No Finding"] == 1), "path"]
    results = predictor.predict_batch(list(normals))
    counts = [len(r.findings) for r in results if r.findings is not None]
    refused = sum(1 for r in results if r.quality and not r.quality["frontal_chest"])
    rows.append(("findings listed on NIH No Finding test films (median / max)", f"{len(results)} films",
                 f"{np.median(counts):.0f} / {max(counts)}" + (f"; {refused} refused by the gate" if refused else "")))
    width = max(len(r[0]) for r in rows)
    print(f"classifier weights SHA-256 {classifier.meta['weights_sha256'][:16]}…")
    print(f"{'measure'.ljust(width)}  {'positives / negatives':>22}  AUC (95 % CI) or value")
    for name, n, value in rows:
        print(f"{name.ljust(width)}  {n:>22}  {value}")
    print("\nassessed labels:")
    for label in LABELS:
        entry = (classifier.meta.get("assessment") or {}).get(label) or {}
        print(f"  {label:<20} {'assessed' if entry.get('assessed') else 'not assessed':<13} "
              f"threshold {entry.get('threshold')}  {entry.get('reason', 'no assessment in this model file')}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    raise SystemExit(main())
