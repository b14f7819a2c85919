"""Nothing that names the patient enters the results store: file names and paths checked against
every identifying header field (probe v5, H1), and names that are not UTF-8 stored escaped (M1)."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumoscan.store.db import Store
from pneumoscan.store.identity import WITHHELD, identify, stored_record

NAME = "Okonkwo^Chidinma=岡子^千=おかこ^ちな"


def dicom_bytes(**fields) -> bytes:
    """A header-only DICOM file with the probe's identifying fields (or others given)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SpecificCharacterSet = ["ISO_IR 192"]
    values = {"PatientName": NAME, "PatientID": "PHI-ID-998877", "PatientBirthDate": "19700228",
              "AccessionNumber": "ACC5566778", "IssuerOfPatientID": "STMARYS", "OtherPatientIDs": ["MRN-44120"]}
    for key, value in (values | fields).items():
        setattr(ds, key, value)
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("name", [
    "Okonkwo_Chidinma.dcm", "okonkwochidinma.dcm", "CHIDINMA-OKONKWO.dcm", "岡子千.dcm", "おかこ.dcm",
    "ACC5566778.dcm", "acc-5566778.dcm", "19700228_chest.dcm", "28.02.1970.dcm", "1970-02-28 chest.dcm",
    "id998877.dcm", "PHI_ID_998877.dcm", "mrn44120.dcm", "ＯＫＯＮＫＷＯ.dcm",
])
def test_a_name_that_holds_any_identifier_is_replaced_by_the_uid(name, tmp_path):
    data = dicom_bytes()
    film, _ = identify(data, name, tmp_path / "films" / name)
    uid = pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
    assert film.display_name == uid and film.path is None


@pytest.mark.parametrize("name", ["scan1.dcm", "chest_pa.dcm", "films_2026.dcm"])
def test_a_name_free_of_identifiers_is_kept(name, tmp_path):
    film, _ = identify(dicom_bytes(), name, tmp_path / name)
    assert film.display_name == name and film.path.endswith(name)


def test_a_folder_named_after_the_patient_drops_the_path_not_the_name(tmp_path):
    film, _ = identify(dicom_bytes(), "scan1.dcm", tmp_path / "Chidinma Okonkwo" / "scan1.dcm")
    assert film.display_name == "scan1.dcm" and film.path is None


def test_every_text_of_the_stored_record_is_checked(tmp_path):
    """The overlay's and DICOM outputs' file names repeat the film's name: withheld, not stored."""
    film, patient = identify(dicom_bytes(), "Okonkwo_Chidinma.dcm", tmp_path / "Okonkwo_Chidinma.dcm")
    record = {"path": "in/Okonkwo_Chidinma.dcm", "overlay": "Okonkwo_Chidinma_overlay.png",
              "dicom": {"sr": "dicom/Okonkwo_Chidinma_sr.dcm"}, "verdict": "abnormal", "findings": ["Effusion"]}
    kept = stored_record(record, film, patient)
    assert kept["path"] == film.display_name and kept["overlay"] == WITHHELD and kept["dicom"]["sr"] == WITHHELD
    assert kept["verdict"] == "abnormal" and kept["findings"] == ["Effusion"]
    assert "okonkwo" not in str(kept).lower()


def test_a_file_name_that_is_not_utf8_is_stored_escaped(tmp_path):
    """Python keeps such bytes as surrogate escapes, which no database driver takes."""
    name = b"bad\xff\xfename.png".decode("utf-8", "surrogateescape")
    film, patient = identify(b"\x89PNG not a dicom", name, tmp_path / name)
    assert film.display_name == "bad\\xff\\xfename.png" and film.path.endswith("bad\\xff\\xfename.png")
    record = stored_record({"path": name, "overlay": name + "_overlay.png"}, film, patient)
    with Store(f"sqlite:///{tmp_path / 'db.sqlite'}") as store:
        assert store.add_result(record, film, {"classifier": "x"}, "predict", None) >= 1
        items, _ = store.worklist(None)
    assert items[0]["name"] == "bad\\xff\\xfename.png"


def test_the_export_keeps_only_paths_that_still_hold_the_reviewed_film(tmp_path):
    """Labels go with the film that was reviewed, never with whatever file has its name now
    (probe v5 M6)."""
    import hashlib

    from pneumoscan.data.manifest import path_mismatch

    film = tmp_path / "a.png"
    film.write_bytes(b"the reviewed film")
    sha = hashlib.sha256(b"the reviewed film").hexdigest()
    assert path_mismatch(str(film), sha) is None
    film.write_bytes(b"another film")
    assert "another file" in path_mismatch(str(film), sha)
    film.unlink()
    assert "no longer" in path_mismatch(str(film), sha)
    assert "no file path" in path_mismatch(None, sha)


