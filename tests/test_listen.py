"""The DICOM listener with real clients: dcmtk's echoscu/storescu and pynetdicom, on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from conftest import DATA, needs_data
from dicom_films import film_to_dicom, validate_dicom

pynetdicom = pytest.importorskip("pynetdicom", reason="the dicom extra is not installed")
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import ComputedRadiographyImageStorage, MRImageStorage  # noqa: E402

CLI = [sys.executable, "-m", "pneumoscan.apps.cli"]
STORESCU, ECHOSCU = Path("/usr/bin/storescu"), Path("/usr/bin/echoscu")  # dcmtk's, not pynetdicom's
pytestmark = needs_data


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _films(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    pngs = sorted((DATA / "shenzhen" / "CXR_png").glob("*.png"))[:n]
    return [film_to_dicom(p, folder / f"{p.stem}.dcm", modality="CR") for p in pngs]


def _start(out: Path, port: int, *extra: str) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "ab")
    proc = subprocess.Popen([*CLI, "listen", "--out", str(out), "--port", str(port), "--host", "127.0.0.1",
                             *extra], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        ae = AE(ae_title="PYTEST")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
        if assoc.is_established:
            assoc.release()
            return proc
        time.sleep(0.5)
    proc.kill()
    pytest.fail("the listener did not start: " + (out.parent / f"{out.name}.log").read_text()[-2000:])


def _send(films: list, port: int, calling: str = "PYTEST") -> list[int]:
    """C-STORE files or datasets in one association; their statuses."""
    datasets = [f if isinstance(f, pydicom.Dataset) else pydicom.dcmread(f) for f in films]
    ae = AE(ae_title=calling)
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def _wait(predicate, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def forward_scp():
    """A second DICOM node that collects what the listener forwards."""
    received: list[pydicom.Dataset] = []

    def store(event):
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="ARCHIVE")
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    port = _port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    yield port, received
    server.shutdown()


@pytest.fixture(scope="module")
def listener(tmp_path_factory, forward_scp):
    root = tmp_path_factory.mktemp("listen")
    port = _port()
    proc = _start(root / "out", port, "--forward", f"127.0.0.1:{forward_scp[0]}:ARCHIVE",
                  "--allow", "PYTEST", "--allow", "STORESCU", "--allow", "ECHOSCU")
    yield {"port": port, "out": root / "out", "root": root}
    proc.terminate()
    proc.wait(timeout=30)


def test_dcmtk_echo_and_store_give_validating_results_and_forward_them(listener, forward_scp):
    port, out = listener["port"], listener["out"]
    assert subprocess.run([str(ECHOSCU), "-aet", "ECHOSCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port)],
                          capture_output=True, timeout=60).returncode == 0
    (film,) = _films(listener["root"] / "dcmtk", 1)
    run = subprocess.run([str(STORESCU), "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port), str(film)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    uid = pydicom.dcmread(film).SOPInstanceUID
    _wait(lambda: (out / ".done" / uid).exists())
    names = (out / ".done" / uid).read_text().split()
    assert sorted(n.rsplit("_", 1)[1] for n in names) == ["sc.dcm", "seg.dcm", "sr.dcm"]
    for name in names:
        ds = pydicom.dcmread(out / name)
        assert ds.StudyInstanceUID == pydicom.dcmread(film).StudyInstanceUID
    _wait(lambda: len([d for d in forward_scp[1] if d.StudyInstanceUID == ds.StudyInstanceUID]) == 3, 60)
    assert not list((out / ".spool").glob("*.dcm"))
    for name in names:
        validate_dicom(out / name)
    # The real SIIM CR film is JPEG-compressed: dcmtk proposes JPEG and the listener accepts it.
    siim = next((DATA / "siim-acr-pneumothorax").rglob("*.dcm"))
    run = subprocess.run([str(STORESCU), "--propose-jpeg8", "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1",
                          str(port), str(siim)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    siim_uid = pydicom.dcmread(siim, stop_before_pixels=True).SOPInstanceUID
    _wait(lambda: (out / ".done" / siim_uid).exists())
    assert len((out / ".done" / siim_uid).read_text().split()) == 3
    log = (listener["root"] / "out.log").read_text()
    assert uid in log and "Test^Film" not in log and "TEST-0001" not in log  # UIDs, never identity


def test_other_sop_classes_and_callers_are_refused(listener):
    ae = AE(ae_title="PYTEST")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", listener["port"], ae_title="PNEUMOSCAN")
    if assoc.is_established:  # accepted with the MR context rejected ("abstract syntax not supported")
        assert not assoc.accepted_contexts and assoc.rejected_contexts[0].result == 0x03
        assoc.release()
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(ComputedRadiographyImageStorage)
    assoc = stranger.associate("127.0.0.1", listener["port"], ae_title="PNEUMOSCAN")
    assert assoc.is_rejected
    _wait(lambda: "refused an association from STRANGER" in (listener["root"] / "out.log").read_text(), 30)


def test_listen_binds_loopback_unless_told():
    from pneumoscan.apps.listen import Listener

    run = subprocess.run([*CLI, "listen", "--help"], capture_output=True, text=True, timeout=120, check=False,
                         env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    host_line = next(line for line in run.stdout.splitlines() if "--host" in line)
    assert "127.0.0.1" in host_line and "0.0.0.0" not in host_line.split("default")[-1]
    assert Listener.host == "127.0.0.1"


def test_kill_9_mid_batch_then_restart_loses_nothing_and_does_each_once(tmp_path):
    films = _films(tmp_path / "films", 6)
    out, port = tmp_path / "out", _port()
    proc = _start(out, port)
    assert _send(films, port) == [0] * 6
    _wait(lambda: any((out / ".done").iterdir()))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list((out / ".spool").glob("*.dcm"))
    assert left, "everything was done before the kill; the test proved nothing"
    proc = _start(out, port)
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in films]
    _wait(lambda: all((out / ".done" / uid).exists() for uid in uids))
    proc.terminate()
    proc.wait(timeout=30)
    log = (tmp_path / "out.log").read_text()
    assert not list((out / ".spool").glob("*.dcm*"))
    processed = [log.count(f"processed {uid}") for uid in uids]
    assert all(n >= 1 for n in processed) and sum(processed) <= len(uids) + 1, processed  # at most the one in flight
    assert len(list(out.glob("*_sr.dcm"))) == len(uids)


def test_a_flood_beyond_the_queue_is_answered_out_of_resources(tmp_path):
    films = _films(tmp_path / "films", 8)
    out, port = tmp_path / "out", _port()
    proc = _start(out, port, "--queue", "1")
    statuses = _send(films, port)
    assert 0xA700 in statuses and 0 in statuses, statuses
    accepted = [pydicom.dcmread(f).SOPInstanceUID for f, s in zip(films, statuses) if s == 0]
    _wait(lambda: all((out / ".done" / uid).exists() for uid in accepted))
    proc.terminate()
    proc.wait(timeout=30)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def test_hostile_uids_and_own_results_are_refused_and_nothing_lands_outside_out(tmp_path):
    """The SOP Instance UID was used as a path: a sender could write outside --out and delete any
    *.dcm. Its own Secondary Capture, routed back, made SC-of-SC without end."""
    (film,) = _films(tmp_path / "films", 1)
    out, port = tmp_path / "out", _port()
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "important.dcm").write_bytes(b"keep me")
    proc = _start(out, port)
    hostile = ["../../archive/important", ".", "..", "1.2\nINFO forged line", "1.2/3.4", "1..2", "1.2.", "x" * 64]
    datasets = []
    for uid in hostile:
        ds = pydicom.dcmread(film)
        ds.SOPInstanceUID = uid
        datasets.append(ds)
    mismatched = pydicom.dcmread(film)
    mismatched.SOPInstanceUID = "1.2.3.4"
    mismatched.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    assert _send(datasets, port) == [0xC000] * len(hostile)
    assert _send([film], port) == [0]
    uid = pydicom.dcmread(film).SOPInstanceUID
    _wait(lambda: (out / ".done" / uid).exists())
    (sc,) = out.glob("*_sc.dcm")
    assert _send([sc], port) == [0xC000]  # its own result, routed back
    _stop(proc)
    assert (archive / "important.dcm").read_bytes() == b"keep me"
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(out)
               and p.parent not in (tmp_path / "films", archive) and p.name != "out.log"]
    assert outside == [] and sorted(p.name for p in archive.iterdir()) == ["important.dcm"]
    log = (tmp_path / "out.log").read_text()
    assert log.count("its SOP Instance UID is not a valid UID") == len(hostile) and "loop guard" in log
    assert not [line for line in log.splitlines() if line.startswith("INFO forged")]  # no forged log line
    records = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["sop_instance_uid"] for r in records] == [uid] and set(records[0]["results"]) == {"sr", "seg", "sc"}
    assert records[0]["status"] in ("called", "not called")
    assert all((out / f"{records[0]['results'][k]}_{k}.dcm").exists() for k in ("sr", "seg", "sc"))


def test_non_conformant_patient_values_still_get_results_and_are_never_echoed(tmp_path):
    """Birth date 1970-02-28, sex 'female', study date 2024/01/01, a 70-character patient ID:
    no results used to be made, and the instance failed again at every restart."""
    (film,) = _films(tmp_path / "films", 1)
    ds = pydicom.dcmread(film)
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "1970-02-28", "female", "2024/01/01", "12:30"
    ds.PatientID = "P" * 70
    out, port = tmp_path / "out", _port()
    proc = _start(out, port)
    assert _send([ds], port) == [0]
    _wait(lambda: (out / ".done" / ds.SOPInstanceUID).exists())
    _stop(proc)
    names = (out / ".done" / ds.SOPInstanceUID).read_text().split()
    assert len(names) == 3
    for name in names:
        result = pydicom.dcmread(out / name)
        assert (result.PatientBirthDate, result.PatientSex, result.StudyDate, result.StudyTime) == \
            ("19700228", "F", "20240101", "1230")
        assert result.PatientID == "P" * 70  # kept: shortening it would file the results elsewhere
    log = (tmp_path / "out.log").read_text()
    assert "1970-02-28" not in log and "female" not in log and "P" * 70 not in log


def test_an_unreadable_instance_goes_to_failed_with_its_error(tmp_path):
    (film,) = _films(tmp_path / "films", 1)
    ds = pydicom.dcmread(film)
    ds.PixelData = ds.PixelData[:1000]  # truncated pixel data
    out, port = tmp_path / "out", _port()
    proc = _start(out, port)
    assert _send([ds], port) == [0]
    uid = ds.SOPInstanceUID
    _wait(lambda: (out / ".done" / uid).exists())
    _stop(proc)
    assert (out / "failed" / f"{uid}.dcm").exists() and "cannot be decoded" in (out / "failed" / f"{uid}.error.txt").read_text()
    assert not list((out / ".spool").iterdir())
    (record,) = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert record["status"] == "error" and record["sop_instance_uid"] == uid


def test_a_poison_instance_is_tried_n_times_then_moved_never_looped(tmp_path):
    from pneumoscan.apps.listen import Listener

    class Boom:
        calls = 0

        def predict(self, *args, **kwargs):
            Boom.calls += 1
            raise RuntimeError("the model fell over")

    listener = Listener(Boom(), tmp_path / "out", tmp_path / "out" / ".spool", tries=3)
    (listener.spool / "1.2.3.dcm").write_bytes(b"anything")
    listener.worker.recover()
    worker = threading.Thread(target=listener.worker.run, daemon=True)
    worker.start()
    _wait(lambda: (listener.failed / "1.2.3.dcm").exists(), 30)
    time.sleep(0.5)
    listener.worker.queue.put(None)
    worker.join(timeout=10)
    assert Boom.calls == 3 and "failed 3 times" in (listener.failed / "1.2.3.error.txt").read_text()
    assert not list(listener.spool.iterdir()) and (listener.done / "1.2.3").exists()


def test_failed_keeps_to_its_count_and_bytes_dropping_the_oldest_with_a_log_line(tmp_path, caplog):
    """Issue 36: a sender that keeps sending what cannot be read must not fill the disk through
    failed/: it holds at most --failed-max instances and --failed-max-mb, the oldest go first."""
    import logging
    import os

    from pneumoscan.apps.listen import Listener

    listener = Listener(None, tmp_path / "out", tmp_path / "out" / ".spool", failed_max=3, failed_max_bytes=10_000)
    with caplog.at_level(logging.WARNING, logger="pneumoscan.apps.listen"):
        for k in range(5):
            uid = f"1.2.{k}"
            (listener.spool / f"{uid}.dcm").write_bytes(b"x" * 1000)
            listener.worker.give_up(uid, "unreadable")
            for path in listener.failed.glob(f"{uid}.*"):
                os.utime(path, ns=(k * 10**9, k * 10**9))  # one second apart, oldest first
            listener.worker.trim_failed()
        kept = sorted({p.name.split(".dcm")[0].split(".error")[0] for p in listener.failed.iterdir()})
        assert kept == ["1.2.2", "1.2.3", "1.2.4"]  # the count: the three newest
        (listener.spool / "1.2.9.dcm").write_bytes(b"x" * 9000)  # one big one: the bytes rule
        listener.worker.give_up("1.2.9", "unreadable")
    kept = sorted({p.name.split(".dcm")[0].split(".error")[0] for p in listener.failed.iterdir()})
    assert kept == ["1.2.9"] and sum(p.stat().st_size for p in listener.failed.iterdir()) <= 10_000
    removed = [r.getMessage() for r in caplog.records if "removed the oldest failed instance" in r.getMessage()]
    assert len(removed) == 5 and "1.2.0" in removed[0]
    assert all((listener.done / f"1.2.{k}").exists() for k in range(5))  # removed from failed/, still done


def test_forwards_wait_for_a_target_that_is_down_and_a_refused_sop_class_is_final(tmp_path):
    """Forwards used to be tried once (then only at a restart) and a target that refuses SR was
    retried forever; unforwarded results did not count against --queue."""
    films = _films(tmp_path / "films", 3)
    out, port, target_port = tmp_path / "out", _port(), _port()
    proc = _start(out, port, "--forward", f"127.0.0.1:{target_port}:ARCHIVE", "--queue", "2")
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in films]
    for film, uid in zip(films[:2], uids):
        assert _send([film], port) == [0]
        _wait(lambda uid=uid: (out / ".done" / uid).exists())
    assert _send([films[2]], port) == [0xA700]  # two instances' results wait to be forwarded
    received: list = []
    ae = AE(ae_title="ARCHIVE")  # takes Secondary Capture only: SR and SEG are refused for good
    from pynetdicom import ALL_TRANSFER_SYNTAXES
    from pynetdicom.sop_class import SecondaryCaptureImageStorage

    ae.add_supported_context(SecondaryCaptureImageStorage, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", target_port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: received.append(event.dataset) or 0)])
    try:
        _wait(lambda: not list((out / ".outbox").glob("*.json")), 120)
    finally:
        server.shutdown()
    _stop(proc)
    assert sorted(str(d.SOPClassUID) for d in received) == ["1.2.840.10008.5.1.4.1.1.7"] * 2
    for uid in uids[:2]:
        refused = (out / "failed" / f"{uid}.forward.txt").read_text().splitlines()
        assert sorted(line.split("\t")[0].rsplit("_", 1)[1] for line in refused) == ["seg.dcm", "sr.dcm"]
    log = (tmp_path / "out.log").read_text()
    assert "waits" in log and "refused for good" in log and log.count("forwarded 1 result object") == 2


def test_stow_rs_door_takes_films_and_refuses_the_rest_per_part(tmp_path):
    """DICOMweb in: the same checks as C-STORE, answered per part in the STOW-RS response."""
    from starlette.testclient import TestClient

    from pneumoscan.apps.listen import Listener

    film, other = _films(tmp_path / "films", 2)
    own = pydicom.dcmread(other)
    own.Manufacturer = "PneumoScan"  # as if one of its results came back
    own_path = tmp_path / "own.dcm"
    own.save_as(own_path)
    listener = Listener(None, tmp_path / "out", tmp_path / "out" / ".spool")
    boundary = "pneumoscan-test"
    bad_vr = bytearray(other.read_bytes())  # its SOP Class UID element's VR made "UO" (probe v5 L2)
    at = bad_vr.find(b"\x08\x00\x16\x00UI", 132 + 12)
    assert at > 0
    bad_vr[at + 4:at + 6] = b"UO"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                    for data in (film.read_bytes(), b"not dicom at all", own_path.read_bytes(), bytes(bad_vr)))
    body += f"--{boundary}--\r\n".encode()
    with TestClient(listener.stow_app()) as http:
        response = http.post("/studies", content=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        assert response.status_code == 202, response.text
        answer = response.json()
        stored = [item["00081155"]["Value"][0] for item in answer["00081199"]["Value"]]
        assert stored == [pydicom.dcmread(film).SOPInstanceUID] and len(answer["00081198"]["Value"]) == 3
        assert all(item["00081197"]["Value"] == [0xC000] for item in answer["00081198"]["Value"])
        assert http.post("/studies", content=b"x", headers={"Content-Type": "application/dicom"}).status_code == 415
    assert [p.name for p in listener.spool.iterdir()] == [f"{stored[0]}.dcm"]


def _store_event(path: Path):
    """The event pynetdicom hands the C-STORE handler for ``path`` received in its own transfer
    syntax: the dataset's bytes after the file meta, as DIMSE carries them."""
    from io import BytesIO
    from types import SimpleNamespace

    from pydicom.uid import UID
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event
    from pynetdicom.presentation import PresentationContextTuple

    from pneumoscan.films.dicom import file_meta_layout

    data = path.read_bytes()
    end, syntax, _, _ = file_meta_layout(data)
    meta = pydicom.filereader.read_file_meta_info(path)  # the meta group only: a bomb's body stays unread
    request = C_STORE()
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    request.DataSet = BytesIO(data[end:])
    class Association:  # what the handler reads of pynetdicom's (an object, weakly referenced like it)
        requestor = SimpleNamespace(ae_title="PYTEST")

    return Event(Association(), evt.EVT_C_STORE,
                 {"request": request, "context": PresentationContextTuple(1, meta.MediaStorageSOPClassUID, UID(syntax))})


