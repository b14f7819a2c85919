"""ONNX export: ONNX Runtime matches PyTorch on real images, Grad-CAM included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.crop import crop_resize
from pneumoscan.films import read_xray
from pneumoscan.labels import LABELS
from pneumoscan.predict import Predictor

from conftest import DATA, needs_data


@pytest.fixture(scope="module")
def exported(tmp_path_factory, assessed_model):
    out = tmp_path_factory.mktemp("onnx")
    result = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "export", "--format", "onnx", "--out", str(out),
                             "--model", str(assessed_model)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@needs_data
def test_onnx_matches_pytorch_on_real_images(exported, assessed_model):
    torch_p, onnx_p = Predictor.from_paths(cls_model=assessed_model, backend="torch"), Predictor.from_onnx(exported)
    assert onnx_p.classifier.assessed_labels == torch_p.classifier.assessed_labels == ["No Finding", "Pneumonia"]
    paths = [*sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[:3],
             DATA / "kermany" / "train" / "PNEUMONIA" / "person1000_bacteria_2931.jpeg",
             next((DATA / "siim-acr-pneumothorax").rglob("*.dcm"))]
    images = [read_xray(p).pixels for p in paths]
    np.testing.assert_allclose(onnx_p.segmenter.probabilities(images), torch_p.segmenter.probabilities(images),
                               atol=1e-4)
    segs = torch_p.segmenter.segment_batch(images)
    crops = np.stack([crop_resize(img, s.box, 224) for img, s in zip(images, segs)]).astype(np.float32)
    np.testing.assert_allclose(onnx_p.classifier.predict_proba(crops), torch_p.classifier.predict_proba(crops),
                               atol=1e-4)
    for crop in crops[:2]:
        for label in ("Pneumonia", "Effusion"):
            k = LABELS.index(label)
            assert np.abs(onnx_p.classifier.gradcam(crop, k) - torch_p.classifier.gradcam(crop, k)).max() < 1e-3
    a, b = torch_p.predict(paths[0], cam="top"), onnx_p.predict(paths[0], cam="top")
    assert a.box == b.box and a.cam_label == b.cam_label
    assert a.not_assessed == b.not_assessed and a.findings == b.findings
    assert max(abs(a.probabilities[l] - b.probabilities[l]) for l in ("Pneumonia", "No Finding")) < 1e-4
    # the heart model is in the export too: same maps, same masks, same ratio
    assert (exported / "heart_unet.onnx").exists() and type(onnx_p.heart).__name__ == "OnnxHeartSegmenter"
    np.testing.assert_allclose(onnx_p.heart.probabilities(images), torch_p.heart.probabilities(images), atol=1e-4)
    assert a.measurements.ratio.reason == b.measurements.ratio.reason
    assert abs(a.mask_quality.heart - b.mask_quality.heart) < 0.005
    a, b = torch_p.predict(paths[1], cam=None), onnx_p.predict(paths[1], cam=None)  # a film with a ratio
    ratio = a.measurements.ratio.value
    assert ratio is not None and abs(b.measurements.ratio.value - ratio) < 0.005


def test_a_cached_export_loads_without_building_the_networks(tmp_path):
    """The default backend's second start reads the model files' metadata and the cached export:
    no PyTorch network is built, MONAI (seconds to import) is never imported."""
    import os

    script = ("import sys; from pneumoscan.predict import Predictor; p = Predictor.from_default(); "
              "print(type(p.heart).__name__, type(p.segmenter).__name__, 'monai' in sys.modules)")
    env = {**os.environ, "PNEUMOSCAN_CACHE": str(tmp_path)}
    first, second = (subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=300, env=env)
                     for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    assert first.stdout.split() == ["OnnxHeartSegmenter", "OnnxLungSegmenter", "True"]  # it exported
    assert second.stdout.split() == ["OnnxHeartSegmenter", "OnnxLungSegmenter", "False"]
    (folder,) = [p for p in (tmp_path / "onnx").iterdir() if p.is_dir()]
    assert len(folder.name.split("-")) == 3  # named by the lung, classifier and heart models


def test_export_leaves_the_pytorch_models_as_they_were(tmp_path):
    from pneumoscan.backends.onnx import export_onnx

    predictor = Predictor.from_default(backend="torch")
    x = np.random.default_rng(0).random((2, 224, 224)).astype(np.float32)
    before = predictor.classifier.predict_proba(x)
    export_onnx(predictor.segmenter, predictor.classifier, tmp_path)
    assert not predictor.classifier.model.training and not predictor.segmenter.net.training
    np.testing.assert_array_equal(predictor.classifier.predict_proba(x), before)
    np.testing.assert_allclose(Predictor.from_onnx(tmp_path).classifier.predict_proba(x), before, atol=1e-4)


def test_incomplete_export_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="pneumoscan export"):
        Predictor.from_onnx(tmp_path)


@needs_data
def test_tampered_truncated_or_damaged_exports_are_refused(exported, tmp_path):
    import shutil

    import onnx
    from onnx import numpy_helper

    from pneumoscan.modelfile import ModelFileError

    def copy() -> Path:
        target = tmp_path / f"e{len(list(tmp_path.iterdir()))}"
        shutil.copytree(exported, target)
        return target

    flipped = copy()  # 1,000 sign-flipped weights: loads in ONNX Runtime, changes the output
    model = onnx.load(flipped / "classifier.onnx")
    tensor = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    values = numpy_helper.to_array(tensor).copy()
    values.reshape(-1)[:1000] *= -1
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save(model, flipped / "classifier.onnx")
    cut = copy()
    data = (cut / "lung_unet.onnx").read_bytes()
    (cut / "lung_unet.onnx").write_bytes(data[: len(data) // 2])
    broken = copy()
    (broken / "pneumoscan_onnx.json").write_text("{not json")
    threshold = copy()  # an edited threshold in the metadata
    text = (threshold / "pneumoscan_onnx.json").read_text().replace('"threshold": 0.5', '"threshold": 0.05', 1)
    (threshold / "pneumoscan_onnx.json").write_text(text)
    for folder, words in ((flipped, "classifier.onnx"), (cut, "lung_unet.onnx"), (broken, "damaged"),
                          (threshold, "SHA-256")):
        with pytest.raises(ModelFileError, match=words):
            Predictor.from_onnx(folder)
    run = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "predict", str(DATA / "nih-cxr14" / "images" /
                          "00000100_000.png"), "--onnx", str(flipped), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "SHA-256" in run.stderr
