"""Predict and prepare over a Ray cluster (the optional ``cluster`` extra): Ray Data does the
scheduling, retries and progress; this module only says what one worker does.

- ``prepare --ray``: the crop cache's shards are the items; an actor pool (one lung model per
  actor) runs :func:`pneumoscan.training.cache.do_shard` on each, which writes the shard and its done-mark
  atomically, so a shard retried after a worker died is written once, identical.
- ``predict --ray``: the files are the items; an actor pool (one :class:`Predictor` per actor,
  with ``num_gpus`` each when the cluster has GPUs) scores batches of them, writes their overlays
  and DICOM results through :mod:`pneumoscan.outputs.writer`, and returns one record per file, in
  input order, which the driver appends to ``predictions.jsonl`` or ``.csv``.

Without an address a local Ray starts on this machine; with one (``ray://…`` or ``HOST:PORT``)
the work goes to that cluster, whose workers must see the same file paths (a shared file system).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pneumoscan.errors import PneumoScanError


class ClusterError(PneumoScanError, RuntimeError):
    """Ray missing or not reachable."""


def ray_init(address: str | None, num_cpus: int | None = None):
    """Connect to ``address`` (None or "local": start a local Ray); a one-line error without the
    extra."""
    address = None if address in (None, "", "local") else address
    try:
        import ray
    except ImportError as exc:
        raise ClusterError("--ray needs the cluster extra: pip install 'pneumoscan[cluster]'") from exc
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=True, logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"cannot reach the Ray cluster at {address}: {str(exc).splitlines()[0][:200]}") from exc
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    return ray


def _one_thread() -> None:
    """Each worker uses one core: Ray gives each actor one CPU."""
    import torch

    os.environ["PNEUMOSCAN_ORT_THREADS"] = "1"
    torch.set_num_threads(1)


class ShardWorker:
    """One lung model; crops whole shards of the cache."""

    def __init__(self, seg_model: str | None):
        from pneumoscan.training.cache import worker_init

        _one_thread()
        worker_init(seg_model)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from pneumoscan.training.cache import ShardJob, do_shard

        done = [do_shard(ShardJob(**json.loads(job))) for job in batch["job"]]
        return {"k": [d[0] for d in done], "n": [d[1] for d in done], "bad": [d[2] for d in done]}


def run_shards(jobs: list, workers: int, seg_model: str | None, address: str | None
               ) -> Iterator[tuple[int, int, int]]:
    """(shard, images, errors) for each job, as Ray finishes them."""
    ray = ray_init(address, num_cpus=workers)
    if not jobs:
        return
    items = ray.data.from_items([{"job": json.dumps({**asdict(j), "threads": 0})} for j in jobs])
    done = items.map_batches(ShardWorker, fn_constructor_args=(seg_model,), batch_size=1, concurrency=workers,
                             num_cpus=1)
    for row in done.iter_rows():
        yield int(row["k"]), int(row["n"]), int(row["bad"])


class PredictWorker:
    """One predictor (all models) in a Ray actor: scores a batch of files and writes their
    overlays and DICOM results through the result writer, returning their records."""

    def __init__(self, outputs, seg: str | None, cls_model: str | None, backend: str, device: str, force: bool):
        from pneumoscan.predict import Predictor

        _one_thread()
        self.predictor = Predictor.from_paths(seg, cls_model, backend=backend, device=device)
        self.outputs, self.force = outputs, force

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        paths = [str(p) for p in batch["path"]]
        results = self.predictor.predict_batch(paths, cam="top", force=self.force,
                                               keep_arrays=self.outputs.needs_arrays)
        return {"record": [json.dumps(self._files(r, p, stem)) for r, p, stem in zip(results, paths, batch["stem"])]}

    def _files(self, result, path: str, stem: str) -> dict[str, Any]:
        """The record; a full output folder is said in it (the driver, writing the records to
        the same folder, stops on its own write)."""
        from pneumoscan.outputs.writer import NoRoom, write_files

        try:
            return write_files(result, Path(path), stem, self.outputs, self.predictor)
        except NoRoom as exc:
            return exc.record


def predict_records(items: Iterable[tuple[str, str]], outputs, *, address: str | None, workers: int,
                    batch_size: int, seg: str | None, cls_model: str | None, backend: str, device: str = "cpu",
                    gpus_per_worker: float = 0.0, force: bool = False) -> Iterator[dict[str, Any]]:
    """One prediction record per (path, output stem), in input order, from an actor pool of
    ``workers``; each actor writes its films' files as ``outputs`` asks."""
    ray = ray_init(address, num_cpus=workers)
    rows = [{"path": str(p), "stem": stem} for p, stem in items]
    if not rows:
        return
    scored = ray.data.from_items(rows).map_batches(
        PredictWorker, fn_constructor_args=(outputs, seg, cls_model, backend, device, force),
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, num_gpus=gpus_per_worker)
    for row in scored.iter_rows():
        yield json.loads(row["record"])
