"""Issue 52's cheap levers, measured out of fold on the NIH originals: test-time crop jitter (TTA)
and an anatomy-informed second stage.

    python benchmarks/adult_levers.py --cv ~/runs/cv --cache ~/runs/cache224m \
        --ctr ~/runs/ctr_nih/ctr_nih.csv --out ~/runs/levers

``--cv`` is a finished ``pneumoscan crossval`` run (its ``features.npz``, ``config.json`` and
``cv_report.json``) on ``--cache``. Each fold's head is refitted exactly as that run fitted it (same
films, weights and L2; the refitted out-of-fold probabilities are checked against its ``oof.csv``),
so every film below is scored by a head that never saw the film or its patient.

- **TTA**: every NIH original is segmented once and cut into crops whose lung box is jittered
  (margin 2 %, 5 % as shipped, 8 %; the box shifted 3 % left/right/up/down); each crop goes
  through the frozen backbone and the film's fold head; the TTA score is the mean logit. Cost is
  measured as backbone passes per film and films/s on this CPU (one thread).
- **Anatomy**: a per-label logistic second stage on the NIH originals, inputs the head's
  out-of-fold logit plus what the pipeline measures on the film (lung area share, left/right lung
  area ratio, lung box height/width, lower-third share of the lung area, and from ``--ctr``
  (benchmarks/ctr_cardiomegaly.py's per-film table) the ungated CTR, heart and lung mask quality,
  heart-shape score), fitted on the NIH films of the other folds (the same patient folds) and
  judged on the scored fold; then the same with the header's AP view, and with age and sex, and
  the view alone beside the logit, to tell the film's share of a gain from the ward's.

Every difference is paired (the same resampled patients for both scores) with its 95 % CI.
Writes ``levers.json`` and ``levers.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adult_eval import auc_entry, fmt  # noqa: E402

#: (margin, dx, dy) of each TTA crop, as fractions of the lung box; the first is the shipped crop.
JITTER = ((0.05, 0.0, 0.0), (0.02, 0.0, 0.0), (0.08, 0.0, 0.0), (0.05, -0.03, 0.0), (0.05, 0.03, 0.0),
          (0.05, 0.0, -0.03), (0.05, 0.0, 0.03))
LABELS_JUDGED = ("Pneumonia", "No Finding", "Cardiomegaly", "Effusion", "Edema", "Atelectasis",
                 "Infiltration", "Consolidation")


def jittered_box(mask: np.ndarray, margin: float, dx: float, dy: float) -> tuple[int, int, int, int]:
    """The lung box of ``mask`` with ``margin`` on each side, shifted by (dx, dy) box widths/heights."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    w, h = x1 - x0, y1 - y0
    x0, x1 = x0 - margin * w + dx * w, x1 + margin * w + dx * w
    y0, y1 = y0 - margin * h + dy * h, y1 + margin * h + dy * h
    height, width = mask.shape
    return (max(0, int(np.floor(x0))), max(0, int(np.floor(y0))), min(width, int(np.ceil(x1))),
            min(height, int(np.ceil(y1))))


