"""Shenzhen Hospital set: ``CXR_png/CHNCXR_####_{0,1}.png`` + ``mask/CHNCXR_####_{0,1}_mask.png``.

Segmentation data; the TB flag is none of the 15 labels, so every label is unknown.
"""

from __future__ import annotations

from pneumoscan.data.base import XraySource, row, unknown


class Shenzhen(XraySource):
    name = "shenzhen"

    def _rows(self):
        images = self._require("CXR_png")
        for path in sorted(images.glob("*.png")):
            mask = self.root / "mask" / f"{path.stem}_mask.png"
            yield row(path, path.stem, "PA", unknown(), mask=str(mask) if mask.exists() else "")
