"""Smoke paths that need nothing but the repository: the bundled examples (two NIH films, one
Kermany film) and DICOMs written from them carry training, prediction, DICOM results, the
listener, the server and Ray, so that no area is untested where ../shared/data is absent."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from dicom_films import film_to_dicom, validate_dicom

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
FILMS = sorted((EXAMPLES / "nih-cxr14" / "images").glob("*.png"))
CLI = [sys.executable, "-m", "pneumoscan.apps.cli"]


def _cli(*args: str, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    run = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-3000:]
    return run


def test_index_prepare_train_evaluate_and_predict_on_the_examples(tmp_path):
    _cli("index", "--root", str(EXAMPLES), "--out", str(tmp_path / "manifest.csv"))
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    assert sorted(manifest.source) == ["kermany", "nih", "nih"]
    manifest.loc[manifest.source == "nih", "split"] = ["train", "val"]  # three films: one to validate on
    manifest.to_csv(tmp_path / "m.csv", index=False)
    _cli("prepare", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "c64"), "--size", "64",
         "--workers", "1")
    _cli("train", "--cache", str(tmp_path / "c64"), "--out", str(tmp_path / "run"), "--init", "random",
         "--epochs", "1", "--batch-size", "2", "--workers", "0")
    model = tmp_path / "run" / "model.pt"
    run = _cli("predict", *map(str, FILMS), "--out", str(tmp_path / "p"), "--model", str(model), "--backend", "torch")
    records = [json.loads(x) for x in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 2 and "2 of 2 images" in run.stdout
    for record in records:  # three films prove nothing: every label stays unassessed, no number is given
        assert len(record["not_assessed"]) == 15 and record["findings"] in ([], None)
        assert all(p is None for p in (record["probabilities"] or {}).values())


def test_dicom_results_validate_and_the_listener_answers(tmp_path):
    pytest.importorskip("highdicom", reason="the dicom extra is not installed")
    from pynetdicom import AE

    films = [film_to_dicom(p, tmp_path / f"{p.stem}.dcm", modality="CR") for p in FILMS]
    _cli("predict", *map(str, films), "--out", str(tmp_path / "p"), "--dicom-out", str(tmp_path / "dicom"))
    written = sorted((tmp_path / "dicom").glob("*.dcm"))
    assert sorted(p.name.rsplit("_", 1)[1] for p in written) == ["sc.dcm", "sc.dcm", "seg.dcm", "seg.dcm",
                                                                  "sr.dcm", "sr.dcm"]
    for path in written:
        validate_dicom(path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "listen"
    proc = subprocess.Popen([*CLI, "listen", "--out", str(out), "--port", str(port)],
                            stdout=open(tmp_path / "listen.log", "wb"), stderr=subprocess.STDOUT)
    try:
        ae = AE(ae_title="SMOKE")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
        deadline = time.time() + 120
        while not (assoc := ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")).is_established:
            assert time.time() < deadline, (tmp_path / "listen.log").read_text()[-2000:]
            time.sleep(0.5)
        assert int(assoc.send_c_store(pydicom.dcmread(films[0])).Status) == 0
        assoc.release()
        uid = pydicom.dcmread(films[0]).SOPInstanceUID
        while not (out / ".done" / uid).exists():
            assert time.time() < deadline + 120, (tmp_path / "listen.log").read_text()[-2000:]
            time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert len((out / ".done" / uid).read_text().split()) == 3


def test_the_server_scores_an_example():
    from fastapi.testclient import TestClient

    from pneumoscan.apps.server import create_app

    with TestClient(create_app(), base_url="http://localhost") as http:
        response = http.post("/v1/predict?images=false", files={"file": (FILMS[1].name, FILMS[1].read_bytes())})
    body = response.json()
    assert response.status_code == 200 and body["quality"]["frontal_chest"] is True
    assert set(body["probabilities"]) - set(body["not_assessed"]) and body["cam_label"] is not None


@pytest.mark.slow
def test_ray_predicts_the_examples_as_one_process_does(tmp_path):
    pytest.importorskip("ray", reason="the cluster extra is not installed")
    _cli("predict", *map(str, FILMS), "--out", str(tmp_path / "one"), "--no-overlays")
    _cli("predict", *map(str, FILMS), "--out", str(tmp_path / "ray"), "--no-overlays", "--ray", "local",
         "--workers", "1")
    one, ray = ([json.loads(x) for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]
                for d in ("one", "ray"))
    assert [r["path"] for r in one] == [r["path"] for r in ray]
    for a, b in zip(one, ray):
        assert a["findings"] == b["findings"] and a["box"] == b["box"]
