"""The DICOM listener under load: dcmtk's storescu sends N chest X-rays; received → results rate,
and the listener's memory while more arrive than it can process.

    python benchmarks/listen_bench.py [--n 200] [--flood 1000]

The films are CR DICOMs made from dev PNGs (NIH 1024² for the rate; Shenzhen 512² for the
flood, each a new instance), written to a temporary folder. The listener runs as
``pneumoscan listen`` with the default backend and a queue larger than N. Prints images/s from
the first instance sent to the last done-mark, and the listener's peak RSS (VmHWM) before and
after the flood, during which all instances are spooled within a few seconds and processed later.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--flood", type=int, default=1000)
    args = parser.parse_args()
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
