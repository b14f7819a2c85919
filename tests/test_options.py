"""The classifier's options: AG-CNN (attention-guided local branch) and patient information, end
to end on tiny real data (train, resume, evaluate, predict, ONNX, serve), and their pure parts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pneumoscan.clinical import (
    AGE_EDGES,
    ClinicalError,
    ClinicalSpec,
    Field,
    fit_spec,
    parse_age,
    parse_category,
)
from pneumoscan.crop import attention_box, box_in_original, local_crop
from pneumoscan.modelfile import load_model

from conftest import CLI, REPO, needs_data

SHIPPED = REPO / "src" / "pneumoscan" / "models" / "chest_densenet121.pt"


# ---- pure parts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, years", [("058Y", 58.0), ("006M", 0.5), ("62", 62.0), (45, 45.0),
                                        ("3D", 3 / 365.25), ("", None), ("old", None), ("-4", None), ("200Y", None)])
def test_ages_are_read_from_numbers_and_dicom_age_strings(raw, years):
    assert parse_age(raw) == (None if years is None else pytest.approx(years))


def test_encodings_give_missing_for_absent_or_unseen_values():
    spec = ClinicalSpec([Field("age", "numeric", AGE_EDGES), Field("sex", "category", values=("F", "M")),
                         Field("view", "category", values=("AP", "PA"))])
    codes = spec.encode([{"age": "058Y", "sex": "male", "view": "AP Supine"}, {}, {"age": 1, "sex": "O", "view": "LL"}])
    assert codes.tolist() == [[6, 2, 1], [0, 0, 0], [1, 0, 0]]  # 58 is in [45, 60): bin 5 → code 6
    assert spec.present(codes[0]) == {"age": True, "sex": True, "view": True}
    assert parse_category("view", " pa ") == "PA" and parse_category("sex", float("nan")) is None
    again = ClinicalSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again.encode([{"age": 30}]).tolist() == spec.encode([{"age": 30}]).tolist() == [[5, 0, 0]]


def test_fit_spec_learns_categories_and_bins_from_training_rows():
    table = pd.DataFrame({"age": [30] * 10, "sex": ["M"] * 6 + ["F"] * 4, "fever": list(np.linspace(36, 40, 10)),
                          "ward": ["A"] * 8 + ["B"] * 2})
    spec = fit_spec(table, ["age", "sex", "fever", "ward"])
    assert [f.kind for f in spec.fields] == ["numeric", "category", "numeric", "category"]
    assert spec.fields[3].values == ("A",)  # B is seen twice: too rare to learn
    assert len(spec.fields[2].edges) == 4
    with pytest.raises(ClinicalError, match="not a manifest column"):
        fit_spec(table, ["temperature"])


def test_attention_box_covers_the_hot_region_and_has_a_minimum_size():
    features = np.zeros((8, 7, 7), np.float32)
    features[3, 1:3, 4:6] = 5.0  # hot at rows 1-2, columns 4-5 of the 7×7 map
    x0, y0, x1, y1 = attention_box(features, 0.7, 224)
    assert 96 <= (x0 + x1) / 2 <= 192 and 16 <= (y0 + y1) / 2 <= 96
    assert x1 - x0 >= 56 and y1 - y0 >= 56  # at least a quarter of the side
    features[:] = 0
    features[0, 3, 3] = 1.0  # a single hot cell: widened to the minimum, kept inside
    box = attention_box(features, 0.9, 224)
    assert box[2] - box[0] == 56 and box[3] - box[1] == 56 and min(box) >= 0 and max(box) <= 224
    assert attention_box(np.zeros((4, 7, 7), np.float32), 0.7, 224) == (0, 0, 224, 224)


def test_local_box_maps_onto_the_original_through_the_lung_box():
    lung = (100, 50, 500, 850)  # 400 wide, 800 high, squeezed into a 200×200 crop
    assert box_in_original((0, 0, 200, 200), lung, 200) == lung
    assert box_in_original((50, 100, 100, 150), lung, 200) == (200, 450, 300, 650)
    pixels = np.zeros((1000, 600), np.float32)
    pixels[450:650, 200:300] = 1.0  # exactly the region of that box
    crop = local_crop(pixels, lung, (50, 100, 100, 150), 200)  # the local input has the crop's size
    assert crop.dtype == np.uint8 and crop.shape == (200, 200) and crop.min() == 255


# ---- end to end on tiny real data ---------------------------------------------------------------

#: MKL may pick kernels by the memory alignment of its inputs, so two processes doing the same
#: sums can differ in the last bits (a CI run saw 1.2e-6 once in one head weight). Its
#: conditional-reproducibility mode takes that out, so that what the resume test compares is
#: the resume, not the allocator.
TRAIN_ENV = {**os.environ, "MKL_CBWR": "AUTO,STRICT"}


def _train(cache: Path, out: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "train", "--cache", str(cache), "--out", str(out), "--init", str(SHIPPED),
                           "--freeze-backbone", "--batch-size", "16", "--workers", "0", "--accelerator", "cpu",
                           "--epoch-size", "64", *extra], capture_output=True, text=True, timeout=timeout,
                          env=TRAIN_ENV)


def assessed_copy(run: Path) -> Path:
    """``run/model.pt`` with Pneumonia and No Finding assessed at 0.5: a tiny run assesses
    nothing, and a prediction without numbers would let the checks below pass on nulls."""
    from pneumoscan.classify import Classifier
    from pneumoscan.labels import LABELS

    classifier = Classifier.load(run / "model.pt")
    classifier.set_assessment({label: {"assessed": label in ("Pneumonia", "No Finding"),
                                       "threshold": 0.5 if label in ("Pneumonia", "No Finding") else None}
                               for label in LABELS})
    classifier.save(run / "assessed.pt")
    return run / "assessed.pt"


@pytest.fixture(scope="module")
def agcnn(cache64, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("agcnn") / "run"
    result = _train(cache64, out, "--arch", "agcnn", "--epochs", "3", "--attention-threshold", "0.6",
                    "--attention-threshold", "0.8")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def clinical(cache64, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clinical") / "run"
    result = _train(cache64, out, "--clinical", "age,sex,view", "--epochs", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@needs_data
@pytest.mark.slow
def test_agcnn_trains_in_stages_and_records_its_architecture(agcnn):
    (init, _), (state, meta) = (load_model(p, kind="chest-classifier") for p in (SHIPPED, agcnn / "model.pt"))
    arch = meta["architecture"]
    assert arch["name"] == "agcnn" and arch["attention_threshold"] in (0.6, 0.8)
    assert set(arch["threshold_validation_scores"]) == {"0.6", "0.8"}
    backbone = [k for k in init if k.startswith("net.features.")]
    for k in backbone:  # both branches are the init's frozen backbone (BN statistics too)
        assert torch.equal(state[k].float(), init[k].float())
        assert torch.equal(state["local." + k.removeprefix("net.features.")].float(), init[k].float())
    assert state["net.class_layers.out.0.weight"].shape == (1000, 2048)  # global | local
    assert (agcnn / "head_state_t0.6.pt").exists() and (agcnn / "head_state_t0.8.pt").exists()


@needs_data
@pytest.mark.slow
def test_option_training_resumes_from_its_head_state(cache64, agcnn, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    for name in ("features_train.npz", "features_val.npz"):  # the branch features, as a killed run left them
        shutil.copy(agcnn / name, out / name)
    first = _train(cache64, out, "--arch", "agcnn", "--epochs", "2", "--attention-threshold", "0.6",
                   "--attention-threshold", "0.8")
    assert first.returncode == 0, first.stderr[-3000:]
    features_time = (out / "features_train.npz").stat().st_mtime
    again = _train(cache64, out, "--arch", "agcnn", "--epochs", "3", "--attention-threshold", "0.6",
                   "--attention-threshold", "0.8")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "features_train.npz").stat().st_mtime == features_time  # reused, not recomputed
    (_, whole), (_, resumed) = (load_model(p / "model.pt", kind="chest-classifier") for p in (agcnn, out))
    assert resumed["weights_sha256"] == whole["weights_sha256"]
    log = pd.read_csv(out / "head_metrics_t0.6.csv")
    assert log["epoch"].tolist() == [0, 1, 2]
    other = _train(cache64, out, "--arch", "agcnn", "--epochs", "4", "--attention-threshold", "0.6",
                   "--attention-threshold", "0.8", "--lr", "0.01")
    assert other.returncode == 2 and "other settings" in other.stderr and "Traceback" not in other.stderr


@needs_data
@pytest.mark.slow
def test_agcnn_predicts_on_both_backends_and_draws_its_local_box(agcnn, tmp_path, nih_png):
    from pneumoscan.predict import Predictor

    model = assessed_copy(agcnn)
    results = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        result = subprocess.run([*CLI, "predict", str(nih_png), "--model", str(model), "--backend", backend,
                                 "--out", str(out), "--force"], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        results[backend] = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
        assert (out / f"{nih_png.stem}_overlay.png").exists()
    torch_r, onnx_r = results["torch"], results["onnx"]
    x0, y0, x1, y1 = torch_r["local_box"]
    bx0, by0, bx1, by1 = torch_r["box"]
    assert bx0 <= x0 < x1 <= bx1 and by0 <= y0 < y1 <= by1  # inside the lung box, on the original
    assert onnx_r["local_box"] == torch_r["local_box"]
    for label in ("Pneumonia", "No Finding"):
        assert abs(torch_r["probabilities"][label] - onnx_r["probabilities"][label]) < 1e-4
    assert torch_r["probabilities"]["Nodule"] is None is onnx_r["probabilities"]["Nodule"]
    predictor = Predictor.from_paths(cls_model=model, backend="torch")
    drawn = predictor.predict(nih_png, keep_arrays=True, force=True)
    from pneumoscan.outputs.overlay import picture_for

    with_box = picture_for(drawn)
    drawn.local_box = None
    assert np.abs(with_box.astype(int) - picture_for(drawn).astype(int)).sum() > 0  # the box is drawn


@needs_data
@pytest.mark.slow
def test_evaluate_an_agcnn_model_from_the_manifest_and_from_the_cache(agcnn, cache64, small_manifest, tmp_path):
    reports = []
    for name, extra in (("direct", []), ("cached", ["--cache", str(cache64)])):
        result = subprocess.run([*CLI, "evaluate", "--manifest", str(small_manifest), "--split", "test",
                                 "--out", str(tmp_path / name), "--model", str(agcnn / "model.pt"),
                                 "--n-boot", "50", "--backend", "torch", *extra],
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
    assert reports[0]["n_images"] == reports[1]["n_images"] > 10
    assert reports[0]["auc"] == reports[1]["auc"]


@needs_data
@pytest.mark.slow
def test_clinical_model_uses_the_fields_from_csv_dicom_and_form(clinical, tmp_path, nih_png, siim_dicom):
    _, meta = load_model(clinical / "model.pt", kind="chest-classifier")
    assert [f["name"] for f in meta["clinical"]["fields"]] == ["age", "sex", "view"]
    assert meta["clinical"]["fields"][1]["codes"] == ["missing", "F", "M"]
    from pneumoscan.predict import Predictor

    model = assessed_copy(clinical)
    predictor = Predictor.from_paths(cls_model=model)
    bare = predictor.predict(nih_png, force=True)
    assert bare.clinical == {"age": False, "sex": False, "view": False} and bare.probabilities["Pneumonia"] is not None
    young = predictor.predict(nih_png, force=True, clinical={"age": 25, "sex": "F", "view": "PA"})
    old = predictor.predict(nih_png, force=True, clinical={"age": 80, "sex": "M", "view": "AP"})
    assert young.clinical == {"age": True, "sex": True, "view": True}
    scores = {r.probabilities["No Finding"] for r in (bare, young, old)}
    assert len(scores) == 3  # each field's embedding changes the answer
    dicom = predictor.predict(siim_dicom, force=True)
    assert dicom.clinical == {"age": True, "sex": True, "view": True}  # PatientAge, PatientSex, ViewPosition
    assert "62" not in json.dumps(dicom.image)  # the values themselves stay out of the output

    table = tmp_path / "patients.csv"
    table.write_text(f"file,age,sex,view\n{nih_png.name},80,M,AP\n")
    result = subprocess.run([*CLI, "predict", str(nih_png), "--model", str(model), "--out",
                             str(tmp_path / "out"), "--clinical-csv", str(table), "--force", "--no-overlays"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    assert line["clinical"] == {"age": True, "sex": True, "view": True}
    assert line["probabilities"]["No Finding"] == pytest.approx(old.probabilities["No Finding"], abs=1e-4)
    plain = subprocess.run([*CLI, "predict", str(nih_png), "--out", str(tmp_path / "p"), "--clinical-csv",
                            str(table)], capture_output=True, text=True, timeout=600)
    assert plain.returncode == 2 and "does not use patient information" in plain.stderr

    from fastapi.testclient import TestClient

    from pneumoscan.apps.server import create_app

    client = TestClient(create_app(predictor), base_url="http://localhost")
    files = {"file": (nih_png.name, nih_png.read_bytes(), "image/png")}
    body = client.post("/v1/predict?images=false&force=true", files=files,
                       data={"age": "80", "sex": "M", "view": "AP"}).json()
    assert body["clinical"] == {"age": True, "sex": True, "view": True}
    assert body["probabilities"]["No Finding"] == pytest.approx(old.probabilities["No Finding"], abs=1e-4)
    refused = client.post("/v1/predict?images=false", files=files, data={"clinical": '{"fever": 39}'})
    assert refused.status_code == 422 and "does not use fever" in refused.json()["error"]


@needs_data
@pytest.mark.slow
def test_clinical_model_exports_to_onnx_with_the_same_answers(clinical, nih_png):
    from pneumoscan.predict import Predictor

    given = {"age": 70, "sex": "F", "view": "AP"}
    model = assessed_copy(clinical)
    answers = [Predictor.from_paths(cls_model=model, backend=b).predict(nih_png, force=True, clinical=given)
               for b in ("torch", "onnx")]
    assert answers[1].clinical == answers[0].clinical == {"age": True, "sex": True, "view": True}
    for label in ("Pneumonia", "No Finding"):
        assert abs(answers[0].probabilities[label] - answers[1].probabilities[label]) < 1e-4


@needs_data
def test_options_refuse_the_full_loop_and_unknown_fields_with_one_line(cache64, tmp_path):
    for extra, message in ((["--arch", "agcnn"], "--freeze-backbone"), (["--arch", "resnet"], "--arch must be"),
                           (["--clinical", "age,temperature", "--freeze-backbone"], "not a manifest column")):
        result = subprocess.run([*CLI, "train", "--cache", str(cache64), "--out", str(tmp_path / "x"),
                                 "--init", str(SHIPPED), "--workers", "0", *extra], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
