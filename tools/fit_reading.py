"""Fit the reading section (calibration maps, paediatric reading, age estimate) from a finished
``pneumoscan crossval`` run and write it into a classifier file whose backbone and head gave that
run's out-of-fold scores (the run's own model.pt, or the shipped model the run reproduced).

    python tools/fit_reading.py --cv runs/cv --cache runs/cache224m \
        --model src/pneumoscan/models/chest_densenet121.pt --out new.pt

``crossval`` does the same for its own model.pt (``pneumoscan.training.reading_fit.fit_reading``);
this tool exists so that the shipped weights keep their identity when only the reading is added:
the weights are checked to be the model's own, and the run's head must give the same
out-of-fold figures (its assessment thresholds within 0.001 of the model's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pneumoscan.classify import Classifier
from pneumoscan.labels import LABELS
from pneumoscan.training.cache import CropCache
from pneumoscan.training.reading_fit import fit_reading


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", type=Path, required=True, help="crossval run folder (features.npz, oof.csv, config.json)")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="classifier whose reading is fitted")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threshold-tolerance", type=float, default=1e-3,
                        help="how far the run's thresholds may lie from the model's (a crossval on a rebuilt cache "
                             "reproduced the shipped ones within 0.0012)")
    parser.add_argument("--rules-only", action="store_true",
                        help="keep the model's calibration maps, paediatric assessment and age model; (re)write only "
                             "the normal rules and the rank scores' knots (reading_fit.normal_rules, rank_section)")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; a model file is never overwritten")
    config = json.loads((args.cv / "config.json").read_text())
    run = Classifier.load(args.cv / "model.pt")
    model = Classifier.load(args.model)
    if run.meta["init"].get("from_sha256") not in (model.meta.get("init", {}).get("from_sha256"),
                                                    model.meta["weights_sha256"], model.meta.get("sha256")):
        raise SystemExit("the crossval run read another backbone than this model's")
    gaps = {}
    for label in model.assessed_labels:
        a, b = run.meta["assessment"][label]["threshold"], model.meta["assessment"][label]["threshold"]
        gaps[label] = abs(a - b)
        if gaps[label] > args.threshold_tolerance:
            raise SystemExit(f"{label}: the run's threshold {a} differs from the model's {b} by more than "
                             f"{args.threshold_tolerance}: not the same head")
    print(f"the run reproduces the model's thresholds within {max(gaps.values()):.4f}", file=sys.stderr)
    features = np.load(args.cv / "features.npz")
    oof = pd.read_csv(args.cv / "oof.csv")
    table = CropCache(args.cache).table.iloc[features["indices"]].reset_index(drop=True)
    if not np.array_equal(table["path"].astype(str).to_numpy(), oof["path"].astype(str).to_numpy()):
        raise SystemExit("features.npz, oof.csv and the cache describe different films")
    scores, folds = oof[list(LABELS)].to_numpy(np.float64), oof["fold"].to_numpy()
    if args.rules_only:
        reading = add_rules(model, features["features"], table, scores, folds)
    else:
        reading = fit_reading(model, features["features"], table, scores, folds, method=config["operating"],
                              target=config["target"])
    weights = Classifier.load(args.model).meta["weights_sha256"]
    written = model.save(args.out, half=True)  # shipped files store float16: the same weights either way
    if written["weights_sha256"] != weights:
        written = model.save(args.out)
    if written["weights_sha256"] != weights:
        args.out.unlink()
        raise SystemExit("the weights changed on saving; nothing written")
    print(json.dumps({"sha256": written["sha256"], "weights_sha256": written["weights_sha256"],
                      "age_evidence": reading["age_model"]["evidence"],
                      "normal": {g: spec.get("normal") for g, spec in reading["populations"].items()}}, indent=1))


def add_rules(model: Classifier, x: np.ndarray, table: pd.DataFrame, oof: np.ndarray, folds: np.ndarray) -> dict:
    """The model's own reading with the normal rules and the rank knots (re)written."""
    from pneumoscan.training.normal_rule import normal_rules
    from pneumoscan.training.reading_fit import head_scores, rank_section

    reading = model.meta.get("reading")
    if not reading:
        raise SystemExit("--rules-only needs a model with a reading section (fit it without --rules-only first)")
    labels = table[list(LABELS)].to_numpy(np.float64)
    sources = table["source"].astype(str).to_numpy()
    ages = table["age"].to_numpy(np.float64)
    populations = reading["populations"]
    adult, child = normal_rules(oof, labels, folds, sources, ages, model.meta["assessment"],
                                populations["paediatric"]["assessment"], progress=lambda m: print(m, file=sys.stderr))
    populations["adult"]["normal"] = adult
    if child is not None:
        populations["paediatric"]["normal"] = child
    reading["rank"] = rank_section(head_scores(model, x), sources)
    model._read_assessment()
    return reading


if __name__ == "__main__":
    main()
