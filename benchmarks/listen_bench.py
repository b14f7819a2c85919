"""The DICOM listener under load: dcmtk's storescu sends N chest X-rays; received → results rate,
and the listener's memory while more arrive than it can process.

    python benchmarks/listen_bench.py [--n 200] [--flood 1000]
    python benchmarks/listen_bench.py --target-down 1000     # forward target down during a flood

The films are CR DICOMs made from dev PNGs (NIH 1024² for the rate; Shenzhen 512² for the
flood, each a new instance), written to a temporary folder. The listener runs as
``pneumoscan listen`` with the default backend and a queue larger than N. Prints images/s from
the first instance sent to the last done-mark, and the listener's peak RSS (VmHWM) before and
after the flood, during which all instances are spooled within a few seconds and processed later.

``--target-down N``: the listener forwards to a node that is down (default ``--queue`` 64); N
instances are sent in one association (pynetdicom). Prints how many were taken and how many got
0xA700, the spool and outbox on disk at the end of the flood, the peak RSS, and, after the
target comes up, how long until every taken instance was done and forwarded (or in failed/).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tests"))
from dicom_films import film_to_dicom  # noqa: E402  (the tests' CR/DX writer)
from server_load import rss_mb  # noqa: E402  (this folder is on sys.path when a script in it runs)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def target_down(count: int) -> None:
    """A flood while the forward target is down, then the target comes up."""
    import pydicom
    from pynetdicom import (
        AE,
        ALL_TRANSFER_SYNTAXES,
        AllStoragePresentationContexts,
        evt,
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shenzhen = sorted((DATA / "shenzhen" / "CXR_png").glob("*.png"))
        template = pydicom.dcmread(film_to_dicom(shenzhen[0], tmp / "film.dcm", modality="CR"))
        ports = []
        for _ in range(2):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                ports.append(sock.getsockname()[1])
        port, target = ports
        out = tmp / "out"
        proc = subprocess.Popen([sys.executable, "-m", "pneumoscan.apps.cli", "listen", "--out", str(out), "--port",
                                 str(port), "--forward", f"127.0.0.1:{target}:ARCHIVE"],
                                stdout=open(tmp / "listen.log", "wb"), stderr=subprocess.STDOUT)
        echo = ["/usr/bin/echoscu", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port)]
        while subprocess.run(echo, capture_output=True).returncode != 0:
            time.sleep(0.5)
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(template.SOPClassUID, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
        statuses, taken, disk = [], [], 0.0
        start = time.perf_counter()
        for i in range(count):
            template.SOPInstanceUID = pydicom.uid.generate_uid()
            code = int(assoc.send_c_store(template).Status)
            statuses.append(code)
            if code == 0:
                taken.append(str(template.SOPInstanceUID))
            if i % 50 == 0:
                disk = max(disk, folder_mb(out))
        assoc.release()
        sent = time.perf_counter() - start
        disk = max(disk, folder_mb(out))
        print(f"{count} CR instances (Shenzhen, 512²) sent in {sent:.1f} s with the forward target down: "
              f"{statuses.count(0)} taken, {statuses.count(0xA700)} answered 0xA700, "
              f"{len(statuses) - statuses.count(0) - statuses.count(0xA700)} other; "
              f"--out on disk at most {disk:.0f} MB; listener peak RSS {rss_mb(proc.pid, 'VmHWM'):.0f} MB")
        received = []
        scp = AE(ae_title="ARCHIVE")
        for context in AllStoragePresentationContexts:
            scp.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        server = scp.start_server(("127.0.0.1", target), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, lambda event: received.append(1) or 0)])
        up = time.perf_counter()
        while any((out / ".outbox").glob("*.json")) or not all(
                (out / ".done" / uid).exists() for uid in taken):
            time.sleep(0.5)
        drained = time.perf_counter() - up
        failed = len(list((out / "failed").glob("*.error.txt")))
        print(f"target up: every taken instance done and forwarded after {drained:.1f} s "
              f"({len(received)} result objects received, {failed} instance(s) in failed/)")
        server.shutdown()
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--flood", type=int, default=1000)
    parser.add_argument("--target-down", type=int, default=0, help="flood this many with the forward target down")
    args = parser.parse_args()
    if args.target_down:
        return target_down(args.target_down)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nih = sorted((DATA / "nih-cxr14" / "images").glob("*.png"))
        films = [film_to_dicom(nih[i % len(nih)], tmp / f"nih{i:04d}.dcm", modality="CR") for i in range(args.n)]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = tmp / "out"
        log = open(tmp / "listen.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "pneumoscan.apps.cli", "listen", "--out", str(out), "--port",
                                 str(port), "--host", "127.0.0.1", "--queue", str(max(args.n, args.flood) + 10)],
                                stdout=log, stderr=subprocess.STDOUT)
        echo = ["/usr/bin/echoscu", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port)]
        while subprocess.run(echo, capture_output=True).returncode != 0:
            time.sleep(0.5)
        idle = rss_mb(proc.pid, "VmRSS")
        start = time.perf_counter()
        subprocess.run(["/usr/bin/storescu", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port), *map(str, films)],
                       check=True, capture_output=True)
        sent = time.perf_counter() - start
        while len(list((out / ".done").iterdir())) < args.n:
            time.sleep(0.2)
        total = time.perf_counter() - start
        peak = rss_mb(proc.pid, "VmHWM")
        print(f"{args.n} NIH CR instances (1024²) sent by storescu in {sent:.1f} s; all results after {total:.1f} s: "
              f"{args.n / total:.2f} images/s received → SR + SEG + SC")
        print(f"listener RSS idle {idle:.0f} MB, peak {peak:.0f} MB")
        if args.flood:
            shenzhen = sorted((DATA / "shenzhen" / "CXR_png").glob("*.png"))
            flood = [film_to_dicom(shenzhen[i % len(shenzhen)], tmp / f"sz{i:05d}.dcm", modality="CR")
                     for i in range(args.flood)]
            start = time.perf_counter()
            subprocess.run(["/usr/bin/storescu", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port), *map(str, flood)],
                           check=True, capture_output=True)
            sent = time.perf_counter() - start
            done_then = len(list((out / ".done").iterdir())) - args.n
            spooled = len(list((out / ".spool").glob("*.dcm")))
            print(f"flood: {args.flood} Shenzhen CR instances (512²) spooled in {sent:.1f} s "
                  f"({done_then} processed meanwhile, {spooled} waiting on disk); listener peak RSS {rss_mb(proc.pid, 'VmHWM'):.0f} MB")
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
