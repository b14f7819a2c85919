"""What every data source shares: a table of images with the 15 labels (NaN = the source does not
say), in the manner of torchxrayvision's dataset classes (``pathologies``, ``labels``, ``csv``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from pneumoscan.errors import PneumoScanError
from pneumoscan.labels import FINDINGS, LABELS, NO_FINDING

#: Columns of a source's ``csv`` before splitting. ``official_split`` is "train", "test" or "".
SOURCE_COLUMNS = ["path", "patient", "view", "age", "sex", "official_split", "mask", *LABELS]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}


class SourceError(PneumoScanError, ValueError):
    """A data-source folder that does not have the layout its source publishes."""


def unknown() -> dict[str, float]:
    """All 15 labels unknown."""
    return {label: np.nan for label in LABELS}


def normal() -> dict[str, float]:
    """A radiograph read as normal: No Finding = 1 and every finding = 0."""
    row = {label: 0.0 for label in FINDINGS}
    row[NO_FINDING] = 1.0
    return row


def tb_screening(file_stem: str) -> dict[str, float]:
    """Montgomery/Shenzhen: ``_0`` is a normal adult film (No Finding = 1, findings 0); ``_1`` is
    tuberculosis, which is none of the 14 findings, so only No Finding = 0 is known."""
    return normal() if file_stem.endswith("_0") else only(No_Finding=0)


def only(**known: float) -> dict[str, float]:
    """Every label unknown except those named (use ``No_Finding`` for "No Finding")."""
    row = unknown()
    for key, value in known.items():
        label = NO_FINDING if key == "No_Finding" else key
        if label not in row:
            raise KeyError(f"unknown label {label!r}")
        row[label] = float(value)
    return row


class XraySource:
    """One public data set in its original layout, indexed into :attr:`csv`.

    Subclasses implement :meth:`_rows`; the constructor checks the folder and builds the table.
    ``warnings`` collects what was skipped (rows without images, say) so callers can report it.
    """

    name: ClassVar[str]
    pathologies: ClassVar[tuple[str, ...]] = LABELS
    #: "adult" or "paediatric": training balances the two, and a label counts as learnt only
    #: from adult positives (the people this tool is for read adult films).
    population: ClassVar[str] = "adult"
    #: Columns beyond :data:`SOURCE_COLUMNS` (e.g. JSRT's heart masks); not carried into manifests.
    extra_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise SourceError(f"{self.name}: {self.root} is not a folder")
        self.warnings: list[str] = []
        rows = list(self._rows())
        self._refuse_outside(rows)
        self.csv = pd.DataFrame(rows, columns=[*SOURCE_COLUMNS, *self.extra_columns])
        if len(self.csv) == 0:
            self.warnings.append(f"{self.name}: no images found under {self.root}")
        self.csv["patient"] = self.name + ":" + self.csv["patient"].astype(str)
        self.csv = self.csv.sort_values("path", kind="stable").reset_index(drop=True)

    def _rows(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def roots(self) -> list[Path]:
        """The folders this source's files may lie in (its root; a source that points into a
        second folder adds it)."""
        return [self.root]

    def _refuse_outside(self, rows: list[dict]) -> None:
        """Every image and mask path must lie inside :meth:`roots`, judged on the path as written
        (``..`` folded, links not followed): a file name in a source's metadata that is absolute
        or climbs out (``../../etc/x``) would otherwise put a file from anywhere into a manifest.
        The first such row is named and the source refused."""
        roots = [os.path.normpath(r) for r in self.roots()]
        for k, rec in enumerate(rows):
            for path in [rec["path"], *filter(None, str(rec.get("mask") or "").split(";"))]:
                written = os.path.normpath(path)
                if not any(written == r or written.startswith(r + os.sep) for r in roots):
                    raise SourceError(f"{self.name}: row {k + 1} of its metadata names {path!r}, outside "
                                      f"{self.root} (an absolute or '..' file name); refused")

    @property
    def labels(self) -> np.ndarray:
        """N×15 float32 array in :data:`LABELS` order, NaN where unknown."""
        return self.csv[list(LABELS)].to_numpy(np.float32)

    def __len__(self) -> int:
        return len(self.csv)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, n={len(self)})"

    def _require(self, *relative: str) -> Path:
        """The first of ``relative`` that exists under the root, or a clear error."""
        for rel in relative:
            path = self.root / rel
            if path.exists():
                return path
        raise SourceError(
            f"{self.name}: expected {' or '.join(relative)} under {self.root} "
            f"(the layout the source publishes; see SPEC 'Data sources')"
        )


def text(value: object) -> str:
    """A table cell as stripped text; missing values (NaN, None) become ""."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def row(path: Path, patient: str, view: str | None, labels: dict[str, float], *,
        official_split: str = "", mask: str = "", age: object = None, sex: object = None) -> dict:
    """One source-table row (``age`` in years and ``sex`` as the source says, where it does:
    the patient information :mod:`pneumoscan.clinical` can fuse with the image)."""
    return {"path": str(path), "patient": patient, "view": text(view), "age": text(age), "sex": text(sex),
            "official_split": official_split, "mask": mask, **labels}
