"""How a film is known to the store, and what the store keeps of a prediction for the review page.

A film is its file's SHA-256 and, for DICOM, its Study/Series/SOP Instance UIDs. Its patient ID
is only ever kept salted and hashed (to split a site's films by patient); its patient name never.
Every name or path derived from the film (its display name, its path, the overlay's and DICOM
outputs' file names, any text in the stored record) is checked against every identifying field
of its header (:data:`IDENTIFYING`: the patient's names in all their component groups and scripts,
joined and split; the patient IDs and their runs of five or more digits; the accession number;
the birth date in its usual spellings), case, separators and script width ignored. A display
name that names the patient is replaced by the SOP Instance UID (or the film's hash), a path is
not kept, and any other text is withheld. Paths are kept by default when they pass the check:
``review export`` needs them to turn reviews into a training manifest."""

from __future__ import annotations

import hashlib
import io
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumoscan.store.records import FilmIdentity, LayerData

#: The header fields that identify a patient or an encounter; a stored name or path is checked
#: against every one (PS3.15 Annex E's basic profile lists them among the attributes to remove).
IDENTIFYING = ("PatientName", "OtherPatientNames", "PatientID", "OtherPatientIDs", "IssuerOfPatientID",
               "AccessionNumber", "PatientBirthDate")
UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
#: Latin name parts shorter than this are matched as whole words only ("Li" would match "clinic").
MIN_FRAGMENT = 4
#: An identifier's runs of digits from this length on are looked for on their own (a patient ID
#: "PHI-ID-998877" is found in "id998877.dcm"); its letters are prefixes like "MRN" that name no one.
MIN_DIGITS = 5


def _dicom_tags(data: bytes) -> dict[str, list[str]]:
    """The UIDs and identifying fields of a DICOM file (header only; {} for anything else), each
    as a list of strings (multi-valued fields and sequences flattened)."""
    from pneumoscan.films import has_dicom_preamble

    if not has_dicom_preamble(data[:132]):
        return {}
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=[*UIDS, *IDENTIFYING, "OtherPatientIDsSequence"])
    except Exception:  # noqa: BLE001 - a header pydicom cannot parse only loses the UIDs
        return {}

    def values(dataset, keyword: str) -> list[str]:
        value = dataset.get(keyword)
        if value is None or value == "":
            return []
        items = value if isinstance(value, pydicom.multival.MultiValue | list | tuple) else [value]
        return [str(v).strip() for v in items if str(v).strip()]

    tags = {k: values(ds, k) for k in (*UIDS, *IDENTIFYING)}
    for item in ds.get("OtherPatientIDsSequence") or []:
        tags["OtherPatientIDs"] += values(item, "PatientID") + values(item, "IssuerOfPatientID")
    return tags


