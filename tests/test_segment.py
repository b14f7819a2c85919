"""Stage 3: U-Net presets, exact resume after SIGKILL, the shipped model and `pneumoscan segment`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from pneumoscan.films import read_xray
from pneumoscan.modelfile import load_model
from pneumoscan.segment import (
    KIND,
    LungSegmenter,
    build_unet,
    default_model_path,
    load_default,
)
from pneumoscan.training.segment import dice_iou_acc, read_mask, segmentation_table

from conftest import DATA, needs_data

CLI = [sys.executable, "-m", "pneumoscan.apps.cli"]


def _params(preset: str) -> float:
    return sum(p.numel() for p in build_unet(preset).parameters()) / 1e6


def test_presets_have_the_documented_sizes():
    assert 1.0 < _params("small") < 3.0
    assert 28 < _params("thesis") < 34
    with pytest.raises(ValueError, match="preset"):
        build_unet("huge")


def test_dice_iou_accuracy_on_known_masks():
    a = np.zeros((10, 10), np.uint8)
    b = np.zeros((10, 10), np.uint8)
    a[:, :5] = 1
    b[:, :4] = 1
    dice, iou, acc = dice_iou_acc(a, b)
    assert dice == pytest.approx(80 / 90) and iou == pytest.approx(40 / 50) and acc == 0.9
    assert dice_iou_acc(np.zeros((4, 4)), np.zeros((4, 4))) == (1.0, 1.0, 1.0)


@needs_data
def test_montgomery_masks_are_merged_left_and_right():
    table = segmentation_table({"montgomery": DATA / "montgomery"})
    spec = table["mask"].iloc[0]
    left, right = (cv2.imread(p, cv2.IMREAD_GRAYSCALE) > 127 for p in spec.split(";"))
    merged = read_mask(spec)
    assert merged.sum() == (left | right).sum() > left.sum() > 0
    assert set(table.split) == {"train", "val"}
    assert 0.1 < (table.split == "val").mean() < 0.3


def _tiny_shenzhen(root: Path, n: int = 10) -> Path:
    (root / "CXR_png").mkdir(parents=True)
    (root / "mask").mkdir()
    for path in sorted((DATA / "shenzhen" / "CXR_png").glob("*.png"))[:n]:
        (root / "CXR_png" / path.name).symlink_to(path)
        mask = DATA / "shenzhen" / "mask" / f"{path.stem}_mask.png"
        (root / "mask" / mask.name).symlink_to(mask)
    return root


def _train_cmd(data: Path, out: Path, epochs: int) -> list[str]:
    return [*CLI, "train-seg", "--shenzhen", str(data), "--out", str(out), "--size", "64",
            "--epochs", str(epochs), "--batch-size", "4", "--accelerator", "cpu"]


@needs_data
def test_training_resumes_exactly_after_sigkill(tmp_path):
    data = _tiny_shenzhen(tmp_path / "shenzhen")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = subprocess.run(_train_cmd(data, tmp_path / "a", 4), capture_output=True, text=True,
                              timeout=300, env=env)
    assert straight.returncode == 0, straight.stderr[-2000:]

    proc = subprocess.Popen(_train_cmd(data, tmp_path / "b", 4), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "model.pt").exists(), "killed too late to test resume"
    resumed = subprocess.run(_train_cmd(data, tmp_path / "b", 4), capture_output=True, text=True,
                             timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    (wa, ma), (wb, mb) = (load_model(tmp_path / run / "model.pt", kind=KIND) for run in "ab")
    assert ma["weights_sha256"] == mb["weights_sha256"]
    assert ma["epochs_trained"] == mb["epochs_trained"] == 4
    assert ma["validation"] == mb["validation"]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert {"dice", "iou", "pixel_accuracy"} <= set(report["validation"]["shenzhen"])


@needs_data
def test_shipped_model_loads_offline_and_finds_lungs(nih_png):
    segmenter = load_default()
    assert segmenter.meta["kind"] == KIND and segmenter.meta["preset"] == "small"
    for source, metric in segmenter.meta["validation"].items():
        assert metric["dice"] > 0.9, (source, metric)
    image = read_xray(nih_png)
    seg = segmenter.segment(image.pixels)
    assert seg.mask.shape == image.shape and not seg.fallback and seg.regions == 2
    x0, y0, x1, y1 = seg.box
    assert 0 <= x0 < x1 <= 1024 and 0 <= y0 < y1 <= 1024
    assert 0.15 < seg.lung_fraction < 0.6
    assert (x1 - x0) * (y1 - y0) < 0.9 * 1024 * 1024  # a real crop, not the whole picture


@needs_data
def test_shipped_model_matches_ground_truth_on_montgomery():
    """The shipped model on the Montgomery images it was validated on (its val split)."""
    segmenter = load_default()
    table = segmentation_table({"montgomery": DATA / "montgomery"})
    val = table[table.split == "val"].head(5)
    for rec in val.to_dict("records"):
        seg = segmenter.segment(read_xray(rec["path"]).pixels)
        dice, _, _ = dice_iou_acc(seg.mask, read_mask(rec["mask"]))
        assert dice > 0.85, rec["path"]


@needs_data
def test_segment_command_on_png_jpeg_dicom_and_a_bad_file(tmp_path, siim_dicom):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    kermany = DATA / "kermany" / "train" / "PNEUMONIA" / "person1000_bacteria_2931.jpeg"
    covid = sorted((DATA / "covid-chestxray" / "images").glob("*.jp*g"))[0]
    inputs = [DATA / "nih-cxr14" / "images" / "00000100_000.png", kermany, siim_dicom, covid, bad]
    result = subprocess.run([*CLI, "segment", *map(str, inputs), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr  # one input failed, the rest were done
    assert "Traceback" not in result.stderr
    lines = [json.loads(l) for l in (tmp_path / "out" / "segment.jsonl").read_text().splitlines()]
    assert [l["path"] for l in lines] == list(map(str, inputs))
    assert lines[-1]["error"] and lines[-1]["box"] is None
    for line, path in zip(lines[:-1], inputs[:-1]):
        assert line["error"] is None and isinstance(line["fallback"], bool)
        mask = cv2.imread(str(tmp_path / "out" / f"{path.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == read_xray(path).shape and set(np.unique(mask)) <= {0, 255}
        assert (tmp_path / "out" / f"{path.stem}_overlay.png").exists()
        x0, y0, x1, y1 = line["box"]
        assert 0 <= x0 < x1 <= mask.shape[1] and 0 <= y0 < y1 <= mask.shape[0]
        assert line["lung_fraction"] == pytest.approx((mask > 0).mean(), abs=0.02)
    assert pydicom.dcmread(siim_dicom).Rows == cv2.imread(
        str(tmp_path / "out" / f"{siim_dicom.stem}_mask.png")).shape[0]


def test_segment_command_with_a_tampered_model_fails_cleanly(tmp_path):
    data = default_model_path().read_bytes()
    (tmp_path / "bad.pt").write_bytes(data[:-100])
    result = subprocess.run([*CLI, "segment", str(tmp_path), "--out", str(tmp_path / "o"),
                             "--model", str(tmp_path / "bad.pt")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr


def test_loaded_segmenter_round_trips(tmp_path):
    segmenter = load_default()
    segmenter.save(tmp_path / "copy.pt")
    again = LungSegmenter.load(tmp_path / "copy.pt")
    x = np.random.default_rng(0).random((300, 260)).astype(np.float32)
    np.testing.assert_allclose(again.probabilities([x]), segmenter.probabilities([x]), atol=1e-6)
