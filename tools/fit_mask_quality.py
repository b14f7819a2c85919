"""Choose the mask-quality estimate and its thresholds on JSRT films scored by models that never saw
them, and write the thresholds into copies of the U-Net files (weights unchanged).

    for k in 0 1 2 3 4; do pneumoscan train-seg --out runs/heart/fold$k --jsrt ../shared/data/jsrt \\
        --structure heart --folds 5 --fold $k --epochs 100 --schedule cosine; done
    python tools/fit_mask_quality.py --folds runs/heart --out runs/mask_quality [--transforms 0,2] [--write]

Heart: each of the 147 films is read by the fold model that held it out (the shipped recipe,
``benchmarks/heart_cv.py``); lungs: the shipped lung model, which never saw JSRT. For every film:
the true Dice of the cleaned mask against the SCR mask, the TTA agreement
(:mod:`pneumoscan.maskquality`) and, as the zero-cost alternative, the soft Dice of the map with
its own mask, and for the heart a shape prior fitted on the training folds' SCR masks
(:class:`pneumoscan.maskquality.ShapeModel`). Spearman correlations say which ranks true Dice
better. The threshold flags at most 5 % of good masks (Dice >= 0.90) and the most failed masks
(heart Dice < 0.85, lungs < 0.90) flagged under that limit, placed halfway between the
best-looking failed mask it flags and the next mask above (no more false alarms than needed);
the share flagged of each is reported.
``--write`` stores ``mask_quality`` (method, threshold, where it was chosen, the figures) in
``<out>/lung_unet_small.pt`` and ``<out>/heart_unet_small.pt``, each checked to carry the
shipped weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
GOOD, FALSE_ALARMS = 0.90, 0.05
#: A failed mask: the issue's heart cut; for the lungs, segmented at Dice 0.965 on average here,
#: a mask under 0.90 misplaces the thoracic width.
FAILED = {"heart": 0.85, "lung": 0.90}
#: The estimate used per structure (chosen by the Spearman correlations this tool prints).
ESTIMATE = {"heart": "mean", "lung": "tta"}


def soft_dice(prob: np.ndarray, threshold: float) -> float:
    """Soft Dice of a probability map with its own thresholded mask (no extra pass)."""
    mask = prob >= threshold
    return float(2 * (prob * mask).sum() / (prob.sum() + mask.sum() + 1e-6))


def choose_threshold(quality: np.ndarray, dice: np.ndarray, bad: float) -> float:
    """Flag (quality < t) as many failed masks (Dice < ``bad``) as possible while flagging at most
    FALSE_ALARMS of good ones (Dice >= GOOD), with the widest margin: t lies halfway between the
    best-looking failed mask that can be flagged and the next mask above it. A higher t would
    flag more good masks and no more failed ones."""
    good = np.sort(quality[dice >= GOOD])
    cap = float(good[int(np.floor(FALSE_ALARMS * len(good)))]) if len(good) else float("inf")
    caught = quality[(dice < bad) & (quality < cap)]
    if not len(caught):
        return float(quality.min())  # nothing can be flagged within the cap: flag nothing
    highest = float(caught.max())
    above = quality[quality > highest]
    return (highest + float(above.min())) / 2 if len(above) else highest


def judged(quality: np.ndarray, dice: np.ndarray, threshold: float, bad: float) -> dict:
    from scipy.stats import spearmanr

    flagged = quality < threshold
    return {"films": int(len(dice)), "spearman_quality_vs_dice": round(float(spearmanr(quality, dice)[0]), 3),
            "threshold": round(threshold, 4), "failed_mask_dice_below": bad,
            "bad_masks": int((dice < bad).sum()), "bad_flagged": round(float(flagged[dice < bad].mean()), 3)
            if (dice < bad).any() else None,
            "good_masks": int((dice >= GOOD).sum()), "good_flagged": round(float(flagged[dice >= GOOD].mean()), 3),
            "flagged": int(flagged.sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", type=Path, required=True, help="folder of fold0..fold4 heart runs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--write", action="store_true", help="write the model files with their thresholds")
    parser.add_argument("--transforms", default="0,1,2,3,4,5,6,7",
                        help="which re-readings of pneumoscan.maskquality.TRANSFORMS (indices); the threshold "
                             "is chosen for them and the model files record them")
    args = parser.parse_args()

    import pandas as pd
    from scipy.stats import spearmanr

    from pneumoscan.data import JSRT
    from pneumoscan.films import read_xray
    from pneumoscan.maskquality import TRANSFORMS, ShapeModel, method, shape_frame
    from pneumoscan.measure import cardiothoracic_ratio
    from pneumoscan.segment import (
        HeartSegmenter,
        default_heart_model_path,
        default_model_path,
        heart_mask,
        load_default,
        locate_lungs,
    )
    from pneumoscan.training.segment import dice_iou_acc, read_mask

    chosen = tuple(TRANSFORMS[int(k)] for k in args.transforms.split(","))
    truth = JSRT(DATA / "jsrt").csv.set_index("path")
    frames = {path: shape_frame(read_mask(row["mask"]), read_mask(row.heart)) for path, row in truth.iterrows()}
    lungs = load_default()
    rows = []
    for fold in sorted(p for p in args.folds.glob("fold*") if (p / "model.pt").is_file()):
        heart = HeartSegmenter.load(fold / "model.pt")
        split = pd.read_csv(fold / "split.csv")
        shapes = ShapeModel.fit(np.stack([frames[p] for p in split.path[split.split == "train"]]))
        for path in split.path[split.split == "val"]:
            pixels = read_xray(path).pixels
            prepared = lungs.preprocessing(pixels)[None]
            heart_prob, lung_prob = heart.probabilities([], prepared)[0], lungs.probabilities([], prepared)[0]
            h, seg = heart_mask(heart_prob, pixels.shape), locate_lungs(lung_prob, pixels.shape)
            rows.append({"film": Path(path).stem, "fold": fold.name,
                         "heart_dice": dice_iou_acc(h, read_mask(truth.heart[path]))[0],
                         "heart_tta": heart.mask_quality(prepared, [h], chosen)[0],
                         "heart_soft": soft_dice(heart_prob, heart.threshold),
                         "heart_shape": shapes.fidelity(shape_frame(seg.mask, h)),
                         "heart_share": float(h.sum() / max(h.sum() + seg.mask.sum(), 1)),
                         "ctr": cardiothoracic_ratio(seg.mask, h, "PA").value,
                         "lung_dice": dice_iou_acc(seg.mask, read_mask(truth["mask"][path]))[0],
                         "lung_tta": lungs.mask_quality(prepared, [seg.mask], chosen)[0],
                         "lung_soft": soft_dice(lung_prob, lungs.threshold)})
    films = pd.DataFrame(rows)
    films["heart_mean"] = (films.heart_tta + films.heart_shape) / 2
    films["heart_min"] = np.minimum(films.heart_tta, films.heart_shape)
    args.out.mkdir(parents=True, exist_ok=True)
    films.to_csv(args.out / "mask_quality_jsrt.csv", index=False)
    report = {}
    for structure in ("heart", "lung"):
        dice = films[f"{structure}_dice"].to_numpy()
        names = [n for n in ("tta", "soft", "shape", "mean", "min") if f"{structure}_{n}" in films]
        candidates = {name: round(float(spearmanr(films[f"{structure}_{name}"], dice)[0]), 3) for name in names}
        quality = films[f"{structure}_{ESTIMATE[structure]}"].to_numpy()
        report[structure] = {"spearman_by_estimate": candidates, "estimate": ESTIMATE[structure],
                             **judged(quality, dice, choose_threshold(quality, dice, FAILED[structure]), FAILED[structure])}
    (args.out / "mask_quality_jsrt.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if args.write:
        chosen_on = ("JSRT, 147 films: heart masks from 5-fold cross-validation of the shipped recipe, lung masks "
                     "from the shipped lung model (never trained on JSRT); highest threshold flagging <= 5 % of "
                     "masks with Dice >= 0.90 (tools/fit_mask_quality.py)")
        everything = ShapeModel.fit(np.stack(list(frames.values())))
        for load, source, name, key in ((lambda p: type(lungs).load(p), default_model_path(), "lung_unet_small.pt", "lung"),
                                        (HeartSegmenter.load, default_heart_model_path(), "heart_unet_small.pt", "heart")):
            model = load(source)
            entry = report[key]
            section = {"method": method(chosen, shape=ESTIMATE[key] != "tta"),
                       "transforms": [list(t) for t in chosen],
                       "estimate": ESTIMATE[key], "threshold": entry["threshold"],
                       "chosen_on": chosen_on, "figures": entry}
            if ESTIMATE[key] != "tta":
                section["shape_model"] = everything.to_dict()
                section["shape_model_from"] = f"SCR heart masks of all {len(frames)} JSRT films, in the SCR lung masks' frame"
            model.meta["mask_quality"] = section
            weights = model.meta["weights_sha256"]
            written = model.save(args.out / name, half=True)
            if written["weights_sha256"] != weights:
                raise SystemExit(f"{name}: float16 storage changed the weights; not written")
            print(f"wrote {args.out / name} (weights {weights[:12]}…, threshold {entry['threshold']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
