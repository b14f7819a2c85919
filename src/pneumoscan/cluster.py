"""Predict and prepare over a Ray cluster (the optional ``cluster`` extra): Ray Data does the
scheduling, retries and progress; this module only says what one worker does.

- ``prepare --ray``: the crop cache's shards are the items; an actor pool (one lung model per
  actor) runs :func:`pneumoscan.cache._do_shard` on each, which writes the shard and its done-mark
  atomically, so a shard retried after a worker died is written once, identical.
- ``predict --ray``: the files are the items; an actor pool (one :class:`Predictor` per actor,
  with ``num_gpus`` each when the cluster has GPUs) scores batches of them and returns one JSON
  record per file, in input order, which the driver appends to ``predictions.jsonl``.

Without an address a local Ray starts on this machine; with one (``ray://…`` or ``HOST:PORT``)
the work goes to that cluster, whose workers must see the same file paths (a shared file system).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any


class ClusterError(RuntimeError):
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
                     log_to_driver=False, configure_logging=True, logging_level="ERROR")
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
        from pneumoscan.cache import _worker_init

        _one_thread()
        _worker_init(seg_model)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from pneumoscan.cache import _do_shard, _Job

        done = [_do_shard(_Job(**json.loads(job))) for job in batch["job"]]
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
    """One predictor (both models); scores a batch of files into JSON records."""

    def __init__(self, seg: str | None, cls_model: str | None, backend: str, device: str, force: bool):
        from pneumoscan.predict import Predictor

        _one_thread()
        self.predictor = Predictor.from_paths(seg, cls_model, backend=backend, device=device)
        self.force = force

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        paths = [str(p) for p in batch["path"]]
        results = self.predictor.predict_batch(paths, cam="top", force=self.force)
        return {"record": [json.dumps(r.to_dict()) for r in results]}


def predict_records(paths: Iterable[str], *, address: str | None, workers: int, batch_size: int,
                    seg: str | None, cls_model: str | None, backend: str, device: str = "cpu",
                    gpus_per_worker: float = 0.0, force: bool = False) -> Iterator[dict[str, Any]]:
    """One prediction record per path, in input order, from an actor pool of ``workers``."""
    ray = ray_init(address, num_cpus=workers)
    items = ray.data.from_items([{"path": str(p)} for p in paths])
    scored = items.map_batches(PredictWorker, fn_constructor_args=(seg, cls_model, backend, device, force),
                               batch_size=batch_size, concurrency=workers, num_cpus=1, num_gpus=gpus_per_worker)
    for row in scored.iter_rows():
        yield json.loads(row["record"])


def done_paths(target) -> set[str]:
    """Paths already in a ``predictions.jsonl`` (a rerun skips them). A last line cut short by a
    crash is dropped from the file (rewritten atomically), so that it is predicted again."""
    from pathlib import Path

    from pneumoscan.modelfile import atomic_write_bytes

    target = Path(target)
    if not target.exists():
        return set()
    text = target.read_text()
    lines = text.splitlines()
    kept, done = [], set()
    for line in lines:
        try:
            done.add(json.loads(line)["path"])
            kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(kept) != len(lines) or (text and not text.endswith("\n")):  # appending must start a line
        atomic_write_bytes(target, "".join(line + "\n" for line in kept).encode())
    return done


def predict_to_jsonl(files: list, target, progress=None, **options: Any) -> dict[str, int]:
    """Append one record per file not yet in ``target`` (resumable); returns counts."""
    done = done_paths(target)
    todo = [str(f) for f in files if str(f) not in done]
    counts = {"skipped": len(files) - len(todo), "written": 0, "errors": 0, "refused": 0}
    if not todo:
        return counts
    with open(target, "a") as handle:
        for record in predict_records(todo, **options):
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            counts["written"] += 1
            counts["errors"] += bool(record.get("error"))
            counts["refused"] += not record.get("error") and not (record.get("quality") or {}).get("frontal_chest")
            if progress:
                progress(1)
    return counts
