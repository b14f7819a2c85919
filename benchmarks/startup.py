"""Start-up against time per film, as a user meets it: ``pneumoscan predict`` on 1 film and on
``--n`` films (default 11), each a fresh process, best of ``--repeat``.

    python benchmarks/startup.py [--n 11] [--repeat 3] [--backend auto]

Time per film = (T(n) − T(1)) / (n − 1); start-up = T(1) − one film's time; the issue's target is
start-up ≤ 4 films' worth. Films: NIH ChestX-ray14 PNGs of ``../shared/data/nih-cxr14/images``
(the development films), else the bundled examples repeated under other names. The ONNX export
is made once before timing (a first run on a new machine or model exports for ~30 s; that is
reported separately, not counted as start-up).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PNEUMOSCAN_DATA", ROOT.parent / "shared" / "data"))


def films(n: int, folder: Path) -> list[Path]:
    """``n`` distinct film files in ``folder`` (NIH development PNGs, else copies of the examples)."""
    nih = sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[:n]
    if len(nih) == n:
        return nih
    examples = sorted(p for p in (ROOT / "examples").rglob("*") if p.suffix.lower() in (".png", ".jpeg", ".jpg", ".dcm"))
    out = []
    for k in range(n):
        source = examples[k % len(examples)]
        out.append(folder / f"{k:02d}{source.suffix}")
        shutil.copy(source, out[-1])
    return out


def timed_predict(paths: list[Path], out: Path, backend: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "predict", *map(str, paths), "--out", str(out),
                    "--backend", backend, "--quiet"], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=11)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = films(args.n, tmp)
        first = timed_predict(paths[:1], tmp / "warm", args.backend)  # makes the ONNX export if missing
        one = min(timed_predict(paths[:1], tmp / "one", args.backend) for _ in range(args.repeat))
        many = min(timed_predict(paths, tmp / "many", args.backend) for _ in range(args.repeat))
    per_film = (many - one) / (len(paths) - 1)
    startup = one - per_film
    print(f"backend {args.backend}; first run (may include the one-off ONNX export) {first:.2f} s")
    print(f"predict, 1 film: {one:.2f} s; {len(paths)} films: {many:.2f} s (best of {args.repeat})")
    print(f"time per film {per_film:.3f} s; start-up {startup:.2f} s")
    print(f"startup_in_films={startup / per_film:.1f}")


if __name__ == "__main__":
    main()
