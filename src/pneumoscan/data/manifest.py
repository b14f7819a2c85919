"""Every source indexed into one table and split patient-wise (SPEC, "Data sources and how they
merge").

A patient's split is drawn from a hash of (seed, patient key), not from a shuffled list: the same
patient lands in the same split whatever other data is indexed beside it, so adding a source never
moves old images between train and test. Official lists (NIH ``test_list.txt``, Kermany's ``test``
folder) pin patients to test; all of a patient's images follow the patient.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumoscan.data.actualmed import Actualmed
from pneumoscan.data.base import SourceError, XraySource
from pneumoscan.data.covid import CovidChestXray
from pneumoscan.data.exclude import Exclusions, drop_excluded
from pneumoscan.data.kermany import Kermany
from pneumoscan.data.montgomery import Montgomery
from pneumoscan.data.nih import NIH
from pneumoscan.data.nih_masked import NIHMasked
from pneumoscan.data.rsna import RSNA
from pneumoscan.data.shenzhen import Shenzhen
from pneumoscan.errors import PneumoScanError
from pneumoscan.labels import LABELS

SOURCES: dict[str, type[XraySource]] = {
    cls.name: cls for cls in (NIH, NIHMasked, Kermany, RSNA, Montgomery, Shenzhen, CovidChestXray, Actualmed)
}
#: Folder names of the sources in ``../shared/data`` (each source's usual release name).
FOLDER_NAMES = {
    "nih": "nih-cxr14", "kermany": "kermany", "rsna": "rsna-pneumonia", "montgomery": "montgomery",
    "shenzhen": "shenzhen", "covid": "covid-chestxray", "actualmed": "actualmed-covid",
    "nihmasked": "rsna-nih-masked",
}
MANIFEST_COLUMNS = ["path", "source", "patient", "view", "age", "sex", "split", *LABELS, "mask"]
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.80, 0.08, 0.12)
DEFAULT_SEED = 2019


class ManifestError(PneumoScanError, ValueError):
    """A manifest that cannot be built or read safely."""


def unit_hash(seed: int, key: str) -> float:
    """A reproducible number in [0, 1) for ``key``, independent of any other key."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    patients: pd.Series,
    official: pd.Series,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
) -> pd.Series:
    """Split per row, decided per patient. ``official`` is "test", "train" or "" per row."""
    train, val, test = fractions
    if min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ManifestError(f"split fractions must be ≥ 0 and sum to 1, got {fractions}")
    pinned = pd.DataFrame({"patient": patients, "official": official})
    to_test = set(pinned.loc[pinned.official == "test", "patient"])
    to_trainval = set(pinned.loc[pinned.official == "train", "patient"]) - to_test
    decided = {}
    for patient in patients.unique():
        u = unit_hash(seed, patient)
        if patient in to_test:
            decided[patient] = "test"
        elif patient in to_trainval:
            decided[patient] = "val" if train + val > 0 and u < val / (train + val) else "train"
        else:
            decided[patient] = "train" if u < train else ("val" if u < train + val else "test")
    return patients.map(decided)


SourceRoots = str | Path | Sequence[str | Path]


def resolve_sources(root: str | Path) -> dict[str, list[Path]]:
    """The sources found under a folder laid out like ``../shared/data``; a source may have
    several folders (``nih-cxr14``, ``nih-cxr14-extra``, ...: its usual name, then ``NAME-*``)."""
    root = Path(root)
    found = {}
    for name, folder in FOLDER_NAMES.items():
        folders = [p for p in [root / folder, *sorted(root.glob(f"{folder}-*"))] if p.is_dir()]
        if folders:
            found[name] = folders
    return found


def population(source: str) -> str:
    """"adult" or "paediatric" for a source name (sources this version does not know: adult)."""
    return SOURCES[source].population if source in SOURCES else "adult"


def _folders(roots: SourceRoots) -> list[Path]:
    return [Path(roots)] if isinstance(roots, str | Path) else [Path(r) for r in roots]


