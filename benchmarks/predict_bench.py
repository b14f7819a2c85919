"""End-to-end predict on 1024×1024 NIH PNGs: read → CLAHE → U-Net → crop → DenseNet-121 →
Grad-CAM of the top finding, PyTorch eager vs ONNX Runtime, on this machine.

    python benchmarks/predict_bench.py [--n 24]

Each backend runs in its own process so that its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def run_backend(backend: str, n: int) -> dict:
    import torch

    from pneumoscan.predict import Predictor

    predictor = Predictor.from_default(backend=backend)
    paths = sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[:n]
    predictor.predict(paths[0], cam="top", keep_arrays=True)  # warm-up
    start = time.perf_counter()
    for path in paths:
        predictor.predict(path, cam="top", keep_arrays=True)
    single = (time.perf_counter() - start) / len(paths)
    start = time.perf_counter()
    for i in range(0, len(paths), 8):
        predictor.predict_batch(paths[i:i + 8], cam="top", keep_arrays=True)
    batched = len(paths) / (time.perf_counter() - start)
    return {"backend": backend, "threads": torch.get_num_threads(), "s_per_image_batch1": single,
            "images_per_s_batch8": batched, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--backend", choices=["torch", "onnx"])
    args = parser.parse_args()
    if args.backend:
        print(json.dumps(run_backend(args.backend, args.n)))
        return
    rows = []
    for backend in ("torch", "onnx"):  # ONNX: the default backend's cached export
        out = subprocess.run([sys.executable, __file__, "--backend", backend, "--n", str(args.n)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.n} NIH PNGs (1024×1024), Grad-CAM of the top finding included")
    print(f"{'backend':<14}{'s/image (batch 1)':>18}{'images/s (batch 8)':>20}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['backend']:<14}{r['s_per_image_batch1']:>18.3f}{r['images_per_s_batch8']:>20.2f}{r['peak_rss_mb']:>13.0f}")


if __name__ == "__main__":
    main()
