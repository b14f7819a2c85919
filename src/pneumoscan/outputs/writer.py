"""One way out for results: a :class:`~pneumoscan.prediction.Prediction` becomes a record (its dict,
plus the names of the files made for it), the files (overlay PNG, DICOM SR/SEG/SC), and one line
of ``predictions.jsonl`` or ``predictions.csv``. ``predict``, ``predict --ray`` and the listener
all go through here, so a writing rule is made once.

The work splits in two so that it can run where the arrays are: :func:`write_files` runs beside
the predictor (in the process, or in a Ray actor), and :class:`RecordSink` writes the lines in
input order in one place.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pneumoscan.labels import LABELS
from pneumoscan.reading import assessed_thresholds, status_of

#: Output names stay well under the 255-byte limit of most file systems, suffixes included.
MAX_STEM_BYTES = 120
FORMATS = ("json", "csv")


def _cell(value: Any) -> Any:
    return "" if value is None else value


def _listed(value: Any) -> str:
    return json.dumps(value) if value else ""


def _part(record: dict[str, Any], name: str) -> dict[str, Any]:
    return record.get(name) or {}


#: CSV columns after the path and the 15 probabilities (a label not assessed has an empty cell),
#: each with how its cell is read from a record: the header and every row come from this one
#: table. ``status`` is :func:`~pneumoscan.reading.status_of`, ``thresholds`` the assessed
#: labels', ``rank_scores`` their population-independent rank scores (JSON).
CSV_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...] = (
    ("findings", lambda r: "|".join(r.get("findings") or [])),
    ("not_assessed", lambda r: "|".join(r.get("not_assessed") or [])),
    ("frontal_chest", lambda r: _cell(_part(r, "quality").get("frontal_chest"))),
    ("gate_reasons", lambda r: "|".join(_part(r, "quality").get("reasons", []))),
    ("box", lambda r: json.dumps(r.get("box"))),
    ("local_box", lambda r: _listed(r.get("local_box"))),
    ("fallback", lambda r: r.get("fallback")),
    ("cam_label", lambda r: r.get("cam_label")),
    ("cam_peak", lambda r: _listed(r.get("cam_peak"))),
    ("cam_region", lambda r: _listed(r.get("cam_region"))),
    ("explanations", lambda r: explained(r.get("cams"))),
    ("cardiothoracic_ratio", lambda r: _cell(_part(r, "measurements").get("cardiothoracic_ratio"))),
    ("cardiothoracic_ratio_reason", lambda r: _cell(_part(r, "measurements").get("cardiothoracic_ratio_reason"))),
    ("lung_mask_quality", lambda r: _cell(_part(r, "mask_quality").get("lungs"))),
    ("heart_mask_quality", lambda r: _cell(_part(r, "mask_quality").get("heart"))),
    ("masks_unreliable", lambda r: "|".join(_part(r, "mask_quality").get("unreliable") or [])),
    ("status", status_of),
    ("verdict", lambda r: _cell(r.get("verdict"))),
    ("population", lambda r: _cell(_part(r, "population").get("group"))),
    ("age", lambda r: _cell(_part(r, "population").get("age"))),
    ("age_source", lambda r: _cell(_part(r, "population").get("source"))),
    ("calibrated_for", lambda r: _cell(r.get("calibrated_for"))),
    ("thresholds", lambda r: _listed(assessed_thresholds(r))),
    ("rank_scores", lambda r: _listed({k: v for k, v in (r.get("rank_scores") or {}).items() if v is not None})),
    ("verdict_reason", lambda r: _cell(r.get("verdict_reason"))),
    ("ctr_call_note", lambda r: _cell(_part(r, "measurements").get("ctr_call_note"))),
    ("overlay", lambda r: r.get("overlay")),
    ("error", lambda r: r.get("error") or ""),
)
CSV_TAIL = [name for name, _ in CSV_COLUMNS]


#: Errors that mean no later file can be written either: the batch stops instead of failing
#: every film in turn.
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class NoRoom(OSError):
    """The output folder takes no more (full disk, quota, read-only); ``record`` is the record of
    the film being written, its file error filled in, so that it can still be kept."""

    def __init__(self, record: dict[str, Any], exc: OSError):
        super().__init__(exc.errno, exc.strerror, exc.filename)
        self.record = record


@dataclass(frozen=True)
class Outputs:
    """What to write for each prediction: the row format, overlays, DICOM results (a folder)."""

    out: Path
    fmt: str = "json"
    overlays: bool = True
    dicom_out: Path | None = None

    @property
    def target(self) -> Path:
        return self.out / ("predictions.jsonl" if self.fmt == "json" else "predictions.csv")

    @property
    def run_file(self) -> Path:
        """Beside the predictions: the models and options that made them (what a resume checks)."""
        return self.out / "predictions.run.json"

    @property
    def needs_arrays(self) -> bool:
        """Whether the predictor must keep the picture, masks and heat map (for files)."""
        return self.overlays or self.dicom_out is not None


def output_stems(paths: list[Path]) -> list[str]:
    """NAME for each NAME.ext, in input order: shortened (with a hash of the full name) when long,
    and made unique (NAME-2, …) when two inputs share a name."""
    used: set[str] = set()
    stems = []
    for path in paths:
        base = os.fsencode(Path(path).stem).decode("utf-8", "replace")  # a name that is not UTF-8 still makes one
        raw = base.encode()
        if len(raw) > MAX_STEM_BYTES:
            base = raw[:MAX_STEM_BYTES - 11].decode(errors="ignore") + "-" + hashlib.sha256(raw).hexdigest()[:10]
        stem, n = base, 1
        while stem in used:
            n += 1
            stem = f"{base}-{n}"
        used.add(stem)
        stems.append(stem)
    return stems


def write_files(result, path: Path, stem: str, outputs: Outputs, predictor) -> dict[str, Any]:
    """The record of one prediction, after writing its overlay and DICOM results. A file that
    cannot be written is said in the record (``overlay_error``, ``dicom_error``): one bad file
    never stops a batch. Only a folder that takes nothing more stops it (:class:`NoRoom`, which
    carries the record)."""
    from pneumoscan.films import is_dicom_file
    from pneumoscan.outputs.overlay import picture_for, save_png

    record = result.to_dict()
    record["overlay"] = None
    picture = picture_for(result) if outputs.needs_arrays and not result.error else None
    if outputs.overlays and picture is not None:
        name = f"{stem}_overlay.png"
        try:
            save_png(picture, str(outputs.out / name))
            record["overlay"] = name
        except OSError as exc:
            record["overlay_error"] = f"overlay not written: {exc.strerror or exc}"
            if exc.errno in NO_ROOM:
                raise NoRoom(record, exc) from exc
    if outputs.dicom_out is not None and picture is not None:
        if is_dicom_file(Path(path)):  # PNG/JPEG inputs get no DICOM results (and no "dicom" key)
            from pneumoscan.errors import first_line
            from pneumoscan.outputs.dicom import write_dicom_results
            from pneumoscan.outputs.dicom_source import DicomOutputError

            try:
                written = write_dicom_results(path, result, predictor, picture, outputs.dicom_out)
                record["dicom"] = {kind: target.name for kind, target in written.items()}
            except (DicomOutputError, OSError, ValueError) as exc:
                record["dicom_error"] = f"DICOM results not written: {first_line(exc)}"
                if isinstance(exc, OSError) and exc.errno in NO_ROOM:
                    raise NoRoom(record, exc) from exc
    return record


#: A spreadsheet reads a cell starting with one of these as a formula (OWASP "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet shows as text: ``'`` before a leading formula character (OWASP's
    rule), and before a leading ``'`` so that the rule can be undone; numbers and other cells
    unchanged. A file named ``=HYPERLINK(...).png`` stays a name."""
    return "'" + value if isinstance(value, str) and value.startswith((*FORMULA_STARTS, "'")) else value