def test_a_deflate_bomb_is_refused_at_both_doors_while_inflating(tmp_path):
    """Issue 36: a deflated dataset sent by C-STORE (pynetdicom's own decoding inflates it whole)
    or as a STOW-RS part is inflated with a file's bounds: a 1 GiB bomb (1 MB sent) is refused
    (0xC000; a failed part) having cost the listener under 100 MB, and an honest deflated film is
    taken and spooled as Explicit VR Little Endian, pixel for pixel the film sent."""
    import copy
    import tracemalloc

    import numpy as np
    from starlette.testclient import TestClient
    from test_io import _deflated

    from pneumoscan.apps.listen import Listener

    (plain,) = _films(tmp_path / "films", 1)
    ds = pydicom.dcmread(plain)
    honest = _deflated(ds, tmp_path / "honest.dcm")
    small = copy.deepcopy(ds)
    small.SOPInstanceUID = small.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    small.Rows = small.Columns = 64
    small.PixelData = np.zeros((64, 64), np.uint16).tobytes()
    bomb = _deflated(small, tmp_path / "bomb.dcm", junk_mib=1024)
    assert bomb.stat().st_size < 2 * 2**20
    listener = Listener(None, tmp_path / "out", tmp_path / "out" / ".spool")  # receiving only: no worker runs
    assert listener.handle_store(_store_event(honest)) == 0x0000
    spooled = pydicom.dcmread(listener.spool / f"{ds.SOPInstanceUID}.dcm")
    assert spooled.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert np.array_equal(spooled.pixel_array, ds.pixel_array)
    event = _store_event(bomb)
    tracemalloc.start()
    tracemalloc.reset_peak()
    status = listener.handle_store(event)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert status == 0xC000 and peak < 100 * 2**20, (status, peak)
    boundary = "pneumoscan-test"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + bomb.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode())
    with TestClient(listener.stow_app()) as http:
        tracemalloc.start()
        tracemalloc.reset_peak()
        answer = http.post("/studies", content=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert len(answer.json()["00081198"]["Value"]) == 1 and peak < 100 * 2**20, (answer.text[:200], peak)
    assert sorted(p.name for p in listener.spool.iterdir()) == [f"{ds.SOPInstanceUID}.dcm"]


def test_a_full_disk_holds_instances_in_the_spool_and_loses_none(tmp_path, monkeypatch):
    """Issue 36: with the results folder full (every write there fails with ENOSPC, as a full
    disk does; the spool is elsewhere), the worker survived (its retry counter's own write used to
    kill it), nothing went to failed/, C-STORE was answered 0xA700 while it could not work; once
    there is room, every instance is processed exactly once. One that failed for good earlier and
    is sent again is processed again, not dropped."""
    import errno

    import pneumoscan.modelfile
    import pneumoscan.outputs.dicom
    from pneumoscan.apps.listen import Listener
    from pneumoscan.predict import Predictor

    out, full = tmp_path / "out", threading.Event()
    films = _films(tmp_path / "films", 10)
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in films]

    def no_room(real):
        def write(path, *args, **kwargs):
            if full.is_set() and Path(path).is_relative_to(out):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, *args, **kwargs)
        return write

    for module, name in ((pneumoscan.modelfile, "atomic_write_bytes"), (pneumoscan.outputs.dicom, "write_dicom_results")):
        real = getattr(module, name)
        if name == "write_dicom_results":
            monkeypatch.setattr(module, name, lambda path, *a, _real=real, **k: (_ for _ in ()).throw(
                OSError(errno.ENOSPC, "No space left on device")) if full.is_set() else _real(path, *a, **k))
        else:
            monkeypatch.setattr(module, name, no_room(real))
    port = _port()
    listener = Listener(Predictor.from_default(), out, tmp_path / "spool", port=port, backoff_max_s=1.0)
    listener.start(block=False)
    try:
        full.set()
        first = _send(films, port)
        assert set(first) <= {0x0000, 0xA700} and first[0] == 0x0000
        _wait(lambda: listener.worker.full, 120)
        assert _send(films[:1], port) == [0xA700]  # the worker cannot write: the sender is told to retry
        assert not list((out / "failed").iterdir())
        full.clear()
        _wait(lambda: not listener.worker.full and not listener.worker.pending, 300)
        refused = [f for f, status in zip(films, first) if status != 0x0000]
        assert not refused or set(_send(refused, port)) == {0x0000}  # the sender's retry, now there is room
        _wait(lambda: all((out / ".done" / uid).exists() for uid in uids) and not listener.worker.pending, 300)
    finally:
        listener.stop()
    assert not list((out / "failed").iterdir())
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(line["sop_instance_uid"] for line in lines) == sorted(uids)  # each processed once
    # an instance that failed for good before is processed when it is sent again
    (out / ".done" / uids[0]).write_text("")
    (out / "failed" / f"{uids[0]}.error.txt").write_text("failed 3 times")
    listener = Listener(Predictor.from_default(), out, tmp_path / "spool", port=_port())
    assert listener.receive(uids[0], pydicom.dcmread(films[0]), films[0].read_bytes(), "PYTEST") == 0x0000
    assert (tmp_path / "spool" / f"{uids[0]}.dcm").exists() and not (out / "failed" / f"{uids[0]}.error.txt").exists()


