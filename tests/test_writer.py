"""The one result writer (no data needed): output names, rows, resume, counters; the public face."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

from pneumoscan.labels import LABELS
from pneumoscan.outputs.writer import CSV_TAIL, Outputs, RecordSink, csv_row, output_stems, recorded_paths

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
        assert recorded_paths(outputs.target) == {"a.png", "b.png", "c.png"}
        with RecordSink(outputs, append=True) as sink:
            sink.write(_record("d.png"))
        if fmt == "json":
            paths = [json.loads(line)["path"] for line in outputs.target.read_text().splitlines()]
        else:
            rows = list(csv.reader(outputs.target.read_text().splitlines()))
            assert rows[0][:2] == ["path", LABELS[0]] and all(len(r) == len(rows[0]) for r in rows)
            paths = [r[0] for r in rows[1:]]
        assert paths == ["a.png", "b.png", "c.png", "d.png"]


def test_version_and_public_face():
    import pneumoscan

    result = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"pneumoscan {pneumoscan.__version__}"
    assert pneumoscan.Predictor.__name__ == "Predictor" and callable(pneumoscan.read_xray)
    assert "No Finding" in pneumoscan.LABELS and len(pneumoscan.LABELS) == 15 and "Prediction" in pneumoscan.__all__
