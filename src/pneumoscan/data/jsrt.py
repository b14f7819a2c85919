"""JSRT with the SCR anatomy masks: ``images/<case>.png``, ``masks/<structure>/<case>.png`` (0/255)
and ``cases.csv`` (``case``, ``nodule``).

Segmentation data for the heart (the only heart masks here) and a third lung source: ``mask`` is
the two lungs (``;``-joined, merged when loaded) and ``heart`` the heart. As classification films,
``JPCLN`` cases have a lung nodule (Nodule 1, the rest unknown) and ``JPCNN`` cases are normal.
"""

from __future__ import annotations

import pandas as pd

from pneumoscan.data.base import XraySource, normal, only, row


class JSRT(XraySource):
    name = "jsrt"
    extra_columns = ("heart",)

    def _rows(self):
        images = self._require("images")
        cases = pd.read_csv(self._require("cases.csv"), dtype={"case": str})
        nodule = dict(zip(cases["case"], cases["nodule"].astype(int)))
        for path in sorted(images.glob("*.png")):
            if path.stem not in nodule:
                self.warnings.append(f"jsrt: {path.name} is not in cases.csv (skipped)")
                continue
            lungs = [self.root / "masks" / side / path.name for side in ("right_lung", "left_lung")]
            heart = self.root / "masks" / "heart" / path.name
            mask = ";".join(str(m) for m in lungs) if all(m.exists() for m in lungs) else ""
            labels = only(Nodule=1) if nodule[path.stem] else normal()
            yield {**row(path, path.stem, "PA", labels, mask=mask),
                   "heart": str(heart) if heart.exists() else ""}
