"""Tile overlay PNGs into one contact sheet so a person can judge many crops at a glance.

    python tools/contact_sheet.py OUT.png OVERLAY.png... [--tile 256] [--columns 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("images", type=Path, nargs="+")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--columns", type=int, default=5)
    args = parser.parse_args()
    tiles = []
    for path in args.images:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"cannot read {path}")
        tile = cv2.resize(image, (args.tile, args.tile), interpolation=cv2.INTER_AREA)
        cv2.putText(tile, path.stem.replace("_overlay", ""), (4, args.tile - 6), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    rows = -(-len(tiles) // args.columns)
    blank = np.zeros_like(tiles[0])
    tiles += [blank] * (rows * args.columns - len(tiles))
    sheet = np.vstack([np.hstack(tiles[r * args.columns:(r + 1) * args.columns]) for r in range(rows)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), sheet)
    print(f"{len(args.images)} overlays → {args.out}")


if __name__ == "__main__":
    main()