def test_listen_warns_when_it_listens_beyond_this_machine(tmp_path):
    """Issue 36: as `serve` does, `listen` says so before it starts when bound off loopback."""
    proc = subprocess.Popen([*CLI, "listen", "--out", str(tmp_path / "out"), "--port", str(_port()), "--host", "0.0.0.0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert first.startswith("warning: listening on 0.0.0.0 beyond this machine") and "no --allow given" in first


def test_stow_rs_door_says_retry_when_full_and_keeps_to_the_study_it_names(tmp_path):
    """Issue 36: a full queue is answered 503 + Retry-After with failure reason 0xA700 (not a
    refusal for good, 0xC000); a part of another study than the path names fails alone; more parts
    than allowed is 413."""
    from starlette.testclient import TestClient

    from pneumoscan.apps.listen import Listener

    films = _films(tmp_path / "films", 2)
    studies = [str(pydicom.dcmread(f).StudyInstanceUID) for f in films]
    boundary = "b0undary"

    def body(paths):
        return b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n"
                        for p in paths) + f"--{boundary}--\r\n".encode()

    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    listener = Listener(None, tmp_path / "out", tmp_path / "out" / ".spool", queue_size=1)
    with TestClient(listener.stow_app(max_parts=2)) as http:
        answer = http.post(f"/studies/{studies[0]}", content=body(films), headers=headers)
        assert answer.status_code == 202  # the second film is of another study
        assert [i["00081197"]["Value"] for i in answer.json()["00081198"]["Value"]] == [[0xC000]]
        full = http.post(f"/studies/{studies[1]}", content=body(films[1:]), headers=headers)  # the queue holds 1
        assert full.status_code == 503 and full.headers["Retry-After"] == "5"
        assert full.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]
        assert http.post("/studies", content=body(films * 2), headers=headers).status_code == 413


