"""Both crops at once: the lung-masked crop (what the shipped head reads) and the plain lung-box crop
(the same box, nothing blacked out: the heart, the mediastinum and what lies at the lung edge),
each through the same frozen backbone, their pooled features side by side in one linear head.
Judged out of fold on the NIH originals against the shipped protocol.

    pneumoscan prepare --manifest ~/runs/manifest26.csv --out ~/runs/cache224p --size 224 --workers 2
    python benchmarks/both_crops.py --cv ~/runs/cv --cache ~/runs/cache224m --plain ~/runs/cache224p \
        --out ~/runs/both_crops

Each fold's head is refitted as ``--cv`` fitted it (same films, weights and L2) on the features of
both crops; the lung-masked copies (``rsna-nih-masked``) arrive masked, so both their crops are the
same picture. Cost: two backbone passes a film. Writes ``both_crops.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adult_eval import auc_entry, fmt  # noqa: E402
from adult_levers import fold_heads, load_cv_run, logits  # noqa: E402

JUDGED = ("Pneumonia", "No Finding", "Cardiomegaly", "Effusion", "Edema")


def main() -> None:
    import torch

    from pneumoscan.classify import Classifier
    from pneumoscan.labels import LABELS
    from pneumoscan.training.cache import CropCache
    from pneumoscan.training.fit_head import branch_features
    from pneumoscan.training.metrics import auc_difference

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cv", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="the lung-masked crop cache of --cv")
    parser.add_argument("--plain", type=Path, required=True, help="the plain crop cache of the same manifest")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--boot", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    run = load_cv_run(args.cv, args.cache)
    cfg, table, raw, labels = run.cfg, run.table, run.raw, run.labels
    sources, views, patients = run.sources, run.views, run.patients
    plain = CropCache(args.plain)
    where = {p: i for i, p in enumerate(plain.table["path"])}
    missing = [p for p in table["path"] if p not in where]
    if missing:
        raise SystemExit(f"{len(missing)} films of --cache are not in --plain, e.g. {missing[0]}")
    plain_rows = np.array([where[p] for p in table["path"]])
    parent = Classifier.load(cfg.backbone)
    x_plain = branch_features(parent.model, plain, plain_rows, args.out / "features_plain.npz")["global"]
    x = np.hstack([run.x, x_plain])
    fold_of, heads = fold_heads(x, labels, sources, views, patients, cfg, run.report)
    nih = np.flatnonzero(sources == "nih")
    both = np.stack([logits(x[i], heads[fold_of[i]]) for i in nih])
    import pandas as pd

    shipped = pd.read_csv(args.cv / "oof.csv").set_index("path").loc[table["path"].iloc[nih], list(LABELS)].to_numpy()
    np.savez(args.out / "scores.npz", paths=table["path"].iloc[nih].to_numpy(str), both=both, shipped=shipped,
             labels=raw[nih], views=views[nih], patients=patients[nih])
    result: dict = {"films": int(len(nih)), "labels": {}}
    # inside each view as well: the NIH extracts tie the view to the labels (ADULT.md), so a gain
    # that is only the view read from the plain crop would vanish inside PA films and inside AP films
    strata = {"all": np.ones(len(nih), bool), "PA": views[nih] == "PA", "AP": views[nih] == "AP"}
    for label in JUDGED:
        j = LABELS.index(label)
        result["labels"][label] = {}
        for name, keep in strata.items():
            y = np.where(keep, raw[nih, j], np.nan).astype(float)
            entry = {"shipped": auc_entry(y, shipped[:, j], args.boot), "both": auc_entry(y, both[:, j], args.boot),
                     "both_vs_shipped": auc_difference(y, both[:, j], shipped[:, j], args.boot, groups=patients[nih])}
            result["labels"][label][name] = entry
            d = entry["both_vs_shipped"]
            print(f"{label} ({name}): shipped {fmt(entry['shipped'])}, both crops {fmt(entry['both'])}, "
                  f"{d['difference']:+.3f} ({d['low']:+.3f}…{d['high']:+.3f})", flush=True)
    (args.out / "both_crops.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
