"""The results store on SQLite and on a real PostgreSQL: migrations up and down, idempotent writes
of real predictions, no patient names, a store that goes down mid-run, the review API's rules,
two readers at once, and the labels back out through export → calibrate."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from sqlalchemy import create_engine, inspect, text

from pneumoscan.labels import LABELS
from pneumoscan.outputs.writer import write_to_store
from pneumoscan.predict import Predictor
from pneumoscan.store.database import StoreError, head_revision, migrate, store_url
from pneumoscan.store.db import Store
from pneumoscan.store.review import (
    ReviewError,
    check_review,
    current_reviews,
    export_manifest,
)

from conftest import CLI, needs_data, start_postgres
from dicom_films import film_to_dicom

TABLES = {"films", "results", "layers", "readers", "reviews", "verdicts", "store_meta"}
STUDY_TABLES = {"studies", "study_cases", "study_steps", "study_ratings"}
FILMS = ["00000427_000.png", "00000100_000.png", "00001734_000.png"]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_default()


@pytest.fixture(scope="module")
def predictions(predictor, data_dir):
    """Real predictions of three NIH films (kept with their arrays, as the store needs)."""
    paths = [data_dir / "nih-cxr14" / "images" / name for name in FILMS]
    return [(path, predictor.predict(path, cam="top", keep_arrays=True)) for path in paths]


def run_of(predictor) -> dict:
    return predictor.run_identity()


def table_names(url: str) -> set[str]:
    engine = create_engine(store_url(url))
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_up_and_down(db_url):
    """Alembic's head creates every table, base removes them all, head again restores them; a
    store at an unknown (newer) revision or a database of other tables is refused with a reason."""
    assert migrate(db_url, "0001") == "0001"
    assert TABLES <= table_names(db_url) and not (STUDY_TABLES & table_names(db_url))
    assert migrate(db_url) == head_revision() == "0003"  # 0002 adds the reader-study tables, 0003 widens verdict
    assert TABLES | STUDY_TABLES <= table_names(db_url)
    assert migrate(db_url, "0001", down=True) == "0001" and not (STUDY_TABLES & table_names(db_url))
    with pytest.raises(StoreError, match="revision 0001; this PneumoScan needs 0003: run `pneumoscan review migrate"):
        Store(db_url)
    assert migrate(db_url) == "0003"
    assert migrate(db_url, "base", down=True) is None
    assert not ((TABLES | STUDY_TABLES) & table_names(db_url))
    with Store(db_url) as store:  # an empty database is created on first use
        assert store.counts()["films"] == 0
    engine = create_engine(store_url(db_url))
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(StoreError, match="newer PneumoScan"):
        Store(db_url)


def test_a_database_of_other_tables_is_not_taken(tmp_path):
    url = f"sqlite:///{tmp_path / 'other.sqlite'}"
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE patients (name TEXT)"))
    engine.dispose()
    with pytest.raises(StoreError, match="not a PneumoScan results store"):
        Store(url)


@needs_data
def test_results_are_stored_once_and_never_name_the_patient(db_url, predictor, predictions, tmp_path):
    """The same film and models twice is one row; a DICOM named after its patient (file and
    folder) is stored by its UIDs, its patient ID only salted and hashed: no table holds the name
    or the ID."""
    folder = tmp_path / "Doe^Jane"
    folder.mkdir()
    dicom = film_to_dicom(predictions[0][0], folder / "Doe_Jane.dcm")
    ds = pydicom.dcmread(dicom)
    ds.PatientName, ds.PatientID = "Doe^Jane", "MRN4711"
    ds.save_as(dicom)
    films = [*predictions, (dicom, predictor.predict(dicom, cam="top", keep_arrays=True))]
    with Store(db_url) as store:
        for _ in range(2):
            for path, result in films:
                record = write_to_store(store, result.to_dict(), result, None, name=path.name, path=path,
                                        run=run_of(predictor), source="predict")
                assert "store_error" not in record and record["store_id"] >= 1
        assert store.counts() | {"readers": 0} == {"films": 4, "results": 4, "readers": 0, "reviews": 0, "verdicts": 0}
        items, total = store.worklist(None)
        assert total == 4
        shown = {item["name"] for item in items}
        assert {p.name for p, _ in predictions} <= shown and ds.SOPInstanceUID in shown
        view = store.result_view(next(i["id"] for i in items if i["name"] == ds.SOPInstanceUID), None)
        assert view["study_uid"] == ds.StudyInstanceUID and view["record"]["path"] == ds.SOPInstanceUID
        assert view["layers"]["preview"][:2] == b"\xff\xd8" and view["layers"]["lungs"]  # a JPEG, outlines
        assert set(view["layers"]["heat"]) == set(predictions[0][1].cam_maps)
    engine = create_engine(store_url(db_url))
    with engine.connect() as connection:
        dump = " ".join(str(row) for table in TABLES for row in connection.execute(text(f"SELECT * FROM {table}")))
    engine.dispose()
    assert "MRN4711" not in dump and "doe" not in dump.lower() and "jane" not in dump.lower()


def FILMS_PATHS(predictions):
    return [path for path, _ in predictions]


@needs_data
def test_a_store_that_goes_down_is_an_error_for_the_film_not_a_lost_result(predictor, predictions, tmp_path):
    """PostgreSQL stopped mid-run: the next film's record says it was not stored (and why), and
    `predict` still writes every film's line; a store that cannot be reached at the start stops
    `predict` with one line, before any model loads."""
    url, stop = start_postgres()
    try:
        from fastapi.testclient import TestClient

        from pneumoscan.apps.server import create_app

        with Store(url) as store:
            path, result = predictions[0]
            assert "store_id" in write_to_store(store, result.to_dict(), result, None, name=path.name, path=path,
                                                run=run_of(predictor), source="predict")
            client = TestClient(create_app(predictor, store=store, allowed_hosts=None))
            assert client.get("/health").json()["status"] == "ok"
            stop()
            health = client.get("/health").json()  # a store that went down is not "ok"
            assert health["status"].startswith("degraded") and health["store_reachable"] is False
            record = write_to_store(store, result.to_dict(), result, None, name=path.name, path=path,
                                    run=run_of(predictor), source="predict")
            assert "store_id" not in record and record["store_error"].startswith("not stored: results store")
            assert "password" not in record["store_error"]
    finally:
        stop()
    done = subprocess.run([*CLI, "predict", str(predictions[0][0]), "--out", str(tmp_path / "out"), "--db", url],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot be used" in done.stderr and not (tmp_path / "out" / "predictions.jsonl").exists()


def test_predict_writes_the_store_and_the_files(tmp_path, data_dir):
    """`predict --db`: every film in predictions.jsonl with its store id, and in the store once
    after a second run."""
    films = [str(data_dir / "nih-cxr14" / "images" / name) for name in FILMS[:2]]
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    for run in range(2):
        done = subprocess.run([*CLI, "predict", *films, "--out", str(tmp_path / f"out{run}"), "--db", url,
                               "--no-overlays"], check=False, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        records = [json.loads(line) for line in (tmp_path / f"out{run}" / "predictions.jsonl").read_text().splitlines()]
        assert [r["store_id"] for r in records] == [1, 2]
    with Store(url) as store:
        assert store.counts()["results"] == 2


# --- the review rules ----------------------------------------------------------------------

RECORD = {"probabilities": {label: 0.1 for label in LABELS}, "findings": ["Pneumonia"],
          "thresholds": {label: (0.5 if label in ("Pneumonia", "No Finding", "Effusion") else None) for label in LABELS},
          "image": {"width": 1000, "height": 800}}


def test_a_review_must_say_one_thing():
    """Verdicts on every assessed label, labels consistent with them, No Finding alone, a box
    inside the film, known fields only."""
    good = {"verdicts": {"Pneumonia": "agree", "No Finding": "agree", "Effusion": "disagree"},
            "labels": ["Pneumonia", "Effusion", "Mass"], "box": [10, 20, 300, 400], "note": "RLL", "seconds": 12.5}
    assert check_review(good, RECORD)["labels"] == ["Effusion", "Mass", "Pneumonia"]
    for change, message in [
        ({"verdicts": {"Pneumonia": "agree"}}, "missing Effusion, No Finding"),
        ({"labels": ["Effusion", "Mass"]}, "Pneumonia: you agree with the model's call, so your labels must include it"),
        ({"labels": ["Pneumonia", "Mass"]}, "Effusion: you disagree with the model's no call"),
        ({"labels": ["No Finding", "Pneumonia", "Effusion"]}, "No Finding cannot be given together"),
        ({"labels": ["Pneumonia", "Effusion", "Pneumonitis"]}, "unknown labels"),
        ({"box": [10, 20, 1300, 400]}, "inside 1000×800"),
        ({"verdicts": {"Pneumonia": "maybe", "No Finding": "agree", "Effusion": "agree"}}, "one of agree"),
        ({"seconds": -1}, "seconds"),
        ({"reader": "someone else"}, "unknown fields"),
    ]:
        with pytest.raises(ReviewError, match=message.replace("(", r"\(")):
            check_review(good | change, RECORD)


def test_majority_labels_adjudicator_and_disagreements(tmp_path):
    import hashlib

    film = tmp_path / "x.png"
    film.write_bytes(b"the reviewed film")
    rows = []
    for n, (reader, labels, verdict) in enumerate([("ann", ["Pneumonia"], "agree"), ("bob", ["No Finding"], "disagree"),
                                                   ("cy", ["Pneumonia"], "agree"), ("bob", ["Pneumonia"], "agree")]):
        rows.append({"id": n + 1, "seq": 1 + (n == 3), "reader": reader, "adjudicator": reader == "cy", "result_id": 1,
                     "models_key": "m", "film_id": 7, "sha256": hashlib.sha256(b"the reviewed film").hexdigest(),
                     "path": str(film), "display_name": "x.png",
                     "study_uid": None, "sop_uid": None, "patient_key": None, "created_at": "", "labels": labels,
                     "verdicts": {"Pneumonia": verdict}, "record": RECORD})
    for row in rows:
        row["current"] = not (row["reader"] == "bob" and row["seq"] == 1)
    manifest, _, disagreements = export_manifest(current_reviews(rows))
    assert len(manifest) == 1 and manifest["Pneumonia"].iloc[0] == 1 and manifest["No Finding"].iloc[0] == 0
    assert disagreements.empty  # bob's first review was superseded
    rows[3]["current"], rows[1]["current"] = False, True  # bob's first opinion stands: 2 to 1
    manifest, _, disagreements = export_manifest(current_reviews(rows), adjudicator="bob")
    assert manifest["Pneumonia"].iloc[0] == 0 and set(disagreements["label"]) == {"Pneumonia", "No Finding"}


@needs_data
def test_the_review_api(tmp_path, predictor, predictions):
    """Reviewing needs a reader; a review is appended (a second supersedes, both kept); a retried
    submission is stored once; the worklist puts the reader's unreviewed films first and filters."""
    from fastapi.testclient import TestClient

    from pneumoscan.apps.server import create_app

    store = Store(f"sqlite:///{tmp_path / 'r.sqlite'}")
    ids = {}
    for path, result in predictions:
        ids[path.name] = write_to_store(store, result.to_dict(), result, None, name=path.name, path=path,
                                        run=run_of(predictor), source="predict")["store_id"]
    key = store.add_reader("ann")
    client = TestClient(create_app(predictor, store=store, reader_header="X-Remote-User", allowed_hosts=None))
    assert client.get("/v1/review/worklist").status_code == 401
    assert client.get("/v1/review/worklist", headers={"X-Reader-Key": "wrong"}).status_code == 401
    assert client.get("/v1/review/me", headers={"X-Remote-User": "dr b"}).json()["reader"] == "dr b"
    # a keyed reader is never reached through the proxy header (probe v5 M5)
    assert client.get("/v1/review/me", headers={"X-Remote-User": "ann"}).status_code == 403
    me = {"X-Reader-Key": key}
    target = ids[FILMS[0]]
    view = client.get(f"/v1/review/results/{target}", headers=me).json()
    assert view["layers"]["preview"].startswith("data:image/jpeg;base64,") and view["my_review"] is None
    record = view["record"]
    verdicts = {label: "agree" for label in view["assessed"]}
    labels = [label for label in view["assessed"] if label in record["findings"]] or ["No Finding"]
    body = {"verdicts": verdicts, "labels": labels, "box": [10, 10, 200, 200], "submission": "first-try-0001"}
    url = f"/v1/review/results/{target}/reviews"
    # only the reader's own page can post (probe v5 M4): a text/plain body or another site's Origin
    plain = client.post(url, headers=me | {"Content-Type": "text/plain"}, content=json.dumps(body))
    assert plain.status_code == 415 and "application/json" in plain.json()["error"]
    evil = client.post(url, headers=me | {"Origin": "http://evil.example"}, json=body)
    assert evil.status_code == 403 and "Origin" in evil.json()["error"]
    assert client.post(url, headers=me | {"Sec-Fetch-Site": "cross-site"}, json=body).status_code == 403
    assert store.counts()["reviews"] == 0
    first = client.post(url, headers=me | {"Origin": "http://testserver"}, json=body)
    assert first.status_code == 201, first.text
    again = client.post(f"/v1/review/results/{target}/reviews", headers=me, json=body)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    # another reader's review with the same id: refused, never answered with ann's (probe v5 L3)
    other = client.post(url, headers={"X-Remote-User": "dr b"}, json=body)
    assert other.status_code == 409 and "note" not in other.json()
    bad = client.post(f"/v1/review/results/{target}/reviews", headers=me, json=body | {"labels": [], "submission": None})
    assert bad.status_code == 422 and "No Finding" in bad.json()["error"]
    second = client.post(f"/v1/review/results/{target}/reviews", headers=me, json=body | {"note": "second look", "submission": None})
    assert second.json()["seq"] == 2
    assert client.get(f"/v1/review/results/{target}", headers=me).json()["my_review"]["note"] == "second look"
    assert store.counts()["reviews"] == 2  # append-only: the first is kept, superseded
    listed = client.get("/v1/review/worklist", headers=me).json()
    assert listed["total"] == 3 and listed["items"][-1]["id"] == target and listed["items"][-1]["reviewed_by_me"]
    assert not any(item["reviewed_by_me"] for item in listed["items"][:-1])
    assert client.get("/v1/review/worklist?reader=ann", headers=me).json()["total"] == 1
    assert client.get("/v1/review/worklist?reader=AN", headers=me).json()["total"] == 1  # part of the name, any case
    assert client.get("/v1/review/worklist?reader=%25", headers=me).json()["total"] == 0  # a wildcard is a character
    assert client.get("/v1/review/worklist?source=serve", headers=me).json()["total"] == 0
    status = predictions[0][1].to_dict()["status"]
    assert all(i["status"] == status for i in client.get(f"/v1/review/worklist?status={status}", headers=me).json()["items"])
    assert client.get("/v1/review/worklist?since=yesterday", headers=me).status_code == 422
    assert client.get("/v1/review/results/999", headers=me).status_code == 404
    # numbers past a 64-bit row id and JSON nested thousands deep are the client's mistake (probe v5 L1)
    assert client.get("/v1/review/results/9223372036854775808", headers=me).status_code == 422
    assert client.get("/v1/review/worklist?offset=99999999999999999999", headers=me).status_code == 422
    deep = client.post(url, headers=me | {"Content-Type": "application/json"}, content=b"[" * 60_000)
    assert deep.status_code == 422
    assert "X-Reader-Key" in client.get("/review").text  # the page is open; its data is not
    store.close()