def lung_measures(mask: np.ndarray) -> list[float]:
    """Lung area share, left/right area ratio (image halves at the box centre), box height/width,
    share of the lung area in the lower third of the box."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [np.nan] * 4
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    mid = (x0 + x1) / 2
    left, right = float((xs < mid).sum()), float((xs >= mid).sum())
    lower = float((ys >= y0 + 2 * (y1 - y0) / 3).sum())
    return [float(mask.mean()), left / max(right, 1.0), (y1 - y0) / max(x1 - x0, 1), lower / len(ys)]


def fold_heads(x, labels, sources, views, patients, cfg, report):
    from pneumoscan.training.crossval import fit_linear_head, row_weights
    from pneumoscan.training.data import patient_folds

    fold_of = patient_folds(patients, cfg.folds, cfg.seed)
    heads = []
    for f, chosen in enumerate(report["folds"]):
        train = fold_of != f
        weights = row_weights(labels[train], sources[train], views[train], cfg, chosen["domain_weight"])
        heads.append(fit_linear_head(x[train], labels[train], weights, chosen["l2"]))
        print(f"fold head {f + 1}/{cfg.folds} refitted", file=sys.stderr, flush=True)
    return fold_of, heads


@dataclass
class CvRun:
    """A finished ``crossval`` run read back with its cache: its settings, its films (the rows it
    used), their features and labels as it learnt and judged them."""

    cfg: Any
    report: dict
    cache: Any
    rows: np.ndarray
    x: np.ndarray
    table: Any
    raw: np.ndarray
    labels: np.ndarray
    sources: np.ndarray
    views: np.ndarray
    patients: np.ndarray


def load_cv_run(cv: Path, cache_folder: Path) -> CvRun:
    """``cv``'s config, report and features on ``cache_folder`` (refused if they were computed on
    other rows), with the labels as ``crossval`` made them."""
    from pneumoscan.labels import LABELS
    from pneumoscan.training.cache import CropCache
    from pneumoscan.training.crossval import CrossvalConfig, against_normal
    from pneumoscan.training.data import select_rows, training_labels

    cfg_dict = json.loads((cv / "config.json").read_text())
    cfg = CrossvalConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    cache = CropCache(cache_folder)
    rows = np.sort(np.concatenate(list(select_rows(cache, cfg.frontal_only).values())))
    saved = np.load(cv / "features.npz")
    if not np.array_equal(saved["indices"], rows):
        raise SystemExit(f"{cv}/features.npz was not computed on these cache rows")
    table = cache.table.iloc[rows].reset_index(drop=True)
    raw = against_normal(table[list(LABELS)].to_numpy(np.float32), cfg.normal_contrast)
    sources = table["source"].astype(str).to_numpy()
    return CvRun(cfg, json.loads((cv / "cv_report.json").read_text()), cache, rows, saved["features"], table, raw,
                 training_labels(raw, sources, cfg.min_positives)[0], sources,
                 table["view"].fillna("").astype(str).str.upper().to_numpy(), table["patient"].astype(str).to_numpy())


def logits(x: np.ndarray, head) -> np.ndarray:
    W, b = head
    return x @ W.T + b


def tta_features(paths: list[str], model, size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Backbone features (films × jitters × 1024), the lung measures per film, and seconds per
    backbone pass (one thread)."""
    import torch

    from pneumoscan.crop import classifier_crop, lungs_only
    from pneumoscan.pipeline import read_segment_crop
    from pneumoscan.segment import LungSegmenter, default_model_path

    segmenter = LungSegmenter.load(default_model_path())
    feats = np.zeros((len(paths), len(JITTER), 1024), np.float32)
    measures = np.full((len(paths), 4), np.nan)
    spent, passes, i = 0.0, 0, 0
    for chunk in read_segment_crop(paths, segmenter, size, batch=16, threads=1):
        for item in chunk:
            if item.seg is None or item.seg.fallback:
                feats[i] = np.nan
            else:
                measures[i] = lung_measures(item.seg.mask)
                film = lungs_only(item.image.pixels, item.seg.mask)
                crops = np.stack([classifier_crop(film, jittered_box(item.seg.mask, *j), size) for j in JITTER])
                started = time.perf_counter()
                with torch.inference_mode():
                    out = model.feature_map(torch.from_numpy(crops.astype(np.float32) / 255.0)[:, None])
                spent += time.perf_counter() - started
                passes += len(JITTER)
                feats[i] = out.mean(dim=(2, 3)).numpy()
            i += 1
        print(f"TTA crops: {i}/{len(paths)} films", file=sys.stderr, flush=True)
    return feats, measures, spent / max(passes, 1)


