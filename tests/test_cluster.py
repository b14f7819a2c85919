"""predict --ray and prepare --ray on a local Ray (2 CPUs): the same outputs as one process,
resumable, each input once even when a worker dies, and a one-line error without the extra."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumoscan.labels import LABELS

from conftest import DATA, needs_data

pytest.importorskip("ray", reason="the cluster extra is not installed")
CLI = [sys.executable, "-m", "pneumoscan.apps.cli"]
pytestmark = [needs_data, pytest.mark.slow]


def _films(n: int) -> list[str]:
    return [str(p) for p in sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[:n]]


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_on_ray_matches_one_process_and_resumes(tmp_path):
    from pneumoscan.predict import Predictor

    films = _films(6)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    target = tmp_path / "ray" / "predictions.jsonl"
    first = subprocess.run([*CLI, "predict", *films[:4], str(broken), "--out", str(tmp_path / "ray"), "--ray", "local"],
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 1 and _records(target)[-1]["error"], first.stderr[-1500:]
    with open(target, "a") as handle:
        handle.write('{"path": "cut short by a cra')  # a crash mid-line
    broken.write_bytes(Path(films[0]).read_bytes())  # the file is mended: its error record is not "done"
    second = subprocess.run([*CLI, "predict", *films, str(broken), "--out", str(tmp_path / "ray"), "--ray", "local"],
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "4 already there, skipped" in second.stdout, second.stdout + second.stderr[-1500:]
    ours = _records(target)
    theirs = [r.to_dict() for r in Predictor.from_default().predict_batch([*films, str(broken)], cam="top")]
    assert [r["path"] for r in ours] == [r["path"] for r in theirs] == [*films, str(broken)]
    # Other options (or models) never count the file's films as done, and are never mixed into it
    forced = subprocess.run([*CLI, "predict", *films, "--out", str(tmp_path / "ray"), "--ray", "local", "--force"],
                            capture_output=True, text=True, timeout=600, check=False)
    assert forced.returncode == 2 and "force" in forced.stderr and "Traceback" not in forced.stderr, forced.stderr
    for a, b in zip(ours, theirs):
        assert a["box"] == b["box"] and a["quality"]["frontal_chest"] == b["quality"]["frontal_chest"]
        for label, p in b["probabilities"].items():
            assert (p is None and a["probabilities"][label] is None) or abs(a["probabilities"][label] - p) <= 1e-5


def test_ctrl_c_stops_predict_on_ray_and_says_how_to_go_on(tmp_path):
    """Issue 36: Ctrl-C (SIGINT to the terminal's whole process group, Ray's processes included)
    stops the run within seconds, keeps the records written and says the same command resumes."""
    out = tmp_path / "ray"
    proc = subprocess.Popen([*CLI, "predict", *_films(40), "--out", str(out), "--ray", "local", "--workers", "1",
                             "--cam", "none", "--batch-size", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 (as a terminal starts it)
    target, deadline = out / "predictions.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (target.exists() and target.read_text().count("\n")):
        time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    stopped = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - stopped < 30 and proc.returncode == 130, err[-1500:]
    kept = _records(target)
    assert 0 < len(kept) < 40 and "the same command goes on from there" in err and "Traceback" not in err


def test_predict_on_ray_writes_csv_overlays_and_dicom_as_one_process_does(tmp_path):
    """Through the one result writer: the same CSV rows, the same overlay names and the same DICOM
    objects (UIDs included) with and without --ray."""
    from dicom_films import film_to_dicom

    inputs = tmp_path / "in"
    inputs.mkdir()
    film_to_dicom(DATA / "nih-cxr14/images/00000100_000.png", inputs / "a.dcm", modality="CR")
    (inputs / "b.png").write_bytes(Path(_films(1)[0]).read_bytes())
    runs = {}
    for name, extra in (("one", []), ("ray", ["--ray", "local"])):
        out = tmp_path / name
        run = subprocess.run([*CLI, "predict", str(inputs), "--out", str(out), "--format", "csv",
                              "--dicom-out", str(out / "dicom"), *extra], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr[-1500:]
        runs[name] = out
    one, ray_ = (pd.read_csv(runs[k] / "predictions.csv") for k in ("one", "ray"))
    pd.testing.assert_frame_equal(one.drop(columns=[c for c in one if c in LABELS]),
                                  ray_.drop(columns=[c for c in ray_ if c in LABELS]))
    np.testing.assert_allclose(one[list(LABELS)].to_numpy(float), ray_[list(LABELS)].to_numpy(float), atol=1e-5)
    assert sorted(p.name for p in runs["one"].glob("*_overlay.png")) == ["a_overlay.png", "b_overlay.png"]
    assert sorted(p.name for p in runs["ray"].glob("*_overlay.png")) == ["a_overlay.png", "b_overlay.png"]
    dicoms = [sorted(p.name for p in (runs[k] / "dicom").glob("*.dcm")) for k in ("one", "ray")]
    assert dicoms[0] == dicoms[1] and len(dicoms[0]) == 3


def test_prepare_on_ray_writes_the_same_shards(tmp_path):
    from pneumoscan.data import build_manifest, write_manifest
    from pneumoscan.training.cache import CropCache, prepare

    table = build_manifest({"nih": DATA / "nih-cxr14"}).head(40)
    write_manifest(table, tmp_path / "m.csv")
    prepare(table, tmp_path / "pool", size=64, shard_size=8, workers=1, progress=False)
    run = subprocess.run([*CLI, "prepare", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "ray"),
                          "--size", "64", "--shard-size", "8", "--workers", "2", "--ray", "local"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-1500:]
    a, b = CropCache(tmp_path / "pool"), CropCache(tmp_path / "ray", verify=True)
    np.testing.assert_array_equal(a.images(range(len(a))), b.images(range(len(b))))
    pd.testing.assert_frame_equal(a.table, b.table)


def test_a_worker_killed_mid_run_is_retried_and_nothing_is_duplicated(tmp_path):
    import ray

    from pneumoscan.apps.cluster import predict_records, ray_init
    from pneumoscan.outputs.writer import Outputs

    ray_init("local", num_cpus=2)
    films = _films(24)
    killed = []

    def workers() -> list[int]:
        """PIDs of Ray's actor processes for the predictor (their titles name the class)."""
        pids = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if b"PredictWorker" in handle.read():
                        pids.append(int(entry))
            except (OSError, ValueError):
                continue
        return pids

    def kill_one() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if pids := workers():
                time.sleep(3)  # let it score a batch or two first
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        records = list(predict_records([(f, f"film{i}") for i, f in enumerate(films)],
                                       Outputs(out=tmp_path, overlays=False), address="local", workers=2,
                                       batch_size=2, seg=None, cls_model=None, backend="auto"))
    finally:
        killer.join()
        ray.shutdown()
    assert killed, "no worker was killed; the test proved nothing"
    assert [r["path"] for r in records] == films and all(r["error"] is None for r in records)


def test_without_the_extra_the_flag_fails_in_one_line(monkeypatch):
    from pneumoscan.apps.cluster import ClusterError, ray_init

    monkeypatch.setitem(sys.modules, "ray", None)  # as if `pip install -e .[cluster]` had not been run
    with pytest.raises(ClusterError, match=r"pip install 'pneumoscan\[cluster\]'"):
        ray_init("local")
