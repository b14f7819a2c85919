"""The input gate: frontal chest films pass; CT, photographs, rotated, inverted, noise and gradient
images are refused with a reason and get no findings unless forced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from pneumoscan.gate import (
    FrontalCheck,
    check_frontal_chest,
    load_default_check,
    tag_reasons,
)
from pneumoscan.films import read_xray
from pneumoscan.predict import Predictor
from pneumoscan.segment import load_default

from conftest import DATA, needs_data
from dicom_films import film_to_dicom

CLI = [sys.executable, "-m", "pneumoscan.apps.cli"]
FRONTAL = ["nih-cxr14/images/00000100_000.png", "nih-cxr14-extra/images/00000165_001.png",
           "shenzhen/CXR_png/CHNCXR_0001_0.png", "montgomery/CXR_png/MCUCXR_0001_0.png",
           "kermany/train/PNEUMONIA/person1000_bacteria_2931.jpeg", "kermany/train/NORMAL/IM-0115-0001.jpeg"]


class Gate:
    """The lung model and the gate's decision maker: the learnt check, or the rules alone."""

    def __init__(self, learnt: bool):
        self.segmenter = load_default()
        self.check = load_default_check() if learnt else None

    def probabilities(self, batch):
        return self.segmenter.probabilities(batch)


@pytest.fixture(scope="module", params=["learnt", "rules"])
def gate(request):
    return Gate(request.param == "learnt")


def _gate(gate, pixels, meta=None):
    result = check_frontal_chest(gate.probabilities([pixels])[0], pixels, meta, gate.check)
    assert result.method == ("learnt" if gate.check else "rules")
    return result


@needs_data
@pytest.mark.parametrize("film", FRONTAL)
def test_frontal_films_pass(gate, film):
    image = read_xray(DATA / film)
    result = _gate(gate, image.pixels, image.meta)
    assert result.frontal_chest, result.reasons


@needs_data
def test_real_cr_dicom_passes(gate, siim_dicom):
    image = read_xray(siim_dicom)
    assert _gate(gate, image.pixels, image.meta).frontal_chest


@needs_data
@pytest.mark.parametrize("change, words", [
    (lambda p: np.rot90(p).copy(), "side by side"),
    (lambda p: np.rot90(p, 2).copy(), "upside-down"),
    (lambda p: 1.0 - p, "inverted"),
])
def test_rotated_and_inverted_films_are_refused(gate, change, words):
    pixels = read_xray(DATA / FRONTAL[0]).pixels
    result = _gate(gate, change(pixels))
    assert not result.frontal_chest and any(words in r for r in result.reasons), result.reasons


def test_noise_gradient_and_a_photograph_are_refused(gate):
    import skimage.data

    rng = np.random.default_rng(0)
    gradient = np.tile(np.linspace(0, 1, 512, dtype=np.float32), (512, 1))
    camera = skimage.data.camera().astype(np.float32) / 255
    for pixels in (rng.random((512, 512), dtype=np.float32), gradient, camera):
        result = _gate(gate, pixels)
        assert not result.frontal_chest and result.reasons


def test_ct_dicom_is_refused_by_its_tags(gate):
    image = read_xray(get_testdata_file("CT_small.dcm"))
    result = _gate(gate, image.pixels, image.meta)
    assert not result.frontal_chest and "modality CT is not a projection radiograph" in result.reasons


def test_tags_name_lateral_views_and_other_body_parts_without_echoing_text():
    assert tag_reasons({"modality": "DX", "body_part": "CHEST", "view_position": "PA"}) == []
    assert tag_reasons({"modality": "MR"}) == ["modality MR is not a projection radiograph"]
    assert any("lateral" in r for r in tag_reasons({"modality": "CR", "view_position": "LL"}))
    hostile = tag_reasons({"modality": "<script>alert(1)</script>", "body_part": "KNEE\n\x00;rm -rf"})
    assert all("<" not in r and "\n" not in r and "\x00" not in r and ";" not in r for r in hostile)
    assert any("body part KNEE" in r for r in hostile)


@needs_data
def test_predictor_refuses_without_findings_and_force_scores(assessed_model, tmp_path):
    predictor = Predictor.from_paths(cls_model=assessed_model)
    noise = np.random.default_rng(1).random((400, 400), dtype=np.float32)
    ct = get_testdata_file("CT_small.dcm")
    refused = predictor.predict_batch([noise, ct, DATA / FRONTAL[0]], cam="top")
    for result in refused[:2]:
        assert result.error is None and result.quality.frontal_chest is False
        assert result.probabilities is None and result.findings is None and result.cam_label is None
        assert result.quality.reasons and not result.quality.forced
    assert refused[2].quality.frontal_chest and refused[2].probabilities["Pneumonia"] is not None
    assert refused[2].quality.method == "learnt" and refused[2].quality.measures["frontal_score"] > 0.9
    forced = predictor.predict(noise, force=True)
    assert forced.quality.forced and forced.probabilities["Pneumonia"] is not None
    assert json.dumps(forced.to_dict())


