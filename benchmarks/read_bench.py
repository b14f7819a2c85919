"""Decode + CLAHE throughput on the 1024×1024 NIH PNGs (a figure, not a test).

    python benchmarks/read_bench.py [--data ../shared/data] [--n 150] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2

from pneumoscan.enhance import clahe
from pneumoscan.films import read_xray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--n", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    paths = sorted((args.data / "nih-cxr14" / "images").glob("*.png"))[: args.n]
    if not paths:
        raise SystemExit(f"no NIH PNGs under {args.data / 'nih-cxr14' / 'images'}")
    cv2.setNumThreads(1)  # one image per core: the crop cache runs one worker per core
    rows = []
    for label, fn in (("read_xray", lambda p: read_xray(p)),
                      ("read_xray + clahe", lambda p: clahe(read_xray(p).pixels))):
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            for path in paths:
                fn(path)
            best = min(best, time.perf_counter() - start)
        rows.append((label, len(paths), best / len(paths) * 1000, len(paths) / best))
    print(f"{'step':<20}{'images':>8}{'ms/image':>10}{'images/s (1 core)':>20}")
    for label, n, ms, ips in rows:
        print(f"{label:<20}{n:>8}{ms:>10.1f}{ips:>20.1f}")


if __name__ == "__main__":
    main()
