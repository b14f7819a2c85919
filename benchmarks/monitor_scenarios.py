"""`pneumoscan monitor` on streams built from the shared data: false alarms on ordinary adult films,
how soon each change is flagged, and how close CBPE's expected AUC comes to the observed one.

    python benchmarks/monitor_scenarios.py --out ~/runs/monitor_bench

Films are predicted once each by the shipped models (``predictions/*.jsonl`` under ``--out``,
reused on a rerun): the NIH originals of ``nih-cxr14*/`` (with NIH's labels), Kermany children,
Shenzhen and Montgomery films (a second and third hospital), NIH films downscaled to 256 px and
saved as JPEG quality 50, and NIH films inverted (what a MONOCHROME1 film looks like when a
PACS drops the flag). A stream is a sequence of those records (ordinary films drawn with
replacement, seeded), watched exactly as ``pneumoscan monitor`` watches a store
(:func:`pneumoscan.monitoring.watch.monitor`, reference 500, windows of 100). Writes
``monitor_scenarios.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def nih_films() -> pd.DataFrame:
    tables = []
    for folder in ("nih-cxr14", "nih-cxr14-extra"):
        table = pd.read_csv(DATA / folder / "Data_Entry_2017.csv")
        table["path"] = [str(DATA / folder / "images" / name) for name in table["Image Index"]]
        tables.append(table[[Path(p).exists() for p in table["path"]]])
    table = pd.concat(tables).drop_duplicates("Image Index")
    return table[table["Patient Age"] >= 18].reset_index(drop=True)


def downscaled(path: str) -> bytes:
    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    small = cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 50])[1].tobytes()


def inverted(path: str) -> bytes:
    return cv2.imencode(".png", 255 - cv2.imread(path, cv2.IMREAD_GRAYSCALE))[1].tobytes()


def predicted(name: str, sources: list, out: Path, predictor, names: list[str]) -> list[dict]:
    """The records of ``sources`` (paths or bytes), from ``out/predictions/NAME.jsonl`` if there."""
    target = out / "predictions" / f"{name}.jsonl"
    if target.exists():
        return [json.loads(line) for line in target.read_text().splitlines()]
    target.parent.mkdir(parents=True, exist_ok=True)
    records = []
    started = time.time()
    for k, result in enumerate(predictor.predict_many(sources, names=names)):
        records.append(result.to_dict() | {"name": names[k]})
        if k % 50 == 49:
            print(f"{name}: {k + 1}/{len(sources)} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    target.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def rows_of(records: list[dict]) -> list:
    from pneumoscan.monitoring.watch import film_row

    return [film_row(k, START + timedelta(hours=k), r) for k, r in enumerate(records)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "monitor_bench")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    from pneumoscan.monitoring.watch import monitor
    from pneumoscan.predict import Predictor

    predictor = Predictor.from_default()
    rng = np.random.default_rng(args.seed)
    nih = nih_films()
    changed = nih.sample(200, random_state=args.seed)
    sets = {
        "nih": (nih["path"].tolist(), nih["Image Index"].tolist()),
        "kermany": (sorted(map(str, (DATA / "kermany" / "train" / "PNEUMONIA").glob("*.jpeg")))[:100]
                    + sorted(map(str, (DATA / "kermany" / "train" / "NORMAL").glob("*.jpeg")))[:100], None),
        "shenzhen": (sorted(map(str, (DATA / "shenzhen" / "CXR_png").glob("*.png")))[:200], None),
        "montgomery": (sorted(map(str, (DATA / "montgomery" / "CXR_png").glob("*.png")))[:100], None),
        "downscaled_jpeg": ([downscaled(p) for p in changed["path"]], [f"{n}.jpg" for n in changed["Image Index"]]),
        "inverted": ([inverted(p) for p in changed["path"]], changed["Image Index"].tolist()),
    }
    records = {name: predicted(name, sources, args.out, predictor, names or [Path(s).name for s in sources])
               for name, (sources, names) in sets.items()}
    ordinary = records["nih"]

    def draw(pool: list[dict], n: int) -> list[dict]:
        return [pool[k] for k in rng.integers(0, len(pool), n)]

    quiet = monitor(rows_of(draw(ordinary, 2500)), reference=500, window=100)
    table = [{"scenario": "ordinary adult films (NIH originals, drawn with replacement)", "films": 2000,
              "alerts": len(quiet["alerts"]), "false_alarms_per_1000": round(1000 * len(quiet["alerts"]) / 2000, 2),
              "flagged_in_window": None, "statistics": sorted({a["statistic"] for a in quiet["alerts"]})}]
    for name, label in (("kermany", "children (Kermany)"), ("shenzhen", "a second hospital (Shenzhen)"),
                        ("montgomery", "a third hospital (Montgomery)"),
                        ("downscaled_jpeg", "NIH films downscaled to 256 px, JPEG quality 50"),
                        ("inverted", "NIH films inverted (MONOCHROME1 mishandled)")):
        stream = draw(ordinary, 1000) + draw(records[name], 100)
        report = monitor(rows_of(stream), reference=500, window=100)
        before = [a for a in report["alerts"] if a["window"] < 5]
        first = [a for a in report["alerts"] if a["window"] == 5]
        table.append({"scenario": label, "films": 100, "alerts": len(first), "false_alarms_before": len(before),
                      "flagged_in_window": 1 if first else None,
                      "statistics": sorted({a["statistic"] for a in first})})
    # CBPE against NIH's labels on stable windows of 500 ordinary films
    from pneumoscan.labels import LABELS

    truth_of = {row["Image Index"]: set(row["Finding Labels"].split("|")) for _, row in nih.iterrows()}
    stable = draw(ordinary, 500 + 5 * 500)
    truth = {k: {label: float(label in truth_of[r["name"]]) if label != "No Finding"
                 else float(truth_of[r["name"]] == {"No Finding"}) for label in LABELS}
             for k, r in enumerate(stable)}
    report = monitor(rows_of(stable), reference=500, window=500, truth={k: v for k, v in truth.items()})
    cbpe = []
    for w in report["windows"]:
        for label, figures in w["performance"].items():
            if figures.get("observed_auc") is not None:
                cbpe.append({"window": w["index"], "label": label, "expected_auc": figures["expected_auc"],
                             "observed_auc": figures["observed_auc"],
                             "error": round(figures["expected_auc"] - figures["observed_auc"], 4)})
    result = {"data": {name: len(r) for name, r in records.items()}, "scenarios": table, "cbpe": cbpe,
              "cbpe_mean_abs_error": round(float(np.mean([abs(c["error"]) for c in cbpe])), 4) if cbpe else None}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "monitor_scenarios.json").write_text(json.dumps(result, indent=1))
    lines = ["| scenario | films | alerts | flagged in the first window after it | statistics |", "|---|---|---|---|---|"]
    lines += [f"| {t['scenario']} | {t['films']} | {t['alerts']} | {'yes' if t['flagged_in_window'] else '—'} | "
              f"{', '.join(t['statistics'])} |" for t in table]
    lines += ["", "| window | label | expected AUC | observed AUC | error |", "|---|---|---|---|---|"]
    lines += [f"| {c['window']} | {c['label']} | {c['expected_auc']} | {c['observed_auc']} | {c['error']:+.3f} |" for c in cbpe]
    (args.out / "monitor_scenarios.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
