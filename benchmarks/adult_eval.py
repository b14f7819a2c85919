"""A classifier on adult films it never saw: the held-out NIH originals through the predictor's path.

    python benchmarks/adult_eval.py --manifest runs/manifest25.csv [--model M] [--out runs/adult_eval]
    python benchmarks/adult_eval.py --manifest runs/manifest26.csv --oof runs/cv27/oof.csv --model runs/cv27/model.pt

With ``--oof`` (``pneumoscan crossval``'s out-of-fold probabilities) nothing is scored here: every
film's probabilities come from the head fitted on the folds without its patient, so every NIH
original (and every Kermany film) is judged, whatever its manifest split; the model file gives
the assessed flags and thresholds, and the No Finding count is of assessed labels over their
thresholds (the input gate is not applied).

The manifest is built with ``--test-source nih`` (``docs/ADULT.md``), so every NIH original in
``nih-cxr14*/`` and every lung-masked film of those patients is in the test split, which chose
nothing (no checkpoint, threshold or assessment). Each original is read, segmented and cropped
by the functions ``predict`` uses (lungs only when the model learnt from lung-masked crops), then
scored. Reported, each with its number of films and a bootstrap 95 % CI:

- adult Pneumonia vs No Finding (NIH's labels), inside PA and inside AP films, and the view
  position alone on the same films (in these NIH extracts No Finding is on 62 % of AP films and 30 %
  of PA ones, the reverse of most data);
- RSNA radiologists' Lung Opacity vs Normal on the originals that have an RSNA label, and on the
  lung-masked films of the test patients (the masked source's own mask);
- every label's AUC against all other NIH originals, marked assessed or not;
- sensitivity and specificity of each assessed label at its stored threshold;
- through the whole predictor (input gate included), how many findings it lists on NIH
  "No Finding" films ("No Finding" itself not counted);
- Kermany Pneumonia on its validation patients (the official Kermany test split is not in the dev
  data; the validation split chose the checkpoint, so this figure is optimistic).

Writes ``adult_eval.json`` and ``adult_eval.md`` into ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def auc_entry(y: np.ndarray, p: np.ndarray, n_boot: int) -> dict:
    from pneumoscan.training.metrics import auc_ci, roc_auc

    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    if len(np.unique(y)) < 2:
        return {"auc": None, "ci": [None, None], "positives": int(y.sum()), "negatives": int((1 - y).sum())}
    low, high = auc_ci(y, p, n_boot)
    return {"auc": round(float(roc_auc(y, p)), 4), "ci": [round(float(low), 4), round(float(high), 4)],
            "positives": int(y.sum()), "negatives": int((1 - y).sum())}


def fmt(entry: dict) -> str:
    if entry["auc"] is None:
        return "–"
    return f"{entry['auc']:.3f} ({entry['ci'][0]:.3f}–{entry['ci'][1]:.3f})"


def rsna_classes(names: list[str], index_csv: Path, key: str = "nih_image") -> np.ndarray:
    """RSNA class per file name ("" where the film was not an RSNA challenge image): ``key`` is the
    index column whose file names ``names`` are (``nih_image`` for NIH originals, ``path`` for the
    lung-masked copies)."""
    import pandas as pd

    if not index_csv.is_file():
        return np.array([""] * len(names), dtype=object)
    table = pd.read_csv(index_csv, usecols=[key, "rsna_class"])
    lookup = dict(zip(table[key].map(lambda p: Path(p).name), table.rsna_class))
    return np.array([lookup.get(n, "") for n in names], dtype=object)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None, help="classifier file (default: shipped)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "adult_eval")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--rsna-index", type=Path, default=DATA / "rsna-nih-masked" / "index.csv")
    parser.add_argument("--oof", type=Path, default=None, help="out-of-fold probabilities (crossval's oof.csv)")
    args = parser.parse_args()

    import pandas as pd

    from pneumoscan.data.manifest import read_manifest
    from pneumoscan.labels import LABELS, NO_FINDING
    from pneumoscan.predict import Predictor
    from pneumoscan.training.cache import crop_paths
    from pneumoscan.training.metrics import sens_spec

    started = time.time()
    predictor = Predictor.from_paths(cls_model=args.model, backend="torch")
    classifier, segmenter = predictor.classifier, predictor.segmenter
    table = read_manifest(args.manifest)
    result: dict = {"model_sha256": classifier.meta["weights_sha256"], "manifest": str(args.manifest),
                    "lung_masked_input": classifier.lung_masked, "assessed": classifier.assessed_labels}

    oof = None if args.oof is None else pd.read_csv(args.oof).set_index("path")
    result["protocol"] = ("held-out test split, scored here" if oof is None else
                          f"out-of-fold probabilities of {args.oof} (patient-grouped cross-validation)")

    def pick(source: str, split: str):
        rows = table[(table.source == source) & ((table.split == split) | (oof is not None))]
        return rows.reset_index(drop=True)

    def score(rows) -> tuple[np.ndarray, np.ndarray]:
        if oof is not None:
            ok = rows.path.isin(oof.index).to_numpy()
            return ok, oof.loc[rows.path[ok], list(LABELS)].to_numpy(np.float32)
        crops, records = crop_paths(rows["path"].tolist(), segmenter, classifier.size, threads=2,
                                    masked=classifier.lung_masked, sources=rows["source"].astype(str).tolist())
        ok = np.array([r["error"] == "" for r in records])
        probs = classifier.predict_proba(crops[ok].astype(np.float32) / 255.0, batch_size=32)
        return ok, probs

    nih = pick("nih", "test")
    print(f"{len(nih)} NIH originals …", file=sys.stderr, flush=True)
    ok, probs = score(nih)
    nih = nih[ok].reset_index(drop=True)
    labels = nih[list(LABELS)].to_numpy(np.float64)
    j = LABELS.index("Pneumonia")
    task = ((nih.Pneumonia == 1) | (nih[NO_FINDING] == 1)).to_numpy()
    y = nih.Pneumonia.to_numpy(float)[task]
    result["pneumonia_vs_no_finding"] = auc_entry(y, probs[task, j], args.n_boot)
    result["view_alone"] = auc_entry(y, (nih.view.to_numpy()[task] == "AP").astype(float), args.n_boot)
    for view in ("PA", "AP"):  # the view is confounded with the labels: within each view it is not
        inside = task & (nih.view.to_numpy() == view)
        result[f"pneumonia_vs_no_finding_{view}"] = auc_entry(nih.Pneumonia.to_numpy(float)[inside], probs[inside, j],
                                                             args.n_boot)
    names = [Path(p).name for p in nih.path]
    classes = rsna_classes(names, args.rsna_index)
    opacity = np.isin(classes, ["Lung Opacity", "Normal"])
    result["rsna_opacity_vs_normal_originals"] = auc_entry(
        (classes[opacity] == "Lung Opacity").astype(float), probs[opacity, j], args.n_boot)
    result["per_label"] = {label: auc_entry(labels[:, k], probs[:, k], args.n_boot) | {
        "assessed": bool(classifier.assessed[k])} for k, label in enumerate(LABELS)}
    result["operating_points"] = {}
    for k, label in enumerate(LABELS):
        if classifier.assessed[k]:
            sens, spec = sens_spec(labels[:, k], probs[:, k], float(classifier.thresholds[k]))
            result["operating_points"][label] = {"threshold": float(classifier.thresholds[k]),
                                                 "sensitivity": round(float(sens), 3),
                                                 "specificity": round(float(spec), 3)}
    result["nih_films"] = int(len(nih))

    masked = pick("nihmasked", "test")
    if len(masked):
        print(f"{len(masked)} lung-masked films of the same patients …", file=sys.stderr, flush=True)
        ok, mprobs = score(masked)
        masked = masked[ok].reset_index(drop=True)
        mclasses = rsna_classes([Path(p).name for p in masked.path], args.rsna_index, key="path")
        task = np.isin(mclasses, ["Lung Opacity", "Normal"])
        result["rsna_opacity_vs_normal_masked"] = auc_entry((mclasses[task] == "Lung Opacity").astype(float),
                                                            mprobs[task, j], args.n_boot)

    normal = (nih[NO_FINDING] == 1).to_numpy()
    if oof is None:
        print(f"whole predictor (gate included) on {normal.sum()} NIH No Finding films …", file=sys.stderr, flush=True)
        listed = [p for p in predictor.predict_many(nih.path[normal].tolist(), batch_size=16)]
        counts = [len(set(p.findings) - {NO_FINDING}) for p in listed if p.findings is not None]
        refused = sum(1 for p in listed if p.findings is None)
    else:
        counts = [len(set(classifier.findings(row)) - {NO_FINDING}) for row in probs[normal]]
        refused = "gate not applied"
    result["no_finding_films"] = {"films": int(normal.sum()), "scored": len(counts),
                                  "refused_by_gate": refused,
                                  "median_findings": float(np.median(counts)) if counts else None,
                                  "max_findings": int(max(counts)) if counts else None,
                                  "films_with_a_finding": int(sum(c > 0 for c in counts))}

    kermany = pick("kermany", "val")
    if len(kermany):
        print(f"{len(kermany)} Kermany films …", file=sys.stderr, flush=True)
        ok, kprobs = score(kermany)
        result["kermany_val_pneumonia"] = auc_entry(kermany.Pneumonia.to_numpy(float)[ok], kprobs[:, j], args.n_boot)
    result["seconds"] = round(time.time() - started, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adult_eval.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out / "adult_eval.md").write_text(text)
    print(text)
    return 0


def markdown(r: dict) -> str:
    """The report as a markdown page (the numbers of ``adult_eval.json``)."""
    def n(e: dict) -> str:
        return f"{e['positives']} / {e['negatives']}"

    lines = [f"Classifier `{r['model_sha256'][:16]}…` ({'lung-masked' if r['lung_masked_input'] else 'unmasked'} "
             f"crops), {r['nih_films']} NIH originals; {r.get('protocol', 'held-out test split')}.", "",
             "| measure | positives / negatives | AUC (95 % CI) |", "|---|---|---|"]
    rows = [("adult Pneumonia vs No Finding (NIH labels)", r["pneumonia_vs_no_finding"]),
            ("same films, view position alone (AP = 1)", r["view_alone"]),
            ("same task, PA films only", r["pneumonia_vs_no_finding_PA"]),
            ("same task, AP films only", r["pneumonia_vs_no_finding_AP"]),
            ("RSNA Lung Opacity vs Normal, NIH originals", r["rsna_opacity_vs_normal_originals"])]
    if "rsna_opacity_vs_normal_masked" in r:
        films = "of the test patients" if "test split" in r.get("protocol", "test split") else "(all, out of fold)"
        rows.append((f"RSNA Lung Opacity vs Normal, lung-masked films {films}",
                     r["rsna_opacity_vs_normal_masked"]))
    if "kermany_val_pneumonia" in r:
        where = ("validation patients (chose the checkpoint)" if "test split" in r.get("protocol", "test split")
                 else "every dev film, out of fold")
        rows.append((f"Kermany Pneumonia, {where}", r["kermany_val_pneumonia"]))
    lines += [f"| {name} | {n(e)} | {fmt(e)} |" for name, e in rows]
    lines += ["", "Each label against all other held-out NIH originals:", "",
              "| label | assessed | positives / negatives | AUC (95 % CI) | threshold | sensitivity | specificity |",
              "|---|---|---|---|---|---|---|"]
    for label, e in r["per_label"].items():
        op = r["operating_points"].get(label, {})
        lines.append(f"| {label} | {'yes' if e['assessed'] else 'no'} | {n(e)} | {fmt(e)} | "
                     f"{op.get('threshold', '–') if not op else round(op['threshold'], 3)} | "
                     f"{op.get('sensitivity', '–')} | {op.get('specificity', '–')} |")
    assessed = [e["auc"] for e in r["per_label"].values() if e["assessed"] and e["auc"] is not None]
    if assessed:
        lines += ["", f"Mean AUC over the {len(assessed)} assessed labels: {np.mean(assessed):.3f}."]
    nf = r["no_finding_films"]
    gate = (f"{nf['refused_by_gate']} refused by the gate" if isinstance(nf["refused_by_gate"], int)
            else "out-of-fold probabilities, the input gate not applied")
    lines += ["", f"On {nf['films']} NIH No Finding films ({gate}): of {nf['scored']} scored, median "
                  f"{nf['median_findings']} findings listed besides No Finding "
                  f"(max {nf['max_findings']}; {nf['films_with_a_finding']} films with at least one)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    raise SystemExit(main())
