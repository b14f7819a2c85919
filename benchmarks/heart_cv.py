"""The heart U-Net's cross-validation on JSRT: every film scored by the fold model that never saw it.

    for k in 0 1 2 3 4; do pneumoscan train-seg --out runs/heart/fold$k --jsrt ../shared/data/jsrt \\
        --structure heart --folds 5 --fold $k --epochs 100 --schedule cosine; done
    python benchmarks/heart_cv.py --runs runs/heart [--out runs/heart/cv]

The fixed cosine schedule keeps the last epoch, so a held-out fold chose nothing. For each of the
147 films, on its original 512² grid (the pipeline's clean-up): heart Dice against the SCR mask;
the shipped lung model's lung Dice (it never saw JSRT); and the CTR from the predicted masks
against the CTR from the SCR masks. Means with a bootstrap 95 % CI over films.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def mean_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(n_boot)]
    return [round(float(values.mean()), 4), round(float(np.percentile(means, 2.5)), 4),
            round(float(np.percentile(means, 97.5)), 4)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "heart")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import pandas as pd

    from pneumoscan.data import JSRT
    from pneumoscan.films import read_xray
    from pneumoscan.measure import cardiothoracic_ratio
    from pneumoscan.segment import HeartSegmenter, load_default
    from pneumoscan.training.segment import dice_iou_acc, read_mask

    masks = JSRT(DATA / "jsrt").csv.set_index("path")
    lungs_model = load_default()
    rows = []
    for fold in range(args.folds):
        run = args.runs / f"fold{fold}"
        heart_model = HeartSegmenter.load(run / "model.pt")
        split = pd.read_csv(run / "split.csv")
        for path in split.path[split.split == "val"]:
            pixels = read_xray(path).pixels
            heart = heart_model.heart_masks([pixels])[0]
            seg = lungs_model.segment(pixels)
            truth_heart, truth_lungs = read_mask(masks.heart[path]), read_mask(masks["mask"][path])
            predicted, truth = cardiothoracic_ratio(seg.mask, heart, "PA"), cardiothoracic_ratio(truth_lungs, truth_heart, "PA")
            rows.append({"film": Path(path).stem, "fold": fold,
                         "heart_dice": dice_iou_acc(heart, truth_heart)[0],
                         "lung_dice": dice_iou_acc(seg.mask, truth_lungs)[0],
                         "ctr": predicted.value, "ctr_truth": truth.value, "reason": predicted.reason})
    films = pd.DataFrame(rows)
    out = args.out or args.runs / "cv"
    out.mkdir(parents=True, exist_ok=True)
    films.to_csv(out / "heart_cv.csv", index=False)
    both = films.dropna(subset=["ctr", "ctr_truth"])
    error = (both.ctr - both.ctr_truth).to_numpy()
    agree = ((both.ctr > 0.5) == (both.ctr_truth > 0.5)).mean()
    report = {"films": len(films), "heart_dice": mean_ci(films.heart_dice.to_numpy()),
              "heart_dice_min": round(float(films.heart_dice.min()), 4),
              "heart_dice_below_0.90": int((films.heart_dice < 0.90).sum()),
              "lung_dice": mean_ci(films.lung_dice.to_numpy()),
              "ctr_measured": len(both), "ctr_mean_abs_error": mean_ci(np.abs(error)),
              "ctr_bias": round(float(error.mean()), 4),
              "ctr_correlation": round(float(np.corrcoef(both.ctr, both.ctr_truth)[0, 1]), 4),
              "ctr_same_side_of_0.50": round(float(agree), 4),
              "no_ctr": films.reason.dropna().value_counts().to_dict()}
    (out / "heart_cv.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