@needs_data
def test_two_readers_at_once_lose_and_duplicate_nothing(db_url, predictor, predictions):
    """Two readers, each sending every review twice (a retry) from threads at once: every review
    stored exactly once, in order per reader."""
    store = Store(db_url)
    results = [write_to_store(store, r.to_dict(), r, None, name=p.name, path=p, run=run_of(predictor),
                              source="predict")["store_id"] for p, r in predictions]
    readers = {name: store.reader_by_name(name, create=True) for name in ("ann", "bob")}
    record = store.result_for_review(results[0])
    verdicts = {label: "unsure" for label in LABELS if (record["thresholds"] or {}).get(label) is not None}
    errors = []

    def send(name: str, result_id: int, n: int) -> None:
        review = {"verdicts": verdicts, "labels": [], "box": None, "note": f"{name} {n}", "seconds": 1.0,
                  "submission": f"{name}-{result_id}-{n:04d}"}
        try:
            store.add_review(result_id, readers[name], check_review(review, store.result_for_review(result_id)))
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=send, args=(name, result_id, n))
               for n in range(5) for name in readers for result_id in results for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    rows = store.review_rows()
    assert len(rows) == 2 * len(results) * 5
    assert len({row["submission"] for row in rows}) == len(rows)
    for name in readers:
        for result_id in results:
            assert sorted(r["seq"] for r in rows if r["reader"] == name and r["result_id"] == result_id) == [1, 2, 3, 4, 5]
    store.close()


