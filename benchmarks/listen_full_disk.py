"""The listener on a full disk (issue 36): `pneumoscan listen --out` on a small tmpfs that fills up
while it runs, 10 films sent while it is full, the space freed, and every film processed once,
none in ``failed/``.

    sudo python benchmarks/listen_full_disk.py [--size-mb 40] [--spool tmpfs|disk|both]

Needs root (it mounts a tmpfs) and the dicom extra. Each film is a 12-bit CR instance made from an
NIH ChestX-ray14 PNG resized to 512 px. The tmpfs is sized in MiB (``--size-mb``): one film's
results (SR, SEG and an uncompressed RGB Secondary Capture of the overlay) take about 1.5 MB, so
a 1 MiB disk could never hold one, and the default 40 MiB holds the 10 films' results once the
filler is gone; the disk is *filled to the last byte* by a filler file once the listener is up,
which is what matters. ``--spool tmpfs``: the spool is on the full disk too (the
default layout, OUT/.spool), so instances cannot even be received: the sender gets 0xA700 and
resends (as a PACS's retry queue does) after the filler is removed. ``--spool disk``: the spool is
elsewhere, instances are taken, and the worker cannot write results: it keeps them in the spool,
answers 0xA700 to new ones meanwhile, and retries with back-off once space returns. Prints, for
each variant, the statuses of each sending round, what the log said, how many results each film
got, and what is in ``failed/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CLI = [sys.executable, "-m", "pneumoscan.apps.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def films(n: int) -> list:
    """``n`` CR datasets from NIH films, 512 px, each its own instance."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out = []
    for png in sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[:n]:
        grey = cv2.resize(cv2.imread(str(png), cv2.IMREAD_GRAYSCALE), (512, 512), interpolation=cv2.INTER_AREA)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientName, ds.PatientID, ds.Modality, ds.ViewPosition = "Full^Disk", "FD-1", "CR", "PA"
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 512, 512, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (grey.astype(np.uint16) * 16).tobytes()
        out.append(ds)
    return out


def send(datasets: list, port: int) -> list[int]:
    """C-STORE each dataset in one association; the statuses (-1: no answer)."""
    from pynetdicom import AE

    ae = AE(ae_title="FULLDISK")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
    if not assoc.is_established:
        return [-1] * len(datasets)
    statuses = []
    for ds in datasets:
        answer = assoc.send_c_store(ds)
        statuses.append(int(answer.Status) if "Status" in answer else -1)
    assoc.release()
    return statuses


def echo(port: int) -> bool:
    from pynetdicom import AE

    ae = AE(ae_title="FULLDISK")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
    ok = assoc.is_established and int(assoc.send_c_echo().Status) == 0
    if assoc.is_established:
        assoc.release()
    return ok


def fill(folder: Path) -> Path:
    """Write a filler file until the disk is full; the filler."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass
        try:
            while True:
                handle.write(b"\0")
        except OSError:
            pass
    return filler


def run(variant: str, size_mb: int, n: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"pneumoscan-full-{variant}-"))
    out = root / "out"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(out)], check=True)
    port, log = free_port(), root / "listen.log"
    spool = ["--spool", str(root / "spool")] if variant == "disk" else []
    handle = log.open("wb")
    proc = subprocess.Popen([*CLI, "listen", "--out", str(out), "--port", str(port), "--queue", "64", *spool],
                            stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not echo(port):
            if time.time() > deadline or proc.poll() is not None:
                raise SystemExit("the listener did not start:\n" + log.read_text()[-2000:])
            time.sleep(0.5)
        datasets = films(n)
        filler = fill(out)
        free = shutil.disk_usage(out).free
        rounds = [send(datasets, port)]
        time.sleep(5)
        alive = echo(port)
        rounds.append(send(datasets[:1], port))  # one more while full: refused or kept?
        filler.unlink()
        start = time.time()
        pending = [ds for ds, status in zip(datasets, rounds[0]) if status != 0]
        while pending and time.time() - start < 120:  # the sender's retry queue
            time.sleep(2)
            statuses = send(pending, port)
            rounds.append(statuses)
            pending = [ds for ds, status in zip(pending, statuses) if status != 0]
        uids = {str(ds.SOPInstanceUID) for ds in datasets}
        lines: list[dict] = []
        while time.time() - start < 300:
            path = out / "predictions.jsonl"
            lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
            if uids <= {line.get("sop_instance_uid") for line in lines}:
                break
            time.sleep(1)
        took = time.time() - start
        per_film = [sum(1 for line in lines if line.get("sop_instance_uid") == uid) for uid in sorted(uids)]
        failed = sorted(p.name for p in (out / "failed").iterdir()) if (out / "failed").exists() else []
        alive_after = proc.poll() is None and echo(port)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        handle.close()
        subprocess.run(["umount", str(out)], check=False)
    said = [line.split(" ", 3)[-1][:140] for line in log.read_text().splitlines()
            if "WARNING" in line or "ERROR" in line]
    return {"variant": f"spool on {'the full tmpfs' if variant == 'tmpfs' else 'another disk'}", "tmpfs_mb": size_mb,
            "free_bytes_when_full": free, "rounds": [[hex(s) if s >= 0 else s for s in r] for r in rounds],
            "echo_while_full": alive, "results_per_film": per_film, "failed": failed,
            "seconds_from_freeing_to_all_done": round(took, 1), "alive_after": alive_after,
            "log_warnings": said[:8], "log_warnings_total": len(said)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=40)
    parser.add_argument("--films", type=int, default=10)
    parser.add_argument("--spool", choices=["tmpfs", "disk", "both"], default="both")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: it mounts a tmpfs")
    for variant in (["tmpfs", "disk"] if args.spool == "both" else [args.spool]):
        print(json.dumps(run(variant, args.size_mb, args.films), indent=1), flush=True)


if __name__ == "__main__":
    main()
