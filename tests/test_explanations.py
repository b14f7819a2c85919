"""Issue 35: mask quality at prediction time, no ratio from a heart mask that failed, and one
explanation per called finding in every output (record, CSV, overlay, SR, triage sheet)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from pneumoscan.maskquality import affines, agreement, dice, perturbed, restored
from pneumoscan.outputs.overlay import (
    FONT,
    MIN_SIDE,
    picture_for,
    prediction_picture,
    wrap_text,
)
from pneumoscan.predict import Predictor

from conftest import DATA, needs_data

#: NIH films (the shipped model's test split) on which the shipped model calls two findings that
#: a Grad-CAM explains (Effusion and Pneumonia), and Cardiomegaly with Edema.
TWO_CALLED = "00000427_000.png"
CARDIOMEGALY = "00011547_000.png"


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_default()


def film(name: str):
    return DATA / "nih-cxr14" / "images" / name


def test_reread_maps_come_back_onto_the_film_grid():
    """An unchanged map warped out and back is the map again (inside a margin the warps cut off),
    so a mask agrees with re-readings that agree with it, and not with a shifted one."""
    size = 224
    disc = np.zeros((size, size), np.float32)
    cv2.circle(disc, (112, 112), 50, 1.0, -1)
    matrices = affines(size)
    back = restored(perturbed(disc[None], matrices), matrices)
    assert back.shape == (1, len(matrices), size, size)
    assert min(dice(disc > 0.5, b > 0.5) for b in back[0]) > 0.97
    assert agreement(disc, back[0], 0.5) > 0.97
    moved = np.roll(disc, 60, axis=1)
    assert agreement(moved, back[0], 0.5) < 0.4
    assert agreement(cv2.resize(disc, (512, 512), interpolation=cv2.INTER_NEAREST), back[0], 0.5) > 0.97


def test_shipped_masks_carry_a_threshold_chosen_on_cross_validated_films(predictor):
    for model in (predictor.segmenter, predictor.heart):
        rule = model.quality_rule
        assert rule.threshold is not None and 0.5 < rule.threshold < 1, model.label
        assert "cross-validation" in rule.chosen_on or "never trained on JSRT" in rule.chosen_on
        assert len(rule.transforms) == 4 == len(model.meta["mask_quality"]["transforms"])  # chosen in HEART.md
        assert "4 re-readings" in model.meta["mask_quality"]["method"]


@needs_data
def test_a_heart_drawn_over_the_spine_gives_no_ratio_and_says_why(predictor, monkeypatch):
    """The U-Net's own heart on a normal film is trusted; a plausible-looking blob over the spine
    (between the lungs, 5-45 % of heart and lungs, a ratio inside 0.25-0.85, so the plausibility
    rules alone pass it) is not: no ratio, the reason with the quality."""
    path = film("00000129_000.png")
    good = predictor.predict(path, keep_arrays=True)
    assert good.measurements.ratio.value is not None and good.mask_quality.unreliable == []
    height, width = good.pixels.shape
    blob = np.zeros((height, width), np.uint8)
    cv2.ellipse(blob, (width // 2, int(0.42 * height)), (int(0.13 * width), int(0.2 * height)), 0, 0, 360, 1, -1)
    from pneumoscan.measure import cardiothoracic_ratio

    assert cardiothoracic_ratio(good.mask, blob, "PA").value is not None  # the old rules measure it
    monkeypatch.setattr(predictor.heart, "heart_masks", lambda films, prepared=None: [blob for _ in films])
    bad = predictor.predict(path)
    assert bad.measurements.ratio.value is None
    reason = bad.measurements.ratio.reason
    assert reason.startswith("heart mask unreliable (quality ")
    assert bad.mask_quality.heart < predictor.heart.quality_rule.threshold
    assert bad.mask_quality.unreliable == [reason]


@needs_data
def test_two_called_findings_get_two_explanations_in_every_output(predictor, tmp_path):
    from pneumoscan.outputs.writer import CSV_TAIL, csv_row

    result = predictor.predict(film(TWO_CALLED), keep_arrays=True, cam="top")
    called = [f for f in result.findings if f != "No Finding"]
    assert len(called) >= 2
    assert set(result.cams) == set(called) and all(e.method == "grad-cam" and e.region for e in result.cams.values())
    assert result.cam_label == max(called, key=lambda f: result.probabilities[f])  # the most probable first
    assert not np.array_equal(*[result.cam_maps[f] for f in called[:2]])  # each finding its own map
    record = result.to_dict()
    assert json.loads(json.dumps(record))["cams"] == record["cams"]
    cell = dict(zip(CSV_TAIL, csv_row(record)[16:]))["explanations"]
    assert all(f"{f}: grad-cam " in cell for f in called)
    single = picture_for(result, only=called[0])
    both = picture_for(result)
    assert both.shape[1] > 1.9 * single.shape[1] * 768 / 1024 and both.shape[0] >= single.shape[0] * 0.7
    asked = predictor.predict(film(TWO_CALLED), keep_arrays=True, cam=called[1])
    assert next(iter(asked.cams)) == called[1] and asked.cams[called[1]].why == "asked for"
    assert picture_for(asked).shape == picture_for(asked, only=called[1]).shape  # --cam LABEL: its panel only
    # several labels (a reader study's targets): each asked label's map first, in the order asked
    quiet = next(f for f in ("Edema", "Effusion", "Pneumonia") if f not in called)
    both_asked = predictor.predict(film(TWO_CALLED), keep_arrays=True, cam=f"{quiet.lower()}, {called[1]}")
    assert list(both_asked.cams)[:2] == [quiet, called[1]]
    assert all(both_asked.cams[f].why == "asked for" for f in (quiet, called[1]))
    assert picture_for(both_asked).shape[1] > 1.9 * picture_for(both_asked, only=quiet).shape[1] * 768 / 1024
    with pytest.raises(ValueError, match="Hernia is not assessed"):
        predictor.predict(film(TWO_CALLED), cam=f"{called[1]},Hernia")


@needs_data
def test_a_cardiomegaly_call_is_explained_by_the_outlines_not_a_lung_map(predictor):
    result = predictor.predict(film(CARDIOMEGALY), keep_arrays=True, cam="top")
    assert "Cardiomegaly" in result.findings
    outline = result.cams["Cardiomegaly"]
    assert outline.method == "outlines" and "Cardiomegaly" not in result.cam_maps
    assert outline.cardiothoracic_ratio == result.measurements.ratio.value is not None
    ys, xs = np.nonzero(result.heart)
    assert outline.region == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    others = [f for f in result.findings if f not in ("Cardiomegaly", "No Finding")]
    assert all(result.cams[f].method == "grad-cam" for f in others)


def test_titles_fit_a_small_film():
    """A 224-px film is drawn enlarged and its long title wrapped: no line runs off the picture."""
    pixels = np.random.default_rng(0).random((224, 224)).astype(np.float32)
    cam = np.zeros((224, 224), np.float32)
    cam[50:100, 50:100] = 1
    picture = prediction_picture(pixels, None, [10, 10, 200, 200], False, cam, "Pleural_Thickening", 0.61234,
                                 threshold=0.5, why="most probable finding; none called")
    assert picture.shape[1] >= MIN_SIDE
    scale = max(0.45, min(0.6, (picture.shape[1] - 70) / 1400))
    title = "Grad-CAM: Pleural_Thickening p = 0.612 >= 0.5, called (most probable finding; none called) | lung crop"
    lines = wrap_text(title, picture.shape[1] - 86, scale)
    assert len(lines) >= 1 and all(cv2.getTextSize(line, FONT, scale, 1)[0][0] <= picture.shape[1] - 16 for line in lines)


@needs_data
def test_the_sr_holds_one_region_per_explained_finding_and_each_masks_quality(predictor, tmp_path):
    highdicom = pytest.importorskip("highdicom", reason="the dicom extra is not installed")
    from pneumoscan.outputs.dicom import write_dicom_results
    from pneumoscan.outputs.overlay import picture_for

    from dicom_films import film_to_dicom, validate_dicom

    source = film_to_dicom(film(TWO_CALLED), tmp_path / "two.dcm", modality="CR")
    result = predictor.predict(source, keep_arrays=True, cam="top")
    written = write_dicom_results(source, result, predictor, picture_for(result), tmp_path / "out")
    sr = highdicom.sr.srread(tmp_path / "out" / written["sr"])
    regions = {r.tracking_identifier for r in sr.content.get_planar_roi_measurement_groups()}
    assert regions == {f"{f} heat-map region" for f, e in result.cams.items() if e.method == "grad-cam"}
    assert len(regions) >= 2
    groups = {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}
    for name, key in (("Lungs mask quality", "lungs"), ("Heart mask quality", "heart")):
        (value,) = groups[name].get_measurements()
        assert abs(value.value - getattr(result.mask_quality, key)) < 1e-6
        assert groups[name].get_qualitative_evaluations()[0].value.meaning == "Yes"
    (ctr,) = groups["Cardiothoracic ratio"].get_measurements()  # both masks trusted: the ratio is given
    assert abs(ctr.value - result.measurements.ratio.value) < 1e-6 and "Danzer" in ctr.method.meaning
    validate_dicom(tmp_path / "out" / written["sr"])


@needs_data
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_web_page_switches_between_the_explanations(tmp_path):
    """The shipped models behind `pneumoscan serve`: a film with two called findings shows a
    button per Grad-CAM, each switching the overlay, and lists what explains each call."""
    from playwright.sync_api import sync_playwright
    from test_server import _free_port

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pneumoscan.apps.cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.goto(url + "/")
            page.set_input_files("#file", str(film(TWO_CALLED)))
            page.wait_for_selector("#explanations li", timeout=120_000)
            items = page.locator("#explanations li").all_inner_texts()
            assert len(items) >= 2 and all("Grad-CAM" in item for item in items)
            buttons = page.locator("#explain-switch button")
            assert buttons.count() == len(items)
            first = page.locator("#overlay").get_attribute("src")
            buttons.nth(1).click()
            assert page.locator("#overlay").get_attribute("src") != first
            assert buttons.nth(1).get_attribute("aria-pressed") == "true"
            assert page.locator("#masks").inner_text().startswith("Mask quality: lungs 0.")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_model_file_names_the_re_readings_its_threshold_holds_for(tmp_path, monkeypatch):
    """Issue 40: the re-readings behind a mask's quality are the model file's (a threshold is
    chosen for them, ``tools/fit_mask_quality.py --transforms``), not a constant of the code; a
    malformed list is refused when the file loads, not in the middle of a batch."""
    from pneumoscan.films import read_xray
    from pneumoscan.maskquality import TRANSFORMS
    from pneumoscan.modelfile import ModelFileError
    from pneumoscan.segment import LungSegmenter, load_default

    lungs = load_default()
    lungs.meta["mask_quality"] = {**lungs.meta["mask_quality"], "transforms": [list(TRANSFORMS[0]), list(TRANSFORMS[2])]}
    lungs.save(tmp_path / "two.pt")
    two = LungSegmenter.load(tmp_path / "two.pt")
    assert two.quality_rule.transforms == (TRANSFORMS[0], TRANSFORMS[2])
    seen = []
    real = two.probabilities
    monkeypatch.setattr(two, "probabilities", lambda batch, prepared=None: seen.append(len(prepared)) or real(batch, prepared))
    example = Path(__file__).resolve().parents[1] / "examples" / "nih-cxr14" / "images" / "00000129_000.png"
    prepared = two.preprocessing(read_xray(example).pixels)[None]
    quality = two.mask_quality(prepared, [np.ones((224, 224), np.uint8)])
    assert seen == [2] and 0 <= quality[0] <= 1
    lungs.meta["mask_quality"]["transforms"] = [[8.0, 1.0]]
    lungs.save(tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match="mask_quality.transforms"):
        LungSegmenter.load(tmp_path / "bad.pt")


@needs_data
def test_a_cardiomegaly_call_beside_a_small_ratio_says_why_and_has_its_own_map(predictor, monkeypatch):
    """A call the measured heart contradicts (ratio at or below 0.50) never stands without a word:
    it gets a Grad-CAM of its own and a sentence, in the record, the CSV and the overlay."""
    import pneumoscan.evidence as evidence_module
    from pneumoscan.measure import CardiothoracicRatio
    from pneumoscan.outputs.overlay import findings_caption
    from pneumoscan.outputs.writer import CSV_TAIL, csv_row

    small = CardiothoracicRatio(0.45, None, 90, 200, (10, 5, 94), (12, 0, 199), False)
    monkeypatch.setattr(evidence_module, "cardiothoracic_ratio", lambda *a, **k: small)
    result = predictor.predict(film(CARDIOMEGALY), keep_arrays=True, cam="top")
    assert "Cardiomegaly" in result.findings
    explanation = result.cams["Cardiomegaly"]
    assert explanation.method == "grad-cam" and explanation.region and "Cardiomegaly" in result.cam_maps
    assert "0.45" in explanation.note and "does not support" in explanation.note
    assert result.measurements.call_note == explanation.note
    assert "does not support" in dict(zip(CSV_TAIL, csv_row(result.to_dict())[16:]))["ctr_call_note"]
    assert "does not support" in findings_caption(result)
    plain = predictor.predict(film(CARDIOMEGALY))  # no --cam: the sentence still comes
    assert "does not support" in plain.measurements.call_note


@needs_data
def test_a_cardiomegaly_call_with_an_untrusted_heart_gets_its_own_map(predictor, monkeypatch):
    """No trusted ratio (the heart mask fails its quality check): the call is explained by its
    Grad-CAM, not by an outline nobody should trust."""
    good = predictor.predict(film(CARDIOMEGALY), keep_arrays=True)
    height, width = good.pixels.shape
    blob = np.zeros((height, width), np.uint8)
    cv2.ellipse(blob, (width // 2, int(0.42 * height)), (int(0.13 * width), int(0.2 * height)), 0, 0, 360, 1, -1)
    monkeypatch.setattr(predictor.heart, "heart_masks", lambda films, prepared=None: [blob for _ in films])
    result = predictor.predict(film(CARDIOMEGALY), keep_arrays=True, cam="top")
    assert "Cardiomegaly" in result.findings and result.measurements.ratio.value is None
    assert result.cams["Cardiomegaly"].method == "grad-cam" and result.cams["Cardiomegaly"].region


@needs_data
def test_an_adult_without_an_age_the_estimate_cannot_place_keeps_the_adult_findings(predictor, monkeypatch):
    """A film whose age no header gives and the estimate cannot place is read with the adult
    reading and says so: Cardiomegaly, Effusion and Edema are scored, never dropped."""
    model = dict(predictor.classifier.age_model)
    monkeypatch.setitem(model, "paediatric", dict(model["paediatric"], adult_below=0.0, paediatric_at=1.01))
    monkeypatch.setattr(predictor.classifier, "age_model", model)
    result = predictor.predict(film(CARDIOMEGALY))
    assert result.population.group == "unknown" and result.population.source == "estimate"
    adult = predictor.classifier.readings["adult"]
    assert result.not_assessed == [label for label, a in zip(result.probabilities, adult.assessed) if not a]
    assert all(result.probabilities[label] is not None for label in ("Cardiomegaly", "Effusion", "Edema"))
    assert "Cardiomegaly" in result.findings
    assert "read with the adult reading" in result.calibrated_for
    assert "Cardiomegaly" in result.verdict_reason.split("; ")[-1] and "give the patient's age" in result.verdict_reason
    assert "read as an adult's" in result.measurements.cutoff_note


@needs_data
def test_a_child_is_read_as_a_child_and_a_mixed_batch_ranks_on_one_scale(predictor):
    """Kermany children are read as children (no adult-only finding); adults' and children's
    rank scores order the films as the raw scores do, where the calibrated probabilities of the
    two populations do not share a scale."""
    from pneumoscan.reading import logit

    children = sorted((DATA / "kermany" / "train" / "PNEUMONIA").glob("*.jpeg"))[:3] + \
        sorted((DATA / "kermany" / "train" / "NORMAL").glob("*.jpeg"))[:3]
    adults = [film(name) for name in ("00000129_000.png", TWO_CALLED, CARDIOMEGALY, "00000100_000.png")]
    results = list(predictor.predict_many([*children, *adults]))
    kids = results[:len(children)]
    assert sum(r.population.group == "paediatric" for r in kids) >= 5
    for r in kids:
        if r.population.group == "paediatric":
            assert r.probabilities["Cardiomegaly"] is None and "Cardiomegaly" not in r.findings
    readings = predictor.classifier.readings

    def raw_logit(r) -> float:  # undo the population's Platt map (and prior shift) of Pneumonia
        spec = readings[r.population.group].maps["Pneumonia"]
        return float((logit(r.probabilities["Pneumonia"]) - spec["b"] - spec.get("shift", 0.0)) / spec["a"])

    raw = [raw_logit(r) for r in results]
    ranks = [r.rank_scores["Pneumonia"] for r in results]
    assert all(0 <= v <= 100 for v in ranks)
    order = np.argsort(raw, kind="stable")
    assert all(ranks[i] <= ranks[j] + 1e-3 for i, j in zip(order[:-1], order[1:]))
