"""Montgomery County set: ``CXR_png/MCUCXR_####_{0,1}.png`` + ``ManualMask/{left,right}Mask``.

Segmentation data: the two lung masks are given as ``mask`` (``;``-joined, merged when loaded).
Also adult classification films: ``_0`` normal (No Finding 1, findings 0); ``_1`` tuberculosis
(No Finding 0, the 14 findings unknown, since TB is none of them).
"""

from __future__ import annotations

from pneumoscan.data.base import XraySource, row, tb_screening


class Montgomery(XraySource):
    name = "montgomery"

    def _rows(self):
        images = self._require("CXR_png")
        for path in sorted(images.glob("*.png")):
            masks = [self.root / "ManualMask" / side / path.name for side in ("leftMask", "rightMask")]
            have = [str(m) for m in masks if m.exists()]
            if len(have) == 1:
                self.warnings.append(f"montgomery: {path.name} has only one lung mask (mask skipped)")
            mask = ";".join(have) if len(have) == 2 else ""
            yield row(path, path.stem, "PA", tb_screening(path.stem), mask=mask)