def test_sqlite_and_postgresql_take_the_same_texts(tmp_path):
    """NUL in a name or a note, and a UID past 64 characters, are handled before the database
    sees them, so both databases accept or refuse the same things (probe v5 L6)."""
    from pneumoscan.store.review import ReviewError, check_note

    film, _ = identify(dicom_bytes(SOPInstanceUID="1." * 150 + "1"), "x\x00y.dcm", tmp_path / "x.dcm")
    assert film.display_name == "x\\x00y.dcm" and film.sop_uid is None
    with pytest.raises(ReviewError, match="NUL"):
        check_note("a\x00b")


def test_read_only_review_commands_refuse_a_store_that_does_not_exist(tmp_path):
    """A mistyped --db reads as "no such store", never as an empty one made on the spot; --out a
    folder is refused before anything is written (probe v5 L8)."""
    import subprocess
    import sys

    missing = tmp_path / "nonexist.sqlite"
    for args in (["export", "--out", str(tmp_path / "y.csv")], ["stats"], ["readers", "list"]):
        run = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "review", *args, "--db", str(missing)],
                             capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert not missing.exists()
    Store(f"sqlite:///{tmp_path / 'db.sqlite'}").close()
    run = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "review", "export", "--db",
                          str(tmp_path / "db.sqlite"), "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 2 and "is a folder" in run.stderr and not list(tmp_path.glob("*.tmp"))


def test_a_store_that_keeps_failing_rests_instead_of_costing_every_film_its_wait():
    """A store left locked by a hung process: after three films in a row it is not tried again
    for a while, and every film says so (probe v5 L7)."""
    from types import SimpleNamespace

    from pneumoscan.outputs.writer import STORE_STRIKES, write_to_store
    from pneumoscan.store.db import StoreError

    class Locked:
        calls = 0
        failing = (0, "", 0.0)

        def add_result(self, *args):
            Locked.calls += 1
            raise StoreError("results store x: storing f failed: database is locked")

    store, result = Locked(), SimpleNamespace(pixels=None)
    records = [write_to_store(store, {"path": f"f{k}.png"}, result, b"png", name=f"f{k}.png", path=None,
                              run={}, source="predict") for k in range(6)]
    assert Locked.calls == STORE_STRIKES
    assert all("database is locked" in r["store_error"] for r in records)
    assert all("not tried again" in r["store_error"] for r in records[STORE_STRIKES:])


def test_evaluate_leaves_out_a_film_its_manifest_sha256_no_longer_names(tmp_path):
    """An exported manifest names each film by its SHA-256 too: `evaluate` scores a path only
    while it still holds that film (probe v5 M6)."""
    import hashlib

    import pandas as pd

    from pneumoscan.training.evaluate import films_as_named

    same, swapped = tmp_path / "same.png", tmp_path / "swapped.png"
    same.write_bytes(b"film one")
    swapped.write_bytes(b"another film")
    rows = pd.DataFrame({"path": [str(same), str(swapped), str(tmp_path / "plain.png")],
                         "sha256": [hashlib.sha256(b"film one").hexdigest(), hashlib.sha256(b"film two").hexdigest(), None]})
    kept, changed = films_as_named(rows)
    assert kept["path"].tolist() == [str(same), str(tmp_path / "plain.png")] and changed == [str(swapped)]
    assert films_as_named(rows.drop(columns="sha256"))[1] == []


def test_the_probes_minor_notes(tmp_path):
    """Probe v5's notes: booleans are not numbers in a review box or a rating, a device or a folder
    given as a model file is named as such, and a manifest that is not UTF-8 names itself."""
    from pneumoscan.data.manifest import ManifestError, read_manifest
    from pneumoscan.modelfile import ModelFileError, load_model
    from pneumoscan.store.review import ReviewError, check_box
    from pneumoscan.store.study import StudyError, _check_rating

    with pytest.raises(ReviewError, match="box"):
        check_box([False, False, True, True], {"image": {"width": 100, "height": 100}})
    assert check_box([1, 2, 30, 40], {"image": {"width": 100, "height": 100}}) == [1, 2, 30, 40]
    with pytest.raises(StudyError, match="score"):
        _check_rating({"score": True, "call": True}, "Pneumonia")
    for odd in ("/dev/zero", str(tmp_path)):
        with pytest.raises(ModelFileError, match="not a regular file"):
            load_model(odd, kind="classifier")
    bad = tmp_path / "m.csv"
    bad.write_bytes(b"path,source\n/x/\xff.png,nih\n")
    with pytest.raises(ManifestError, match=r"m\.csv is not UTF-8"):
        read_manifest(bad)


def test_removing_every_table_asks_for_yes(tmp_path):
    """`review migrate --to base --down` deletes every result, review and study: refused without --yes."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    Store(url).close()
    cli = [sys.executable, "-m", "pneumoscan.apps.cli", "review", "migrate", "--db", url, "--to", "base", "--down"]
    refused = subprocess.run(cli, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert subprocess.run([*cli, "--yes"], capture_output=True, text=True, timeout=120, check=False).returncode == 0
