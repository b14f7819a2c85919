"""Data sources in their original layouts, the merged manifest and its patient-wise split."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from pneumoscan.data import (
    NIH,
    RSNA,
    SOURCES,
    Actualmed,
    CovidChestXray,
    Kermany,
    ManifestError,
    Montgomery,
    Shenzhen,
    build_manifest,
    patient_leaks,
    read_manifest,
    resolve_sources,
    write_manifest,
)
from pneumoscan.data.kermany import patient_key
from pneumoscan.data.manifest import assign_splits
from pneumoscan.labels import FINDINGS, LABELS

from conftest import DATA, needs_data


def _labels(source, name):
    rows = source.csv[source.csv.path.str.endswith("/" + name)]
    assert len(rows) == 1, name
    return rows.iloc[0]


@needs_data
def test_kermany_counts_and_labels():
    source = Kermany(DATA / "kermany")
    assert len(source) == 5_216
    assert (source.csv.Pneumonia == 1).sum() == 3_875
    assert (source.csv["No Finding"] == 1).sum() == 1_341
    assert source.pathologies == LABELS and source.labels.shape == (5_216, 15)
    pneu = _labels(source, "person1000_bacteria_2931.jpeg")
    assert pneu.Pneumonia == 1 and pneu["No Finding"] == 0 and np.isnan(pneu.Effusion)
    assert pneu.patient == "kermany:person1000"
    norm = _labels(source, "IM-0115-0001.jpeg")
    assert norm["No Finding"] == 1 and all(norm[f] == 0 for f in FINDINGS)
    assert set(source.csv.official_split) == {"train"}


def test_kermany_patient_keys():
    assert patient_key("person1000_bacteria_2931.jpeg") == "person1000"
    assert patient_key("person1000_virus_1681.jpeg") == "person1000"
    assert patient_key("IM-0115-0001.jpeg") == "IM-0115"
    assert patient_key("NORMAL2-IM-0381-0001.jpeg") == "NORMAL2-IM-0381"


@needs_data
def test_nih_counts_and_labels():
    source = NIH(DATA / "nih-cxr14")
    assert len(source) == 150 and source.csv.patient.nunique() == 150
    assert (source.csv.Pneumonia == 1).sum() == 11
    assert (source.csv.Infiltration == 1).sum() == 42 and (source.csv.Edema == 1).sum() == 6
    assert not np.isnan(source.labels).any()  # NIH says all 15
    row = _labels(source, "00000100_000.png")  # "Atelectasis|Effusion|Infiltration"
    assert [l for l in LABELS if row[l] == 1] == ["Atelectasis", "Effusion", "Infiltration"]
    assert row.patient == "nih:100" and row.view == "PA"
    assert _labels(source, "00000129_000.png")["No Finding"] == 1


@needs_data
def test_montgomery_and_shenzhen_masks():
    mont, shen = Montgomery(DATA / "montgomery"), Shenzhen(DATA / "shenzhen")
    assert len(mont) == 69 and len(shen) == 416
    assert all(len(m.split(";")) == 2 for m in mont.csv["mask"])
    assert (shen.csv["mask"] != "").all()


@needs_data
def test_montgomery_and_shenzhen_are_adult_classification_films():
    """Normals (_0): No Finding 1, every finding 0. TB (_1): No Finding 0, findings unknown."""
    for source, normals, tb in ((Montgomery(DATA / "montgomery"), 40, 29),
                                (Shenzhen(DATA / "shenzhen"), 211, 205)):
        assert source.population == "adult"
        is_normal = source.csv.path.str.endswith("_0.png")
        assert is_normal.sum() == normals and (~is_normal).sum() == tb
        labels = source.csv[list(LABELS)]
        assert (labels[is_normal]["No Finding"] == 1).all()
        assert (labels.loc[is_normal, list(FINDINGS)] == 0).all().all()
        assert (labels[~is_normal]["No Finding"] == 0).all()
        assert labels.loc[~is_normal, list(FINDINGS)].isna().all().all()
    assert Kermany.population == "paediatric"


@needs_data
def test_nih_from_several_folders_shares_patients_and_splits(tmp_path):
    """Both NIH extracts in one source; a patient whose films sit in two folders gets one split,
    and a file present in both folders is indexed once."""
    # A third folder holding one film of a patient from nih-cxr14-extra (another image of the
    # same patient) and a duplicate of a nih-cxr14 file.
    extra = pd.read_csv(DATA / "nih-cxr14-extra" / "Data_Entry_2017.csv")
    base = pd.read_csv(DATA / "nih-cxr14" / "Data_Entry_2017.csv")
    third = tmp_path / "nih-cxr14-third"
    (third / "images").mkdir(parents=True)
    moved = extra.iloc[0].copy()
    moved["Image Index"] = moved["Image Index"].replace(".png", "_copy.png")
    (third / "images" / moved["Image Index"]).write_bytes(
        (DATA / "nih-cxr14-extra" / "images" / extra.iloc[0]["Image Index"]).read_bytes())
    dup = base.iloc[0]
    (third / "images" / dup["Image Index"]).write_bytes(
        (DATA / "nih-cxr14" / "images" / dup["Image Index"]).read_bytes())
    pd.DataFrame([moved, dup]).to_csv(third / "Data_Entry_2017.csv", index=False)
    warnings: list[str] = []
    table = build_manifest({"nih": [DATA / "nih-cxr14", DATA / "nih-cxr14-extra", third]}, warnings=warnings)
    assert len(table) == 150 + 507 + 1  # the duplicate file name is indexed once
    assert any("more than one of its folders" in w for w in warnings)
    assert patient_leaks(table) == []
    pid = f"nih:{moved['Patient ID']}"
    assert table.loc[table.patient == pid, "split"].nunique() == 1
    assert (table.patient == pid).sum() >= 2
    extra_rows = table[table.path.str.contains("nih-cxr14-extra")]
    assert (extra_rows.Pneumonia == 1).sum() == 220 and (extra_rows["No Finding"] == 1).sum() == 287


@needs_data
def test_resolve_sources_finds_every_nih_folder_and_the_cli_takes_several(tmp_path):
    found = resolve_sources(DATA)
    assert [p.name for p in found["nih"]] == ["nih-cxr14", "nih-cxr14-extra"]
    out = tmp_path / "m.csv"
    run = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "index", "--nih", str(DATA / "nih-cxr14"),
                          "--nih", str(DATA / "nih-cxr14-extra"), "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(read_manifest(out)) == 657


@needs_data
def test_covid_and_actualmed_labels():
    covid, actual = CovidChestXray(DATA / "covid-chestxray"), Actualmed(DATA / "actualmed-covid")
    assert len(covid) == 65 and covid.csv.patient.nunique() == 35
    assert len(actual) == 22 and actual.csv.patient.nunique() == 20
    meta = pd.read_csv(DATA / "covid-chestxray" / "metadata.csv")
    ards = meta.loc[meta.finding == "ARDS", "filename"].iloc[0]
    assert np.isnan(_labels(covid, ards).Pneumonia)
    strep = meta.loc[meta.finding == "Streptococcus", "filename"].iloc[0]
    assert _labels(covid, strep).Pneumonia == 1
    assert (covid.csv.view == "L").sum() == 10
    assert (covid.csv["mask"] != "").sum() == 50
    assert (actual.csv.Pneumonia == 1).sum() == 12 and (actual.csv["No Finding"] == 1).sum() == 6
    assert np.isnan(actual.labels).all(axis=1).sum() == 4  # blank finding = inconclusive


@needs_data
def test_full_manifest_has_no_patient_leak_and_expected_counts():
    warnings: list[str] = []
    table = build_manifest(resolve_sources(DATA), warnings=warnings)
    assert list(table.columns[:7]) == ["path", "source", "patient", "view", "age", "sex", "split"]
    assert list(table.columns[7:22]) == list(LABELS)
    nih = table[table.source == "nih"]  # patient information, for the options that fuse it
    assert nih.age.astype(float).between(1, 100).all() and set(nih.sex) == {"M", "F"}
    assert (table.loc[table.source == "kermany", "age"] == "").all()
    counts = table.source.value_counts().to_dict()
    assert counts == {"kermany": 5216, "shenzhen": 416, "nih": 657, "montgomery": 69,
                      "covid": 65, "actualmed": 22}
    assert patient_leaks(table) == []
    assert set(table.split) == {"train", "val", "test"}
    assert any("rsna" in w and "no DICOM" in w for w in warnings)  # labels here, images not
    # Kermany's folder is its official training split: no Kermany image may land in test
    assert set(table.loc[table.source == "kermany", "split"]) == {"train", "val"}
    nih = table[table.source == "nih"].split.value_counts(normalize=True)
    assert 0.6 < nih["train"] < 0.95


@needs_data
def test_manifest_round_trip(tmp_path):
    table = build_manifest({"nih": DATA / "nih-cxr14", "covid": DATA / "covid-chestxray"})
    write_manifest(table, tmp_path / "m.csv")
    text = (tmp_path / "m.csv").read_text().splitlines()
    assert ",1,0," in text[1] or ",0,1," in text[1]  # labels written as 1/0, not 1.0
    back = read_manifest(tmp_path / "m.csv")
    np.testing.assert_array_equal(back[list(LABELS)].to_numpy(), table[list(LABELS)].to_numpy())


def test_read_manifest_refuses_foreign_csv(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ManifestError, match="missing columns"):
        read_manifest(tmp_path / "x.csv")


def test_split_is_per_patient_stable_and_honours_official_lists():
    patients = pd.Series([f"p{i // 3}" for i in range(3000)])  # 1,000 patients × 3 images
    official = pd.Series([""] * 3000)
    splits = assign_splits(patients, official, seed=7)
    assert splits.groupby(patients).nunique().max() == 1
    share = splits.groupby(patients).first().value_counts(normalize=True)
    assert abs(share["train"] - 0.8) < 0.05 and abs(share["test"] - 0.12) < 0.04
    # adding other patients never moves these ones
    more = assign_splits(pd.concat([patients, pd.Series(["q1", "q2"])], ignore_index=True),
                         pd.Series([""] * 3002), seed=7)
    assert (more[:3000].to_numpy() == splits.to_numpy()).all()
    # an official test image pins its whole patient, a "train" pin excludes test
    official = pd.Series(["test"] + [""] * 2 + ["train"] * 2997)
    pinned = assign_splits(patients, official, seed=7)
    assert set(pinned[:3]) == {"test"} and "test" not in set(pinned[3:])


def _fake_rsna(tmp_path, with_mapping: bool):
    """Two real RSNA label rows with small DICOMs written by the test."""
    root = tmp_path / "rsna"
    (root / "stage_2_train_images").mkdir(parents=True)
    labels = pd.read_csv(DATA / "rsna-pneumonia" / "stage_2_train_labels.csv")
    pos = labels[labels.Target == 1].patientId.iloc[0]
    neg = labels[labels.Target == 0].patientId.iloc[0]
    labels[labels.patientId.isin([pos, neg])].to_csv(root / "stage_2_train_labels.csv", index=False)
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for pid in (pos, neg):
        ds.save_as(root / "stage_2_train_images" / f"{pid}.dcm")
    if with_mapping:
        mapping = [{"subset_img_id": pos, "img_id": "00000100_000"},
                   {"subset_img_id": neg, "img_id": "00000129_000"}]
        (root / "pneumonia-challenge-dataset-mappings_2018.json").write_text(json.dumps(mapping))
    return root, pos, neg


@needs_data
def test_rsna_labels_and_nih_mapping(tmp_path):
    root, pos, neg = _fake_rsna(tmp_path, with_mapping=True)
    source = RSNA(root)
    assert len(source) == 2 and source.has_mapping
    by_id = source.csv.set_index(source.csv.path.str.extract(r"([^/]+)\.dcm$")[0])
    assert by_id.loc[pos, "Pneumonia"] == 1 and by_id.loc[pos, "No Finding"] == 0
    assert by_id.loc[neg, "Pneumonia"] == 0 and np.isnan(by_id.loc[neg, "No Finding"])
    assert set(source.csv.patient) == {"nih:100", "nih:129"}
    table = build_manifest({"nih": DATA / "nih-cxr14", "rsna": root})
    for patient in ("nih:100", "nih:129"):  # the RSNA copy follows its NIH original
        assert table.loc[table.patient == patient, "split"].nunique() == 1
        assert (table.patient == patient).sum() == 2


@needs_data
def test_rsna_with_nih_but_no_mapping_is_refused(tmp_path):
    root, _, _ = _fake_rsna(tmp_path, with_mapping=False)
    assert len(build_manifest({"rsna": root})) == 2  # alone it is fine
    with pytest.raises(ManifestError, match="mapping"):
        build_manifest({"nih": DATA / "nih-cxr14", "rsna": root})


def test_missing_layout_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="Data_Entry_2017.csv"):
        build_manifest({"nih": tmp_path})
    with pytest.raises(ManifestError, match="unknown sources"):
        build_manifest({"chexpert": tmp_path})
    assert set(SOURCES) == {"nih", "nihmasked", "kermany", "rsna", "montgomery", "shenzhen", "covid", "actualmed"}


@needs_data
def test_index_command_writes_manifest_and_summary(tmp_path):
    out = tmp_path / "manifest.csv"
    result = subprocess.run(
        [sys.executable, "-m", "pneumoscan.apps.cli", "index", "--root", str(DATA), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Images (patients) per source and split" in result.stdout
    assert "6,445" in result.stdout
    assert len(read_manifest(out)) == 6_445
    # --root holds holdout-exclude/, so the index applied it by default and says so.
    assert "left out 0 films listed in" in result.stdout and "holdout-exclude" in result.stdout


@needs_data
def test_films_of_an_exclusion_list_never_reach_the_manifest(tmp_path):
    """Every film of a listed NIH patient goes (from both NIH extracts), and every listed file
    name (a Shenzhen film here), before splits are drawn; the CLI reports the counts per source."""
    base = pd.read_csv(DATA / "nih-cxr14" / "Data_Entry_2017.csv")
    extra = pd.read_csv(DATA / "nih-cxr14-extra" / "Data_Entry_2017.csv")
    both = sorted(set(base["Patient ID"]) & set(extra["Patient ID"]))[0]  # a patient in both folders
    listed = tmp_path / "exclude"
    listed.mkdir()
    (listed / "nih_patient_ids.txt").write_text(f"{both}\n")
    (listed / "other_file_names.txt").write_text("CHNCXR_0001_0.png\nJPCLN001.png\n")
    from pneumoscan.data import Exclusions

    sources = {"nih": [DATA / "nih-cxr14", DATA / "nih-cxr14-extra"], "shenzhen": DATA / "shenzhen"}
    table = build_manifest(sources, exclusions=Exclusions.load(listed))
    films = int((base["Patient ID"] == both).sum() + (extra["Patient ID"] == both).sum())
    assert table.attrs["excluded"] == {"nih": films, "shenzhen": 1} and films >= 2
    assert f"nih:{both}" not in set(table.patient)
    assert not table.path.str.endswith("CHNCXR_0001_0.png").any()
    assert len(table) == 657 + 416 - films - 1
    out = tmp_path / "m.csv"
    run = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "index", "--shenzhen", str(DATA / "shenzhen"),
                          "--exclude", str(listed), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "left out 1 films listed in" in run.stdout and "shenzhen 1" in run.stdout
    assert len(read_manifest(out)) == 415
    (listed / "nih_patient_ids.txt").write_text("00000061_000.png\n")  # a file name in the ID list
    bad = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "index", "--shenzhen", str(DATA / "shenzhen"),
                          "--exclude", str(listed), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "NIH patient IDs are numbers" in bad.stderr and "Traceback" not in bad.stderr


def test_index_command_without_sources_fails_cleanly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "index", "--out",
                             str(tmp_path / "m.csv")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no sources given" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_file_name_that_leaves_the_source_folder_is_refused_with_its_row(tmp_path, nih_png):
    """``index`` never puts a file from outside a source's folder into a manifest: an absolute or
    climbing file name in the source's metadata refuses the source and names the row."""
    from pneumoscan.data.base import SourceError

    png = nih_png.read_bytes()
    outside = tmp_path / "elsewhere" / "secret.png"
    outside.parent.mkdir()
    outside.write_bytes(png)
    for name in ("../../elsewhere/secret.png", str(outside)):
        root = tmp_path / f"actualmed{len(name)}"
        (root / "images").mkdir(parents=True)
        (root / "images" / "fine.png").write_bytes(png)
        pd.DataFrame({"patientid": ["p1", "p2"], "imagename": ["fine.png", name], "finding": ["No finding", "COVID-19"],
                      "view": ["PA", "PA"]}).to_csv(root / "metadata.csv", index=False)
        with pytest.raises(SourceError, match=r"row 2 .*outside .*refused"):
            Actualmed(root)
        run = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "index", "--actualmed", str(root),
                              "--out", str(tmp_path / "m.csv")], capture_output=True, text=True, check=False, timeout=120)
        assert run.returncode == 2 and "row 2" in run.stderr and "Traceback" not in run.stderr
        assert not (tmp_path / "m.csv").exists()
        (root / "metadata.csv").write_text((root / "metadata.csv").read_text().replace(name, "fine.png"))
        assert len(Actualmed(root)) == 2  # the same folder with names inside it indexes
