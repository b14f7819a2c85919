"""ONNX Runtime int8 (static, calibrated on dev crops) against float32: speed, AUC and Dice.

    python benchmarks/quantise.py --manifest runs/manifest.csv --cache runs/cache224 [--calibration 200]

Both shipped models are exported (the per-user cache), then quantised with
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel weights, MinMax calibration) on
``--calibration`` crops / U-Net inputs from the **train** split. Measured on other images:
- classifier: Pneumonia AUC on the NIH test split (Pneumonia vs No Finding) and on Kermany's
  validation patients, and the largest probability change, float32 vs int8;
- U-Net: Dice of the cleaned mask against the truth on the Montgomery and Shenzhen validation
  images (the masks' own split; ``segment_train.segmentation_table``), float32 vs int8;
- images/s of each model alone at batch 8 on this machine.
The issue's rule: int8 becomes the default only if AUC and Dice move by ≤ 0.005 and it is faster.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from run_all import timed  # this folder is on sys.path when a script in it runs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class Reader:
    """Calibration batches for quantize_static."""

    def __init__(self, name: str, arrays: np.ndarray, batch: int = 8):
        self.feeds = iter([{name: arrays[i:i + batch]} for i in range(0, len(arrays), batch)])

    def get_next(self):
        return next(self.feeds, None)


def quantise(src: Path, dst: Path, name: str, arrays: np.ndarray) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst.with_name(dst.stem + "_pre.onnx")
    quant_pre_process(str(src), str(prepared))
    quantize_static(str(prepared), str(dst), Reader(name, arrays), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def rate(sess, name: str, x: np.ndarray, repeat: int = 3) -> float:
    """Best-of-``repeat`` images/s of one session over ``x`` in batches of 8."""
    return timed(lambda: [sess.run(None, {name: x[i:i + 8]}) for i in range(0, len(x), 8)], len(x), repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--calibration", type=int, default=200)
    args = parser.parse_args()
    from pneumoscan.backends.onnx import cached_export, sigmoid
    from pneumoscan.backends.onnx import ort_session as session
    from pneumoscan.classify import default_model_path
    from pneumoscan.classify import load_default as load_classifier
    from pneumoscan.crop import lung_crop
    from pneumoscan.labels import LABELS
    from pneumoscan.segment import default_model_path as default_lung_path
    from pneumoscan.segment import load_default as load_segmenter
    from pneumoscan.training.cache import CropCache
    from pneumoscan.training.metrics import roc_auc
    from pneumoscan.training.segment import (
        dice_iou_acc,
        load_arrays,
        segmentation_table,
    )

    segmenter, classifier = load_segmenter(), load_classifier()
    folder = cached_export(default_lung_path(), default_model_path(), None, [segmenter.meta, classifier.meta])
    cache = CropCache(args.cache)
    table = cache.table
    rng = np.random.default_rng(0)
    train = np.flatnonzero((table.split == "train").to_numpy())
    calib = np.sort(rng.choice(train, args.calibration, replace=False))
    crops_calib = (cache.images(calib).astype(np.float32) / 255.0)[:, None]
    j = LABELS.index("Pneumonia")
    tests = {
        "NIH test, Pneumonia vs No Finding": ((table.source == "nih") & (table.split == "test")
                                              & ((table.Pneumonia == 1) | (table["No Finding"] == 1))).to_numpy(),
        "Kermany validation patients": ((table.source == "kermany") & (table.split == "val")).to_numpy(),
    }
    seg_data = segmentation_table({"montgomery": DATA / "montgomery", "shenzhen": DATA / "shenzhen"})
    seg_val = seg_data[seg_data.split == "val"].reset_index(drop=True)
    seg_images, seg_masks = load_arrays(seg_val, segmenter.preprocessing)
    seg_x = (seg_images.astype(np.float32) / 255.0)[:, None]
    seg_train = seg_data[seg_data.split == "train"].sample(min(args.calibration, (seg_data.split == "train").sum()),
                                                          random_state=0)
    seg_calib = (load_arrays(seg_train.reset_index(drop=True), segmenter.preprocessing)[0].astype(np.float32)
                 / 255.0)[:, None]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        quantise(folder / "classifier.onnx", tmp / "classifier_int8.onnx", "crops", crops_calib)
        quantise(folder / "lung_unet.onnx", tmp / "lung_unet_int8.onnx", "image", seg_calib)
        models = {"float32": (session(folder / "classifier.onnx"), session(folder / "lung_unet.onnx")),
                  "int8": (session(tmp / "classifier_int8.onnx"), session(tmp / "lung_unet_int8.onnx"))}
        print(f"{'':<10}{'classifier img/s':>18}{'U-Net img/s':>14}  " + "  ".join(f"{k} AUC" for k in tests)
              + "  Dice (val, cleaned)")
        probs_by = {}
        for kind, (cls_sess, seg_sess) in models.items():
            aucs, probs_all = [], []
            for mask in tests.values():
                index = np.flatnonzero(mask)
                x = (cache.images(index).astype(np.float32) / 255.0)[:, None]
                logits = np.concatenate([cls_sess.run(None, {"crops": x[i:i + 16]})[0] for i in range(0, len(x), 16)])
                probs = sigmoid(logits)
                probs_all.append(probs)
                aucs.append(roc_auc(table.Pneumonia.to_numpy()[index], probs[:, j]))
            probs_by[kind] = np.concatenate(probs_all)
            seg_logits = np.concatenate([seg_sess.run(None, {"image": seg_x[i:i + 8]})[0] for i in range(0, len(seg_x), 8)])
            dice = np.mean([dice_iou_acc(lung_crop(sigmoid(l[0])).mask, m)[0] for l, m in zip(seg_logits, seg_masks)])
            cls_rate = rate(cls_sess, "crops", (cache.images(np.arange(64)).astype(np.float32) / 255.0)[:, None])
            seg_rate = rate(seg_sess, "image", seg_x[:64])
            print(f"{kind:<10}{cls_rate:>18.1f}{seg_rate:>14.1f}  " + "  ".join(f"{a:>{len(k) + 4}.4f}" for a, k in zip(aucs, tests))
                  + f"  {dice:.4f}")
        print(f"largest Pneumonia probability change float32 → int8: "
              f"{np.abs(probs_by['float32'][:, j] - probs_by['int8'][:, j]).max():.4f}")


if __name__ == "__main__":
    main()
