"""Did a change alter any prediction? A snapshot of what the predictor says on dev films, and a
comparison of two snapshots.

    git worktree add /tmp/old REV
    PYTHONPATH=/tmp/old/src python benchmarks/prediction_snapshot.py old.json   # the old tree's code
    python benchmarks/prediction_snapshot.py new.json                          # this tree's
    python benchmarks/prediction_snapshot.py --compare old.json new.json
    python benchmarks/prediction_snapshot.py new.json --model OLD.pt   # this tree's code, another classifier file

Films: the first 80 NIH and 20 Shenzhen films by name in ../shared/data, PyTorch backend, shipped
models. The comparison prints how many films differ in the gate's verdict, box, Grad-CAM peak and
cardiothoracic ratio, the largest probability difference, and how many films' whole records
(``Prediction.to_dict()``, as every output writes them) differ at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def snapshot(out: Path, model: Path | None = None) -> None:
    from pneumoscan.predict import Predictor

    films = (sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[:80]
             + sorted((DATA / "shenzhen" / "CXR_png").glob("*.png"))[:20])
    predictor = Predictor.from_paths(cls_model=model, backend="torch")
    found = {}
    for r in predictor.predict_many([str(f) for f in films], cam="top", batch_size=8):
        record = r.to_dict()
        found[r.path] = {"probs": record["probabilities"], "box": record["box"], "cam_peak": record["cam_peak"],
                         "frontal": (record["quality"] or {}).get("frontal_chest"),
                         "ctr": (record["measurements"] or {}).get("cardiothoracic_ratio"), "record": record}
    out.write_text(json.dumps(found))
    print(f"{len(found)} films → {out}")


def compare(a_path: Path, b_path: Path) -> None:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    if a.keys() != b.keys():
        sys.exit("the snapshots hold different films")
    differ = {"gate verdict": 0, "box": 0, "cam_peak": 0, "ctr": 0}
    worst = 0.0
    for path in a:
        x, y = a[path], b[path]
        differ["gate verdict"] += x["frontal"] != y["frontal"]
        differ["box"] += x["box"] != y["box"]
        differ["cam_peak"] += x["cam_peak"] != y["cam_peak"]
        differ["ctr"] += x["ctr"] != y["ctr"]
        for label, p in (x["probs"] or {}).items():
            q = (y["probs"] or {}).get(label)
            if (p is None) != (q is None):
                worst = float("inf")
            elif p is not None:
                worst = max(worst, abs(p - q))
    whole = sum(1 for path in a if "record" in a[path] and a[path].get("record") != b[path].get("record"))
    print(f"{len(a)} films; differing: " + ", ".join(f"{k} {v}" for k, v in differ.items())
          + f"; largest probability difference {worst:.2e}; whole records (JSON) differing: {whole}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path)
    parser.add_argument("--model", type=Path, help="classifier file (default: the shipped one)")
    args = parser.parse_args()
    compare(*args.compare) if args.compare else snapshot(args.out, args.model)
