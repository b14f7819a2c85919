"""What storing a result costs ``predict --db`` per film (issue 38's target: ≤ 20 ms on SQLite).

    python benchmarks/store_write.py [--films 50] [--db URL]

Predicts ``--films`` NIH films of ``../shared/data`` with the shipped models (arrays kept, as
``--db`` keeps them), then times :func:`pneumoscan.outputs.writer.write_to_store` for each into a
new store (a temporary SQLite file unless ``--db`` names an empty one): the film's SHA-256 and
DICOM tags, the review page's layers (JPEG preview, outlines, heat maps) and the database write,
each also timed alone. Then every film once more (the idempotent update of an existing row).
Prints median and 95th percentile in ms.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pneumoscan.outputs.writer import write_to_store
from pneumoscan.predict import Predictor
from pneumoscan.store.db import Store
from pneumoscan.store.identity import identify, layer_data

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def summary(name: str, seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1000
    return f"{name:<34} median {np.median(ms):6.1f} ms   p95 {np.percentile(ms, 95):6.1f} ms   (n={len(ms)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--films", type=int, default=50)
    parser.add_argument("--db", default=None, help="an empty store's URL (default: a new SQLite file)")
    args = parser.parse_args()
    paths = sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[: args.films]
    predictor = Predictor.from_default()
    run = {"models": {k: v for k, v in predictor.models.items() if k != "backend"}, "force": False}
    url = args.db or f"sqlite:///{tempfile.mkdtemp(prefix='store-bench-')}/results.sqlite"
    store = Store(url)
    times: dict[str, list[float]] = {"write_to_store (all of it)": [], "  film identity (SHA-256, tags)": [],
                                     "  layers (preview, outlines, heat)": [], "again (same film and models)": []}
    kept = []
    for path, result in zip(paths, predictor.predict_many(paths, cam="top", keep_arrays=True)):
        start = time.perf_counter()
        record = write_to_store(store, result.to_dict(), result, None, name=path.name, path=path, run=run,
                                source="predict")
        times["write_to_store (all of it)"].append(time.perf_counter() - start)
        assert "store_id" in record, record.get("store_error")
        start = time.perf_counter()
        identify(path.read_bytes(), path.name, path)
        times["  film identity (SHA-256, tags)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        layer_data(result)
        times["  layers (preview, outlines, heat)"].append(time.perf_counter() - start)
        kept.append((path, result.to_dict()))
    for path, record in kept:  # without arrays: the row update alone
        start = time.perf_counter()
        write_to_store(store, record, type("NoArrays", (), {"pixels": None})(), None, name=path.name, path=path,
                       run=run, source="predict")
        times["again (same film and models)"].append(time.perf_counter() - start)
    print(f"store {store.where}; {len(paths)} NIH films (1024² PNG)")
    for name, seconds in times.items():
        print(summary(name, seconds))
    print(f"counts: {store.counts()}")
    store.close()


if __name__ == "__main__":
    main()