@needs_data
@pytest.mark.slow
def test_export_feeds_calibrate(tmp_path, predictor, data_dir):
    """Films stored, reviewed with their NIH labels, exported: `evaluate`'s manifest reader takes
    the export, and `calibrate` on it writes a model whose No Finding threshold moved."""
    from pneumoscan.data.manifest import read_manifest

    table = pd.read_csv(data_dir / "nih-cxr14" / "Data_Entry_2017.csv")
    images = {p.name for p in (data_dir / "nih-cxr14" / "images").iterdir()}
    table = table[table["Image Index"].isin(images) & (table["Patient Age"] >= 18)]
    chosen = pd.concat([table[table["Finding Labels"] == "No Finding"].head(14),
                        table[table["Finding Labels"] != "No Finding"].head(16)])
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    store = Store(url)
    reader = store.reader_by_name('=HYPERLINK("http://evil.example","x")', create=True)  # a hostile proxy name
    for name, truth in zip(chosen["Image Index"], chosen["Finding Labels"]):
        path = data_dir / "nih-cxr14" / "images" / name
        result = predictor.predict(path, cam="top", keep_arrays=True)
        record = write_to_store(store, result.to_dict(), result, None, name=name, path=path, run=run_of(predictor),
                                source="predict")
        mine = [label for label in truth.split("|") if label in LABELS]
        called = set(result.findings or [])
        verdicts = {label: "agree" if (label in mine) == (label in called) else "disagree"
                    for label in LABELS if (result.thresholds or {}).get(label) is not None}
        store.add_review(record["store_id"], reader, check_review({"verdicts": verdicts, "labels": mine}, record))
    store.close()
    out = tmp_path / "site.csv"
    done = subprocess.run([*CLI, "review", "export", "--db", url, "--out", str(out)], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(out)
    assert len(manifest) == 30 and int(manifest["No Finding"].sum()) == 14 and set(manifest["split"]) == {"val"}
    assert set(pd.read_csv(out)["readers"]) == {"'=HYPERLINK(\"http://evil.example\",\"x\")"}  # text, not a formula (L4)
    stats = subprocess.run([*CLI, "review", "stats", "--db", url, "--out", str(tmp_path / "stats.json")],
                           check=False, capture_output=True, text=True)
    assert stats.returncode == 0, stats.stderr
    figures = json.loads((tmp_path / "stats.json").read_text())
    assert figures["labels"]["No Finding"]["n"] == 30 and figures["labels"]["No Finding"]["model_kappa"] is not None
    model = tmp_path / "site.pt"
    done = subprocess.run([*CLI, "calibrate", "--manifest", str(out), "--split", "val", "--out", str(model), "--youden",
                           "--n-boot", "50"], check=False, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    import numpy as np

    from pneumoscan.classify import Classifier, load_default

    i = LABELS.index("No Finding")
    site = Classifier.load(model)
    assert not np.isclose(site.thresholds[i], load_default().thresholds[i])
    assert "site.csv" in json.dumps(site.meta, default=str)


@needs_data
def test_serve_and_listen_store_what_they_read(tmp_path, predictor, predictions):
    """`serve --db --keep-films`: an upload's answer carries its store id and the film is kept by
    its hash (so the export can point at it); `listen --db`: a received instance is stored by its
    UIDs, its patient's name nowhere."""
    from fastapi.testclient import TestClient

    from pneumoscan.apps.listen import Listener
    from pneumoscan.apps.server import create_app

    store = Store(f"sqlite:///{tmp_path / 'r.sqlite'}")
    kept = tmp_path / "films"
    kept.mkdir()
    client = TestClient(create_app(predictor, store=store, keep_films=kept, allowed_hosts=None))
    path = predictions[1][0]
    answer = client.post("/v1/predict?images=false", files={"file": (path.name, path.read_bytes(), "image/png")}).json()
    assert answer["store_id"] == 1 and client.get("/health").json()["store"] == "sqlite"
    (copy,) = kept.iterdir()
    assert copy.read_bytes() == path.read_bytes() and copy.suffix == ".png"

    dicom = film_to_dicom(predictions[0][0], tmp_path / "in.dcm", modality="CR")
    ds = pydicom.dcmread(dicom)
    ds.PatientName = "Roe^Richard"
    ds.save_as(dicom)
    listener = Listener(predictor, tmp_path / "out", tmp_path / "out" / ".spool", store=store, keep_films=kept)
    assert listener.receive(ds.SOPInstanceUID, ds, dicom.read_bytes(), "PYTEST") == 0
    listener.worker.process(ds.SOPInstanceUID)
    items, total = store.worklist(None)
    assert total == 2 and {i["source"] for i in items} == {"serve", "listen"}
    listened = store.result_view(next(i["id"] for i in items if i["source"] == "listen"), None)
    assert listened["sop_uid"] == ds.SOPInstanceUID == listened["name"] and "Roe" not in json.dumps(listened, default=str)
    reader = store.reader_by_name("ann", create=True)
    for item in items:
        record = store.result_for_review(item["id"])
        verdicts = {label: "unsure" for label in LABELS if (record["thresholds"] or {}).get(label) is not None}
        store.add_review(item["id"], reader, check_review({"verdicts": verdicts, "labels": []}, record))
    manifest, left_out, _ = export_manifest(current_reviews(store.review_rows()))
    assert sorted(Path(p).parent for p in manifest["path"]) == [kept, kept] and left_out.empty
    store.close()


def test_a_heat_map_of_a_finding_not_called_stays_faint():
    """The review page's heat layer: a called finding's map reaches its full opacity at the peak,
    a map of a finding not called (the most probable one on a film with no call) stays faint."""
    import base64

    import cv2

    from pneumoscan.store.layers import FAINT_ALPHA, HEAT_ALPHA, heat_png

    cam = np.zeros((400, 300), np.float32)
    cam[100:200, 50:150] = np.linspace(0, 1, 100)[None, :]

    def alpha(png: str) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(base64.b64decode(png), np.uint8), cv2.IMREAD_UNCHANGED)[..., 3]

    called, faint = alpha(heat_png(cam)), alpha(heat_png(cam, called=False))
    assert called.max() >= HEAT_ALPHA - 5 and faint.max() <= FAINT_ALPHA
    assert faint.max() > 0 and (faint > 0).sum() == (called > 0).sum()  # the same region, fainter
