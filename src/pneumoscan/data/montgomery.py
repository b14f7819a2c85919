"""Montgomery County set: ``CXR_png/MCUCXR_####_{0,1}.png`` + ``ManualMask/{left,right}Mask``.

Segmentation data: the two lung masks are given as ``mask`` (``;``-joined, merged when loaded).
The TB flag (``_1``) is none of the 15 labels, so every label is unknown.
"""

from __future__ import annotations

from pneumoscan.data.base import XraySource, row, unknown


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
            yield row(path, path.stem, "PA", unknown(), mask=mask)