def from_spreadsheet_safe(cell: str) -> str:
    """The text :func:`spreadsheet_safe` was given."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith((*FORMULA_STARTS, "'")) else cell


def csv_row(record: dict[str, Any]) -> list[Any]:
    """One CSV row of a record: path, the 15 probabilities (empty when not assessed), then
    :data:`CSV_COLUMNS`; every text cell :func:`spreadsheet_safe`."""
    probs = _part(record, "probabilities")
    row = [record["path"], *(_cell(probs.get(label)) for label in LABELS), *(read(record) for _, read in CSV_COLUMNS)]
    return [spreadsheet_safe(value) for value in row]


def explained(cams: dict[str, dict[str, Any]] | None) -> str:
    """The explanations in one cell: ``label: method region`` joined by ``|`` (the region as
    x0 y0 x1 y1 in film pixels, or ``-`` when the explanation has none)."""
    return "|".join(f"{label}: {e['method']} {' '.join(map(str, e['region'])) if e.get('region') else '-'}"
                    for label, e in (cams or {}).items())


def csv_line(row: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(row)
    return buffer.getvalue()


def recorded_paths(target: Path) -> set[str]:
    """Paths already done in a ``predictions.jsonl`` or ``.csv`` (a resumed run skips them).
    Records that ended in an error, and a last line cut short by a crash, are dropped from the
    file (rewritten atomically), so that those films are tried again."""
    from pneumoscan.modelfile import atomic_write_bytes

    target = Path(target)
    if not target.exists():
        return set()
    parts = target.read_text(errors="replace").split("\n")
    lines = [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    kept, done = [], set()
    for i, line in enumerate(lines):
        if not line.endswith("\n"):
            continue  # cut short by a crash
        if target.suffix == ".csv":
            row = next(csv.reader([line]), [])
            if i == 0:
                kept.append(line)
                continue
            if len(row) != 1 + len(LABELS) + len(CSV_TAIL) or row[-1]:
                continue
            path = from_spreadsheet_safe(row[0])
        else:
            try:
                record = json.loads(line)
                path = record["path"]
            except (ValueError, KeyError, TypeError):
                continue
            if record.get("error"):
                continue
        done.add(path)
        kept.append(line)
    if kept != lines:
        atomic_write_bytes(target, "".join(kept).encode())
    return done


def check_resumable(outputs: Outputs, run: dict[str, Any]) -> None:
    """Refuse to add to predictions made by other models or options (``run``: what makes a
    prediction, e.g. the models' SHA-256 and ``force``): mixing them in one file, or skipping
    films as "done" by another model, would be a silent wrong answer. ValueError says what
    differs."""
    if not outputs.target.exists():
        return
    try:
        before = json.loads(outputs.run_file.read_text())
    except (OSError, ValueError):
        before = None
    if before != json.loads(json.dumps(run)):
        differs = sorted(k for k in run if not isinstance(before, dict) or before.get(k) != run[k]) or ["the run"]
        raise ValueError(f"{outputs.target} holds predictions made with other settings ({', '.join(differs)} "
                         f"differ, or {outputs.run_file.name} is missing); give another --out, or remove it to start over")


class RecordSink:
    """Writes records as lines of ``outputs.target`` (JSONL or CSV with a header), each written
    through to the file as it is made, so that a crash loses at most the line being written, and
    a line that could not be written whole (a full disk) is cut off again, never left half. An
    ``OSError`` from :meth:`write` means nothing more can be written. ``append`` continues a file
    (resume); ``run`` (the models and options) is written beside it for :func:`check_resumable`.
    Counts what it wrote."""

    def __init__(self, outputs: Outputs, append: bool = False, run: dict[str, Any] | None = None):
        from pneumoscan.modelfile import atomic_write_bytes

        self.outputs = outputs
        self.append = append and outputs.target.exists()
        self.handle: BinaryIO | None = None
        self.counts = {"written": 0, "errors": 0, "refused": 0, "failed_files": 0, "not_dicom": 0}
        if run is not None:
            atomic_write_bytes(outputs.run_file, json.dumps(run, indent=1).encode(), sync=False)

    def __enter__(self) -> RecordSink:
        self.handle = open(self.outputs.target, "ab" if self.append else "wb", buffering=0)
        if self.outputs.fmt == "csv" and not self.append:
            self._line(csv_line(["path", *LABELS, *CSV_TAIL]))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()

    def _line(self, text: str) -> None:
        handle = self.handle
        if handle is None:
            raise RuntimeError("RecordSink writes only inside its with-block")
        data, start = text.encode(), handle.tell()
        try:
            view = memoryview(data)
            while view:
                view = view[handle.write(view):]
        except OSError:
            os.ftruncate(handle.fileno(), start)  # never half a line
            handle.seek(start)
            raise

    def write(self, record: dict[str, Any]) -> None:
        self._line(json.dumps(record) + "\n" if self.outputs.fmt == "json" else csv_line(csv_row(record)))
        counts = self.counts
        counts["written"] += 1
        counts["errors"] += bool(record.get("error"))
        counts["refused"] += not record.get("error") and not (record.get("quality") or {}).get("frontal_chest")
        counts["failed_files"] += (bool(record.get("overlay_error")) + bool(record.get("dicom_error"))
                                   + bool(record.get("store_error")))
        counts["not_dicom"] += (self.outputs.dicom_out is not None and not record.get("error")
                                and "dicom" not in record and "dicom_error" not in record)


#: A store that fails this many films in a row (locked, down) is not tried again for
#: :data:`STORE_REST_S` seconds: a store left locked by a hung process would otherwise cost its
#: 30-second wait for every film.
STORE_STRIKES = 3
STORE_REST_S = 300.0


def keep_film(folder: Path, data: bytes, suffix: str) -> Path:
    """A received film kept for the store's export, named by its SHA-256 (written once, atomically:
    the same film sent twice is one file); OSError when it cannot be written."""
    from pneumoscan.modelfile import atomic_write_bytes

    target = folder / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    if not target.exists():
        atomic_write_bytes(target, data, sync=False)
    return target


def write_to_store(store, record: dict[str, Any], result, data: bytes | None, *, name: str, path: Path | None,
                   run: dict[str, Any], source: str) -> dict[str, Any]:
    """Store one record (after its files were written): ``store_id`` in the record, or, when the
    store is down or full, ``store_error`` (the file outputs already hold the result, so nothing
    is lost). ``data`` is the film's bytes (read from ``path`` when None). An unreadable film
    (``error``) is not stored: there is nothing to review. After :data:`STORE_STRIKES` films in a
    row the store failed, it rests (each film says so) before it is tried again."""
    from pneumoscan.store.db import StoreError
    from pneumoscan.store.identity import identify, layer_data, stored_record

    if record.get("error") or store is None:
        return record
    import time

    failed, last, since = store.failing
    if failed >= STORE_STRIKES and time.monotonic() - since < STORE_REST_S:
        record["store_error"] = (f"not stored: the results store failed {failed} films in a row ({last}); not tried "
                                 f"again for {STORE_REST_S:g} s")
        return record
    try:
        if data is None:
            if path is None:
                raise ValueError("write_to_store needs the film's bytes or its path")
            data = path.read_bytes()
        film, patient = identify(data, name, path)
        record["store_id"] = store.add_result(stored_record(record, film, patient), film, run, source,
                                              layer_data(result))
        store.failing = (0, "", 0.0)
    except StoreError as exc:
        record["store_error"] = f"not stored: {exc}"
        store.failing = (failed + 1, str(exc), time.monotonic())
    except (OSError, UnicodeError) as exc:  # this film's own trouble, not the store's
        record["store_error"] = f"not stored: {exc}"
    return record