def _squash(text: str) -> str:
    """Case-folded letters and digits only (any script), so that separators never hide a match."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold() if c.isalnum())


def _birth_date_spellings(date: str) -> set[str]:
    """A DICOM date (YYYYMMDD) as sites write it in file names, separators removed."""
    digits = re.sub(r"\D", "", date)
    if len(digits) != 8:
        return {digits} if len(digits) >= MIN_FRAGMENT else set()
    y, m, d = digits[:4], digits[4:6], digits[6:]
    return {y + m + d, d + m + y, m + d + y, y[2:] + m + d, d + m + y[2:], m + d + y[2:]}


@dataclass(frozen=True)
class PatientIdentifiers:
    """What identifies the patient of one film: ``fragments`` looked for anywhere in a squashed
    text (:func:`_squash`), ``words`` (short name parts) only as whole words."""

    fragments: frozenset[str] = frozenset()
    words: frozenset[str] = frozenset()

    @classmethod
    def of(cls, tags: dict[str, list[str]]) -> PatientIdentifiers:
        fragments: set[str] = set()
        words: set[str] = set()
        for name in tags.get("PatientName", []) + tags.get("OtherPatientNames", []):
            for group in name.split("="):  # alphabetic, ideographic and phonetic component groups
                parts = [_squash(p) for p in re.split(r"[\^\s,.\-_]+", group) if _squash(p)]
                for part in parts:
                    # Latin parts of 2–3 letters only as whole words; other scripts' names are short
                    (fragments if len(part) >= MIN_FRAGMENT or not part.isascii() else words).add(part)
                if len(parts) >= 2:
                    fragments.update({"".join(parts), "".join(reversed(parts))})
        for key in ("PatientID", "OtherPatientIDs", "IssuerOfPatientID", "AccessionNumber"):
            for value in tags.get(key, []):
                whole = _squash(value)
                if len(whole) >= 3:
                    fragments.add(whole)
                fragments.update(run for run in re.findall(r"\d+", value) if len(run) >= MIN_DIGITS)
        for value in tags.get("PatientBirthDate", []):
            fragments.update(_birth_date_spellings(value))
        return cls(frozenset(f for f in fragments if f), frozenset(words))

    def named_in(self, text: str | None) -> bool:
        """Whether ``text`` holds any of these identifiers (case, separators and script width
        ignored)."""
        if not text or not (self.fragments or self.words):
            return False
        squashed = _squash(text)
        if any(f in squashed for f in self.fragments):
            return True
        return bool(self.words & {_squash(w) for w in re.split(r"[\W_]+", text) if w})


def names_patient(text: str | None, patient_name: str, patient_id: str = "") -> bool:
    """Whether ``text`` names the patient of that PatientName / PatientID (see
    :class:`PatientIdentifiers` for the rules; :func:`identify` checks every identifying field)."""
    tags = {"PatientName": [patient_name] if patient_name else [], "PatientID": [patient_id] if patient_id else []}
    return PatientIdentifiers.of(tags).named_in(text)


def storable_text(text: str) -> str:
    """A name every database takes: bytes of a file name that are not UTF-8 (kept by Python as
    surrogate escapes) and NUL (which PostgreSQL's text cannot hold) written as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


def _uid(value: str) -> str | None:
    """A DICOM UID as the store keeps it: at most 64 characters of digits and dots (PS3.5 9.1),
    else None (a longer or malformed one would be stored by SQLite and refused by PostgreSQL)."""
    return value if value and len(value) <= 64 and re.fullmatch(r"[0-9.]+", value) else None


def identify(data: bytes, name: str, path: str | Path | None = None) -> tuple[FilmIdentity, PatientIdentifiers]:
    """The film's identity from its bytes, and what identifies its patient; ``name`` is what it
    is shown as (a file name, never a folder), ``path`` where it can be read again (for an
    export). A name or path that holds any identifying field of the header is not kept: the film
    is then shown by its SOP Instance UID (or its hash), and has no stored path."""
    tags = _dicom_tags(data)
    sha = hashlib.sha256(data).hexdigest()
    first = {k: (v[0] if v else "") for k, v in tags.items()}
    patient = PatientIdentifiers.of(tags)
    shown = storable_text(Path(str(name).replace("\\", "/")).name or sha[:16])
    if patient.named_in(shown):
        shown = _uid(first.get("SOPInstanceUID", "")) or f"film {sha[:16]}"
    where = storable_text(str(Path(path).resolve())) if path is not None else None
    if patient.named_in(where):
        where = None
    return (FilmIdentity(sha256=sha, display_name=shown, path=where, study_uid=_uid(first.get("StudyInstanceUID", "")),
                         series_uid=_uid(first.get("SeriesInstanceUID", "")), sop_uid=_uid(first.get("SOPInstanceUID", "")),
                         patient_id=first.get("PatientID") or None), patient)


#: What a stored text that named the patient is replaced with.
WITHHELD = "(withheld: named the patient)"


def scrubbed(value: Any, patient: PatientIdentifiers) -> Any:
    """``value`` (a record, or any part of one) with every string that names the patient
    replaced by :data:`WITHHELD` and every string made storable (:func:`storable_text`)."""
    if isinstance(value, str):
        return WITHHELD if patient.named_in(value) else storable_text(value)
    if isinstance(value, dict):
        return {k: scrubbed(v, patient) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrubbed(v, patient) for v in value]
    return value


def stored_record(record: dict[str, Any], film: FilmIdentity, patient: PatientIdentifiers) -> dict[str, Any]:
    """The record as the store keeps it: its ``path`` is the film's display name (a path can name
    the patient; the film's own path, when safe, is kept apart), and every other text in it that
    names the patient (the overlay's and DICOM outputs' file names, say) is withheld."""
    return scrubbed(record, patient) | {"path": film.display_name}


def layer_data(result) -> LayerData | None:
    """The review page's layers of a :class:`~pneumoscan.prediction.Prediction` kept with its arrays."""
    from pneumoscan.store.layers import heat_png, outlines, preview_jpeg, preview_scale

    if result.pixels is None:
        return None
    scale = preview_scale(result.pixels.shape)
    preview, width, height = preview_jpeg(result.pixels, scale)
    return LayerData(preview=preview, width=width, height=height, scale=scale,
                     lungs=outlines(result.mask, scale), heart=outlines(result.heart, scale),
                     heat={label: heat_png(cam, called=label in (result.findings or []))
                           for label, cam in (result.cam_maps or {}).items()})
