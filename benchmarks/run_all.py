"""One table of PneumoScan throughput on this machine, then the files → probabilities comparison
with torchxrayvision (``benchmarks/files_to_probs.py``, run by this script).

    python benchmarks/run_all.py [--quick] [--xrv-python /path/to/venv/bin/python]

torchxrayvision needs torchvision, which this project's environment avoids, so it runs in its own
virtual environment (``python3 -m venv xrv && xrv/bin/pip install torchxrayvision``) pointed to
with --xrv-python or $XRV_PYTHON. The last line is ``ratio_vs_torchxrayvision=X``: PneumoScan's
default backend, files in → probabilities out (segmentation and input gate included), over
torchxrayvision's faster resize engine, on the same files in the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed(fn, n: int, repeat: int) -> float:
    """Best-of-``repeat`` images/s for ``fn`` processing ``n`` images."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 images, 1 repeat (a few minutes)")
    parser.add_argument("--xrv-python", default=os.environ.get("XRV_PYTHON"))
    args = parser.parse_args()
    import torch

    from pneumoscan.backends.onnx import export_onnx
    from pneumoscan.crop import crop_resize
    from pneumoscan.data import build_manifest
    from pneumoscan.enhance import clahe
    from pneumoscan.films import read_xray
    from pneumoscan.predict import Predictor
    from pneumoscan.training.cache import CropCache, prepare
    from pneumoscan.training.data import CropDataset

    n, repeat = (16, 1) if args.quick else (48, 3)
    paths = sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[:n]
    if len(paths) < n:
        raise SystemExit(f"need {n} NIH PNGs under {DATA / 'nih-cxr14' / 'images'}")
    torch_p = Predictor.from_default(backend="torch")
    images = [read_xray(p).pixels for p in paths]
    segs = torch_p.segmenter.segment_batch(images)
    crops = np.stack([crop_resize(im, s.box, 224) for im, s in zip(images, segs)]).astype(np.float32)
    rows: list[tuple[str, float]] = []
    rows.append(("read + CLAHE (1024² PNG)", timed(lambda: [clahe(read_xray(p).pixels) for p in paths], n, repeat)))
    rows.append(("segmentation: U-Net + clean-up + crop, batch 16",
                 timed(lambda: [crop_resize(im, s.box, 224) for im, s in
                                zip(images, torch_p.segmenter.segment_batch(images))], n, repeat)))
    with tempfile.TemporaryDirectory() as tmp:
        table = build_manifest({"nih": DATA / "nih-cxr14"}).head(n)
        start = time.perf_counter()
        prepare(table, Path(tmp) / "cache", workers=1, progress=False)
        rows.append(("crop cache prepare, in process", n / (time.perf_counter() - start)))
        cache = CropCache(Path(tmp) / "cache")
        dataset = CropDataset(cache, np.arange(len(cache)))
        loader_n = 50 * len(dataset)
        rows.append(("loader from the crop cache (uint8 crops + labels)",
                     timed(lambda: [dataset[i % len(dataset)] for i in range(loader_n)], loader_n, repeat)))
        onnx_dir = Path(tmp) / "onnx"
        export_onnx(torch_p.segmenter, torch_p.classifier, onnx_dir)
        onnx_p = Predictor.from_onnx(onnx_dir)
        ours = timed(lambda: torch_p.classifier.predict_proba(
            np.stack([crop_resize(im, s.box, 224) for im, s in zip(images, segs)]).astype(np.float32)), n, repeat)
        rows.append(("DenseNet-121 inference, PyTorch (crop → probabilities)", ours))
        rows.append(("DenseNet-121 inference, ONNX Runtime", timed(lambda: onnx_p.classifier.predict_proba(crops), n, repeat)))
        rows.append(("end-to-end predict + Grad-CAM, PyTorch, batch 8",
                     timed(lambda: [torch_p.predict_batch(paths[i:i + 8], cam="top", keep_arrays=True) for i in range(0, n, 8)], n, repeat)))
        rows.append(("end-to-end predict + Grad-CAM, ONNX Runtime, batch 8",
                     timed(lambda: [onnx_p.predict_batch(paths[i:i + 8], cam="top", keep_arrays=True) for i in range(0, n, 8)], n, repeat)))
    print(f"PneumoScan benchmarks: {n} NIH ChestX-ray14 PNGs (1024×1024), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, best of {repeat}")
    print(f"{'step':<72}{'images/s':>10}")
    for name, ips in rows:
        print(f"{name:<72}{ips:>10.1f}")
    print(flush=True)
    command = [sys.executable, str(Path(__file__).with_name("files_to_probs.py")), "--n", str(min(n, 32)),
               "--repeat", str(repeat)] + (["--xrv-python", args.xrv_python] if args.xrv_python else [])
    raise SystemExit(subprocess.run(command).returncode)


if __name__ == "__main__":
    main()