def test_a_dicomweb_target_is_believed_only_when_its_answer_confirms(tmp_path):
    """Issue 36: `--forward-dicomweb` reads the target's answer: a failure listed in a 200 body,
    an answer that is not DICOM JSON, and a redirect to another host are failures of that object
    (never counted as forwarded, never followed with the film); "out of resources" and a target
    slower than the timeout are tried again later; a confirmed instance is forwarded."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse
    from starlette.routing import Route
    from test_review_page import LiveServer

    from pneumoscan.apps.forward import StowForward, Transient

    (film,) = _films(tmp_path / "films", 1)
    uid = str(pydicom.dcmread(film).SOPInstanceUID)
    stolen = []

    def failed(reason: int):
        return JSONResponse({"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]},
                                                                  "00081197": {"vr": "US", "Value": [reason]}}]}},
                            media_type="application/dicom+json")

    async def answer(request):
        kind = request.path_params["kind"]
        if kind == "elsewhere":
            stolen.append(await request.body())
            return PlainTextResponse("thanks")
        await request.body()
        if kind == "ok":
            return JSONResponse({"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]}}]}},
                                media_type="application/dicom+json")
        if kind == "refused":
            return failed(0xC000)
        if kind == "busy":
            return failed(0xA700)
        if kind == "html":
            return PlainTextResponse("<html>stored, probably</html>", media_type="text/html")
        if kind == "redirect":
            return RedirectResponse(f"http://127.0.0.1:{server.port}/elsewhere/studies", status_code=307)
        await asyncio.sleep(3)  # slow
        return failed(0xC000)

    server = LiveServer(Starlette(routes=[Route("/{kind}/studies", answer, methods=["POST"])]))
    with server as url:
        def send(kind: str):
            return StowForward(f"{url}/{kind}", timeout=1.0).send([film], "PNEUMOSCAN")[film]

        assert send("ok") is None
        assert send("refused") == f"{url}/refused refused it (failure reason 0xC000)"
        assert "did not confirm storing it" in send("html")
        assert "redirected the request (not followed)" in send("redirect") and not stolen
        for kind in ("busy", "slow"):
            with pytest.raises(Transient):
                send(kind)


def test_idle_peers_cannot_hold_every_association_and_the_log_says_why_one_was_refused(tmp_path, caplog):
    """Issue 36: associations that open and then say nothing are closed after --idle-timeout;
    while the slots are full a newcomer is rejected with the reason in the log, and once the idle
    ones are closed a sender gets through."""
    import logging

    from pneumoscan.apps.listen import Listener

    port = _port()
    listener = Listener(None, tmp_path / "out", tmp_path / "out" / ".spool", port=port, max_associations=2,
                        idle_timeout=2.0)
    listener.start()
    try:
        def associate():
            ae = AE(ae_title="IDLE")
            ae.add_requested_context("1.2.840.10008.1.1")
            return ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")

        with caplog.at_level(logging.WARNING, logger="pneumoscan.apps.listen"):
            idle = [associate() for _ in range(2)]
            assert all(a.is_established for a in idle)
            third = associate()
            assert third.is_rejected
        assert any("2 associations already open" in r.getMessage() and "idle ones close after 2 s" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        _wait(lambda: not any(a.is_alive() for a in idle), timeout=20)  # closed by the listener, not by us
        late = associate()
        assert late.is_established and late.send_c_echo().Status == 0x0000
        late.release()
    finally:
        listener.stop()


def test_an_instance_over_the_size_limit_ends_its_association_while_it_arrives(tmp_path, caplog):
    """Issue 36: an instance larger than the limit is not held whole in memory first: its
    association is aborted while it arrives, with a log line; the next sender is served."""
    import logging

    import numpy as np

    from pneumoscan.apps.listen import Listener

    port = _port()
    listener = Listener(None, tmp_path / "out", tmp_path / "out" / ".spool", port=port,
                        max_instance_bytes=4 * 2**20)
    small = pydicom.dcmread(_films(tmp_path / "in", 1)[0])
    big = pydicom.dcmread(_films(tmp_path / "in", 1)[0])
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    big.Rows, big.Columns, big.BitsAllocated, big.BitsStored, big.HighBit = 2048, 2048, 16, 12, 11
    big.PixelData = np.random.default_rng(0).integers(0, 4096, (2048, 2048), dtype=np.uint16).tobytes()  # 8 MiB
    listener.start()
    try:
        ae = AE(ae_title="BIGSENDER")
        ae.add_requested_context(str(big.SOPClassUID), "1.2.840.10008.1.2.1")
        with caplog.at_level(logging.WARNING, logger="pneumoscan.apps.listen"):
            assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
            assert assoc.is_established
            answer = assoc.send_c_store(big)
            _wait(lambda: assoc.is_aborted or not assoc.is_alive(), timeout=30)
        assert "Status" not in answer and assoc.is_aborted  # no answer: the association was ended
        assert any("more than 4194304 bytes" in r.getMessage() for r in caplog.records)
        time.sleep(3)  # the instance is never received afterwards either (probe v5 M2)
        assert not list(listener.spool.glob("*.dcm")) and not list(listener.failed.glob("*"))
        assert not any(f"received {big.SOPInstanceUID}" in r.getMessage() for r in caplog.records)
        assert _send([small], port) == [0x0000]  # the next sender is served
    finally:
        listener.stop()


def test_allow_binds_both_doors_by_address_and_the_stow_door_to_this_machine_by_title(tmp_path, caplog):
    """Issue 36: --allow used to restrict AE titles only, and the STOW-RS door took anything from
    anyone. An address or network in --allow now binds both doors (an association from elsewhere is
    rejected with a log line; a STOW-RS request gets 403); with AE titles alone, which HTTP does
    not carry, the STOW-RS door takes requests from this machine only."""
    import logging

    from starlette.testclient import TestClient

    from pneumoscan.apps.listen import Listener

    def echo(port: int, title: str = "PYTEST"):
        ae = AE(ae_title=title)
        ae.add_requested_context("1.2.840.10008.1.1")
        return ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")

    port = _port()
    elsewhere = Listener(None, tmp_path / "a", tmp_path / "a" / ".spool", port=port, allow=("10.9.9.0/24",))
    elsewhere.start()
    try:
        with caplog.at_level(logging.WARNING, logger="pneumoscan.apps.listen"):
            assert echo(port).is_rejected  # this test runs on 127.0.0.1, not in 10.9.9.0/24
        assert any("address not in --allow" in r.getMessage() for r in caplog.records)
    finally:
        elsewhere.stop()
    port = _port()
    here = Listener(None, tmp_path / "b", tmp_path / "b" / ".spool", port=port, allow=("127.0.0.0/8", "PYTEST"))
    here.start()
    try:
        assoc = echo(port)
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert echo(port, "STRANGER").is_rejected  # the titles still apply
    finally:
        here.stop()

    def stow(listener, client: tuple[str, int]):
        with TestClient(listener.stow_app(), client=client) as http:  # 415: let in, and then the body judged
            return http.post("/studies", content=b"x", headers={"Content-Type": "application/dicom"})

    assert stow(elsewhere, ("10.9.9.4", 5000)).status_code == 415
    assert elsewhere.peer_refusal("::ffff:10.9.9.4") is None  # the same peer through a dual-stack socket
    refused = stow(elsewhere, ("192.168.1.20", 5000))
    assert refused.status_code == 403 and "not in the --allow addresses" in refused.json()["error"]
    titles = Listener(None, tmp_path / "c", tmp_path / "c" / ".spool", allow=("PACS1",))
    assert stow(titles, ("127.0.0.1", 5000)).status_code == 415
    refused = stow(titles, ("10.0.0.5", 5000))
    assert refused.status_code == 403 and "AE title" in refused.json()["error"]
    assert stow(Listener(None, tmp_path / "d", tmp_path / "d" / ".spool"), ("10.0.0.5", 5000)).status_code == 415


def test_stow_rs_door_keeps_the_upload_pace_and_a_budget_per_client(tmp_path):
    """Issue 36: the STOW-RS door had no pace: a sender trickling its body held one of the four
    request places as long as it liked. It now gets 408 like at the REST server, and after its
    strikes its address gets 429 without a byte read; an honest sender elsewhere is served."""
    import asyncio

    from pneumoscan.apps.limits import PeerBudget, UploadPace
    from pneumoscan.apps.listen import Listener

    film = _films(tmp_path / "films", 1)[0]
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + film.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode())
    listener = Listener(None, tmp_path / "out", tmp_path / "out" / ".spool")
    app = listener.stow_app(pace=UploadPace(idle_s=0.3, grace_s=0.3, min_rate=1000, deadline_s=5),
                            budget=PeerBudget(uploads=2, strikes=2, cooloff_s=30))
    reads = 0

    async def trickle():  # a byte every 50 ms: under 1,000 bytes/s after the grace
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def whole():
        return {"type": "http.request", "body": body, "more_body": False}

    def post(receive, client: str) -> tuple[int, dict]:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        headers = [(b"content-type", f'multipart/related; type="application/dicom"; boundary={boundary}'.encode())]
        scope = {"type": "http", "method": "POST", "path": "/studies", "raw_path": b"/studies", "headers": headers,
                 "query_string": b"", "client": (client, 40000), "server": ("127.0.0.1", 8042), "scheme": "http",
                 "root_path": "", "http_version": "1.1"}
        asyncio.run(app(scope, receive, send))
        return sent[0]["status"], dict(sent[0]["headers"])

    start = time.monotonic()
    assert [post(trickle, "10.0.0.66")[0] for _ in range(2)] == [408, 408]
    assert time.monotonic() - start < 3
    before = reads
    status, headers = post(trickle, "10.0.0.66")
    assert status == 429 and int(headers[b"retry-after"]) >= 25 and reads == before
    assert post(whole, "10.0.0.7")[0] == 200
    assert [p.name for p in listener.spool.iterdir()] == [f"{pydicom.dcmread(film).SOPInstanceUID}.dcm"]


def test_a_forward_target_that_dribbles_its_answer_meets_a_total_deadline(tmp_path):
    """A target that sends one header line every half second never trips the per-read timeout:
    the forward ends at its total deadline and is tried again later, so one slow target cannot
    hold every later result (probe v5 M9)."""
    import socket
    import threading

    from pneumoscan.apps.forward import StowForward, Transient

    (film,) = _films(tmp_path / "films", 1)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()

    def dribble():
        conn, _ = server.accept()
        with conn:
            conn.recv(1 << 20)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.wait(0.5):
                try:
                    conn.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    return

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(Transient, match="within 2 s"):
            StowForward(f"http://127.0.0.1:{server.getsockname()[1]}/dw", timeout=1.0, deadline=2.0).send(
                [film], "PNEUMOSCAN")
        assert time.monotonic() - started < 6
    finally:
        stop.set()
        server.close()


def test_a_stow_body_is_parsed_holding_each_part_once_and_stops_at_the_part_limit():
    """python-multipart's streaming parser: a 20 MiB part costs about 20 MiB more while parsing
    (the standard library's MIME parser held a body about 14 times), and part 1,001 of 50,000
    ends the parsing as it begins (probe v5 M3)."""
    import os
    import tracemalloc

    from pneumoscan.apps.stow import TooManyParts, multipart_parts

    payload = os.urandom(20 << 20)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + payload + b"\r\n--b--\r\n"
    tracemalloc.start()
    try:
        parts = multipart_parts('multipart/related; type="application/dicom"; boundary=b', body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(parts) == 1 and parts[0] == payload and peak < 1.3 * len(payload)
    many = b"".join(b"--b\r\nContent-Type: application/dicom\r\n\r\nx\r\n" for _ in range(50_000)) + b"--b--\r\n"
    begun = []
    import python_multipart.multipart as parser_module

    class Counting(parser_module.MultipartParser):  # how far the parser got before it stopped
        def write(self, data):
            begun.append(len(data))
            return super().write(data)

    original, parser_module.MultipartParser = parser_module.MultipartParser, Counting
    try:
        with pytest.raises(TooManyParts, match="at most 1,000"):
            multipart_parts("multipart/related; boundary=b", many, 1_000)
    finally:
        parser_module.MultipartParser = original
    assert sum(begun) < len(many)  # stopped inside the body, not after parsing it whole
    assert multipart_parts("multipart/related; boundary=b", b"--b\r\nno end") is None
    assert multipart_parts("application/dicom", body) is None
