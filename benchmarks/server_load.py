"""Load on `pneumoscan serve`: C concurrent clients × R requests each (or for S seconds) with
real NIH PNGs, plus the time to refuse an over-limit upload.

    python benchmarks/server_load.py [--clients 4] [--requests 25]
    python benchmarks/server_load.py --clients 8 --duration 60
    python benchmarks/server_load.py --clients 48 --requests 3 --huge     # the memory attack
    python benchmarks/server_load.py --clients 48 --requests 3 --slow 9   # with slow-upload senders

Starts the server in a subprocess on a free port, posts /v1/predict (Grad-CAM of the top finding,
inline images), and prints the answers by HTTP status, latency p50/p95, the server's RSS before,
after and at its peak (sampled every 0.1 s), and the latency of /health polled every 50 ms during
the run. ``--huge``: every other request is a small PNG that declares 7,900 × 7,900 pixels (a real,
valid file of a 62 M-pixel grey ramp, about 100 KB), which must be decoded in full (about 0.3 GB
as float32) and then goes through segmentation and the input gate. ``--slow N``: N more senders
that each declare a 100 KB upload and send one byte every 5 s for the whole run, reconnecting
as soon as they are cut off (after a 429, 0.2 s later, to spare this script's own CPU), from
``--slow-from`` (127.0.0.2: another address than the clients'); their answers (408, then 429 once
their address is barred) are counted apart, and the clients' share of 200s is the figure to watch.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """A process's resident memory now (VmRSS) or at its peak (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; overrides --requests")
    parser.add_argument("--huge", action="store_true", help="mix in huge-header PNGs")
    parser.add_argument("--workers", type=int, default=None, help="the server's --workers (default: its own)")
    parser.add_argument("--slow", type=int, default=0, help="slow senders (one byte every 5 s) during the run")
    parser.add_argument("--slow-from", default="127.0.0.2", help="the slow senders' source address")
    args = parser.parse_args()
    import cv2

    gradient = np.tile(np.linspace(0, 255, 7_900).astype(np.uint8), (7_900, 1))  # decodes in full
    huge = cv2.imencode(".png", gradient)[1].tobytes() if args.huge else b""
    print(f"huge-header PNG: {len(huge):,} bytes for 7,900 × 7,900 pixels" if args.huge else "", end="")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    extra = ["--workers", str(args.workers)] if args.workers else []
    server = subprocess.Popen([sys.executable, "-m", "pneumoscan.apps.cli", "serve", "--port", str(port), *extra],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        paths = sorted((DATA / "nih-cxr14" / "images").glob("*.png"))
        httpx.post(url + "/v1/predict", files={"file": (paths[0].name, paths[0].read_bytes())}, timeout=120)
        before = rss_mb(server.pid)

        began = time.perf_counter()
        stop_at = began + args.duration
        samples = [(0.0, before)]

        running = True
        peak, health = [before], []

        def watch() -> None:  # the server's RSS every 0.1 s and /health every 50 ms, while clients run
            with httpx.Client(timeout=30) as http:
                last = 0.0
                while running:
                    peak.append(rss_mb(server.pid))
                    if time.perf_counter() - last > 0.05:
                        last = t0 = time.perf_counter()
                        http.get(url + "/health")
                        health.append(time.perf_counter() - t0)
                    time.sleep(0.05)

        def client(c: int) -> list[tuple[int, float]]:
            out = []
            with httpx.Client(timeout=600) as http:
                r = 0
                while (time.perf_counter() < stop_at) if args.duration else (r < args.requests):
                    path = paths[(c * 997 + r) % len(paths)]
                    body = (("huge.png", huge) if args.huge and (c + r) % 2 == 0 else (path.name, path.read_bytes()))
                    r += 1
                    if c == 0:
                        samples.append((time.perf_counter() - began, rss_mb(server.pid)))
                    start = time.perf_counter()
                    status = http.post(url + "/v1/predict", files={"file": body}).status_code
                    out.append((status, time.perf_counter() - start))
            return out

        slow_answers: list[bytes] = []

        def slow_sender() -> None:  # declares 100 KB, sends a byte every 5 s, reconnects when cut off
            while running:
                with socket.create_connection(("127.0.0.1", port), timeout=120,
                                              source_address=(args.slow_from, 0)) as sock:
                    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n"
                                 b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
                    try:
                        while running:
                            sock.sendall(b"x")
                            time.sleep(5)
                    except OSError:
                        pass
                    try:
                        slow_answers.append(sock.recv(100).split(b"\r\n", 1)[0])
                    except OSError as exc:
                        slow_answers.append(type(exc).__name__.encode())
                if slow_answers[-1].startswith(b"HTTP/1.1 429"):
                    time.sleep(0.2)

        watcher = concurrent.futures.ThreadPoolExecutor(1).submit(watch)
        slow_pool = concurrent.futures.ThreadPoolExecutor(max(1, args.slow))
        slow = [slow_pool.submit(slow_sender) for _ in range(args.slow)]
        time.sleep(1 if args.slow else 0)
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            results = [x for chunk in pool.map(client, range(args.clients)) for x in chunk]
        took = time.perf_counter() - start
        running = False
        watcher.result()
        for future in slow:
            future.result()
        after = rss_mb(server.pid)
        big = b"\x89PNG" + bytes(40 * 2**20)
        t0 = time.perf_counter()
        refused = httpx.post(url + "/v1/predict", files={"file": ("big.png", big)}, timeout=60).status_code
        refuse_s = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies = np.array([t for s, t in results if s == 200] or [np.nan])
    statuses = {code: sum(1 for s, _ in results if s == code) for code in sorted({s for s, _ in results})}
    what = f"{args.duration:.0f} s" if args.duration else f"{args.requests} requests"
    print(f"{args.clients} clients × {what}{' (half huge-header PNGs)' if args.huge else ''}: "
          f"{len(results)} answered in {took:.1f} s, by status {statuses}, "
          f"{statuses.get(200, 0) / took:.2f} predictions/s; clients' success rate "
          f"{statuses.get(200, 0) / max(len(results), 1):.1%}")
    print(f"/health during the run: {len(health)} polls, p50 {np.percentile(health, 50) * 1000:.0f} ms, "
          f"p95 {np.percentile(health, 95) * 1000:.0f} ms, max {max(health) * 1000:.0f} ms")
    print(f"server RSS peak {max(peak):.0f} MB")
    if args.slow:
        answers = {a.decode(errors="replace"): slow_answers.count(a) for a in sorted(set(slow_answers))}
        print(f"{args.slow} slow senders (a byte every 5 s): answers {answers}")
    print(f"latency of 200s p50 {np.nanpercentile(latencies, 50):.2f} s, p95 {np.nanpercentile(latencies, 95):.2f} s, "
          f"max {np.nanmax(latencies):.2f} s")
    print(f"server RSS {before:.0f} MB after warm-up, {after:.0f} MB after the run; during the run: "
          + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in samples[:: max(1, len(samples) // 8)]))
    print(f"40 MiB upload (limit 32 MiB): HTTP {refused} in {refuse_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
