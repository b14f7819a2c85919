"""The cardiothoracic ratio from masks, the heart U-Net, JSRT, and the CTR in every output."""

from __future__ import annotations

import json
import subprocess

import cv2
import numpy as np
import pytest

from pneumoscan.measure import (
    CardiothoracicRatio,
    cardiothoracic_ratio,
    heart_extent,
    thorax_extent,
)

from conftest import CLI, DATA, needs_data


def _thorax(heart_half_width: int = 60, size: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Two lung ellipses 300 px across in all and a heart ellipse between them, at the bottom."""
    lungs = np.zeros((size, size), np.uint8)
    cv2.ellipse(lungs, (125, 200), (70, 150), 0, 0, 360, 1, -1)   # x 55…195
    cv2.ellipse(lungs, (275, 200), (70, 150), 0, 0, 360, 1, -1)   # x 205…345
    heart = np.zeros_like(lungs)
    cv2.ellipse(heart, (210, 290), (heart_half_width, 50), 0, 0, 360, 1, -1)
    return lungs, heart


def test_widths_follow_the_definition():
    lungs, heart = _thorax()
    y, x0, x1 = thorax_extent(lungs)
    assert (x0, x1) == (55, 345) and 170 <= y <= 230          # the widest row, lung edge to lung edge
    hy, hx0, hx1 = heart_extent(np.pad(np.ones((5, 20), np.uint8), ((10, 10), (30, 30))))
    assert (hy, hx0, hx1) == (10, 30, 49)


def test_ratio_of_a_drawn_thorax():
    lungs, heart = _thorax(heart_half_width=60)
    ctr = cardiothoracic_ratio(lungs, heart, view="PA")
    assert ctr.value == pytest.approx(121 / 291, abs=0.01)
    assert ctr.enlarged is False and ctr.reason is None
    big = cardiothoracic_ratio(*_thorax(heart_half_width=90), view="PA")
    assert big.value == pytest.approx(181 / 291, abs=0.01) and big.enlarged is True
    assert cardiothoracic_ratio(lungs, heart, view="AP").enlarged is None   # 0.50 is a PA cut-off
    assert cardiothoracic_ratio(lungs, heart).enlarged is None
    record = ctr.to_dict()
    assert record["cardiothoracic_ratio"] == ctr.value
    assert record["heart_line"][1] == pytest.approx(150, abs=1) and record["heart_line"][2] == pytest.approx(270, abs=1)


@pytest.mark.parametrize("case, reason", [
    ("no heart", "no heart found"),
    ("one lung", "two lungs not found"),
    ("heart beside", "not between the lungs"),
    ("tiny heart", "implausible heart size"),
])
def test_implausible_masks_give_no_number(case, reason):
    lungs, heart = _thorax()
    if case == "no heart":
        heart[:] = 0
    elif case == "one lung":
        lungs[:, 200:] = 0
    elif case == "heart beside":
        heart = np.zeros_like(heart)
        cv2.circle(heart, (370, 300), 25, 1, -1)
    elif case == "tiny heart":
        heart = np.zeros_like(heart)
        cv2.circle(heart, (200, 300), 8, 1, -1)
    ctr = cardiothoracic_ratio(lungs, heart, view="PA")
    assert ctr.value is None and reason in ctr.reason and ctr.enlarged is None
    assert isinstance(ctr, CardiothoracicRatio) and ctr.to_dict()["cardiothoracic_ratio"] is None


def test_a_lung_fallback_gives_no_ratio():
    lungs, heart = _thorax()
    ctr = cardiothoracic_ratio(lungs, heart, view="PA", lungs_found=False)
    assert ctr.value is None and ctr.reason == "lungs not found"


@needs_data
def test_jsrt_source_reads_lungs_and_heart():
    from pneumoscan.data import JSRT
    from pneumoscan.training.segment import read_mask, segmentation_table

    source = JSRT(DATA / "jsrt")
    assert len(source) == 147 and not source.warnings
    assert source.csv.Nodule.sum() == 92 and source.csv["No Finding"].sum() == 55
    heart = segmentation_table({"jsrt": DATA / "jsrt"}, structure="heart", folds=5, fold=2)
    assert len(heart) == 147 and 15 < (heart.split == "val").sum() < 45
    other = segmentation_table({"jsrt": DATA / "jsrt"}, structure="heart", folds=5, fold=3)
    assert not set(heart.path[heart.split == "val"]) & set(other.path[other.split == "val"])
    lungs = read_mask(source.csv["mask"][0])
    truth_heart = read_mask(source.csv["heart"][0])
    ctr = cardiothoracic_ratio(lungs, truth_heart, view="PA")   # the SCR masks themselves
    assert 0.35 < ctr.value < 0.62


@needs_data
def test_shipped_heart_model_on_jsrt_films():
    """The shipped heart model learnt from every JSRT film here, so this checks that it loads
    and works, not how well it generalises (docs/HEART.md has the cross-validated figure)."""
    from pneumoscan.data import JSRT
    from pneumoscan.films import read_xray
    from pneumoscan.segment import load_default_heart
    from pneumoscan.training.segment import dice_iou_acc, read_mask

    heart = load_default_heart()
    assert heart.meta["kind"] == "heart-segmentation" and heart.meta["labels"] == ["heart"]
    table = JSRT(DATA / "jsrt").csv.head(4)
    films = [read_xray(p).pixels for p in table.path]
    for mask, truth in zip(heart.heart_masks(films), map(read_mask, table.heart)):
        assert mask.shape == truth.shape and dice_iou_acc(mask, truth)[0] > 0.85


@needs_data
def test_predictions_carry_the_ratio_in_json_csv_and_overlay(tmp_path):
    film = DATA / "nih-cxr14" / "images" / "00000129_000.png"  # both masks pass their quality threshold
    for fmt in ("json", "csv"):
        result = subprocess.run([*CLI, "predict", str(film), "--out", str(tmp_path / fmt), "--format", fmt,
                                 "--overlays"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "json" / "predictions.jsonl").read_text())
    ratio = record["measurements"]["cardiothoracic_ratio"]
    assert 0.3 < ratio < 0.7 and record["measurements"]["ctr_above_pa_cutoff"] is None  # PNG: view unknown
    import pandas as pd

    row = pd.read_csv(tmp_path / "csv" / "predictions.csv").iloc[0]
    assert row["cardiothoracic_ratio"] == pytest.approx(ratio)
    overlay = cv2.imread(str(tmp_path / "json" / record["overlay"]))
    red = (overlay[..., 2] > 200) & (overlay[..., 1] < 90) & (overlay[..., 0] < 90)
    assert red.sum() > 500   # the heart outline and the two widths are drawn


@needs_data
def test_segment_writes_the_heart_mask(tmp_path):
    film = DATA / "jsrt" / "images" / "JPCNN001.png"
    if not film.exists():
        film = sorted((DATA / "jsrt" / "images").glob("JPCNN*.png"))[0]
    result = subprocess.run([*CLI, "segment", str(film), "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    heart = cv2.imread(str(tmp_path / f"{film.stem}_heart.png"), cv2.IMREAD_GRAYSCALE)
    assert heart.shape == (512, 512) and set(np.unique(heart)) == {0, 255}
    line = json.loads((tmp_path / "segment.jsonl").read_text())
    assert 0.3 < line["cardiothoracic_ratio"] < 0.7


@needs_data
def test_train_seg_heart_cross_validation_fold(tmp_path):
    """One epoch of the heart U-Net on four JSRT folds, the fifth held out; a fixed schedule keeps
    the last epoch, and the file says what it is."""
    from pneumoscan.modelfile import load_model

    result = subprocess.run([*CLI, "train-seg", "--out", str(tmp_path / "h"), "--jsrt", str(DATA / "jsrt"),
                             "--structure", "heart", "--folds", "5", "--fold", "1", "--epochs", "1",
                             "--schedule", "cosine", "--size", "96", "--accelerator", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    _, meta = load_model(tmp_path / "h" / "model.pt", kind="heart-segmentation")
    assert meta["labels"] == ["heart"] and meta["split"].startswith("hash fold 1 of 5")
    assert meta["training_data"] == {"jsrt": 147} and meta["validation"]["jsrt"]["images"] < 45
    refused = subprocess.run([*CLI, "train-seg", "--out", str(tmp_path / "x"), "--shenzhen",
                              str(DATA / "shenzhen"), "--structure", "heart"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "--jsrt" in refused.stderr and "Traceback" not in refused.stderr
