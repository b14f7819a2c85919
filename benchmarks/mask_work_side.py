"""How large the lung map is cleaned: Dice against the dev masks and time per image, per side.

    python benchmarks/mask_work_side.py [--sides 1024 768 512 384] [--upscale 2]

The U-Net's 224×224 map is upsampled to at most SIDE on the long side, cleaned (threshold,
opening, hole filling, two largest components) and brought to the original size
(``pneumoscan.segment.locate_lungs``). Masked dev images: Montgomery and Shenzhen (512×512) and
the COVID-19 collection's V7 masks (up to 1024 px). At 512 px or less the side changes nothing,
so those films are also scored ``--upscale`` times larger (1024×1024, like NIH films), with the
truth mask upscaled by nearest neighbour. Prints mean Dice per set and side, and ms per image for
the clean-up alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pneumoscan.data import build_manifest, resolve_sources
from pneumoscan.films import read_xray
from pneumoscan.segment import load_default, locate_lungs
from pneumoscan.training.segment import dice_iou_acc

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def truth_mask(paths: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Truth (0/1) at the image's size and where it counts: Montgomery's left and right masks
    (``a;b``) are merged; the V7 masks' 127 means "ignore"."""
    masks = [cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in paths.split(";")]
    mask = np.maximum.reduce(masks)
    if mask.shape != shape:
        mask = cv2.resize(mask, shape[::-1], interpolation=cv2.INTER_NEAREST)
    return (mask > 200).astype(np.uint8), mask != 127


def dice(a: np.ndarray, b: tuple[np.ndarray, np.ndarray]) -> float:
    """Dice where the truth counts (the project's own Dice, on the valid pixels)."""
    truth, valid = b
    return dice_iou_acc(a[valid], truth[valid])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[1024, 768, 512, 384])
    parser.add_argument("--upscale", type=int, default=2)
    args = parser.parse_args()
    sources = resolve_sources(DATA)
    table = build_manifest({k: v for k, v in sources.items() if k in ("montgomery", "shenzhen", "covid")})
    table = table[table["mask"].fillna("") != ""]
    segmenter = load_default()
    rows, timings = [], {side: [] for side in args.sides}
    for path, source, mask_path in zip(table.path, table.source, table["mask"]):
        pixels = read_xray(path).pixels
        variants = [(source, pixels)]
        if max(pixels.shape) <= 512 and args.upscale > 1:
            big = cv2.resize(pixels, None, fx=args.upscale, fy=args.upscale, interpolation=cv2.INTER_LINEAR)
            variants.append((f"{source} ×{args.upscale}", big))
        for name, image in variants:
            truth = truth_mask(mask_path, image.shape)
            prob = segmenter.probabilities([image])[0]
            for side in args.sides:
                start = time.perf_counter()
                seg = locate_lungs(prob, image.shape, work_side=side)
                timings[side].append(time.perf_counter() - start)
                rows.append({"set": name, "side": side, "dice": dice(seg.mask, truth), "pixels": image.size})
    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index="set", columns="side", values="dice", aggfunc="mean").round(4)
    table["images"] = frame[frame.side == args.sides[0]].groupby("set").size()
    print(table.to_string())
    print("\nclean-up ms per image (all sets):",
          ", ".join(f"{side}: {1000 * np.mean(t):.1f}" for side, t in timings.items()))
    big = frame[frame.pixels >= 1000 * 1000]
    print("clean-up on ≥ 1000² images, Dice by side:",
          ", ".join(f"{side}: {big[big.side == side].dice.mean():.4f}" for side in args.sides))


if __name__ == "__main__":
    main()
