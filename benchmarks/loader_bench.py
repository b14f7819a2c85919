"""Crop-cache throughput: `prepare` images/s per worker, and training batches/s from the cache.

    python benchmarks/loader_bench.py --cache runs/cache224 [--manifest runs/cls_manifest.csv --prepare-n 256]

The loader figure is what feeds the GPU: uint8 crops from memory-mapped shards → batches of 16
(augmentation runs batched on the device, so it is not part of this figure).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import torch
from torch.utils.data import DataLoader

from pneumoscan.data import read_manifest
from pneumoscan.training.cache import CropCache, prepare
from pneumoscan.training.data import CropDataset, select_rows
from pneumoscan.training.segment import EpochSampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--manifest", type=Path)
    parser.add_argument("--prepare-n", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    cache = CropCache(args.cache)
    rows = select_rows(cache, True)["train"]
    dataset = CropDataset(cache, rows)
    print(f"cache: {len(cache)} crops of {cache.size}×{cache.size}; training rows {len(rows)}")
    print(f"{'what':<42}{'images/s':>12}")
    for workers in (0, 1):
        loader = DataLoader(dataset, batch_size=16, sampler=EpochSampler(len(dataset), 0), num_workers=workers)
        it, seen = iter(loader), 0
        next(it)
        start = time.perf_counter()
        for _, (x, _) in zip(range(args.batches), it):
            seen += len(x)
        took = time.perf_counter() - start
        label = "loader, main process (1 core)" if workers == 0 else "loader, 1 worker process (1 core)"
        print(f"{label:<42}{seen / took:>12.0f}")
    if args.manifest:
        table = read_manifest(args.manifest).head(args.prepare_n)
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            prepare(table, Path(tmp) / "c", size=cache.size, workers=1, progress=False)
            took = time.perf_counter() - start
        mix = ", ".join(f"{k} {v}" for k, v in table.source.value_counts().items())
        print(f"{'prepare, 1 worker (1 core) [' + mix + ']':<42}{len(table) / took:>12.1f}")


if __name__ == "__main__":
    main()
