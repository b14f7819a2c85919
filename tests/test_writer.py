"""The one result writer (no data needed): output names, rows, resume, counters; the public face."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

from pneumoscan.labels import LABELS
from pneumoscan.outputs.writer import (
    CSV_TAIL,
    Outputs,
    RecordSink,
    csv_row,
    output_stems,
    recorded_paths,
)

from conftest import CLI


def _record(path: str, **extra) -> dict:
    return {"path": path, "probabilities": {label: (0.25 if label == "Effusion" else None) for label in LABELS},
            "findings": [], "not_assessed": [label for label in LABELS if label != "Effusion"],
            "quality": {"frontal_chest": True, "reasons": []}, "box": [1, 2, 3, 4], "local_box": None,
            "fallback": False, "cam_label": "Effusion", "cam_peak": [5, 6], "cam_region": None,
            "measurements": {"cardiothoracic_ratio": 0.51, "cardiothoracic_ratio_reason": None},
            "overlay": None, "error": None, **extra}


def test_output_stems_are_unique_and_short():
    long = "x" * 300
    stems = output_stems([Path("a/film.png"), Path("b/film.dcm"), Path("film"), Path(f"{long}.png")])
    assert stems[:3] == ["film", "film-2", "film-3"]
    assert len(stems[3].encode()) <= 120 and stems[3] != output_stems([Path(f"{long}y.png")])[0]


def test_csv_row_has_one_cell_per_column_and_empty_cells_for_unassessed():
    row = csv_row(_record("f.png"))
    assert len(row) == 1 + len(LABELS) + len(CSV_TAIL)
    assert row[1 + LABELS.index("Effusion")] == 0.25 and row[1 + LABELS.index("Pneumonia")] == ""
    assert row[1 + len(LABELS) + CSV_TAIL.index("cardiothoracic_ratio")] == 0.51


def test_sink_counts_and_resume_drops_a_line_cut_short(tmp_path):
    for fmt in ("json", "csv"):
        outputs = Outputs(out=tmp_path / fmt, fmt=fmt, overlays=False)
        outputs.out.mkdir()
        with RecordSink(outputs) as sink:
            sink.write(_record("a.png"))
            sink.write(_record("b.png", error="b.png: not an image", quality=None))
            sink.write(_record("c.png", quality={"frontal_chest": False, "reasons": ["upside down"]},
                               overlay_error="overlay not written: disk full"))
        assert sink.counts == {"written": 3, "errors": 1, "refused": 1, "failed_files": 1, "not_dicom": 0}
        with open(outputs.target, "a") as handle:
            handle.write('{"path": "d.pn' if fmt == "json" else "d.png,0.1")  # a crash mid-line
        # b.png ended in an error: it is not done, and its line leaves the file (it is tried again)
        assert recorded_paths(outputs.target) == {"a.png", "c.png"}
        with RecordSink(outputs, append=True) as sink:
            sink.write(_record("d.png"))
            sink.write(_record("b.png"))
        if fmt == "json":
            paths = [json.loads(line)["path"] for line in outputs.target.read_text().splitlines()]
        else:
            rows = list(csv.reader(outputs.target.read_text().splitlines()))
            assert rows[0][:2] == ["path", LABELS[0]] and all(len(r) == len(rows[0]) for r in rows)
            paths = [r[0] for r in rows[1:]]
        assert paths == ["a.png", "c.png", "d.png", "b.png"]


def test_csv_cells_cannot_become_formulas(tmp_path):
    """OWASP's rule: a text cell starting with = + - @ TAB or CR gets a leading quote, in every
    text column; numbers stay numbers; resume reads the name back as it was."""
    names = ["=HYPERLINK(\"http://x\",\"y\").png", "+1.png", "-2.png", "@SUM(A1).png", "\tt.png", "ok.png", "'@x.png"]
    outputs = Outputs(out=tmp_path, fmt="csv", overlays=False)
    with RecordSink(outputs) as sink:
        for name in names:
            sink.write(_record(name, error=None))
        sink.write(_record("=cmd|calc!A1.png", error="=cmd|calc!A1.png: not a PNG", quality=None))
    with open(outputs.target, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    for row in rows:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), row
    assert rows[0][0] == "'=HYPERLINK(\"http://x\",\"y\").png" and rows[-1][-1].startswith("'=cmd")
    assert rows[5][0] == "ok.png" and rows[5][1 + LABELS.index("Effusion")] == "0.25"
    assert rows[6][0] == "''@x.png"  # found by the campaign: a quote of its own is kept
    assert recorded_paths(outputs.target) == set(names)


def test_a_line_that_does_not_fit_is_cut_off_and_nothing_before_it_is_lost(tmp_path):
    """A full disk (here a file-size limit, which fails writes the same way): the records written
    before stay whole, the one that did not fit leaves no half line, and the error reaches the
    caller."""
    import resource
    import signal

    outputs = Outputs(out=tmp_path, fmt="json", overlays=False)
    line = len(json.dumps(_record("a.png"))) + 1
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with RecordSink(outputs) as sink:
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(2.5 * line), old_limit[1]))
            sink.write(_record("a.png"))
            sink.write(_record("b.png"))
            try:
                sink.write(_record("c.png"))
                raise AssertionError("the third line should not have fitted")
            except OSError as exc:
                assert exc.errno == 27  # EFBIG
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    text = outputs.target.read_text()
    assert text.endswith("\n") and [json.loads(x)["path"] for x in text.splitlines()] == ["a.png", "b.png"]


def test_resume_refuses_predictions_of_other_models_or_options(tmp_path):
    from pneumoscan.outputs.writer import check_resumable

    outputs = Outputs(out=tmp_path, fmt="json", overlays=False)
    run = {"models": {"classifier": "a" * 64}, "force": False}
    check_resumable(outputs, run)  # nothing there yet
    with RecordSink(outputs, run=run) as sink:
        sink.write(_record("a.png"))
    check_resumable(outputs, run)
    for other, named in (({**run, "force": True}, "force"), ({**run, "models": {"classifier": "b" * 64}}, "models")):
        try:
            check_resumable(outputs, other)
            raise AssertionError("resumed another run's file")
        except ValueError as exc:
            assert named in str(exc) and "--out" in str(exc)
    outputs.run_file.unlink()
    try:
        check_resumable(outputs, run)
        raise AssertionError("resumed a file of unknown origin")
    except ValueError as exc:
        assert "missing" in str(exc)


def test_names_that_are_not_utf8_make_outputs(tmp_path):
    import os

    from pneumoscan.films import display_name

    odd = Path(os.fsdecode(b"bad\xff\xfename.png"))
    assert display_name(odd) == "bad\\xff\\xfename.png"
    stem = output_stems([odd])[0]
    (tmp_path / f"{stem}_overlay.png").write_bytes(b"x")  # a file of that name can be made
    stem.encode()  # and it is valid UTF-8


def test_version_and_public_face():
    import pneumoscan

    result = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"pneumoscan {pneumoscan.__version__}"
    assert pneumoscan.Predictor.__name__ == "Predictor" and callable(pneumoscan.read_xray)
    assert "No Finding" in pneumoscan.LABELS and len(pneumoscan.LABELS) == 15 and "Prediction" in pneumoscan.__all__
