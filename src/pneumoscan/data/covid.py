"""COVID-19 image data collection (Cohen et al.): ``images/`` + ``metadata.csv`` (+ V7 lung masks
in ``semantic_masks_v7labs_lungs/``, 255 = lung, 127 = ignore).

Pneumonia-type findings (COVID-19, SARS, MERS, bacterial and fungal pneumonias) → Pneumonia = 1,
No Finding = 0; "No finding" → normal; anything else (ARDS, say) → No Finding = 0, rest unknown.
"""

from __future__ import annotations

import pandas as pd

from pneumoscan.data.base import XraySource, normal, only, row

PNEUMONIA_WORDS = ("covid", "sars", "mers", "pneumonia", "streptococcus", "pneumocystis",
                   "klebsiella", "legionella", "chlamydophila", "mycoplasma", "e.coli",
                   "staphylococcus", "influenza", "varicella", "aspergillosis", "nocardia",
                   "lipoid", "bacterial", "viral", "fungal")


def finding_labels(finding: object) -> dict[str, float]:
    """The 15 labels a free-text ``finding`` value supports (blank → all unknown)."""
    text = str(finding).strip().lower() if pd.notna(finding) else ""
    if not text:
        return only()
    if text in {"no finding", "normal"}:
        return normal()
    if any(word in text for word in PNEUMONIA_WORDS):
        return only(Pneumonia=1, No_Finding=0)
    return only(No_Finding=0)


class CovidChestXray(XraySource):
    name = "covid"

    def _rows(self):
        meta = pd.read_csv(self._require("metadata.csv"))
        meta.columns = [c.strip() for c in meta.columns]
        mask_dir = self.root / "semantic_masks_v7labs_lungs"
        absent = 0
        for rec in meta.to_dict("records"):
            if str(rec.get("modality", "X-ray")).strip() not in {"X-ray", "nan"}:
                continue  # CT slices share the table
            path = self.root / "images" / str(rec["filename"])
            if not path.exists():
                absent += 1
                continue
            mask = mask_dir / path.name
            yield row(path, str(rec["Patientid"]), rec.get("view"),
                      finding_labels(rec.get("finding")), mask=str(mask) if mask.exists() else "",
                      age=rec.get("age"), sex=rec.get("sex"))
        if absent:
            self.warnings.append(f"covid: {absent} metadata rows have no image here (skipped)")
