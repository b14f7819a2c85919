"""Cardiomegaly from the cardiothoracic ratio on adult NIH films the heart model never saw.

    python benchmarks/ctr_cardiomegaly.py [--heart-model M] [--out runs/ctr_nih]

Every NIH original in ``nih-cxr14/`` and ``nih-cxr14-extra/`` (NIH's report-mined labels) goes
through the predictor (input gate, lung U-Net, heart U-Net, CTR, classifier; ``force`` so that a
film the gate refuses is still measured, and counted). The heart model learnt from JSRT only, so
no NIH film chose anything in it. Reported, each with its number of films and a bootstrap 95 % CI:

- the CTR's AUC for NIH's Cardiomegaly label, on all films with a CTR and inside PA and AP films;
- the shipped classifier's Cardiomegaly probability on the same films, and the view alone;
- CTR + view (logistic, AP magnifies the heart) and CTR + view + classifier, as out-of-fold scores
  of a patient-grouped 5-fold cross-validation (the test fold chooses nothing);
- sensitivity / specificity of the textbook PA cut-off (CTR > 0.50) on PA films, and of the
  out-of-fold Youden cut-off of CTR + view on all films;
- how many films got no CTR, and why; how many called findings have no explanation (``cams``);
- the mask-quality gate (:mod:`pneumoscan.maskquality`): the CTR's AUC over the films whose ratio
  is reported against the same films' ratios without the gate (computed from the same masks), and
  the share of films reported, so that the gate cannot look better only by dropping films.

Writes ``ctr_nih.json``, ``ctr_nih.csv`` (one row per film) and ``ctr_nih.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adult_eval import auc_entry, fmt  # noqa: E402


def grouped_oof(features: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5) -> np.ndarray:
    """Out-of-fold logistic-regression scores, folds grouped by patient."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = np.zeros(len(y))
    for train, test in GroupKFold(folds).split(features, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
        model.fit(features[train], y[train])
        scores[test] = model.predict_proba(features[test])[:, 1]
    return scores


def oof_cutoff(score: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5) -> np.ndarray:
    """Calls (0/1) at the Youden cut-off chosen on the other folds, folds grouped by patient."""
    from sklearn.model_selection import GroupKFold

    from pneumoscan.training.metrics import youden_threshold

    calls = np.zeros(len(y), bool)
    for train, test in GroupKFold(folds).split(score, y, groups):
        calls[test] = score[test] >= youden_threshold(y[train], score[train])
    return calls


def rates(y: np.ndarray, called: np.ndarray) -> dict:
    tp, fn = int((called & (y == 1)).sum()), int((~called & (y == 1)).sum())
    tn, fp = int((~called & (y == 0)).sum()), int((called & (y == 0)).sum())
    return {"sensitivity": round(tp / max(tp + fn, 1), 3), "specificity": round(tn / max(tn + fp, 1), 3),
            "positives": tp + fn, "negatives": tn + fp}


def predicted(predictor, table):
    """One row per film: the predictor's CTR (quality-gated), the ratio of the same masks without
    the gate, both masks' quality, the classifier's Cardiomegaly probability and the explanations."""
    import pandas as pd
    from tqdm import tqdm

    from pneumoscan.maskquality import shape_frame
    from pneumoscan.measure import cardiothoracic_ratio

    rows = []
    for rec, result in zip(table.to_dict("records"), tqdm(
            predictor.predict_many(table.path.tolist(), cam="top", force=True, batch_size=8, keep_arrays=True), total=len(table),
            unit="img")):
        record = result.to_dict()
        m = record["measurements"] or {}
        ungated = None if result.error else cardiothoracic_ratio(
            result.mask, result.heart, rec["view"], lungs_found=not result.fallback).value
        shape = None if result.error or predictor.heart.shape_model is None else \
            predictor.heart.shape_model.fidelity(shape_frame(result.mask, result.heart))
        rows.append({"path": Path(rec["path"]).name, "patient": rec["patient"], "view": rec["view"],
                     "cardiomegaly": rec["Cardiomegaly"], "ctr": m.get("cardiothoracic_ratio"),
                     "reason": m.get("cardiothoracic_ratio_reason") or result.error,
                     "gate_frontal": (record["quality"] or {}).get("frontal_chest"),
                     "classifier": (result.probabilities or {}).get("Cardiomegaly"), "ctr_ungated": ungated,
                     "lung_quality": (record["mask_quality"] or {}).get("lungs"),
                     "heart_quality": (record["mask_quality"] or {}).get("heart"), "heart_shape": shape,
                     "called": "|".join(f for f in result.findings or [] if f != "No Finding"),
                     "unexplained": "|".join(f for f in result.findings or [] if f != "No Finding"
                                             and not ((record["cams"] or {}).get(f) or {}).get("region"))})
    return pd.DataFrame(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heart-model", type=Path, default=None, help="heart model (default: shipped)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ctr_nih")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--from-csv", type=Path, default=None, help="analyse a ctr_nih.csv written before")
    args = parser.parse_args()

    import pandas as pd

    from pneumoscan.data import NIH
    from pneumoscan.measure import PA_CUTOFF
    from pneumoscan.predict import Predictor

    predictor = Predictor.from_paths(backend="torch", heart=args.heart_model)
    started = time.time()
    if args.from_csv is not None:
        films = pd.read_csv(args.from_csv)
    else:
        films = predicted(predictor, pd.concat([NIH(DATA / name).csv for name in ("nih-cxr14", "nih-cxr14-extra")],
                                                ignore_index=True))
    args.out.mkdir(parents=True, exist_ok=True)
    films.to_csv(args.out / "ctr_nih.csv", index=False)

    # films read as adults (the classifier's Cardiomegaly is assessed for adults only) with a ratio
    have = films[films.ctr.notna() & films.classifier.notna()].reset_index(drop=True)
    y = have.cardiomegaly.to_numpy(float)
    ap = (have.view == "AP").to_numpy(float)
    ctr = have.ctr.to_numpy(float)
    groups = have.patient.to_numpy()
    report = {"films": len(films), "with_ctr": len(have),
              "no_ctr": dict(Counter(films.reason[films.ctr.isna()].fillna("?").str.replace(
                  r" \(quality [0-9.]+ < [0-9.]+\)", " (quality below its threshold)", regex=True)).most_common()),
              "gate_refused": int((films.gate_frontal == False).sum()),  # noqa: E712
              "heart_model": predictor.heart.meta.get("weights_sha256"),
              "classifier": predictor.classifier.meta.get("weights_sha256"),
              "auc": {}, "cutoffs": {}, "seconds": round(time.time() - started, 1)}
    for view, keep in (("all", np.ones(len(have), bool)), ("PA", ap == 0), ("AP", ap == 1)):
        report["auc"][f"CTR, {view}"] = auc_entry(y[keep], ctr[keep], args.n_boot)
    clf = have.classifier.to_numpy(float)
    report["auc"]["classifier Cardiomegaly, all"] = auc_entry(y, clf, args.n_boot)
    report["auc"]["view alone (AP), all"] = auc_entry(y, ap, args.n_boot)
    plain = films[films.ctr_ungated.notna() & films.classifier.notna()]
    report["quality_gate"] = {
        "films_measured_without_gate": len(plain), "films_reported_with_gate": len(have),
        "share_reported": round(len(have) / max(len(plain), 1), 4),
        "auc_without_gate": auc_entry(plain.cardiomegaly.to_numpy(float), plain.ctr_ungated.to_numpy(float), args.n_boot),
        "auc_with_gate": report["auc"]["CTR, all"],
        "auc_of_dropped_films_without_gate": auc_entry(plain.cardiomegaly[plain.ctr.isna()].to_numpy(float),
                                                       plain.ctr_ungated[plain.ctr.isna()].to_numpy(float), args.n_boot),
        "cardiomegaly_films_dropped": int(plain.cardiomegaly.sum() - have.cardiomegaly.sum())}
    listed = lambda column: int(films[column].fillna("").astype(str).str.split("|").map(
        lambda v: sum(1 for x in v if x)).sum())
    report["explanations"] = {"called_findings": listed("called"), "without_explanation": listed("unexplained")}
    both = grouped_oof(np.column_stack([ctr, ap]), y, groups)
    report["auc"]["CTR + view (5-fold OOF), all"] = auc_entry(y, both, args.n_boot)
    all_three = grouped_oof(np.column_stack([ctr, ap, clf]), y, groups)
    report["auc"]["CTR + view + classifier (5-fold OOF), all"] = auc_entry(y, all_three, args.n_boot)
    from pneumoscan.training.metrics import auc_difference

    report["paired"] = {name: {k: round(v, 4) for k, v in auc_difference(y, new, clf, args.n_boot).items()}
                        for name, new in (("CTR + view − classifier", both),
                                          ("CTR + view + classifier − classifier", all_three))}
    pa = ap == 0
    report["cutoffs"]["PA films, CTR > 0.50"] = rates(y[pa], ctr[pa] > PA_CUTOFF)
    report["cutoffs"]["all films, CTR + view, OOF Youden"] = rates(y, oof_cutoff(both, y, groups))
    report["ctr_quantiles"] = {f"{view} {'cardiomegaly' if c else 'other'}":
                               [round(float(q), 3) for q in np.quantile(ctr[(ap == a) & (y == c)], [0.25, 0.5, 0.75])]
                               for view, a in (("PA", 0), ("AP", 1)) for c in (0, 1) if ((ap == a) & (y == c)).any()}
    (args.out / "ctr_nih.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Cardiomegaly from the CTR: {len(films)} NIH originals (nih-cxr14 + nih-cxr14-extra)", "",
             f"CTR measured on {len(have)} films; none on {len(films) - len(have)}: {report['no_ctr']}.", "",
             "| score | AUC (95 % CI) | Cardiomegaly / other |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(v)} | {v['positives']} / {v['negatives']} |" for k, v in report["auc"].items()]
    lines += ["", "Paired bootstrap AUC differences on the same films: " + "; ".join(
        f"{k}: {v['difference']:+.3f} ({v['low']:+.3f} to {v['high']:+.3f}, p = {v['p']:.3f})"
        for k, v in report["paired"].items())]
    lines += ["", "| operating point | sensitivity | specificity | Cardiomegaly / other |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['sensitivity']:.3f} | {v['specificity']:.3f} | {v['positives']} / {v['negatives']} |"
              for k, v in report["cutoffs"].items()]
    gate = report["quality_gate"]
    lines += ["", f"Mask-quality gate: ratio reported on {gate['films_reported_with_gate']} of "
              f"{gate['films_measured_without_gate']} films measurable without it ({gate['share_reported']:.1%}); CTR AUC "
              f"{fmt(gate['auc_with_gate'])} with the gate, {fmt(gate['auc_without_gate'])} without "
              f"({gate['cardiomegaly_films_dropped']} Cardiomegaly films dropped; the dropped films' ungated ratios: "
              f"{fmt(gate['auc_of_dropped_films_without_gate'])})."]
    lines += ["", f"Explanations: {report['explanations']['without_explanation']} of {report['explanations']['called_findings']} "
              "called findings have no explanation with a region (Grad-CAM, or the heart outline for Cardiomegaly)."]
    lines += ["", "CTR quartiles (25/50/75 %): " + "; ".join(f"{k}: {v}" for k, v in report["ctr_quantiles"].items())]
    (args.out / "ctr_nih.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
