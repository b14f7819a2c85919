"""NIH ChestX-ray14: ``images*/**/*.png`` + ``Data_Entry_2017.csv`` (all 15 labels known)."""

from __future__ import annotations

import pandas as pd

from pneumoscan.data.base import XraySource, row
from pneumoscan.labels import LABELS


class NIH(XraySource):
    """Labels come from ``Finding Labels`` split on ``|``; the official ``train_val_list.txt`` /
    ``test_list.txt``, when present in the folder, pin each image to train or test."""

    name = "nih"

    def _rows(self):
        table = pd.read_csv(self._require("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"))
        needed = {"Image Index", "Finding Labels", "Patient ID", "View Position"}
        missing = needed - set(table.columns)
        if missing:
            raise ValueError(f"nih: Data_Entry_2017.csv lacks columns {sorted(missing)}")
        # Both the flat layout (images/) and the Kaggle one (images_001/images/...) are found.
        files = {p.name: p for p in self.root.glob("images*/**/*.png")}
        official = {}
        for list_name, split in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
            path = self.root / list_name
            if path.exists():
                official.update({n.strip(): split for n in path.read_text().split() if n.strip()})
        absent = 0
        for rec in table.to_dict("records"):
            name = rec["Image Index"]
            path = files.get(name)
            if path is None:
                absent += 1
                continue
            findings = set(str(rec["Finding Labels"]).split("|"))
            unknown_names = findings - set(LABELS)
            if unknown_names:
                self.warnings.append(f"nih: {name} has unknown labels {sorted(unknown_names)}")
            labels = {label: float(label in findings) for label in LABELS}
            yield row(path, str(rec["Patient ID"]), str(rec["View Position"]), labels,
                      official_split=official.get(name, ""), age=rec.get("Patient Age"),
                      sex=rec.get("Patient Gender"))
        if absent:
            self.warnings.append(f"nih: {absent} CSV rows have no image file here (skipped)")
