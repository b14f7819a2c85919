"""read → CLAHE → U-Net → clean-up → crop on the 1024×1024 NIH PNGs, with the shipped U-Net.

    python benchmarks/segment_bench.py [--data ../shared/data] [--n 48] [--batch 1 8 16]

Prints images/s per batch size on this machine (all cores torch is allowed), and the split of
time between reading + CLAHE, the U-Net and the clean-up/crop at batch 1.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pneumoscan.crop import crop_resize
from pneumoscan.films import read_xray
from pneumoscan.segment import load_default, locate_lungs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    args = parser.parse_args()
    paths = sorted((args.data / "nih-cxr14" / "images").glob("*.png"))[: args.n]
    if not paths:
        raise SystemExit("no NIH PNGs found")
    segmenter = load_default()
    segmenter.segment_batch([read_xray(paths[0]).pixels])  # warm-up
    print(f"CPU threads: {torch.get_num_threads()}; {len(paths)} NIH PNGs, 1024×1024")
    print(f"{'batch':>6}{'images/s':>10}{'ms/image':>10}")
    for batch in args.batch:
        start = time.perf_counter()
        for i in range(0, len(paths), batch):
            pixels = [read_xray(p).pixels for p in paths[i:i + batch]]
            for image, seg in zip(pixels, segmenter.segment_batch(pixels)):
                crop_resize(image, seg.box, 224)
        took = time.perf_counter() - start
        print(f"{batch:>6}{len(paths) / took:>10.1f}{took / len(paths) * 1000:>10.1f}")
    parts = {"read": 0.0, "clahe+resize+unet": 0.0, "clean-up+crop": 0.0}
    for path in paths:
        t0 = time.perf_counter()
        pixels = read_xray(path).pixels
        t1 = time.perf_counter()
        prob = segmenter.probabilities([pixels])[0]
        t2 = time.perf_counter()
        crop_resize(pixels, locate_lungs(prob, pixels.shape).box, 224)
        t3 = time.perf_counter()
        parts["read"] += t1 - t0
        parts["clahe+resize+unet"] += t2 - t1
        parts["clean-up+crop"] += t3 - t2
    print("batch 1, ms/image: " + ", ".join(f"{k} {v / len(paths) * 1000:.1f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