def stacked(z: np.ndarray, y: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Out-of-fold scores of a logistic second stage on ``z`` (rows with a known label), fitted on
    the other folds' films."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = np.full(len(y), np.nan)
    known = ~np.isnan(y)
    for f in np.unique(fold):
        train, test = known & (fold != f), fold == f
        model = make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
        model.fit(z[train], y[train].astype(int))
        out[test] = model.decision_function(z[test])
    return out


def main() -> None:
    import pandas as pd
    import torch

    from pneumoscan.classify import Classifier
    from pneumoscan.labels import LABELS
    from pneumoscan.training.metrics import auc_difference

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cv", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--ctr", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--boot", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    run = load_cv_run(args.cv, args.cache)
    cfg, cache, x, table, raw = run.cfg, run.cache, run.x, run.table, run.raw
    sources, views, patients, labels = run.sources, run.views, run.patients, run.labels
    fold_of, heads = fold_heads(x, labels, sources, views, patients, cfg, run.report)

    nih = np.flatnonzero(sources == "nih")
    base = np.stack([logits(x[i], heads[fold_of[i]]) for i in nih])
    oof = pd.read_csv(args.cv / "oof.csv").set_index("path").loc[table["path"].iloc[nih], list(LABELS)].to_numpy()
    check = float(np.nanmax(np.abs(1 / (1 + np.exp(-base)) - oof)))
    print(f"refitted heads reproduce oof.csv to {check:.2e}", file=sys.stderr)

    kept = args.out / "tta_features.npz"  # the slow part (one backbone pass per crop), kept for reruns
    if kept.exists() and np.array_equal(np.load(kept)["paths"], table["path"].iloc[nih].to_numpy(str)):
        saved = np.load(kept)
        feats, measures, per_pass = saved["features"], saved["measures"], float(saved["seconds_per_pass"])
    else:
        parent = Classifier.load(cfg.backbone)
        feats, measures, per_pass = tta_features(table["path"].iloc[nih].tolist(), parent.model, cache.size)
        np.savez(kept, features=feats, measures=measures, seconds_per_pass=per_pass,
                 paths=table["path"].iloc[nih].to_numpy(str))
    jit = np.stack([np.stack([logits(feats[k, j], heads[fold_of[i]]) for j in range(len(JITTER))])
                    for k, i in enumerate(nih)])  # films × jitters × labels
    ok = ~np.isnan(jit).any(axis=(1, 2))
    crop_check = float(np.nanmax(np.abs(jit[ok, 0] - base[ok])))

    ctr = pd.read_csv(args.ctr).set_index("path")
    names = table["path"].iloc[nih].map(lambda p: Path(p).name)
    ctr = ctr.reindex(names.to_numpy())
    image = np.column_stack([measures, ctr["ctr_ungated"].to_numpy(float), ctr["heart_quality"].to_numpy(float),
                             ctr["lung_quality"].to_numpy(float), ctr["heart_shape"].to_numpy(float)])
    view = (views[nih] == "AP").astype(float)[:, None]
    person = np.column_stack([table["age"].iloc[nih].to_numpy(float),
                              (table["sex"].iloc[nih].astype(str) == "M").astype(float)])
    # What the film's pixels measure, then what the header says: the view is a property of the
    # ward (portable AP films are sicker patients'), which the head is trained to ignore
    # (view balance), so it is kept apart to show how much of a gain is the ward and not the film.
    second_stages = {"anatomy": image, "anatomy + view": np.hstack([image, view]),
                     "anatomy + view + age, sex": np.hstack([image, view, person]), "view": view}
    groups, fold = patients[nih], fold_of[nih]
    result: dict = {"films": int(len(nih)), "films_with_every_crop": int(ok.sum()),
                    "refit_check_max_abs_prob": check, "shipped_crop_vs_cache_max_abs_logit": crop_check,
                    "seconds_per_backbone_pass": per_pass, "jitter": [list(j) for j in JITTER], "labels": {}}
    for label in LABELS_JUDGED:
        j = LABELS.index(label)
        y = raw[nih, j].astype(float)
        y[~ok] = np.nan
        tta = jit[:, :, j].mean(axis=1)
        entry = {"shipped": auc_entry(y, base[:, j], args.boot), "tta": auc_entry(y, tta, args.boot),
                 "tta_vs_shipped": auc_difference(y, tta, base[:, j], args.boot, groups=groups),
                 "logit_restacked": auc_entry(y, stacked(base[:, j:j + 1], y, fold), args.boot)}
        for name, extra in second_stages.items():
            score = stacked(np.column_stack([base[:, j], extra]), y, fold)
            entry[name] = auc_entry(y, score, args.boot)
            entry[f"{name} vs shipped"] = auc_difference(y, score, base[:, j], args.boot, groups=groups)
        result["labels"][label] = entry
        print(f"{label}: shipped {fmt(entry['shipped'])}, TTA {fmt(entry['tta'])}, "
              f"anatomy {fmt(entry['anatomy'])}", file=sys.stderr)
    (args.out / "levers.json").write_text(json.dumps(result, indent=2))
    lines = [f"Out of fold on {int(ok.sum())} NIH originals ({len(nih)} in the cross-validation); TTA: "
             f"{len(JITTER)} crops a film ({per_pass * 1000:.0f} ms a backbone pass, one thread, so "
             f"{len(JITTER)}× the classifier's cost).", "",
             "| label | pos/neg | shipped | TTA − shipped | " + " | ".join(f"+ {n} − shipped" for n in second_stages)
             + " |", "|---|---|---|---|" + "---|" * len(second_stages)]

    def diff(d: dict) -> str:
        return f"{d['difference']:+.3f} ({d['low']:+.3f}…{d['high']:+.3f})"

    for label, e in result["labels"].items():
        lines.append(f"| {label} | {e['shipped']['positives']}/{e['shipped']['negatives']} | {fmt(e['shipped'])} | "
                     f"{diff(e['tta_vs_shipped'])} | "
                     + " | ".join(f"{fmt(e[n])}: {diff(e[f'{n} vs shipped'])}" for n in second_stages) + " |")
    (args.out / "levers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
