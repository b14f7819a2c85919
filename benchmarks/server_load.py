"""Load on `pneumoscan serve`: C concurrent clients × R requests each (or for S seconds) with
real NIH PNGs, plus the time to refuse an over-limit upload.

    python benchmarks/server_load.py [--clients 4] [--requests 25]
    python benchmarks/server_load.py --clients 8 --duration 60

Starts the server in a subprocess on a free port, posts /v1/predict (Grad-CAM of the top finding,
inline images), and prints errors, latency p50/p95 and the server's RSS before and after.
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


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; overrides --requests")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "pneumoscan.cli", "serve", "--port", str(port)],
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

        def client(c: int) -> list[tuple[int, float]]:
            out = []
            with httpx.Client(timeout=300) as http:
                r = 0
                while (time.perf_counter() < stop_at) if args.duration else (r < args.requests):
                    path = paths[(c * 997 + r) % len(paths)]
                    r += 1
                    if c == 0:
                        samples.append((time.perf_counter() - began, rss_mb(server.pid)))
                    start = time.perf_counter()
                    status = http.post(url + "/v1/predict", files={"file": (path.name, path.read_bytes())}).status_code
                    out.append((status, time.perf_counter() - start))
            return out

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            results = [x for chunk in pool.map(client, range(args.clients)) for x in chunk]
        took = time.perf_counter() - start
        after = rss_mb(server.pid)
        big = b"\x89PNG" + bytes(40 * 2**20)
        t0 = time.perf_counter()
        refused = httpx.post(url + "/v1/predict", files={"file": ("big.png", big)}, timeout=60).status_code
        refuse_s = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies = np.array([t for _, t in results])
    errors = sum(1 for s, _ in results if s != 200)
    what = f"{args.duration:.0f} s" if args.duration else f"{args.requests} requests"
    print(f"{args.clients} clients × {what}: {len(results)} done, {errors} errors, "
          f"{len(results) / took:.2f} requests/s")
    print(f"latency p50 {np.percentile(latencies, 50):.2f} s, p95 {np.percentile(latencies, 95):.2f} s, "
          f"max {latencies.max():.2f} s")
    print(f"server RSS {before:.0f} MB after warm-up, {after:.0f} MB after the run; during the run: "
          + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in samples[:: max(1, len(samples) // 8)]))
    print(f"40 MiB upload (limit 32 MiB): HTTP {refused} in {refuse_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
