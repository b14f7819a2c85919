"""How cost grows with workers: prepare and predict images/s on 1, 2, 4, … workers (up to the
cores here), one process against Ray, with a plot and a projection.

    python benchmarks/scaling.py [--n 40 120] [--workers 1 2 4 8 16] [--plot docs/scaling.png]

prepare: the crop cache of NIH films (1024², cycled from the 150 dev films), shards of 8, with
the local process pool (``--workers``) and with ``--ray local``. predict: the same films, files →
probabilities, in one process (``Predictor.predict_many``, all cores) and with ``--ray local``
actors (one core each). Worker counts above the cores here are skipped. Every configuration runs
in its own process twice, on the two ``--n`` sizes: the steady rate is the difference in images
over the difference in seconds (start-up cancels out), and the start-up is what remains. Efficiency
= (steady images/s per worker) / (steady images/s of 1 worker) for the same runner.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CLI = [sys.executable, "-m", "pneumoscan.apps.cli"]


def timed_run(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs=2, default=[40, 120])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    from pneumoscan.data import build_manifest, write_manifest

    cores = os.cpu_count() or 1
    counts = [w for w in args.workers if w <= cores]
    base_table = build_manifest({"nih": DATA / "nih-cxr14"})  # the 1024² originals
    sizes = sorted(args.n)
    rows = []

    def steady(run) -> tuple[float, float]:
        """(images/s, start-up s) from one run per size."""
        (n1, t1), (n2, t2) = [(n, run(n)) for n in sizes]
        rate = (n2 - n1) / (t2 - t1)
        return rate, max(0.0, t1 - n1 / rate)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def table(n: int):
            rows_n = base_table.iloc[[i % len(base_table) for i in range(n)]].copy()
            rows_n["path"] = [str(tmp / "films" / f"{i:05d}.png") for i in range(n)]
            return rows_n

        (tmp / "films").mkdir()
        for i in range(max(sizes)):  # distinct file names: a file seen twice is indexed once
            os.symlink(base_table.path.iloc[i % len(base_table)], tmp / "films" / f"{i:05d}.png")
        for n in sizes:
            write_manifest(table(n), tmp / f"m{n}.csv")
        films = {n: table(n).path.tolist() for n in sizes}

        def predict_one(n: int) -> float:
            return timed_run([*CLI, "predict", *films[n], "--out", str(tmp / f"one{n}"), "--no-overlays"])

        rows.append(("predict", "one process (all cores)", cores, *steady(predict_one)))
        for runner in ("pool", "ray"):
            for w in counts:
                def prep(n: int, w=w, runner=runner) -> float:
                    extra = ["--ray", "local"] if runner == "ray" else []
                    return timed_run([*CLI, "prepare", "--manifest", str(tmp / f"m{n}.csv"), "--out",
                                      str(tmp / f"prep-{runner}-{w}-{n}"), "--shard-size", "8", "--workers", str(w),
                                      *extra])
                rows.append(("prepare", runner, w, *steady(prep)))
        for w in counts:
            def pred(n: int, w=w) -> float:
                return timed_run([*CLI, "predict", *films[n], "--out", str(tmp / f"ray{w}-{n}"), "--ray", "local",
                                  "--workers", str(w)])
            rows.append(("predict", "ray", w, *steady(pred)))
    print(f"NIH films (1024²), runs of {sizes[0]} and {sizes[1]}, {cores} cores here; steady rates (start-up apart)")
    print(f"{'job':<9}{'runner':<26}{'workers':>8}{'images/s':>10}{'s / 1,000':>11}{'efficiency':>12}{'start-up s':>12}")
    base = {(job, runner): ips for job, runner, w, ips, _ in rows if w == 1}
    for job, runner, w, ips, start in rows:
        eff = ips / w / base[(job, runner)] if (job, runner) in base else float("nan")
        print(f"{job:<9}{runner:<26}{w:>8}{ips:>10.2f}{1000 / ips:>11.0f}{eff:>12.2f}{start:>12.1f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        for job, runner in sorted({(j, r) for j, r, *_ in rows if r != "one process (all cores)"}):
            points = [(w, ips) for j, r, w, ips, _ in rows if (j, r) == (job, runner)]
            ax.plot(*zip(*points), marker="o", label=f"{job}, {runner}")
        ax.set(xlabel="workers", ylabel="steady images/s", title=f"Scaling on {cores} cores")
        ax.legend(fontsize=8)
        fig.savefig(args.plot, bbox_inches="tight")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
