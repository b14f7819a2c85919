"""Stage 7 and the end-to-end Predictor: Grad-CAM, hooks released, `pneumoscan predict`."""

from __future__ import annotations

import csv
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan.networks import ChestClassifier
from pneumoscan.explain import GradCAM, cam_from_features, place_on_original
from pneumoscan.films import read_xray
from pneumoscan.labels import LABELS
from pneumoscan.predict import Predictor
from pneumoscan.prediction import resolve_label

from conftest import DATA, TEST_ASSESSED, needs_data

CLI = [sys.executable, "-m", "pneumoscan.apps.cli"]


@pytest.fixture(scope="module")
def predictor(assessed_model) -> Predictor:
    """The PyTorch backend: these tests look inside the network (test_backend.py checks that the
    default ONNX Runtime backend gives the same answers)."""
    return Predictor.from_paths(cls_model=assessed_model, backend="torch")


@needs_data
def test_gradcam_agrees_with_monai_and_with_the_forward_only_form(predictor, nih_png):
    from monai.visualize import GradCAM as MonaiGradCAM

    result = predictor.predict(nih_png, keep_arrays=True)
    crop = np.asarray(result.pixels[result.box[1]:result.box[3], result.box[0]:result.box[2]])
    import cv2

    x = torch.from_numpy(cv2.resize(crop, (224, 224), interpolation=cv2.INTER_AREA))[None, None]
    model = predictor.classifier.model
    for k in range(len(LABELS)):  # a class whose map is not all zero (a zero map has no shape to compare)
        with GradCAM(model) as cam:
            ours = cam(x, k)[0]
        if ours.max() > 0:
            break
    theirs = MonaiGradCAM(nn_module=model, target_layers="net.class_layers.relu")(x, class_idx=k)
    theirs = theirs[0, 0].detach().numpy()
    assert np.abs(ours - (1 - theirs)).max() < 0.02  # MONAI's default normaliser maps max → 0
    feats = {}
    handle = model.net.class_layers.relu.register_forward_hook(lambda m, i, o: feats.setdefault("f", o.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    forward_only = cam_from_features(feats["f"].numpy(), model.net.class_layers.out, k, (224, 224))[0]
    assert np.abs(ours - forward_only).max() < 1e-4
    assert ours.min() == 0.0 and ours.max() == pytest.approx(1.0)


def test_gradcam_hooks_are_released_and_memory_stays_flat():
    torch.manual_seed(0)
    model = ChestClassifier().eval()
    layer = model.net.class_layers.relu
    x = torch.rand(1, 1, 64, 64)
    rss = []
    for i in range(200):
        with GradCAM(model) as cam:
            cam(x, i % 15)
        assert len(layer._forward_hooks) == 0
        if i in (20, 199):
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert rss[1] - rss[0] < 50_000  # kB: no growth beyond allocator noise over 180 calls
    with pytest.raises(RuntimeError, match="with"):
        GradCAM(model)(x, 0)


def test_heatmap_is_placed_through_the_crop_box():
    cam = np.ones((224, 224), np.float32)
    full = place_on_original(cam, (100, 50, 300, 450), (600, 500))
    assert full.shape == (600, 500)
    assert full[50:450, 100:300].min() == 1.0 and full.sum() == 200 * 400


def test_resolve_label():
    assert resolve_label("pneumonia") == "Pneumonia"
    assert resolve_label("pleural thickening") == "Pleural_Thickening"
    assert resolve_label("No Finding") == "No Finding"
    with pytest.raises(ValueError, match="unknown class"):
        resolve_label("covid")


@needs_data
def test_predictor_on_png_jpeg_dicom_array_and_bad_input(predictor, nih_png, siim_dicom, tmp_path):
    kermany = DATA / "kermany" / "train" / "PNEUMONIA" / "person1000_bacteria_2931.jpeg"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    array = read_xray(nih_png).pixels
    results = predictor.predict_batch([nih_png, kermany, siim_dicom, bad, array], cam="top", keep_arrays=True)
    for result in results[:3] + results[4:]:
        assert result.error is None
        assert list(result.probabilities) == list(LABELS)
        # assessed labels carry a probability; the others are null, listed, never findings
        assert all(0 <= result.probabilities[l] <= 1 for l in TEST_ASSESSED)
        assert result.not_assessed == [l for l in LABELS if l not in TEST_ASSESSED]
        assert all(result.probabilities[l] is None and result.thresholds[l] is None for l in result.not_assessed)
        assert set(result.findings) <= set(TEST_ASSESSED)
        assert result.cam.shape == result.pixels.shape and result.cam.max() <= 1.0
        assert result.cam_label == "Pneumonia"  # the only assessed finding ("No Finding" is none)
        x0, y0, x1, y1 = result.box
        assert result.cam[:y0].sum() == 0 and result.cam[y1:].sum() == 0  # heat only inside the box
    assert results[3].error and "not a PNG" in results[3].error and results[3].probabilities is None
    assert results[0].probabilities == results[4].probabilities  # file and array agree
    dicom = results[2].to_dict()
    assert dicom["image"]["format"] == "dicom" and "PatientName" not in json.dumps(dicom)
    assert results[1].probabilities["Pneumonia"] > 0.5  # a training image: the pipeline runs end to end
    json.dumps([r.to_dict() for r in results])


@needs_data
def test_the_same_film_in_every_container_gets_the_same_probabilities(predictor, tmp_path):
    """One intensity convention: dev films as 8-bit PNG, as the same pixels in an 8-bit DICOM
    without a window, as a 16-bit PNG (×257) and as a 12-bit DICOM of the same picture
    (round(v × 4095 / 255) under the full 0–4095 window) give probabilities within 0.02 of each
    other (the DICOM used to be stretched to its own min–max). Not the same picture: ×16 under that
    window is 0.4 % darker at white, which moves lung-mask edges and the shipped model's
    probabilities by up to 0.06 (its card, "Known limits")."""
    from dicom_films import film_containers

    films = sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[:4]
    wrapped = [film_containers(png, tmp_path, str(k)) for k, png in enumerate(films)]
    ways = [films] + [[w[kind] for w in wrapped] for kind in ("8.dcm", "16.png", "12.dcm")]
    probs = [[[v for v in r.probabilities.values() if v is not None] for r in predictor.predict_batch(paths)]
             for paths in ways]
    reference = np.array(probs[0])
    assert reference.size and np.isfinite(reference).all()
    for other in probs[1:]:
        assert np.abs(np.array(other) - reference).max() <= 0.02


@needs_data
def test_predict_command_writes_contract_outputs(tmp_path, nih_png, assessed_model):
    bad = tmp_path / "in" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    kermany = DATA / "kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg"
    out = tmp_path / "out"
    model = ["--model", str(assessed_model)]
    result = subprocess.run([*CLI, "predict", str(nih_png), str(kermany), str(tmp_path / "in"), "--out", str(out),
                             "--format", "json", "--cam", "PNEUMONIA", *model], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1, result.stderr  # one input failed, the others were done
    assert "Traceback" not in result.stderr
    lines = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    good = [l for l in lines if l["error"] is None]
    assert len(good) == 2 and lines[2]["error"]
    for line in good:
        assert {"path", "probabilities", "findings", "box", "fallback", "error"} <= set(line)
        assert list(line["probabilities"]) == list(LABELS) and line["cam_label"] == "Pneumonia"
        assert (out / line["overlay"]).stat().st_size > 20_000
        assert line["not_assessed"] == [l for l in LABELS if l not in TEST_ASSESSED]
        assert line["probabilities"]["Nodule"] is None and set(line["findings"]) <= set(TEST_ASSESSED)
    assert (out / f"{nih_png.stem}_overlay.png").exists()
    csv_run = subprocess.run([*CLI, "predict", str(nih_png), "--out", str(tmp_path / "csv"), "--format", "csv",
                              "--cam", "None", "--no-overlays", *model], capture_output=True, text=True, timeout=600)
    assert csv_run.returncode == 0, csv_run.stderr
    rows = list(csv.DictReader(open(tmp_path / "csv" / "predictions.csv")))
    assert len(rows) == 1 and float(rows[0]["Pneumonia"]) == pytest.approx(good[0]["probabilities"]["Pneumonia"], abs=1e-6)
    assert rows[0]["Nodule"] == "" and "Nodule" in rows[0]["not_assessed"].split("|")
    unknown = subprocess.run([*CLI, "predict", str(nih_png), "--cam", "covid"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "unknown class" in unknown.stderr and "Traceback" not in unknown.stderr
    unlearnt = subprocess.run([*CLI, "predict", str(nih_png), "--cam", "nodule", *model], capture_output=True,
                              text=True, timeout=120)
    assert unlearnt.returncode == 2 and "Nodule is not assessed by this model" in unlearnt.stderr


@needs_data
def test_shipped_model_lists_only_assessed_findings_on_a_no_finding_film(tmp_path):
    """The issue's acceptance line: a No Finding NIH film lists no untrained finding."""
    from pneumoscan.classify import load_default

    shipped = load_default()
    film = Path(__file__).resolve().parents[1] / "examples" / "nih-cxr14" / "images" / "00000129_000.png"
    run = subprocess.run([*CLI, "predict", str(film), "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    line = json.loads((tmp_path / "predictions.jsonl").read_text())
    assert set(line["findings"]) <= set(shipped.assessed_labels)
    assert line["not_assessed"] == [l for l in LABELS if l not in shipped.assessed_labels]
    assert all(line["probabilities"][l] is None for l in line["not_assessed"])


@needs_data
def test_classifier_refuses_another_lung_model_unless_told(tmp_path, nih_png):
    from pneumoscan.modelfile import ModelFileError
    from pneumoscan.segment import load_default

    other = load_default()
    with torch.no_grad():
        next(other.net.parameters()).mul_(1.01)  # a retrained lung model: other weights, other crops
    other.save(tmp_path / "other_lungs.pt")
    with pytest.raises(ModelFileError, match="--allow-model-mismatch"):
        Predictor.from_paths(seg=tmp_path / "other_lungs.pt")
    assert Predictor.from_paths(seg=tmp_path / "other_lungs.pt", allow_model_mismatch=True).model_mismatch
    run = subprocess.run([*CLI, "predict", str(nih_png), "--seg-model", str(tmp_path / "other_lungs.pt"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "trained on crops from lung model" in run.stderr and "Traceback" not in run.stderr


@needs_data
def test_every_called_finding_has_a_heat_map_that_points_inside_the_lungs():
    """Issue 19: on dev NIH films, the shipped model's map of each finding it calls is never
    blank, and its peak and region lie inside the film (the region inside the lung box)."""
    predictor = Predictor.from_default()
    films = sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[:12]
    called = 0
    for result in predictor.predict_batch(films, cam="top"):
        for label in [f for f in (result.findings or []) if f != "No Finding"]:
            (one,) = predictor.predict_batch([result.path], cam=label)
            called += 1
            assert one.cam_label == label and one.cam_peak is not None, (result.path, label)
            x0, y0, x1, y1 = one.box
            assert x0 <= one.cam_peak[0] < x1 and y0 <= one.cam_peak[1] < y1
            assert one.cam_region is not None and x0 <= one.cam_region[0] < one.cam_region[2] <= x1
    assert called > 0, "no finding called on these films: the test would test nothing"


def test_the_record_is_the_prediction_s_typed_parts_as_json():
    """``to_dict`` is derived from the fields (arrays left out) and each typed part writes the keys,
    in the order, that every output and the store read."""
    from dataclasses import fields

    from pneumoscan.gate import GateResult
    from pneumoscan.maskquality import MaskQuality, QualityRule
    from pneumoscan.measure import CardiothoracicRatio, Measurements
    from pneumoscan.prediction import Explanation, Prediction
    from pneumoscan.reading import Group, Population

    ratio = CardiothoracicRatio(0.45, None, 90, 200, (10, 5, 95), (12, 0, 199), False)
    prediction = Prediction(
        "a.png", population=Population(Group.PAEDIATRIC, 7.04, "PatientAge", "DICOM PatientAge 7 y"),
        quality=GateResult(False, ["upside down"], {"aspect": 1.2}),
        cams={"Pneumonia": Explanation("grad-cam", True, "called", [1, 2, 30, 40], peak=[5, 6]),
              "Cardiomegaly": Explanation("outlines", True, "called", [0, 0, 50, 50], cardiothoracic_ratio=0.6,
                                          reason=None, note="read the film")},
        mask_quality=MaskQuality.of(0.9, QualityRule(0.8), 0.5, QualityRule(0.7)),
        measurements=Measurements(ratio, cutoff_applies=False, cutoff_note="a child's", call_note="not enlarged"),
        pixels=np.zeros((4, 4)), mask=np.ones((4, 4), np.uint8), cam_maps={"Pneumonia": np.zeros((4, 4))})
    record = prediction.to_dict()
    assert json.loads(json.dumps(record)) == record
    exported = {f.name for f in fields(Prediction) if f.metadata.get("export", True)}
    assert list(record)[:2] == ["path", "status"] and set(record) == exported | {"status"}
    assert not {"pixels", "mask", "heart", "cam_maps"} & set(record)
    assert record["population"] == {"group": "paediatric", "age": 7.0, "source": "PatientAge",
                                    "reason": "DICOM PatientAge 7 y"}
    assert record["quality"] == {"frontal_chest": False, "reasons": ["upside down"], "measures": {"aspect": 1.2},
                                 "forced": False, "method": "rules", "refused_as": prediction.quality.refused_as}
    assert record["cams"]["Pneumonia"] == {"method": "grad-cam", "called": True, "why": "called", "peak": [5, 6],
                                           "region": [1, 2, 30, 40]}
    assert record["cams"]["Cardiomegaly"] == {"method": "outlines", "called": True, "why": "called",
                                              "region": [0, 0, 50, 50], "cardiothoracic_ratio": 0.6, "reason": None,
                                              "note": "read the film"}
    assert record["mask_quality"] == {"lungs": 0.9, "heart": 0.5, "thresholds": {"lungs": 0.8, "heart": 0.7},
                                      "unreliable": ["heart mask unreliable (quality 0.500 < 0.700)"]}
    assert list(record["measurements"]) == ["cardiothoracic_ratio", "cardiothoracic_ratio_reason", "heart_width_px",
                                            "thoracic_width_px", "heart_line", "thoracic_line", "ctr_above_pa_cutoff",
                                            "ctr_cutoff_note", "ctr_call_note"]
    assert record["measurements"]["ctr_above_pa_cutoff"] is None and record["measurements"]["heart_line"] == [10, 5, 95]
    assert record["status"] == "refused"  # the gate said no, and nothing was scored
