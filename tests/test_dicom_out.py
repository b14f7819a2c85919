"""DICOM results: SR (TID 1500), SEG and Secondary Capture for DICOM inputs, read back and
validated with Debian's dicom3tools (``dciodvfy``) where it is installed (CI installs it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import DATA, TEST_ASSESSED, needs_data
from dicom_films import film_to_dicom, validate_dicom

highdicom = pytest.importorskip("highdicom", reason="the dicom extra is not installed")

CLI = [sys.executable, "-m", "pneumoscan.apps.cli"]
pytestmark = needs_data


@pytest.fixture(scope="module")
def results(tmp_path_factory, assessed_model):
    root = tmp_path_factory.mktemp("dicom_out")
    inputs = root / "in"
    inputs.mkdir()
    cr = film_to_dicom(DATA / "nih-cxr14/images/00000100_000.png", inputs / "cr.dcm", modality="CR")
    ct = film_to_dicom(DATA / "shenzhen/CXR_png/CHNCXR_0001_0.png", inputs / "ct.dcm")
    ds = pydicom.dcmread(ct)
    ds.Modality = "CT"
    ds.save_as(ct)
    shutil.copy(DATA / "nih-cxr14/images/00000100_000.png", inputs / "film.png")
    out = root / "out"
    run = subprocess.run([*CLI, "predict", str(inputs), "--out", str(out), "--model", str(assessed_model),
                          "--dicom-out", str(out / "dicom")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = {Path(json.loads(l)["path"]).name: json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()}
    return {"run": run, "lines": lines, "out": out, "cr": cr, "ct": ct}


def test_sr_holds_the_assessed_labels_and_references_its_source(results):
    source = pydicom.dcmread(results["cr"])
    line = results["lines"]["cr.dcm"]
    sr_path = results["out"] / "dicom" / line["dicom"]["sr"]
    sr = highdicom.sr.srread(sr_path)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.SOPInstanceUID != source.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    every = sr.content.get_image_measurement_groups()
    masks = {"Lungs mask quality": "lungs", "Heart mask quality": "heart"}
    groups = [g for g in every if g.tracking_identifier not in ("Cardiothoracic ratio", "Overall verdict", *masks)]
    for group in (g for g in every if g.tracking_identifier in masks):
        (quality,) = group.get_measurements()
        assert abs(quality.value - line["mask_quality"][masks[group.tracking_identifier]]) < 1e-6
    assert sorted(g.tracking_identifier for g in groups) == sorted(TEST_ASSESSED)
    (verdict_group,) = [g for g in every if g.tracking_identifier == "Overall verdict"]
    evaluations = {e.name.meaning: e.value.meaning for e in verdict_group.get_qualitative_evaluations()}
    assert evaluations == {"Overall verdict": line["verdict"].capitalize(),
                           "Population read for": line["population"]["group"].capitalize()}
    if line["population"]["source"] == "estimate":
        (age,) = verdict_group.get_measurements()
        assert abs(age.value - line["population"]["age"]) < 0.06 and age.unit.value == "a"
    ctr_groups = [g for g in every if g.tracking_identifier == "Cardiothoracic ratio"]
    (heart,) = [g for g in every if g.tracking_identifier == "Heart mask quality"]
    reliable = heart.get_qualitative_evaluations()[0].value.meaning
    if line["measurements"]["cardiothoracic_ratio"] is None:  # this film's heart mask is below its threshold
        assert ctr_groups == [] and reliable == "No"
        assert line["measurements"]["cardiothoracic_ratio_reason"].startswith("heart mask unreliable")
    else:
        (ctr,) = ctr_groups[0].get_measurements()
        assert ctr.name.meaning == "Cardiothoracic ratio" and ctr.unit.value == "1" and reliable == "Yes"
        assert abs(ctr.value - line["measurements"]["cardiothoracic_ratio"]) < 1e-6
        assert "Danzer" in ctr.method.meaning and ctr_groups[0].finding_type.meaning == "Heart"
    for group in groups:
        label = group.tracking_identifier
        probability = next(m for m in group.get_measurements() if m.name.meaning == "Probability")
        assert abs(probability.value - line["probabilities"][label]) < 1e-6
        above = group.get_qualitative_evaluations()[0].value.meaning
        assert above == ("Yes" if label in line["findings"] else "No")
        assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
    observer = sr.content.get_observer_contexts()[0]
    assert observer.observer_type.meaning == "Device"
    assert sum(g.tracking_identifier in masks for g in every) == 2
    regions = {r.tracking_identifier: r for r in sr.content.get_planar_roi_measurement_groups()}
    assert line["cam_region"]  # the relative map is not blank on this film: its region is drawable
    expected = {f"{label} heat-map region": e["region"] for label, e in line["cams"].items() if e["method"] == "grad-cam"}
    assert set(regions) == set(expected) and f"{line['cam_label']} heat-map region" in regions
    for name, (x0, y0, x1, y1) in expected.items():
        np.testing.assert_allclose(regions[name].roi.value, [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
        assert regions[name].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            source.SOPInstanceUID
    validate_dicom(sr_path)


def test_seg_is_the_lung_mask_on_the_source_grid(results, assessed_model):
    from pneumoscan.predict import Predictor

    source = pydicom.dcmread(results["cr"])
    seg_path = results["out"] / "dicom" / results["lines"]["cr.dcm"]["dicom"]["seg"]
    seg = highdicom.seg.segread(seg_path)
    assert seg.SegmentSequence[0].SegmentLabel == "Lungs" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    mask = seg.pixel_array.reshape(source.Rows, source.Columns).astype(bool)
    expected = Predictor.from_paths(cls_model=assessed_model).predict(results["cr"], keep_arrays=True).mask
    assert mask.sum() > 0.1 * mask.size and np.array_equal(mask, expected.astype(bool))
    validate_dicom(seg_path)


def test_sc_is_the_overlay_and_a_refused_image_gets_only_the_sc(results):
    source = pydicom.dcmread(results["cr"])
    sc_path = results["out"] / "dicom" / results["lines"]["cr.dcm"]["dicom"]["sc"]
    sc = pydicom.dcmread(sc_path)
    assert sc.PhotometricInterpretation == "RGB" and sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesDescription.startswith("PneumoScan overlay") and sc.pixel_array.ndim == 3
    (reference,) = sc.SourceImageSequence  # the film it was made from
    assert (reference.ReferencedSOPInstanceUID, reference.ReferencedSOPClassUID) == \
        (source.SOPInstanceUID, source.SOPClassUID)
    validate_dicom(sc_path)
    refused = results["lines"]["ct.dcm"]
    assert refused["quality"]["frontal_chest"] is False and set(refused["dicom"]) == {"sc"}
    assert "film.png" in results["lines"] and "dicom" not in results["lines"]["film.png"]
    assert "1 input(s) are PNG/JPEG" in results["run"].stdout


def test_a_rerun_makes_the_same_uids(results, assessed_model, tmp_path):
    again = tmp_path / "again"
    run = subprocess.run([*CLI, "predict", str(results["cr"]), "--out", str(again), "--model", str(assessed_model),
                          "--dicom-out", str(again / "dicom"), "--no-overlays"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-1500:]
    first = sorted(p.name for p in (results["out"] / "dicom").iterdir()
                   if p.name in results["lines"]["cr.dcm"]["dicom"].values())
    assert sorted(p.name for p in (again / "dicom").iterdir()) == first


def test_non_conformant_patient_and_study_values_are_repaired_or_emptied():
    from pneumoscan.outputs.dicom_source import conform_copied

    ds = pydicom.Dataset()
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "1970-02-28", "female", "2024/01/01", "12:30:05"
    ds.PatientAge, ds.AccessionNumber = "62", "A1"
    conform_copied(ds)
    assert (ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime) == ("19700228", "F", "20240101", "123005")
    assert "PatientAge" not in ds and ds.AccessionNumber == "A1"
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate = "1970-02-30", "unknown", "yesterday"
    conform_copied(ds)
    assert (ds.PatientBirthDate, ds.PatientSex, ds.StudyDate) == ("", "", "")  # Type 2: present, empty
