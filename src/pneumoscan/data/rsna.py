"""RSNA Pneumonia Detection Challenge: ``stage_2_train_images/*.dcm`` + ``stage_2_train_labels.csv``
(+ ``stage_2_detailed_class_info.csv`` when present).

Target 1 → Pneumonia = 1, No Finding = 0. With the class file: "Normal" → No Finding = 1 and all
findings 0; "No Lung Opacity / Not Normal" → Pneumonia = 0, No Finding = 0. Without it, Target 0
only says Pneumonia = 0.

RSNA images are re-annotated NIH images. With the RSNA↔NIH mapping
(``pneumonia-challenge-dataset-mappings_2018.json``, in the folder or passed as ``mapping``) each
RSNA image takes its NIH patient's key, so it always falls in the same split as that patient's NIH
images. Without the mapping every RSNA image is its own patient; ``build_manifest`` then refuses to
combine RSNA with NIH, since the same radiograph could land in two splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pneumoscan.data.base import SourceError, XraySource, normal, only, row

MAPPING_NAME = "pneumonia-challenge-dataset-mappings_2018.json"


def read_mapping(path: str | Path) -> dict[str, str]:
    """RSNA patientId → NIH patient ID, from the official mapping JSON."""
    try:
        items = json.loads(Path(path).read_text())
        mapping = {}
        for item in items:
            nih_image = str(item["img_id"]).removesuffix(".png")
            mapping[str(item["subset_img_id"])] = str(int(nih_image.split("_")[0]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"rsna: cannot read the RSNA↔NIH mapping {path}: {exc}") from exc
    return mapping


class RSNA(XraySource):
    name = "rsna"

    def __init__(self, root: str | Path, mapping: str | Path | None = None):
        root = Path(root)
        if mapping is None and (root / MAPPING_NAME).exists():
            mapping = root / MAPPING_NAME
        self.mapping = read_mapping(mapping) if mapping is not None else None
        super().__init__(root)
        if self.mapping is not None:
            # Keys of mapped images name the NIH patient, so both sources share one key space.
            mapped = self.csv["patient"].str.startswith("rsna:nih:")
            self.csv.loc[mapped, "patient"] = self.csv.loc[mapped, "patient"].str.removeprefix("rsna:")

    @property
    def has_mapping(self) -> bool:
        return self.mapping is not None

    def _rows(self):
        labels_csv = pd.read_csv(self._require("stage_2_train_labels.csv"))
        target = labels_csv.groupby("patientId")["Target"].max()
        detail = {}
        class_file = self.root / "stage_2_detailed_class_info.csv"
        if class_file.exists():
            info = pd.read_csv(class_file).drop_duplicates("patientId")
            detail = dict(zip(info["patientId"], info["class"]))
        views = {}
        header_file = self.root / "kaggle_stage_2_train_images_dicom_headers.csv"
        if header_file.exists():
            headers = pd.read_csv(header_file, usecols=["PatientID", "ViewPosition"])
            views = dict(zip(headers["PatientID"], headers["ViewPosition"]))
        image_dir = self.root / "stage_2_train_images"
        files = {p.stem: p for p in image_dir.glob("*.dcm")} if image_dir.is_dir() else {}
        absent = 0
        for pid, tgt in target.items():
            path = files.get(pid)
            if path is None:
                absent += 1
                continue
            klass = detail.get(pid)
            if tgt == 1:
                labels = only(Pneumonia=1, No_Finding=0)
            elif klass == "Normal":
                labels = normal()
            elif klass is not None:
                labels = only(Pneumonia=0, No_Finding=0)
            else:
                labels = only(Pneumonia=0)
            patient = pid
            if self.mapping is not None and pid in self.mapping:
                patient = "nih:" + self.mapping[pid]
            yield row(path, patient, views.get(pid), labels)
        if absent:
            self.warnings.append(
                f"rsna: {absent:,} labelled images have no DICOM under {image_dir} (skipped)"
            )
