"""How long `pneumoscan monitor` takes on a large store: N simulated results (the record fields the
monitor reads, drawn as in tests/test_monitor.py) written straight into a new SQLite store, then
read and tested as the command does (reference 500, windows of 100).

    python benchmarks/monitor_scale.py --results 100000 --out ~/runs/monitor_scale

Prints the seconds to read the store and to test every window; target: under a minute for
100,000 results on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=100_000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from sqlalchemy import insert
    from test_monitor import START, record

    from pneumoscan.monitoring import read_store
    from pneumoscan.monitoring.watch import monitor
    from pneumoscan.store.db import Store
    from pneumoscan.store.schema import Film, Result

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scale.sqlite"
    path.unlink(missing_ok=True)
    store = Store(f"sqlite:///{path}")
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    with store.session("filling") as session:
        for first in range(0, args.results, 5000):
            ids = range(first, min(first + 5000, args.results))
            session.execute(insert(Film), [{"id": k + 1, "sha256": f"{k:064x}", "display_name": f"f{k}.dcm",
                                            "created_at": START + timedelta(minutes=k)} for k in ids])
            rows = []
            for k in ids:
                r = record(rng, child=k > args.results - 100)
                rows.append({"id": k + 1, "film_id": k + 1, "models_key": "0" * 64, "models": {}, "source": "listen",
                             "status": r["status"], "verdict": "abnormal", "population": "adult", "findings": "||",
                             "probabilities": r["probabilities"], "thresholds": r["thresholds"], "record": r,
                             "created_at": START + timedelta(minutes=k), "updated_at": START + timedelta(minutes=k)})
            session.execute(insert(Result), rows)
    filled = time.perf_counter() - started
    started = time.perf_counter()
    rows, truth = read_store(store)
    read = time.perf_counter() - started
    started = time.perf_counter()
    report = monitor(rows, reference=500, window=100, truth=truth)
    tested = time.perf_counter() - started
    store.close()
    result = {"results": args.results, "fill_s": round(filled, 1), "read_s": round(read, 1), "test_s": round(tested, 1),
              "total_s": round(read + tested, 1), "windows": len(report["windows"]), "alerts": len(report["alerts"]),
              "db_mb": round(path.stat().st_size / 2**20, 1)}
    (args.out / "monitor_scale.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
