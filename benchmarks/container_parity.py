"""How far the shipped models' probabilities move when the same dev film arrives in another container.

    python benchmarks/container_parity.py [--films 8]

The first N NIH films of ``../shared/data/nih-cxr14`` (by name) as 8-bit PNG, as the same pixels in
an 8-bit DICOM without a window, as a 16-bit PNG (×257), as a 12-bit DICOM of the same picture
(round(v × 4095 / 255), full window) and as a 12-bit DICOM stored ×16 under the full 0–4095
window (0.4 % darker at white: not the same picture). Prints the largest |Δp| per assessed label
against the PNG. ``tests/test_predict.py`` holds the first four containers to 0.02.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--films", type=int, default=8)
    args = parser.parse_args()

    from pneumoscan.predict import Predictor

    from dicom_films import film_containers

    films = sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[:args.films]
    tmp = Path(tempfile.mkdtemp())
    wrapped = [film_containers(png, tmp, str(k)) for k, png in enumerate(films)]
    predictor = Predictor.from_default()
    names = {"8.dcm": "8-bit DICOM, no window", "16.png": "16-bit PNG", "12.dcm": "12-bit DICOM, same picture",
             "x16.dcm": "12-bit DICOM ×16, full window"}
    ways = {"8-bit PNG": films} | {name: [w[kind] for w in wrapped] for kind, name in names.items()}
    assessed = predictor.classifier.assessed_labels
    probs = {name: np.array([[r.probabilities[label] for label in assessed] for r in predictor.predict_batch(paths)])
             for name, paths in ways.items()}
    print(f"{len(films)} NIH dev films; largest |Δp| against the 8-bit PNG\n")
    print("| container | " + " | ".join(assessed) + " |")
    print("|---|" + "---|" * len(assessed))
    for name in list(ways)[1:]:
        worst = np.abs(probs[name] - probs["8-bit PNG"]).max(axis=0)
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in worst) + " |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO / "tests"))
    raise SystemExit(main())
