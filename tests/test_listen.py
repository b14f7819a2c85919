"""The DICOM listener with real clients: dcmtk's echoscu/storescu and pynetdicom, on 127.0.0.1."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
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


def _send(films: list[Path], port: int, calling: str = "PYTEST") -> list[int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ComputedRadiographyImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in films]
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
    from pynetdicom import AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES

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