@needs_data
def test_predict_command_reports_refusals_and_force(assessed_model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "noise.png"), (np.random.default_rng(2).random((300, 300)) * 255).astype(np.uint8))
    dicom = film_to_dicom(DATA / FRONTAL[0], folder / "ct.dcm", modality="CR")
    import pydicom

    ds = pydicom.dcmread(dicom)
    ds.Modality = "CT"
    ds.save_as(dicom)
    run = subprocess.run([*CLI, "predict", str(folder), "--out", str(tmp_path / "out"), "--model", str(assessed_model)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("refused:") == 2 and "modality CT" in run.stderr
    assert "2 not frontal chest X-rays" in run.stdout
    lines = [json.loads(l) for l in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert all(l["probabilities"] is None and l["quality"]["frontal_chest"] is False for l in lines)
    assert all((tmp_path / "out" / l["overlay"]).exists() for l in lines)
    forced = subprocess.run([*CLI, "predict", str(folder / "noise.png"), "--out", str(tmp_path / "f"),
                             "--model", str(assessed_model), "--force", "--no-overlays"],
                            capture_output=True, text=True, timeout=600)
    assert forced.returncode == 0 and "scored anyway" in forced.stderr
    line = json.loads((tmp_path / "f" / "predictions.jsonl").read_text())
    assert line["quality"]["forced"] and line["probabilities"]["Pneumonia"] is not None


def test_blurred_ellipse_and_one_white_pixel_are_refused(gate):
    """Two of the issue's reproductions: shapes with no anatomy got 7–13 findings each."""
    ellipse = np.zeros((512, 512), np.float32)
    cv2.ellipse(ellipse, (256, 256), (180, 120), 0, 0, 360, 1.0, -1)
    ellipse = cv2.GaussianBlur(ellipse, (0, 0), 25)
    pixel = np.zeros((512, 512), np.float32)
    pixel[100, 300] = 1.0
    for pixels in (ellipse, pixel):
        result = _gate(gate, pixels)
        assert not result.frontal_chest and result.reasons


def test_lung_model_with_bad_metadata_is_a_clear_error(tmp_path):
    import torch

    from pneumoscan.modelfile import ModelFileError, save_model
    from pneumoscan.segment import KIND, LungSegmenter

    good = load_default()
    for broken in ({"preset": "no-such-preset"}, {"preprocessing": None}, {"preset": None}):
        meta = {**good.meta, **broken, "kind": KIND}
        meta.pop("sha256", None)
        save_model(tmp_path / "bad.pt", good.net.state_dict(), meta)
        with pytest.raises(ModelFileError, match="lung model"):
            LungSegmenter.load(tmp_path / "bad.pt")
    save_model(tmp_path / "wrong.pt", {"w": torch.zeros(3)}, {**good.meta, "kind": KIND})
    with pytest.raises(ModelFileError):
        LungSegmenter.load(tmp_path / "wrong.pt")


@needs_data
def test_learnt_check_accepts_a_frontal_film_the_rules_refuse():
    """The rules refused 2.8 % of the dev frontal films (here a NIH film that is darker below the
    lungs than above); the learnt check accepts it, and still refuses the same film upside down."""
    gate_learnt, gate_rules = Gate(True), Gate(False)
    pixels = read_xray(DATA / "nih-cxr14-extra/images/00010531_074.png").pixels
    assert not _gate(gate_rules, pixels).frontal_chest
    assert _gate(gate_learnt, pixels).frontal_chest
    flipped = _gate(gate_learnt, np.rot90(pixels, 2).copy())
    assert not flipped.frontal_chest and "learnt check" in flipped.reasons[0]


def test_learnt_check_is_tied_to_its_lung_model_and_its_file_is_verified(tmp_path, assessed_model):
    import torch

    from pneumoscan.classify import Classifier
    from pneumoscan.modelfile import ModelFileError

    segmenter = load_default()
    with torch.no_grad():
        next(segmenter.net.parameters()).add_(1e-3)  # another lung model
    segmenter.save(tmp_path / "other_unet.pt")
    other = type(segmenter).load(tmp_path / "other_unet.pt")
    with pytest.warns(UserWarning, match="rules only"):
        predictor = Predictor(other, Classifier.load(assessed_model), allow_model_mismatch=True)
    assert predictor.frontal_check is None
    result = predictor.predict(np.random.default_rng(0).random((300, 300), dtype=np.float32))
    assert result.quality.method == "rules" and not result.quality.frontal_chest

    check = load_default_check()
    path = tmp_path / "gate.pt"
    check.save(path)
    blob = torch.load(path, weights_only=True)
    blob["meta_json"] = blob["meta_json"].replace(f'"threshold": {check.threshold}', '"threshold": 0.0')
    torch.save(blob, path)
    with pytest.raises(ModelFileError, match="metadata does not match"):
        FrontalCheck.load(path)


def test_photographs_the_learnt_check_never_saw_are_refused():
    """Held out from the fit: matplotlib's bundled sample pictures (a portrait, a logo)."""
    from matplotlib import cbook

    gate = Gate(True)
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        image = read_xray(cbook.get_sample_data(name, asfileobj=False))
        result = _gate(gate, image.pixels)
        assert not result.frontal_chest and result.reasons, name


@needs_data
def test_a_tilted_film_passes_and_a_vertically_flipped_one_is_refused():
    """Two changes the fit never saw: a 10° tilt (still a frontal film) and a vertical flip."""
    gate = Gate(True)
    pixels = read_xray(DATA / FRONTAL[2]).pixels
    height, width = pixels.shape
    tilted = cv2.warpAffine(pixels, cv2.getRotationMatrix2D((width / 2, height / 2), 10, 1.0), (width, height))
    assert _gate(gate, tilted).frontal_chest
    assert not _gate(gate, pixels[::-1].copy()).frontal_chest


def test_pictures_with_few_grey_levels_are_refused():
    """A film a broken window turned black-and-white was accepted and scored No Finding 1.0."""
    from pneumoscan.gate import MIN_GREY_LEVELS, grey_levels, picture_reasons

    film = read_xray(Path(__file__).resolve().parents[1] / "examples" / "nih-cxr14" / "images" / "00000129_000.png")
    assert grey_levels(film.pixels) > 100 and picture_reasons(film.pixels) == []
    binary = (film.pixels > np.median(film.pixels)).astype(np.float32)
    posterised = np.round(film.pixels * (MIN_GREY_LEVELS - 2)) / (MIN_GREY_LEVELS - 2)
    for picture in (binary, posterised):
        assert grey_levels(picture) < MIN_GREY_LEVELS and "grey levels" in picture_reasons(picture)[0]
    result = Predictor.from_default(backend="torch").predict(binary)
    assert result.quality.frontal_chest is False and result.probabilities is None
    assert any("grey levels" in reason for reason in result.quality.reasons)


@needs_data
def test_a_grey_copy_of_pneumoscans_own_overlay_is_refused():
    """Issue 36: the colour rule refuses the overlay itself, but a grey copy of it (a screenshot
    through a grey viewer, a printout scanned) was read as a film and scored. Its frame, a title
    and a caption band of one dark grey with text on both, now refuses it, whatever its size or
    encoding; the frontal films above, with their own black borders and burnt-in markers, are not
    taken for one."""
    from pneumoscan.gate import own_overlay, picture_reasons
    from pneumoscan.films import decode_xray
    from pneumoscan.outputs.overlay import picture_for

    predictor = Predictor.from_default(backend="torch")
    film = DATA / "shenzhen" / "CXR_png" / "CHNCXR_0001_0.png"
    for cam in ("top", "none"):
        grey = cv2.cvtColor(picture_for(predictor.predict(str(film), cam=cam, keep_arrays=True)), cv2.COLOR_BGR2GRAY)
        for copy in (grey, cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)):
            for suffix in (".png", ".jpg"):
                pixels = decode_xray(cv2.imencode(suffix, copy)[1].tobytes(), name="copy" + suffix).pixels
                assert own_overlay(pixels), (cam, copy.shape, suffix)
    result = predictor.predict(pixels)
    assert result.quality.frontal_chest is False and result.probabilities is None
    assert any("PneumoScan's own overlay" in reason for reason in result.quality.reasons)
    for name in FRONTAL:
        image = read_xray(DATA / name)
        assert not own_overlay(image.pixels) and picture_reasons(image.pixels, image.meta) == [], name


@needs_data
def test_a_childs_film_in_a_large_white_field_is_refused_for_its_lungs_not_for_being_no_chest(gate):
    """Like NIH 00005618_000 (a 3-year-old in a large white field): the lung model finds no two
    lungs, and the refusal says that first instead of calling the film no chest X-ray; a CT slice
    keeps "not a frontal chest X-ray"."""
    child = read_xray(DATA / "kermany/train/NORMAL/IM-0115-0001.jpeg").pixels
    field = np.full((1024, 1024), 0.95, np.float32)
    field[358:666, 358:666] = cv2.resize(child, (308, 308))
    result = _gate(gate, field)
    assert not result.frontal_chest and result.reasons[0].startswith("lungs not found")
    assert result.to_dict()["refused_as"] == "the lungs were not found, so it could not be checked as a frontal chest X-ray"
    ct = read_xray(get_testdata_file("CT_small.dcm"))
    assert _gate(gate, ct.pixels, ct.meta).to_dict()["refused_as"] == "not a frontal chest X-ray"
    assert _gate(gate, read_xray(DATA / FRONTAL[0]).pixels).to_dict()["refused_as"] is None
