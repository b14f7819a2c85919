"""One way out for results: a :class:`~pneumoscan.predict.Prediction` becomes a record (its dict,
plus the names of the files made for it), the files (overlay PNG, DICOM SR/SEG/SC), and one line
of ``predictions.jsonl`` or ``predictions.csv``. ``predict``, ``predict --ray`` and the listener
all go through here, so a writing rule is made once.

The work splits in two so that it can run where the arrays are: :func:`write_files` runs beside
the predictor (in the process, or in a Ray actor), and :class:`RecordSink` writes the lines in
input order in one place.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pneumoscan.labels import LABELS

#: Output names stay well under the 255-byte limit of most file systems, suffixes included.
MAX_STEM_BYTES = 120
FORMATS = ("json", "csv")
#: CSV columns after the path and the 15 probabilities (a label not assessed has an empty cell).
CSV_TAIL = ["findings", "not_assessed", "frontal_chest", "gate_reasons", "box", "local_box", "fallback",
            "cam_label", "cam_peak", "cam_region", "cardiothoracic_ratio", "cardiothoracic_ratio_reason",
            "overlay", "error"]


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
    def needs_arrays(self) -> bool:
        """Whether the predictor must keep the picture, masks and heat map (for files)."""
        return self.overlays or self.dicom_out is not None


def output_stems(paths: list[Path]) -> list[str]:
    """NAME for each NAME.ext, in input order: shortened (with a hash of the full name) when long,
    and made unique (NAME-2, …) when two inputs share a name."""
    used: set[str] = set()
    stems = []
    for path in paths:
        base = Path(path).stem
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
    cannot be written is said in the record (``overlay_error``, ``dicom_error``), never raised:
    one bad file never stops a batch."""
    from pneumoscan.io import is_dicom_file
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
    if outputs.dicom_out is not None and picture is not None:
        if is_dicom_file(Path(path)):  # PNG/JPEG inputs get no DICOM results (and no "dicom" key)
            from pneumoscan.modelfile import first_line
            from pneumoscan.outputs.dicom import DicomOutputError, write_dicom_results

            try:
                written = write_dicom_results(path, result, predictor, picture, outputs.dicom_out)
                record["dicom"] = {kind: target.name for kind, target in written.items()}
            except (DicomOutputError, OSError, ValueError) as exc:
                record["dicom_error"] = f"DICOM results not written: {first_line(exc)}"
    return record


def csv_row(record: dict[str, Any]) -> list[Any]:
    """One CSV row of a record: path, the 15 probabilities (empty when not assessed), then
    :data:`CSV_TAIL`."""
    probs = record.get("probabilities") or {}
    quality = record.get("quality") or {}
    measurements = record.get("measurements") or {}

    def cell(value: Any) -> Any:
        return "" if value is None else value

    def listed(value: Any) -> str:
        return json.dumps(value) if value else ""

    return [record["path"], *(cell(probs.get(label)) for label in LABELS),
            "|".join(record.get("findings") or []), "|".join(record.get("not_assessed") or []),
            cell(quality.get("frontal_chest")), "|".join(quality.get("reasons", [])),
            json.dumps(record.get("box")), listed(record.get("local_box")), record.get("fallback"),
            record.get("cam_label"), listed(record.get("cam_peak")), listed(record.get("cam_region")),
            cell(measurements.get("cardiothoracic_ratio")), cell(measurements.get("cardiothoracic_ratio_reason")),
            record.get("overlay"), record.get("error") or ""]


def recorded_paths(target: Path) -> set[str]:
    """Paths already in a ``predictions.jsonl`` or ``.csv`` (a resumed run skips them). A last
    line cut short by a crash is dropped from the file (rewritten atomically), so that it is
    predicted again."""
    from pneumoscan.modelfile import atomic_write_bytes

    target = Path(target)
    if not target.exists():
        return set()
    text = target.read_text()
    lines = text.splitlines()
    if target.suffix == ".csv":
        rows = list(csv.reader(lines))
        whole = text.endswith("\n")
        kept = rows[:1] + [r for i, r in enumerate(rows[1:], 1)
                           if len(r) == 1 + len(LABELS) + len(CSV_TAIL) and (whole or i < len(rows) - 1)]
        if len(kept) != len(rows) or (text and not whole):
            from io import StringIO

            buffer = StringIO()
            csv.writer(buffer).writerows(kept)
            atomic_write_bytes(target, buffer.getvalue().encode())
        return {r[0] for r in kept[1:]}
    kept, done = [], set()
    for line in lines:
        try:
            done.add(json.loads(line)["path"])
            kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(kept) != len(lines) or (text and not text.endswith("\n")):  # appending must start a line
        atomic_write_bytes(target, "".join(line + "\n" for line in kept).encode())
    return done


class RecordSink:
    """Writes records as lines of ``outputs.target`` (JSONL or CSV with a header), flushed one by
    one so that a crash loses at most the line being written; ``append`` continues a file
    (resume). Counts what it wrote."""

    def __init__(self, outputs: Outputs, append: bool = False):
        self.outputs = outputs
        self.append = append and outputs.target.exists()
        self.handle: TextIO | None = None
        self.writer = None
        self.counts = {"written": 0, "errors": 0, "refused": 0, "failed_files": 0, "not_dicom": 0}

    def __enter__(self) -> RecordSink:
        self.handle = open(self.outputs.target, "a" if self.append else "w", newline="")
        if self.outputs.fmt == "csv":
            self.writer = csv.writer(self.handle)
            if not self.append:
                self.writer.writerow(["path", *LABELS, *CSV_TAIL])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            self.handle.write(json.dumps(record) + "\n")
        else:
            self.writer.writerow(csv_row(record))
        self.handle.flush()
        counts = self.counts
        counts["written"] += 1
        counts["errors"] += bool(record.get("error"))
        counts["refused"] += not record.get("error") and not (record.get("quality") or {}).get("frontal_chest")
        counts["failed_files"] += bool(record.get("overlay_error")) + bool(record.get("dicom_error"))
        counts["not_dicom"] += (self.outputs.dicom_out is not None and not record.get("error")
                                and "dicom" not in record and "dicom_error" not in record)
