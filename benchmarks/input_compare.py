"""Which input should the classifier read: the lung-masked crop or the plain lung-box crop?

    python benchmarks/input_compare.py --manifest runs/manifest25.csv --model runs/tail3/model.pt

Judged on the held-out NIH originals (``nih-cxr14*/``, unmasked, read and segmented as
``predict`` does), with 5-fold cross-validation grouped by patient:

- (a) lung-masked crops in training *and* in use: the model as trained (no fitting on these films),
  and a logistic probe on its pooled features of the masked crops, fitted in the folds;
- (b) the backbone trained on lung-masked films, then the final stage (the same logistic probe)
  fitted on the plain box crops of unmasked films, in the folds.

The probes make (a) and (b) differ only in the input. Tasks: adult Pneumonia vs No Finding
(NIH's labels), and each finding with at least 20 positives against all other films (these NIH
extracts were picked for Pneumonia vs No Finding, so the other findings ride with Pneumonia).
Writes ``input_compare.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def grouped_cv_scores(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold probabilities of a standardised, L2-regularised logistic probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = np.zeros(len(y))
    for train, test in StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(x, y, groups):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
        probe.fit(x[train], y[train])
        out[test] = probe.predict_proba(x[test])[:, 1]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="a classifier trained on lung-masked crops")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "input_compare")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()

    import torch

    from pneumoscan.classify import Classifier
    from pneumoscan.data.manifest import read_manifest
    from pneumoscan.labels import FINDINGS, LABELS, NO_FINDING
    from pneumoscan.segment import load_default
    from pneumoscan.training.cache import crop_paths
    from pneumoscan.training.metrics import auc_ci, roc_auc

    classifier, segmenter = Classifier.load(args.model), load_default()
    table = read_manifest(args.manifest)
    nih = table[(table.source == "nih") & (table.split == "test")].reset_index(drop=True)
    paths, sources = nih.path.tolist(), nih.source.tolist()
    features, probs = {}, {}
    for name, masked in (("masked", True), ("plain", False)):
        print(f"cropping and scoring {len(nih)} NIH originals ({name}) …", file=sys.stderr, flush=True)
        crops, records = crop_paths(paths, segmenter, classifier.size, threads=2, masked=masked, sources=sources)
        assert all(r["error"] == "" for r in records)
        x = torch.from_numpy(crops.astype(np.float32) / 255.0)[:, None]
        with torch.inference_mode():
            maps = torch.cat([classifier.model.feature_map(x[i:i + 32]) for i in range(0, len(x), 32)])
        features[name] = maps.mean(dim=(2, 3)).numpy()
        probs[name] = classifier.predict_proba(crops.astype(np.float32) / 255.0, batch_size=32)
    groups = nih.patient.to_numpy()
    tasks = {"Pneumonia vs No Finding": (((nih.Pneumonia == 1) | (nih[NO_FINDING] == 1)).to_numpy(),
                                         nih.Pneumonia.to_numpy(float), "Pneumonia")}
    for label in FINDINGS:
        y = nih[label].to_numpy(float)
        if np.nansum(y) >= 20:
            tasks[f"{label} vs rest"] = (np.ones(len(nih), bool), y, label)

    def entry(y: np.ndarray, p: np.ndarray) -> dict:
        low, high = auc_ci(y, p, args.n_boot)
        return {"auc": round(float(roc_auc(y, p)), 4), "ci": [round(float(low), 4), round(float(high), 4)]}

    result = {"model_sha256": classifier.meta["weights_sha256"], "films": len(nih), "tasks": {}}
    for task, (rows, y, label) in tasks.items():
        y, g = y[rows], groups[rows]
        k = LABELS.index(label)
        result["tasks"][task] = {
            "positives": int(y.sum()), "negatives": int((1 - y).sum()),
            "a_model_as_trained": entry(y, probs["masked"][rows, k]),
            "a_probe_masked": entry(y, grouped_cv_scores(features["masked"][rows], y, g)),
            "b_probe_plain": entry(y, grouped_cv_scores(features["plain"][rows], y, g)),
            "model_on_plain_crops": entry(y, probs["plain"][rows, k]),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "input_compare.json").write_text(json.dumps(result, indent=2))
    show = lambda e: f"{e['auc']:.3f} ({e['ci'][0]:.3f}–{e['ci'][1]:.3f})"  # noqa: E731
    print(f"{len(nih)} held-out NIH originals, classifier `{result['model_sha256'][:16]}…`\n")
    print("| task | pos / neg | (a) model as trained, masked crops | (a) probe, masked crops (CV) | "
          "(b) probe, plain crops (CV) | model on plain crops |")
    print("|---|---|---|---|---|---|")
    for task, e in result["tasks"].items():
        print(f"| {task} | {e['positives']} / {e['negatives']} | {show(e['a_model_as_trained'])} | "
              f"{show(e['a_probe_masked'])} | {show(e['b_probe_plain'])} | {show(e['model_on_plain_crops'])} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    raise SystemExit(main())
