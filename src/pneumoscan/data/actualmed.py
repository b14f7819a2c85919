"""Actualmed COVID-19 set: ``images/`` + ``metadata.csv`` (COVID-19, No finding, or blank =
inconclusive, which leaves every label unknown). Same label rules as the COVID-19 collection."""

from __future__ import annotations

import pandas as pd

from pneumoscan.data.base import XraySource, row
from pneumoscan.data.covid import finding_labels


class Actualmed(XraySource):
    name = "actualmed"

    def _rows(self):
        meta = pd.read_csv(self._require("metadata.csv"))
        absent = 0
        for rec in meta.to_dict("records"):
            path = self.root / "images" / str(rec["imagename"])
            if not path.exists():
                absent += 1
                continue
            yield row(path, str(rec["patientid"]), rec.get("view"),
                      finding_labels(rec.get("finding")), age=rec.get("age"), sex=rec.get("sex"))
        if absent:
            self.warnings.append(f"actualmed: {absent} metadata rows have no image here (skipped)")
