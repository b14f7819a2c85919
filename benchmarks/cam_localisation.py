"""Does the Pneumonia heat map point where radiologists drew the opacity?

    python benchmarks/cam_localisation.py --manifest runs/manifest25.csv [--model M] [--out runs/cam_loc]

Films: the test split's films that RSNA radiologists marked "Lung Opacity" and boxed
(``../shared/data/rsna-pneumonia/stage_2_train_labels.csv``, boxes in the 1024² NIH film): the
lung-masked films of the held-out patients (their own mask and crop, as in training), and the
held-out NIH originals that were RSNA images (read, segmented and cropped as ``predict`` does).
The test split chose nothing. For each film, the map of the model's Pneumonia output (the
forward-only form the ONNX backend uses, equal to the PyTorch hooks' map; ``explain.py``):

- **pointing game**: the map's peak lies inside a box;
- **mass in boxes**: the share of the map's sum inside the boxes;
- **IoU**: the region where the map reaches half its maximum inside the lung mask, against the
  union of the boxes (pixels).

A lung-masked classifier's map is kept to the lung mask, as ``predict`` keeps it.

Baselines on the same films: **lung centre** (the peak at the lung mask's centroid, the map
uniform over the lungs) and **random location** (a peak drawn uniformly inside the lung mask:
its expected pointing game is the boxes' share of the lungs).

Also, on every held-out NIH original: for each assessed finding the model calls, whether its map
is empty. Writes ``cam_localisation.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def box_mask(shape: tuple[int, int], boxes: list[tuple[float, float, float, float]], scale: float) -> np.ndarray:
    """Union of ``boxes`` (x, y, w, h in 1024² film pixels) on a picture ``scale`` times that size."""
    mask = np.zeros(shape, bool)
    for x, y, w, h in boxes:
        x0, y0 = int(np.floor(x * scale)), int(np.floor(y * scale))
        mask[y0:int(np.ceil((y + h) * scale)), x0:int(np.ceil((x + w) * scale))] = True
    return mask


def measures(heat: np.ndarray, lung: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> dict:
    """The three measures of one full-size map, and both baselines', on one film."""
    from pneumoscan.explain import REGION_LEVEL

    lung = lung > 0
    out = {"empty": bool(heat.max() <= 0)}
    if not out["empty"]:
        y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        region = (heat >= REGION_LEVEL * heat.max()) & lung
        out.update(pointing=bool(truth[y, x]), mass=float(heat[truth].sum() / heat.sum()),
                   iou=float((region & truth).sum() / max((region | truth).sum(), 1)))
    ys, xs = np.nonzero(lung)
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    k = rng.integers(len(ys))
    out.update(centre_pointing=bool(truth[cy, cx]), random_pointing=bool(truth[ys[k], xs[k]]),
               uniform_mass=float((truth & lung).sum() / lung.sum()),
               lung_iou=float((lung & truth).sum() / (lung | truth).sum()))
    return out


