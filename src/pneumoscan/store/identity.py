"""How a film is known to the store, and what the store keeps of a prediction for the review page.

A film is its file's SHA-256 and, for DICOM, its Study/Series/SOP Instance UIDs. Its patient ID
is only ever kept salted and hashed (to split a site's films by patient); its patient name never.
A display name or path that contains a part of the patient's name is not kept: the film is then
shown by its UID or hash."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

from pneumoscan.store.db import FilmIdentity, LayerData


def _dicom_tags(data: bytes) -> dict[str, str]:
    """The UIDs and patient fields of a DICOM file (header only; {} for anything else)."""
    from pneumoscan.io import has_dicom_preamble

    if not has_dicom_preamble(data[:132]):
        return {}
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                            "PatientID", "PatientName"])
    except Exception:  # noqa: BLE001 - a header pydicom cannot parse only loses the UIDs
        return {}
    return {k: str(ds.get(k, "") or "").strip() for k in
            ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "PatientName")}


def names_patient(text: str | None, patient_name: str, patient_id: str = "") -> bool:
    """Whether ``text`` holds a word of a DICOM person name (words compared whole, so a patient
    called Film does not hide ``films/``) or the patient ID (4 characters or more, anywhere)."""
    if not text:
        return False
    words = set(re.split(r"[^0-9a-z]+", text.lower()))
    parts = {p for p in re.split(r"[^0-9a-z]+", (patient_name or "").lower()) if len(p) >= 2}
    return bool(parts & words) or (len(patient_id) >= 4 and patient_id.lower() in text.lower())


def identify(data: bytes, name: str, path: str | Path | None = None) -> FilmIdentity:
    """The film's identity from its bytes; ``name`` is what it is shown as (a file name, never a
    folder), ``path`` where it can be read again (for an export), if anywhere."""
    tags = _dicom_tags(data)
    sha = hashlib.sha256(data).hexdigest()
    patient = tags.get("PatientName", "")
    shown = Path(str(name).replace("\\", "/")).name or sha[:16]
    patient_id = tags.get("PatientID", "")
    if names_patient(shown, patient, patient_id):
        shown = tags.get("SOPInstanceUID") or f"film {sha[:16]}"
    where = str(Path(path).resolve()) if path is not None else None
    if names_patient(where, patient, patient_id):
        where = None
    return FilmIdentity(sha256=sha, display_name=shown, path=where, study_uid=tags.get("StudyInstanceUID") or None,
                        series_uid=tags.get("SeriesInstanceUID") or None, sop_uid=tags.get("SOPInstanceUID") or None,
                        patient_id=patient_id or None)


def stored_record(record: dict[str, Any], film: FilmIdentity) -> dict[str, Any]:
    """The record as the store keeps it: its ``path`` is the film's display name (a path can name
    the patient; the film's own path, when safe, is kept apart)."""
    return record | {"path": film.display_name}


def layer_data(result) -> LayerData | None:
    """The review page's layers of a :class:`~pneumoscan.predict.Prediction` kept with its arrays."""
    from pneumoscan.store.layers import heat_png, outlines, preview_jpeg, preview_scale

    if result.pixels is None:
        return None
    scale = preview_scale(result.pixels.shape)
    preview, width, height = preview_jpeg(result.pixels, scale)
    return LayerData(preview=preview, width=width, height=height, scale=scale,
                     lungs=outlines(result.mask, scale), heart=outlines(result.heart, scale),
                     heat={label: heat_png(cam) for label, cam in (result.cam_maps or {}).items()})
