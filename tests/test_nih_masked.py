"""The lung-masked NIH source (rsna-nih-masked): labels, un-inversion, patient keys shared with NIH,
test pinning, and the lung-masked crop the classifier learns from.

The repository snapshot the index points into is not in ../shared/data, so each test writes a
small snapshot of its own from real dev NIH films, stored the way that repository stores them
(inverted inside a lung mask, 0 outside, 448×448)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pneumoscan.crop import classifier_crop, lungs_only, premasked_crop
from pneumoscan.data import NIH, NIHMasked, build_manifest
from pneumoscan.data.nih_masked import labels_of, read_premasked
from pneumoscan.labels import LABELS, NO_FINDING
from pneumoscan.training.cache import crop_premasked

from conftest import DATA, needs_data, skip_without_data

INDEX_COLUMNS = ["path", "patientId", "nih_image", "nih_patient", "match_mse", "rsna_class", "rsna_target",
                 "finding_labels", "age", "sex", "view", "follow_up"]


def two_lungs(side: int = 448) -> np.ndarray:
    """A 0/1 mask of two lung-shaped ellipses, with a speck outside them (the repository's masks
    have specks)."""
    mask = np.zeros((side, side), np.uint8)
    cv2.ellipse(mask, (side * 3 // 10, side // 2), (side // 8, side // 4), 0, 0, 360, 1, -1)
    cv2.ellipse(mask, (side * 7 // 10, side // 2), (side // 8, side // 4), 0, 0, 360, 1, -1)
    cv2.circle(mask, (side // 2, side - 20), 4, 1, -1)
    return mask


def store_masked(film_png: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Write ``film_png`` as that repository does; returns (448² film, mask)."""
    film = cv2.resize(cv2.imread(str(film_png), cv2.IMREAD_GRAYSCALE), (448, 448), interpolation=cv2.INTER_AREA)
    mask = two_lungs()
    stored = np.where(mask > 0, 255 - np.maximum(film, 1), 0).astype(np.uint8)  # 255 stays "lung"
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), stored)
    return film, mask


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> tuple[Path, Path, pd.DataFrame]:
    """(index folder, snapshot folder, index) for three dev NIH films: two of patients held in
    nih-cxr14 (one as Lung Opacity, one as Normal) and one of a new patient."""
    skip_without_data()
    root = tmp_path_factory.mktemp("nihmasked")
    entries = pd.read_csv(DATA / "nih-cxr14" / "Data_Entry_2017.csv").head(2)
    rows = []
    for k, (rec, cls) in enumerate(zip(entries.to_dict("records"), ["Lung Opacity", "Normal"])):
        path = f"dataset/train/{'op' if cls == 'Lung Opacity' else 'normal'}/film{k}.png"
        store_masked(DATA / "nih-cxr14" / "images" / rec["Image Index"], root / "snap" / path)
        rows.append([path, f"rsna{k}", rec["Image Index"], rec["Patient ID"], 1.0, cls, int(cls == "Lung Opacity"),
                     "Infiltration" if k == 0 else "No Finding", 50, "M", "PA", 0])
    path = "dataset/val/normal/film2.png"
    store_masked(DATA / "nih-cxr14" / "images" / entries["Image Index"].iloc[0], root / "snap" / path)
    rows.append([path, "rsna2", "99999999_000.png", 99999999, 1.0, "No Lung Opacity / Not Normal", 0,
                 "Effusion", 61, "F", "AP", 0])
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    (root / "index").mkdir()
    index.to_csv(root / "index" / "index.csv", index=False)
    return root / "index", root / "snap", index


def test_labels_are_nihs_own():
    assert labels_of("Infiltration|Pneumonia")["Pneumonia"] == 1
    assert labels_of("Infiltration")["Pneumonia"] == 0 and labels_of("Infiltration")[NO_FINDING] == 0
    assert labels_of("No Finding")[NO_FINDING] == 1 and labels_of("No Finding")["Mass"] == 0
    assert set(labels_of("Mass|Nodule")) == set(LABELS)


def test_read_premasked_undoes_the_inversion(tmp_path, nih_png):
    film, mask = store_masked(nih_png, tmp_path / "x.png")
    read, read_mask = read_premasked(tmp_path / "x.png")
    np.testing.assert_array_equal(read_mask, mask)
    inside = mask > 0
    assert np.abs(read[inside] * 255 - np.maximum(film, 1)[inside]).max() < 0.01
    assert (read[~inside] == 0).all()
    with pytest.raises(OSError):
        read_premasked(tmp_path / "missing.png")


def test_source_shares_nih_patient_keys_and_reads_its_snapshot(snapshot):
    index_dir, snap, index = snapshot
    source = NIHMasked(index_dir, images=snap)
    assert len(source) == 3 and not source.warnings
    assert set(source.csv.patient) == {f"nih:{p}" for p in index.nih_patient}
    nih = NIH(DATA / "nih-cxr14")
    assert set(source.csv.patient) & set(nih.csv.patient) == {f"nih:{p}" for p in index.nih_patient[:2]}
    row = source.csv.set_index(source.csv.path.map(lambda p: Path(p).name)).loc["film0.png"]
    assert row["Infiltration"] == 1 and row["Pneumonia"] == 0 and row[NO_FINDING] == 0  # NIH's labels


def test_without_the_snapshot_the_source_is_empty_and_says_where_to_get_it(snapshot, monkeypatch):
    monkeypatch.delenv("PNEUMOSCAN_NIH_MASKED_IMAGES", raising=False)
    source = NIHMasked(snapshot[0])
    assert len(source) == 0 and "amitlohan/covid_lungs_dataset" in source.warnings[0]


def test_test_source_pins_its_patients_masked_copies_to_test(snapshot):
    index_dir, snap, index = snapshot
    table = build_manifest({"nih": DATA / "nih-cxr14", "nihmasked": index_dir}, nih_masked_images=snap,
                           test_sources=["nih"], fractions=(0.85, 0.15, 0.0))
    assert set(table.loc[table.source == "nih", "split"]) == {"test"}
    masked = table[table.source == "nihmasked"].set_index("patient")["split"]
    for patient in index.nih_patient[:2]:  # held-out NIH patients: their masked films are test too
        assert masked[f"nih:{patient}"] == "test"
    assert masked[f"nih:{index.nih_patient[2]}"] in {"train", "val"}


def test_premasked_crop_is_the_lungs_only_crop_of_the_cleaned_mask(snapshot):
    _, snap, index = snapshot
    path = snap / index.path[0]
    crop, record = crop_premasked(str(path), 224)
    film, mask = read_premasked(path)
    found, expected = premasked_crop(film, mask, 224)
    np.testing.assert_array_equal(crop, expected)
    assert found.regions == 2 and not record["fallback"]
    assert found.mask.sum() < mask.sum()  # the speck outside the lungs was cleaned away
    box = (record["x0"], record["y0"], record["x1"], record["y1"])
    np.testing.assert_array_equal(crop, classifier_crop(lungs_only(film, found.mask), box, 224))
    assert crop[0, 0] == 0 and crop.max() > 100  # black outside the lungs, the film inside


@needs_data
def test_the_real_index_counts():
    index = pd.read_csv(DATA / "rsna-nih-masked" / "index.csv")
    assert len(index) == 10424 and index.nih_patient.nunique() == 6068
    assert (index.rsna_class == "Lung Opacity").sum() == 2942