def build_manifest(
    sources: Mapping[str, SourceRoots],
    *,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
    rsna_mapping: str | Path | None = None,
    nih_masked_images: str | Path | None = None,
    test_sources: Sequence[str] = (),
    warnings: list[str] | None = None,
    exclusions: Exclusions | None = None,
) -> pd.DataFrame:
    """One row per image of every source: ``path, source, patient, view, split``, the 15 labels
    (1/0, NaN unknown) and ``mask`` (segmentation masks, ``;``-joined, or empty).

    A source may be given several folders (NIH extracts, say): their patient keys are shared, so
    a patient found in two folders still lands in one split; a file name seen twice in one source
    is indexed once (the first folder's copy).

    ``test_sources`` pins every image of those sources to test, and with them every image of
    their patients in other sources (NIH originals held out while their lung-masked copies in
    ``nihmasked`` would otherwise train). ``nih_masked_images``: the repository snapshot that
    ``nihmasked``'s index points into. ``exclusions``: films of an independent evaluation set,
    dropped before anything else sees them; how many each source lost is in
    ``table.attrs["excluded"]`` (and which list, in ``table.attrs["exclusions"]``)."""
    unknown_names = set(sources) - set(SOURCES)
    if unknown_names:
        raise ManifestError(f"unknown sources {sorted(unknown_names)}; known: {sorted(SOURCES)}")
    tables = []
    for name, roots in sources.items():
        parts = []
        for root in _folders(roots):
            try:
                source: XraySource
                if name == "rsna":
                    source = RSNA(root, mapping=rsna_mapping)
                elif name == "nihmasked":
                    source = NIHMasked(root, images=nih_masked_images)
                else:
                    source = SOURCES[name](root)
            except SourceError as exc:
                raise ManifestError(str(exc)) from exc
            if isinstance(source, RSNA) and "nih" in sources and not source.has_mapping and len(source):
                raise ManifestError(
                    "RSNA images are re-annotated NIH images; without the RSNA↔NIH mapping "
                    f"({'pneumonia-challenge-dataset-mappings_2018.json'}) the same radiograph could "
                    "sit in two splits. Put the mapping in the RSNA folder or pass it "
                    "(--rsna-mapping), or index RSNA and NIH separately."
                )
            if warnings is not None:
                warnings.extend(source.warnings)
            parts.append(source.csv)
        table = pd.concat(parts, ignore_index=True).assign(source=name)
        names = table["path"].map(lambda p: Path(p).name)
        twice = names.duplicated()
        if twice.any() and warnings is not None:
            warnings.append(f"{name}: {int(twice.sum())} file names appear in more than one of its "
                            f"folders; each is indexed once (e.g. {names[twice].iloc[0]})")
        tables.append(table[~twice])
    if not tables:
        raise ManifestError("no sources given")
    merged = pd.concat(tables, ignore_index=True)
    excluded = None
    if exclusions is not None:
        merged, excluded = drop_excluded(merged, exclusions)
    unknown_test = set(test_sources) - set(sources)
    if unknown_test:
        raise ManifestError(f"test sources {sorted(unknown_test)} are not among the indexed sources")
    merged.loc[merged["source"].isin(list(test_sources)), "official_split"] = "test"
    merged["split"] = assign_splits(merged["patient"], merged["official_split"], fractions, seed)
    table = merged[MANIFEST_COLUMNS].reset_index(drop=True)
    if exclusions is not None:
        table.attrs.update(excluded=excluded, exclusions=exclusions.folder)
    return table


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV and check it has the contract's columns."""
    try:
        table = pd.read_csv(path, dtype={"patient": str, "view": str, "mask": str, "sex": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                            f"{exc.start}); save it as UTF-8") from None
    missing = [c for c in ["path", "source", "patient", "view", "split", *LABELS] if c not in table]
    if missing:
        raise ManifestError(f"{path}: not a PneumoScan manifest, missing columns {missing}")
    table["view"] = table["view"].fillna("")
    for optional in ("age", "sex"):  # patient information; manifests before it have neither
        if optional not in table:
            table[optional] = np.nan
    if "mask" not in table:
        table["mask"] = ""
    table["mask"] = table["mask"].fillna("")
    try:
        values = table[list(LABELS)].to_numpy(np.float64)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: label columns must be 1, 0 or empty ({exc})") from exc
    bad = set(np.unique(values[~np.isnan(values)]).tolist()) - {0.0, 1.0}
    if bad:
        raise ManifestError(f"{path}: label columns must be 1, 0 or empty, found {sorted(bad)}")
    return table


def path_mismatch(path: Any, sha256: str) -> str | None:
    """Why the stored path no longer holds the reviewed film (None when it does): no path kept,
    the file gone or unreadable, or another file there now (its SHA-256 differs). The labels are
    the film's, never whatever file now has its name."""
    from pneumoscan.modelfile import file_sha256

    if not isinstance(path, str) or not path:
        return "no file path kept (uploaded or received without a kept copy)"
    try:
        if not Path(path).is_file():
            return f"the file is no longer at {path}"
        if file_sha256(Path(path)) != sha256:
            return f"another file is at {path} now (its SHA-256 is not the reviewed film's)"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    return None


def unique_films(table: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The rows without repeats of a film already listed (same path), and how many were dropped:
    a film listed twice would count twice in every figure."""
    repeated = table["path"].astype(str).duplicated()
    return table[~repeated], int(repeated.sum())


def write_manifest(table: pd.DataFrame, path: str | Path) -> None:
    """Write atomically (a crash never leaves half a manifest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    out = table.copy()
    out[list(LABELS)] = out[list(LABELS)].astype("Int8")  # 1 / 0 / empty, as the contract says
    out.to_csv(tmp, index=False)
    tmp.replace(path)


def summarize(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two tables: "images (patients)" per source and split, and "positive/known" per label."""
    groups = [(str(source), part) for source, part in table.groupby("source", sort=True)]
    per_source = pd.DataFrame(
        [{"source": source, **{split: f"{(p := part[part.split == split]).shape[0]:,} "
                                      f"({p.patient.nunique():,})" for split in SPLITS}}
         for source, part in [*groups, ("all", table)]]
    )
    per_label = pd.DataFrame(
        [{"label": label, **{split: f"{int((v := table.loc[table.split == split, label]).eq(1).sum()):,}"
                                    f"/{int(v.notna().sum()):,}" for split in SPLITS}}
         for label in LABELS]
    )
    return per_source, per_label


def patient_leaks(table: pd.DataFrame) -> list[str]:
    """Patients found in more than one split (should always be empty)."""
    counts = table.groupby("patient")["split"].nunique()
    return sorted(counts[counts > 1].index)


def label_matrix(table: pd.DataFrame) -> np.ndarray:
    """N×15 float32 labels in SPEC order, NaN where unknown."""
    return table[list(LABELS)].to_numpy(np.float32)
