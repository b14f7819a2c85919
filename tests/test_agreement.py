"""The same film gives the same answer whatever its file format: DICOM (8-bit CR, 12-bit DX with a
window, MONOCHROME1, rescale intercept) against an 8-bit PNG of the same picture."""

from __future__ import annotations

import cv2
import numpy as np
import pydicom
import pytest

from pneumoscan.classify import load_default
from pneumoscan.labels import LABELS
from pneumoscan.predict import Predictor

from conftest import DATA, needs_data
from dicom_films import film_to_dicom

TOLERANCE = 0.05


@pytest.fixture(scope="module")
def every_output(tmp_path_factory) -> Predictor:
    """The shipped weights with all 15 outputs exposed, so that every probability is compared
    (raw: without the reading section, every film reads the plain assessment, uncalibrated)."""
    classifier = load_default()
    classifier.meta.pop("reading", None)
    classifier.set_assessment({label: {"assessed": True, "threshold": 0.5} for label in LABELS})
    path = tmp_path_factory.mktemp("all") / "all.pt"
    classifier.save(path)
    return Predictor.from_paths(cls_model=path)


def _probs(predictor: Predictor, path) -> np.ndarray:
    result = predictor.predict(path)
    assert result.error is None, result.error
    return np.array([result.probabilities[label] for label in LABELS])


@needs_data
def test_siim_dicom_and_its_png_export_agree(every_output, siim_dicom, tmp_path):
    png = tmp_path / "siim.png"
    cv2.imwrite(str(png), pydicom.dcmread(siim_dicom).pixel_array.astype(np.uint8))
    gap = np.abs(_probs(every_output, siim_dicom) - _probs(every_output, png))
    assert gap.max() < TOLERANCE, dict(zip(LABELS, gap.round(4)))


@needs_data
@pytest.mark.parametrize("film", ["nih-cxr14/images/00000100_000.png", "nih-cxr14-extra/images/00000165_001.png"])
@pytest.mark.parametrize("variant", [dict(modality="DX"), dict(modality="CR", monochrome1=True),
                                     dict(modality="DX", intercept=-1024.0)],
                         ids=["DX-12bit-window", "CR-MONOCHROME1", "DX-rescale-intercept"])
def test_twelve_bit_dicoms_built_from_dev_films_agree_with_the_png(every_output, film, variant, tmp_path):
    png = DATA / film
    dicom = film_to_dicom(png, tmp_path / "film.dcm", **variant)
    gap = np.abs(_probs(every_output, dicom) - _probs(every_output, png))
    assert gap.max() < TOLERANCE, dict(zip(LABELS, gap.round(4)))
