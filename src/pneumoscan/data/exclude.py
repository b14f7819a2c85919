"""Films of the independent evaluation set, dropped before anything trains, selects or calibrates.

Why in the index: every later step (crop cache, cross-validation, thresholds, calibration, the
reading's rules) reads the manifest, so a film the manifest never holds cannot reach any of them.
The list comes as a folder laid out like ``../shared/data/holdout-exclude``: ``nih_patient_ids.txt``
(NIH ChestX-ray14 patient IDs, one a line; every film of these patients goes, in any source keyed by
the NIH patient) and ``other_file_names.txt`` (file names, e.g. Montgomery, Shenzhen and JSRT films).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pneumoscan.data.base import SourceError

PATIENT_FILE = "nih_patient_ids.txt"
NAMES_FILE = "other_file_names.txt"


@dataclass(frozen=True)
class Exclusions:
    """NIH patient keys (``nih:<ID>``, the manifest's key) and file names to leave out."""

    nih_patients: frozenset[str]
    file_names: frozenset[str]
    folder: str

    @classmethod
    def load(cls, folder: str | Path) -> Exclusions:
        folder = Path(folder)
        files = [folder / PATIENT_FILE, folder / NAMES_FILE]
        if not any(f.is_file() for f in files):
            raise SourceError(f"{folder} holds neither {PATIENT_FILE} nor {NAMES_FILE}: not an exclusion list")
        ids, names = (_lines(f) for f in files)
        bad = sorted(i for i in ids if not i.isdigit())
        if bad:
            raise SourceError(f"{folder / PATIENT_FILE}: NIH patient IDs are numbers, found {bad[:3]}")
        return cls(frozenset(f"nih:{int(i)}" for i in ids), frozenset(names), str(folder))

    def drops(self, table: pd.DataFrame) -> pd.Series:
        """True for every row of ``table`` (a manifest) that belongs to the excluded films."""
        names = table["path"].astype(str).map(lambda p: Path(p).name)
        return table["patient"].astype(str).isin(self.nih_patients) | names.isin(self.file_names)


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def drop_excluded(table: pd.DataFrame, exclusions: Exclusions) -> tuple[pd.DataFrame, dict[str, int]]:
    """``table`` without the excluded films, and how many each source lost (every source listed)."""
    drop = exclusions.drops(table)
    counts = table.loc[drop, "source"].value_counts()
    lost = {str(s): int(counts.get(s, 0)) for s in table["source"].unique()}
    return table[~drop].reset_index(drop=True), lost
