"""NIH ChestX-ray14 films that were RSNA Pneumonia Challenge images, lung-masked, read through an
index (``rsna-nih-masked/index.csv``) from a snapshot of the public repository
``amitlohan/covid_lungs_dataset`` (448×448 PNGs).

Two facts about those PNGs, measured here on the 100 films that are also in ``nih-cxr14*/``:

- inside the lungs the grey values are the NIH film **inverted** (correlation −0.999 with the
  original, resized); outside the lungs they are 0. :func:`read_premasked` undoes the inversion
  and returns the film with 0 outside the lungs and the lung mask itself;
- the mask is that repository's own U-Net's, with specks outside the lungs; it is cleaned like
  ours (:func:`pneumoscan.crop.lung_crop`: opening, holes filled, two largest regions).

Labels: NIH's 14 findings and No Finding (text-mined from reports), as in every NIH folder. The
RSNA radiologists' class ("Lung Opacity" / "Normal" / "No Lung Opacity / Not Normal") stays in the
index for evaluation (``benchmarks/adult_eval.py``) and is not a training label: an output trained
on RSNA's opacity here ranked the NIH originals' Pneumonia films *below* their No Finding films
(AUC 0.44 on 537 films, ``docs/ADULT.md``), since RSNA's opacity follows the view (48 % of AP films,
10 % of PA ones) and NIH's pneumonia label is a different reading.

Patient keys are NIH's (``nih:<Patient ID>``), shared with :class:`pneumoscan.data.NIH`, so a
patient's masked films and original films always fall in the same split.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pneumoscan.data.base import XraySource, row
from pneumoscan.labels import LABELS

#: Where the repository snapshot is looked for when no ``images`` folder is given.
IMAGES_ENV = "PNEUMOSCAN_NIH_MASKED_IMAGES"
REPOSITORY = "amitlohan/covid_lungs_dataset"


def labels_of(finding_labels: str) -> dict[str, float]:
    """The 15 labels of one film: NIH's ``Finding Labels`` (``|``-separated, or No Finding)."""
    findings = set(str(finding_labels).split("|"))
    return {label: float(label in findings) for label in LABELS}


def read_premasked(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A masked PNG of this source → (film in [0, 1] with 0 outside the lungs, 0/1 uint8 mask).

    The stored lungs are inverted (lungs bright, ribs dark); 255 − value restores the film."""
    stored = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if stored is None:
        raise OSError(f"{path}: not a readable PNG")
    mask = (stored > 0).astype(np.uint8)
    film = np.where(mask > 0, 255.0 - stored.astype(np.float32), 0.0) / 255.0
    return film.astype(np.float32), mask


def images_root(root: Path, images: str | Path | None) -> Path | None:
    """The repository snapshot holding the PNGs: ``images``, else ``$PNEUMOSCAN_NIH_MASKED_IMAGES``,
    else a ``covid_lungs_dataset`` folder beside the index."""
    for candidate in (images, os.environ.get(IMAGES_ENV), root / "covid_lungs_dataset"):
        if candidate and Path(candidate).expanduser().is_dir():
            return Path(candidate).expanduser().resolve()
    return None


class NIHMasked(XraySource):
    name = "nihmasked"

    def __init__(self, root: str | Path, images: str | Path | None = None):
        self.images = images
        super().__init__(root)
        # Keys name the NIH patient, so NIH's own folders and this one share one key space.
        self.csv["patient"] = "nih:" + self.csv["patient"].str.removeprefix(self.name + ":")

    def roots(self) -> list[Path]:
        base = images_root(self.root, self.images)
        return [self.root, *([base.expanduser().resolve()] if base is not None else [])]

    def _rows(self):
        table = pd.read_csv(self._require("index.csv"))
        needed = {"path", "nih_patient", "rsna_class", "finding_labels", "view"}
        missing = needed - set(table.columns)
        if missing:
            raise ValueError(f"{self.name}: index.csv lacks columns {sorted(missing)}")
        base = images_root(self.root, self.images)
        if base is None:
            self.warnings.append(
                f"{self.name}: the {len(table):,} indexed films are not here; bring a snapshot of "
                f"{REPOSITORY} and pass its folder (index --nih-masked-images DIR, or "
                f"${IMAGES_ENV})")
            return
        absent = 0
        for rec in table.to_dict("records"):
            path = base / rec["path"]
            if not path.is_file():
                absent += 1
                continue
            yield row(path, str(int(rec["nih_patient"])), rec["view"],
                      labels_of(rec["finding_labels"]),
                      age=rec.get("age"), sex=rec.get("sex"))
        if absent:
            self.warnings.append(f"{self.name}: {absent} indexed films are missing under {base} (skipped)")
