"""Fit the input gate's learnt check, report it honestly, and save it as a model file.

    python tools/gate_fit.py [--films 100] [--out runs/gatefit] [--save src/pneumoscan/models/frontal_gate.pt]

Positives: every frontal film in ../shared/data (all sources). Negatives: the non-chest set of
``tools/gate_report.py`` (scikit-image photographs, the images inside pydicom's CT/MR/US/NM/RT
test files, the COVID-19 collection's lateral views), with ``--films`` films per source rotated by
90°, 180° and 270°, inverted, and replaced by blank, noise and gradient images. Features:
:func:`pneumoscan.gate.gate_features` on the shipped lung U-Net's map (cached in OUT/features.npz).

The figures printed are **out of fold**: 5 folds grouped by patient (a film and everything made
from it, a photograph, a DICOM file, in one fold), every image scored by a model that never saw
it, with the threshold chosen on the training folds only (the lowest score among the training
folds' frontal films after leaving out ``--refuse-share`` of them). The saved model is then
fitted on everything, its threshold chosen the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def collect(films_per_source: int) -> list[tuple[str, str, object, bool]]:
    """(set, group, path or (name, array), frontal) for every image."""
    from gate_report import DATA, negatives, positives

    from pneumoscan.data import build_manifest, resolve_sources

    table = build_manifest({k: v for k, v in resolve_sources(DATA).items() if k != "rsna"})
    patient = dict(zip(table.path.astype(str), table.patient.astype(str)))
    pos = positives(0)
    rng = np.random.default_rng(0)
    films: list[str] = []
    for source in sorted({s for s, _ in pos}):
        paths = [p for s, p in pos if s == source]
        films += list(rng.choice(paths, min(films_per_source, len(paths)), replace=False))
    items = [(s, patient.get(p, p), p, True) for s, p in pos]
    film_group = {Path(f).name: patient.get(f, f) for f in films}
    for group, item in negatives(films):
        if isinstance(item, tuple):
            items.append((group, film_group.get(item[0], item[0]), item, False))
        else:  # a pydicom test file or a lateral film: its pixels, tags left out (the tags refuse it anyway)
            items.append((group, Path(item).name, item, False))
    return items


def features(items, segmenter) -> tuple[np.ndarray, list[dict]]:
    """The gate's feature vector of every readable image (tags are not features: ignored here)."""
    from gate_report import load
    from tqdm import tqdm

    from pneumoscan.gate import measure
    from pneumoscan.films import XrayReadError

    rows, vectors = [], []
    for group, key, item, frontal in tqdm(items, unit="img", desc="features"):
        try:
            name, pixels, _ = load(item)
        except XrayReadError:
            continue
        vectors.append(measure(segmenter.probabilities([pixels])[0], pixels)[1])
        rows.append({"set": group, "group": key, "item": name, "frontal": frontal})
    return np.stack(vectors), rows


def fit(x: np.ndarray, y: np.ndarray, refuse_share: float):
    """Standardised logistic regression; threshold = the ``refuse_share`` quantile of the
    positives' scores. Returns (mean, std, weight, bias, threshold)."""
    from sklearn.linear_model import LogisticRegression

    mean, std = x.mean(0), x.std(0) + 1e-6
    model = LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced").fit((x - mean) / std, y)
    w, b = model.coef_[0], float(model.intercept_[0])
    scores = score(x[y == 1], mean, std, w, b)
    return mean, std, w, b, float(np.quantile(scores, refuse_share))


def score(x, mean, std, w, b) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(((x - mean) / std) @ w + b)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--films", type=int, default=100, help="films per source to rotate, invert, replace")
    parser.add_argument("--refuse-share", type=float, default=0.002,
                        help="share of the frontal films the threshold may refuse")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gatefit")
    parser.add_argument("--save", type=Path, default=None)
    args = parser.parse_args()
    from gate_report import summarise
    from sklearn.model_selection import GroupKFold

    from pneumoscan.segment import load_default

    segmenter = load_default()
    cache = args.out / "features.npz"
    if cache.exists():
        blob = np.load(cache, allow_pickle=False)
        x, table = blob["x"], pd.read_csv(args.out / "features.csv")
    else:
        x, rows = features(collect(args.films), segmenter)
        table = pd.DataFrame(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez(cache, x=x)
        table.to_csv(args.out / "features.csv", index=False)
    y = table.frontal.to_numpy().astype(int)
    oof = np.zeros(len(y))
    accepted = np.zeros(len(y), bool)
    for train, held in GroupKFold(5).split(x, y, table.group.astype(str)):
        mean, std, w, b, threshold = fit(x[train], y[train], args.refuse_share)
        oof[held] = score(x[held], mean, std, w, b)
        accepted[held] = oof[held] >= threshold
    table["score"], table["accepted"] = oof, accepted
    summary = summarise(table, "out of fold")
    table.to_csv(args.out / "scores_oof.csv", index=False)
    if args.save:
        save(args, x, y, table, summary, segmenter)
    return 0


def save(args, x, y, table, summary, segmenter) -> None:
    """Fit on everything and write the model file with what it was fitted on and how it did."""
    from pneumoscan.gate import MEASURES, THUMB, FrontalCheck

    mean, std, w, b, threshold = fit(x, y, args.refuse_share)
    check = FrontalCheck({"mean": mean, "std": std, "weight": w, "bias": np.array([b])},
                         {"threshold": threshold})
    meta = check.save(
        args.save,
        name="frontal_gate", architecture="standardised logistic regression",
        features={"measures": list(MEASURES), "flags": 3, "film_thumbnail": THUMB, "lung_map_thumbnail": THUMB},
        lung_model_sha256=segmenter.meta["weights_sha256"],
        threshold_rule=f"the {args.refuse_share:.1%} quantile of the frontal films' scores",
        training_data={s: int(n) for s, n in table.groupby("set").size().items()},
        out_of_fold={"folds": "5, grouped by patient / source image",
                     "frontal_accepted": round(float(table[table.frontal].accepted.mean()), 4),
                     "non_chest_refused": round(float(1 - table[~table.frontal].accepted.mean()), 4),
                     "per_set": dict(zip(summary.set, summary.rate))},
        command=f"python tools/gate_fit.py --films {args.films} --refuse-share {args.refuse_share} "
                f"--save {args.save.name}")
    print(f"saved {args.save} (threshold {threshold:.3f}, sha256 {meta['sha256'][:12]}…)")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    raise SystemExit(main())
