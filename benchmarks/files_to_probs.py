"""Files → probabilities, as a user meets it: PneumoScan's default and PyTorch backends against
torchxrayvision with its two resize engines, on the same files, in one run.

    python benchmarks/files_to_probs.py [--n 32] [--batch 8] [--repeat 3] [--xrv-python PATH]

Ours: ``Predictor.predict_many(paths, batch_size=B)``: read (threads), CLAHE, U-Net, clean-up,
input gate, crop, DenseNet-121 → 15 probabilities, no Grad-CAM. Theirs: torchxrayvision's README
recipe (``skimage.io.imread`` → ``xrv.datasets.normalize`` → ``XRayCenterCrop`` →
``XRayResizer(224, engine=…)`` → ``xrv.models.DenseNet``) in batches of B, with ``engine`` its
default (skimage) and cv2; its weights cannot be downloaded here, so it runs with random weights
(``weights=None``, same architecture: speed does not depend on the values). torchxrayvision needs
torchvision, so it runs in its own virtual environment (``python3 -m venv xrv && xrv/bin/pip
install torchxrayvision``), pointed to with --xrv-python or $XRV_PYTHON. Every side: all CPU
threads torch is given, one warm-up pass, best of --repeat.

Also printed: batch-1 latency (p50, p95) of predict + Grad-CAM + overlay PNG per backend, and
each process's peak RSS. The last line is ``ratio_vs_torchxrayvision=X``: the default backend's
files → probabilities images/s over torchxrayvision's faster engine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from run_all import timed  # this folder is on sys.path when a script in it runs

DATA = Path(os.environ.get("PNEUMOSCAN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

XRV_SCRIPT = r"""
import json, sys, time
import numpy as np, skimage.io, torch, torchvision, torchxrayvision as xrv
paths, batch, repeat, engine = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = xrv.models.DenseNet(weights=None).eval()
transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224, engine=engine)])
def load(path):
    img = xrv.datasets.normalize(skimage.io.imread(path), 255)
    img = img.mean(2) if img.ndim == 3 else img
    return transform(img[None])
def run():
    out = []
    for i in range(0, len(paths), batch):
        x = torch.from_numpy(np.stack([load(p) for p in paths[i:i + batch]]))
        with torch.inference_mode():
            out.append(model(x).numpy())
    return np.concatenate(out)
run()
best = float("inf")
for _ in range(repeat):
    t = time.perf_counter(); run(); best = min(best, time.perf_counter() - t)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))  # ru_maxrss survives exec
print(json.dumps({"images_per_s": len(paths) / best, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "peak_rss_mb": int(hwm.split()[1]) / 1024}))
"""


def latency(predictor, paths: list[Path], out: Path) -> tuple[float, float]:
    """p50 and p95 seconds of one image → probabilities + Grad-CAM + overlay PNG."""
    from pneumoscan.outputs.overlay import picture_for, save_png

    times = []
    for i, path in enumerate([paths[0], *paths]):
        start = time.perf_counter()
        r = predictor.predict(path, cam="top", keep_arrays=True)
        save_png(picture_for(r), str(out / f"{i}.png"))  # as `pneumoscan predict` writes it
        times.append(time.perf_counter() - start)
    times = times[1:]  # the first one warms up
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--xrv-python", default=os.environ.get("XRV_PYTHON"))
    args = parser.parse_args()
    import torch

    from pneumoscan.predict import Predictor

    paths = sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[: args.n]
    if len(paths) < args.n:
        raise SystemExit(f"need {args.n} NIH PNGs under {DATA / 'nih-cxr14' / 'images'}")
    rows: list[tuple[str, str, str]] = []
    ours = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("auto", "torch"):
            predictor = Predictor.from_default(backend=backend)
            name = f"PneumoScan, backend {backend} ({predictor.models['backend']})"
            ips = timed(lambda: [r.probabilities for r in predictor.predict_many(paths, batch_size=args.batch)],
                              len(paths), args.repeat)
            ours[backend] = ips
            p50, p95 = latency(predictor, paths, Path(tmp))
            rows.append((name, f"{ips:.1f}", f"{1000 * p50:.0f} / {1000 * p95:.0f}"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    theirs = {}
    if args.xrv_python:
        for engine in ("skimage", "cv2"):
            out = subprocess.run([args.xrv_python, "-c", XRV_SCRIPT, json.dumps([str(p) for p in paths]),
                                  str(args.batch), str(args.repeat), engine],
                                 capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                raise SystemExit("torchxrayvision run failed:\n" + out.stderr[-2000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
            theirs[engine] = result
            rows.append((f"torchxrayvision DenseNet-121, resize engine {engine} (torch {result['torch']})",
                         f"{result['images_per_s']:.1f}", f"– (peak RSS {result['peak_rss_mb']:.0f} MB)"))
    print(f"files → 15/18 probabilities: {len(paths)} NIH ChestX-ray14 PNGs (1024×1024), batch {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeat}; "
          f"PneumoScan peak RSS {rss:.0f} MB")
    print(f"{'pipeline':<78}{'images/s':>10}   batch-1 predict + Grad-CAM + overlay PNG, p50 / p95 ms")
    for name, ips, lat in rows:
        print(f"{name:<78}{ips:>10}   {lat}")
    if theirs:
        best = max(theirs.values(), key=lambda r: r["images_per_s"])
        print(f"ratio_vs_torchxrayvision={ours['auto'] / best['images_per_s']:.2f}")
    else:
        print("ratio_vs_torchxrayvision=unmeasured (give --xrv-python or $XRV_PYTHON)")


if __name__ == "__main__":
    main()