def summary(rows: list[dict]) -> dict:
    scored = [r for r in rows if not r["empty"]]
    mean = lambda key, part: round(float(np.mean([r[key] for r in part])), 3) if part else None  # noqa: E731
    return {"films": len(rows), "empty_maps": len(rows) - len(scored),
            "pointing_game": mean("pointing", scored), "mass_in_boxes": mean("mass", scored),
            "iou": mean("iou", scored), "lung_centre_pointing": mean("centre_pointing", rows),
            "random_location_pointing": mean("random_pointing", rows), "uniform_mass_in_boxes": mean("uniform_mass", rows),
            "lung_mask_iou": mean("lung_iou", rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "cam_localisation")
    parser.add_argument("--boxes", type=Path, default=DATA / "rsna-pneumonia" / "stage_2_train_labels.csv")
    parser.add_argument("--index", type=Path, default=DATA / "rsna-nih-masked" / "index.csv")
    args = parser.parse_args()

    import pandas as pd
    import torch

    from pneumoscan.crop import premasked_crop
    from pneumoscan.data.manifest import read_manifest
    from pneumoscan.data.nih_masked import read_premasked
    from pneumoscan.explain import cam_from_features, place_on_original, within_lungs
    from pneumoscan.films import read_xray
    from pneumoscan.labels import LABELS
    from pneumoscan.predict import Predictor
    from pneumoscan.training.cache import crop_paths

    predictor = Predictor.from_paths(cls_model=args.model, backend="torch")
    classifier, segmenter = predictor.classifier, predictor.segmenter
    head, reference, size = classifier.model.head, classifier.cam_reference, classifier.size
    j = LABELS.index("Pneumonia")
    boxes = pd.read_csv(args.boxes).dropna(subset=["x"]).groupby("patientId")[["x", "y", "width", "height"]]
    boxes = {pid: [tuple(r) for r in part.to_numpy()] for pid, part in boxes}
    index = pd.read_csv(args.index)
    table = read_manifest(args.manifest)
    rng = np.random.default_rng(0)

    def maps(crops: np.ndarray, labels: list[int | None]) -> tuple[np.ndarray, list[np.ndarray | None]]:
        x = torch.from_numpy(crops.astype(np.float32) / 255.0)[:, None]
        with torch.inference_mode():
            features = classifier.model.feature_map(x).numpy()
        probs = classifier.predict_proba(crops.astype(np.float32) / 255.0)
        return probs, [None if k is None else cam_from_features(f[None], head, k, (size, size), reference=reference)[0]
                       for f, k in zip(features, labels)]

    result: dict = {"model_sha256": classifier.meta["weights_sha256"],
                    "method": (classifier.meta.get("explain") or {}).get("method", "plain Grad-CAM")}
    masked = table[(table.source == "nihmasked") & (table.split == "test")]  # those with boxes below
    by_path = dict(zip(index.path.map(lambda p: Path(p).name), index.patientId))
    rows = []
    for path in masked.path:
        pid = by_path.get(Path(path).name)
        if pid not in boxes:
            continue
        film, stored = read_premasked(path)
        found, crop = premasked_crop(film, stored, size)
        _, (heat,) = maps(crop[None], [j])
        full = place_on_original(heat, found.box, film.shape)
        full = within_lungs(full, found.mask) if classifier.lung_masked else full
        rows.append(measures(full, found.mask, box_mask(film.shape, boxes[pid], film.shape[0] / 1024), rng))
    result["lung_masked_test_films"] = summary(rows)
    print(f"{len(rows)} lung-masked test films with boxes done", file=sys.stderr, flush=True)

    nih = table[(table.source == "nih") & (table.split == "test")].reset_index(drop=True)
    crops, records = crop_paths(nih.path.tolist(), segmenter, size, threads=2, masked=classifier.lung_masked,
                                sources=nih.source.tolist())
    probs = classifier.predict_proba(crops.astype(np.float32) / 255.0, batch_size=32)
    by_name = dict(zip(index.nih_image, index.patientId))
    rows, empty, called_total = [], {}, 0
    for i, (path, rec) in enumerate(zip(nih.path, records)):
        called = [k for k, label in enumerate(LABELS) if classifier.assessed[k] and probs[i, k] >= classifier.thresholds[k]
                  and label != "No Finding"]
        _, heats = maps(crops[i:i + 1].repeat(max(1, len(called)), 0), called or [None])
        lung = None
        if classifier.lung_masked and called:
            x0, y0, x1, y1 = rec["x0"], rec["y0"], rec["x1"], rec["y1"]
            mask = segmenter.segment(read_xray(path).pixels).mask
            lung = cv2.resize(mask[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_NEAREST)
        for k, heat in zip(called, heats):
            called_total += 1
            if (heat if lung is None else within_lungs(heat, lung)).max() <= 0:
                empty[LABELS[k]] = empty.get(LABELS[k], 0) + 1
        pid = by_name.get(Path(path).name)
        if pid in boxes:
            pixels = read_xray(path).pixels
            seg = segmenter.segment(pixels)
            _, (heat,) = maps(crops[i:i + 1], [j])
            full = place_on_original(heat, seg.box, pixels.shape)
            full = within_lungs(full, seg.mask) if classifier.lung_masked else full
            rows.append(measures(full, seg.mask, box_mask(pixels.shape, boxes[pid], pixels.shape[0] / 1024), rng))
    result["nih_originals_with_boxes"] = summary(rows)
    result["called_findings_on_nih_originals"] = {"films": len(nih), "calls": called_total, "empty_maps": empty}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cam_localisation.json").write_text(json.dumps(result, indent=2))
    print(f"Pneumonia map of classifier `{result['model_sha256'][:16]}…` ({result['method']})\n")
    print("| films | n | empty maps | pointing game | lung centre | random location | mass in boxes | "
          "uniform mass | IoU | lung-mask IoU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("lung_masked_test_films", "nih_originals_with_boxes"):
        s = result[name]
        print(f"| {name.replace('_', ' ')} | {s['films']} | {s['empty_maps']} | {s['pointing_game']} | "
              f"{s['lung_centre_pointing']} | {s['random_location_pointing']} | {s['mass_in_boxes']} | "
              f"{s['uniform_mass_in_boxes']} | {s['iou']} | {s['lung_mask_iou']} |")
    c = result["called_findings_on_nih_originals"]
    print(f"\nCalled assessed findings on {c['films']} held-out NIH originals: {c['calls']} calls, "
          f"empty maps: {c['empty_maps'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    raise SystemExit(main())
