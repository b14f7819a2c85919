"""The source DICOM whose header the results copy: read without its pixels, checked for what the
results must reference, and its patient and study values made to conform to their value
representations (a common spelling repaired, else a Type 2 value emptied and a Type 3 one dropped),
never echoed."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pydicom

from pneumoscan.errors import PneumoScanError

_AGE = re.compile(r"^\d{3}[DWMY]$")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")


class DicomOutputError(PneumoScanError, ValueError):
    """The source cannot be answered in DICOM (not a DICOM file, or missing what DICOM needs)."""


def read_source(path: str | Path) -> pydicom.Dataset:
    """The source's header (no pixels), checked for what the results must reference."""
    try:
        with warnings.catch_warnings(action="ignore", category=UserWarning):  # they quote tag values
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            conform_copied(ds)
    except Exception as exc:  # pydicom raises many kinds for non-DICOM input
        raise DicomOutputError(f"{Path(path).name}: not a DICOM file, no DICOM results") from exc
    missing = [k for k in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows",
                           "Columns") if k not in ds]
    if missing:
        raise DicomOutputError(f"{Path(path).name}: no DICOM results: the source lacks {', '.join(missing)}")
    if "Modality" not in ds and ds.SOPClassUID == SECONDARY_CAPTURE:
        ds.Modality = "OT"  # Type 1, left out by some converters (dcmtk's img2dcm): "other", as SC allows
    for keyword in TYPE2_PATIENT_STUDY:  # Type 2: must be present in the results, may be empty
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


#: Patient and study attributes the results copy that are not Type 2 (an invalid one is dropped).
TYPE3_COPIED = ("PatientAge", "PatientSize", "PatientWeight", "StudyDescription")
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}


def repaired(vr: str, keyword: str, value: Any) -> Any:
    """A common non-conformant value in its DICOM form (``1970-02-28`` → ``19700228``,
    ``12:30`` → ``1230``, ``female`` → ``F``), or None when it has none."""
    text = str(value).strip()
    if keyword == "PatientSex":
        return _SEX.get(text.upper())
    if vr == "DA" and (m := re.fullmatch(r"(\d{4})[-/.]?(\d{2})[-/.]?(\d{2})", text)):
        import datetime

        try:
            return datetime.date(*(int(g) for g in m.groups())).strftime("%Y%m%d")
        except ValueError:
            return None
    if vr == "TM" and (m := re.fullmatch(r"(\d{2}):?(\d{2})?(?::?(\d{2}(?:\.\d{1,6})?))?", text)):
        return "".join(g for g in m.groups() if g)
    return None


def conform_copied(ds: pydicom.Dataset) -> None:
    """Make the patient and study values the results copy conform to their VR, in place, as DICOM
    allows: a common spelling repaired (:func:`repaired`), else a Type 2 value emptied and a Type
    3 one dropped. Values are never echoed (pydicom's warnings would quote them). An over-long
    identifier is kept as it is: shortening it would file the results under another patient."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    for keyword in (*TYPE2_PATIENT_STUDY, *TYPE3_COPIED):
        if keyword not in ds or ds[keyword].VR in ("PN", "LO", "SH", "UI") or ds[keyword].value in (None, ""):
            continue
        element = ds[keyword]
        try:
            if keyword == "PatientAge" and not _AGE.match(str(element.value)):
                raise ValueError("age")
            if keyword == "PatientSex" and str(element.value) not in ("M", "F", "O"):
                raise ValueError("sex")
            validate_value(element.VR, element.value, config.RAISE)
        except (ValueError, TypeError):
            fixed = repaired(element.VR, keyword, element.value)
            if fixed is not None:
                element.value = fixed
            elif keyword in TYPE2_PATIENT_STUDY:
                element.value = ""
            else:
                del ds[keyword]
