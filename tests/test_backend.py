"""The default backend (ONNX Runtime through a per-user export cache), its refusals, the choice
of backend and device, and the one read → segment → crop path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.backends.onnx import cache_root
from pneumoscan.films import read_ahead, read_xray
from pneumoscan.labels import LABELS
from pneumoscan.modelfile import ModelFileError
from pneumoscan.pipeline import read_segment_crop, segment_and_crop
from pneumoscan.predict import Predictor
from pneumoscan.segment import load_default

from conftest import DATA, needs_data

CLI = [sys.executable, "-m", "pneumoscan.apps.cli"]


def _dev_films() -> list[Path]:
    return [*sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[:4],
            *sorted((DATA / "nih-cxr14-extra" / "images").glob("*.png"))[:2],
            DATA / "kermany" / "train" / "PNEUMONIA" / "person1000_bacteria_2931.jpeg",
            DATA / "shenzhen" / "CXR_png" / "CHNCXR_0001_0.png",
            next((DATA / "siim-acr-pneumothorax").rglob("*.dcm"))]


@needs_data
def test_default_backend_is_onnx_and_matches_pytorch_within_1e_3(assessed_model):
    fast = Predictor.from_paths(cls_model=assessed_model)
    slow = Predictor.from_paths(cls_model=assessed_model, backend="torch")
    assert fast.models["backend"] == "onnx" and slow.models["backend"] == "torch (cpu)"
    films = _dev_films()
    for a, b in zip(fast.predict_batch(films, cam="top"), slow.predict_batch(films, cam="top")):
        assert a.error is None and b.error is None
        assert a.quality.frontal_chest == b.quality.frontal_chest
        assert a.box == b.box and a.findings == b.findings and a.cam_label == b.cam_label
        for label in LABELS:
            pa, pb = a.probabilities[label], b.probabilities[label]
            assert (pa is None) == (pb is None) and (pa is None or abs(pa - pb) <= 1e-3), (label, pa, pb)


def test_export_is_made_once_per_model_pair_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path))
    told: list[str] = []
    Predictor.from_paths(progress=told.append)
    folders = [p for p in cache_root().iterdir() if p.is_dir()]
    assert len(folders) == 1 and len(told) == 1 and "once" in told[0]
    stamp = (folders[0] / "classifier.onnx").stat().st_mtime_ns
    Predictor.from_paths(progress=told.append)
    assert len(told) == 1 and (folders[0] / "classifier.onnx").stat().st_mtime_ns == stamp
    assert not [p for p in cache_root().iterdir() if ".tmp" in p.name]


def test_tampered_or_foreign_cached_export_is_refused(tmp_path, monkeypatch, assessed_model):
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path))
    Predictor.from_paths()
    (shipped,) = [p for p in cache_root().iterdir() if p.is_dir()]
    onnx = shipped / "classifier.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=f"delete {shipped}"):
        Predictor.from_paths()
    # An intact export of the shipped pair placed under the name of another pair's export.
    shutil.rmtree(shipped)
    Predictor.from_paths()
    Predictor.from_paths(cls_model=assessed_model)
    other = next(p for p in cache_root().iterdir() if p.is_dir() and p != shipped)
    shutil.rmtree(other)
    shutil.copytree(shipped, other)
    with pytest.raises(ModelFileError, match="not the one loaded"):
        Predictor.from_paths(cls_model=assessed_model)


@needs_data
def test_two_processes_on_an_empty_cache_export_once(tmp_path, nih_png):
    """Both start at once; the lock makes one export and the other wait and reuse it."""
    env = {**os.environ, "PNEUMOSCAN_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([*CLI, "predict", str(nih_png), "--out", str(tmp_path / f"out{i}"), "--no-overlays"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outputs]
    assert sum("preparing the ONNX Runtime models" in err for _, err in outputs) == 1
    lines = [(tmp_path / f"out{i}" / "predictions.jsonl").read_text() for i in range(2)]
    assert lines[0] == lines[1]


def test_backend_and_device_choices_fail_in_one_line(tmp_path, monkeypatch):
    for args, words in ((["--backend", "tpu"], "choose one of auto, onnx, torch"),
                        (["--backend", "torch", "--device", "cuda"], "no CUDA GPU"),
                        (["--backend", "onnx", "--device", "cuda"], "runs on the CPU")):
        if "cuda" in args and __import__("torch").cuda.is_available():
            continue
        run = subprocess.run([*CLI, "predict", "x.png", "--out", str(tmp_path / "o"), *args],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and words in run.stderr and "Traceback" not in run.stderr, run.stderr
    import pneumoscan.loading as loading

    monkeypatch.setattr(loading, "_onnx_installed", lambda: False)
    assert Predictor.from_paths().models["backend"] == "torch (cpu)"  # auto without ONNX Runtime
    with pytest.raises(ValueError, match="onnx extra"):
        Predictor.from_paths(backend="onnx")


@needs_data
def test_read_segment_crop_keeps_order_reports_errors_and_matches_the_batch_path(tmp_path):
    segmenter = load_default()
    films = _dev_films()[:5]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    sources = [films[0], broken, *films[1:]]
    items = [item for chunk in read_segment_crop(sources, segmenter, 224, batch=2, threads=2) for item in chunk]
    assert [item.source for item in items] == sources
    assert items[1].error and items[1].seg is None and items[1].crop is None
    segs, crops = segment_and_crop([read_xray(p).pixels for p in films], segmenter, 224)
    ok = [item for item in items if item.error is None]
    np.testing.assert_array_equal(np.stack([item.crop for item in ok]), crops)
    assert [item.seg.box for item in ok] == [s.box for s in segs]


def test_read_ahead_stays_a_bounded_distance_in_front():
    pulled = []
    lock = threading.Lock()

    def source():
        for i in range(1000):
            with lock:
                pulled.append(i)
            yield i

    stream = read_ahead(lambda i: i * 2, source(), threads=2, ahead=8)
    assert [next(stream) for _ in range(3)] == [0, 2, 4]
    time.sleep(0.2)
    assert len(pulled) <= 3 + 8 + 1, len(pulled)
    assert list(stream) == [2 * i for i in range(3, 1000)]
