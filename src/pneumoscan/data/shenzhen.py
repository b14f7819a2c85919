"""Shenzhen Hospital set: ``CXR_png/CHNCXR_####_{0,1}.png`` + ``mask/CHNCXR_####_{0,1}_mask.png``.

Segmentation data, and adult classification films: ``_0`` normal (No Finding 1, findings 0);
``_1`` tuberculosis (No Finding 0, the 14 findings unknown, since TB is none of them).
"""

from __future__ import annotations

from pneumoscan.data.base import XraySource, row, tb_screening


class Shenzhen(XraySource):
    name = "shenzhen"

    def _rows(self):
        images = self._require("CXR_png")
        for path in sorted(images.glob("*.png")):
            mask = self.root / "mask" / f"{path.stem}_mask.png"
            yield row(path, path.stem, "PA", tb_screening(path.stem), mask=str(mask) if mask.exists() else "")
