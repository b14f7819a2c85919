"""Where a film's time goes, stage by stage, on the default backend: files → probabilities with the
heart model and both masks' quality, on the same NIH films, with the mask-quality re-readings the
model files name and with the 8 of the earlier files, in one run.

    python benchmarks/stages.py [--n 32] [--batch 8] [--repeat 3]

Each stage runs alone over all films (in batches of --batch where the pipeline batches), best of
--repeat, and is reported in ms per film and as a share of the sum: read (decode a 1024² PNG),
prepare (CLAHE and resize for the U-Nets), lung U-Net + clean-up + crop, heart U-Net + clean-up,
lung mask quality (its re-readings), heart mask quality (re-readings and shape prior), input
gate, classifier (DenseNet-121 on the crops). In the pipeline, decoding runs on threads beside
the networks, so the sum is an upper bound of the time per film.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def best(fn, repeat: int) -> float:
    """Seconds of the fastest of ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from pneumoscan.gate import check_frontal_chest
    from pneumoscan.films import read_xray
    from pneumoscan.maskquality import TRANSFORMS
    from pneumoscan.pipeline import segment_and_crop
    from pneumoscan.predict import Predictor

    predictor = Predictor.from_default()
    lungs, heart, classifier = predictor.segmenter, predictor.heart, predictor.classifier
    paths = sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[: args.n]
    images = [read_xray(p) for p in paths]
    pixels = [im.pixels for im in images]
    prepared = np.stack([lungs.preprocessing(p) for p in pixels])
    spans = [slice(i, i + args.batch) for i in range(0, len(paths), args.batch)]
    segs, crops = [], []
    for s in spans:
        found, cut = segment_and_crop(pixels[s], lungs, classifier.size, args.batch, prepared[s])
        segs += found
        crops += list(cut)
    hearts = [m for s in spans for m in heart.heart_masks(pixels[s], prepared[s])]
    masks = [seg.mask for seg in segs]
    inputs = np.stack(crops).astype(np.float32) / 255.0

    shipped = {name: model.quality_rule.transforms for name, model in (("lungs", lungs), ("heart", heart))}
    stages = {
        "read (decode PNG)": lambda: [read_xray(p) for p in paths],
        "prepare (CLAHE, resize)": lambda: [lungs.preprocessing(p) for p in pixels],
        "lung U-Net + clean-up + crop": lambda: [segment_and_crop(pixels[s], lungs, classifier.size, args.batch,
                                                                  prepared[s]) for s in spans],
        "heart U-Net + clean-up": lambda: [heart.heart_masks(pixels[s], prepared[s]) for s in spans],
        "lung mask quality": lambda: [lungs.mask_quality(prepared[s], masks[s]) for s in spans],
        "heart mask quality": lambda: [heart.heart_quality(prepared[s], hearts[s], masks[s]) for s in spans],
        "input gate": lambda: [check_frontal_chest(seg.prob, im.pixels, im.meta, predictor.frontal_check)
                               for seg, im in zip(segs, images)],
        "classifier (DenseNet-121)": lambda: [classifier.predict_proba(inputs[s]) for s in spans],
    }
    rows = {}
    for label, transforms in (("model files", None), ("8 re-readings", TRANSFORMS)):
        for model, name in ((lungs, "lungs"), (heart, "heart")):
            section = model.meta["mask_quality"]
            section["transforms"] = [list(t) for t in (transforms or shipped[name])]
        for stage, fn in stages.items():
            if label != "model files" and "quality" not in stage:
                rows.setdefault(stage, {})[label] = rows[stage]["model files"]
                continue
            rows.setdefault(stage, {})[label] = 1000 * best(fn, args.repeat) / len(paths)
    counts = {label: f"{len(t or shipped['lungs'])} + {len(t or shipped['heart'])}"
              for label, t in (("model files", None), ("8 re-readings", TRANSFORMS))}
    print(f"{len(paths)} NIH films (1024²), batch {args.batch}, backend {type(lungs).__name__}, best of {args.repeat}; "
          f"ms per film (share of the sum)")
    print(f"{'stage':34s} | re-readings {counts['8 re-readings']:>7s} | re-readings {counts['model files']:>7s}")
    totals = {label: sum(r[label] for r in rows.values()) for label in counts}
    for stage, r in rows.items():
        print(f"{stage:34s} | {r['8 re-readings']:7.1f} ({r['8 re-readings'] / totals['8 re-readings']:4.0%})"
              f"       | {r['model files']:7.1f} ({r['model files'] / totals['model files']:4.0%})")
    print(f"{'sum':34s} | {totals['8 re-readings']:7.1f}              | {totals['model files']:7.1f}")


if __name__ == "__main__":
    main()
