"""The crop cache behind `pneumoscan prepare`: read → CLAHE → segment → crop → resize, done once.

Layout of a cache folder::

    config.json            input size, shard size, segmentation model SHA-256, manifest SHA-256
    manifest.csv           the manifest rows, in shard order
    shards/00000.npy       uint8 N×S×S crops (memory-mapped when read)
    shards/00000.csv       per row: manifest row, box, fallback, lung fraction, error
    shards/00000.json      written last: row count and SHA-256 of the .npy — the "done" mark
    errors.csv             unreadable images (skipped, never fatal)

Every file is written under a temporary name and renamed, and a shard counts as done only when its
``.json`` exists and matches, so a killed run never leaves a shard that is read half-written; a
rerun does the missing shards only. ``shard=(i, n)`` takes every n-th shard from i, so the jobs
of a cluster array split the work without talking to each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pneumoscan.data.manifest import write_manifest
from pneumoscan.errors import PneumoScanError
from pneumoscan.modelfile import atomic_write_bytes

if TYPE_CHECKING:
    from pneumoscan.training.cropstore import CropStore

CACHE_VERSION = 1


class CacheError(PneumoScanError, ValueError):
    """A cache folder that cannot be used as asked (wrong settings, damaged shard)."""


def manifest_digest(table: pd.DataFrame) -> str:
    """SHA-256 of the manifest's paths in order: a cache belongs to one manifest."""
    return hashlib.sha256("\n".join(table["path"].astype(str)).encode()).hexdigest()


def shard_paths(root: Path, k: int) -> tuple[Path, Path, Path]:
    base = root / "shards" / f"{k:05d}"
    return base.with_suffix(".npy"), base.with_suffix(".csv"), base.with_suffix(".json")


def shard_done(root: Path, k: int, rows: int) -> bool:
    """True when shard k was completely written (its mark exists and agrees with the array)."""
    npy, csv, mark = shard_paths(root, k)
    if not (npy.exists() and csv.exists() and mark.exists()):
        return False
    try:
        info = json.loads(mark.read_text())
        array = np.load(npy, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return info.get("rows") == rows == len(array)


@dataclass(frozen=True)
class ShardJob:
    root: str
    k: int
    rows: list[dict[str, Any]]
    size: int
    seg_model: str | None
    threads: int = 1  # decoding threads beside the U-Net (2 when one process does everything)
    masked: bool = False  # black out everything outside the lung mask before cropping


_SEGMENTER = None


def worker_init(seg_model: str | None, one_thread: bool = True) -> None:
    """Load the segmenter once per worker; worker processes use one core each (the pool is the
    parallelism), the caller's own process keeps its thread settings."""
    import cv2
    import torch

    if one_thread:
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
    global _SEGMENTER
    from pneumoscan.segment import LungSegmenter, load_default

    _SEGMENTER = LungSegmenter.load(seg_model) if seg_model else load_default()


#: Sources whose films arrive lung-masked: their own mask gives the box, no U-Net runs.
PREMASKED_SOURCES = {"nihmasked"}


def crop_premasked(path: str, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A lung-masked film's crop (:func:`pneumoscan.crop.premasked_crop`) and its record."""
    from pneumoscan.crop import premasked_crop
    from pneumoscan.data.nih_masked import read_premasked

    rec = {"path": path, "x0": -1, "y0": -1, "x1": -1, "y1": -1, "fallback": True,
           "lung_fraction": np.nan, "error": ""}
    try:
        film, mask = read_premasked(path)
    except OSError as exc:
        return np.zeros((size, size), np.uint8), rec | {"error": str(exc)}
    found, crop = premasked_crop(film, mask, size)
    x0, y0, x1, y1 = found.box
    return crop, rec | {"x0": x0, "y0": y0, "x1": x1, "y1": y1, "fallback": found.fallback,
                        "lung_fraction": round(found.lung_fraction, 4)}


def crop_paths(paths: list[str], segmenter, size: int, batch: int = 16, threads: int = 1,
               masked: bool = False, sources: list[str] | None = None, progress: str | None = None,
               store: CropStore | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """read → segment → crop → resize for each path (:func:`pneumoscan.pipeline.read_segment_crop`):
    uint8 crops (zeros where unreadable) and, per path, the box, fallback flag, lung fraction and
    error message ("" when read). ``masked``: lungs only. Films of a :data:`PREMASKED_SOURCES`
    source (named in ``sources``) are always cropped by their own mask. ``progress``: a bar
    with this title. ``store``: crops shared between commands
    (:class:`~pneumoscan.training.cropstore.CropStore`), taken from it and kept in it."""
    from pneumoscan.pipeline import read_segment_crop
    from pneumoscan.progress import bar, note

    crops = np.zeros((len(paths), size, size), np.uint8)
    records: list[dict[str, Any]] = [{}] * len(paths)
    premasked = [sources is not None and sources[i] in PREMASKED_SOURCES for i in range(len(paths))]
    for k in np.flatnonzero(premasked):
        crops[k], records[k] = crop_premasked(paths[k], size)
    rest = [i for i in range(len(paths)) if not premasked[i]]
    digests = _stored_crops(paths, rest, store, crops, records) if store is not None else {}
    if store is not None and digests:
        kept = sum(1 for i in rest if records[i])
        if kept:
            note(f"{kept:,} of {len(rest):,} films' crops taken from the shared crop cache ({store.folder})")
        rest = [i for i in rest if not records[i]]
    items = (item for chunk in read_segment_crop([paths[i] for i in rest], segmenter, size, batch=batch,
                                                 threads=threads, masked=masked)
             for item in chunk)
    with bar(len(rest), progress or "", enabled=progress is not None and bool(rest)) as shown:
        for i, item in zip(rest, items):
            rec = {"path": item.source, "x0": -1, "y0": -1, "x1": -1, "y1": -1, "fallback": True,
                   "lung_fraction": np.nan, "error": item.error or ""}
            if item.seg is not None and item.crop is not None:  # a crop comes with every segmentation
                crops[i] = item.crop
                x0, y0, x1, y1 = item.seg.box
                rec.update(x0=x0, y0=y0, x1=x1, y1=y1, fallback=item.seg.fallback,
                           lung_fraction=round(item.seg.lung_fraction, 4))
                if store is not None and i in digests:
                    store.put(digests[i], crops[i], rec)
            records[i] = rec
            shown.update()
    if store is not None:
        store.trim()
    return crops, records


def _stored_crops(paths: list[str], rest: list[int], store: CropStore, crops: np.ndarray,
                  records: list[dict[str, Any]]) -> dict[int, str]:
    """Fill ``crops`` and ``records`` from ``store`` where it holds a film's crop; each film's
    SHA-256 by its index (none for a film that cannot be read: its error comes from the reader)."""
    from pneumoscan.films import file_limit
    from pneumoscan.modelfile import file_sha256

    digests, limit = {}, file_limit()
    for i in rest:
        try:
            info = os.stat(paths[i])
            # a FIFO would block the hashing for ever, and a file over the limit is refused unread
            if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
                continue
            digests[i] = file_sha256(paths[i])
        except OSError:
            continue
        found = store.get(digests[i])
        if found is not None:
            crops[i] = found[0]
            fields = {k: (np.nan if v is None else v) for k, v in found[1].items()}
            records[i] = {"path": paths[i], **fields, "error": ""}
    return digests


def do_shard(job: ShardJob) -> tuple[int, int, int]:
    """Crop one shard; returns (shard, images, errors)."""
    root = Path(job.root)
    crops, records = crop_paths([r["path"] for r in job.rows], _SEGMENTER, job.size, threads=job.threads,
                                masked=job.masked, sources=[r["source"] for r in job.rows])
    for rec, row in zip(records, job.rows):
        rec["row"] = row["row"]
    npy, csv, mark = shard_paths(root, job.k)
    tmp_npy = npy.with_name(npy.name + ".tmp.npy")
    np.save(tmp_npy, crops)
    tmp_npy.replace(npy)
    atomic_write_bytes(csv, pd.DataFrame(records).to_csv(index=False).encode())
    digest = hashlib.sha256(npy.read_bytes()).hexdigest()
    atomic_write_bytes(mark, json.dumps({"rows": len(job.rows), "sha256": digest}).encode())
    return job.k, len(job.rows), sum(1 for r in records if r["error"])


def claim_folder(root: Path, config: dict[str, Any], table: pd.DataFrame) -> None:
    """A new cache's manifest and settings written into ``root``, or, when ``root`` holds a cache
    already, its settings checked against ``config`` (a rerun resumes it; other settings are refused)."""
    config_path = root / "config.json"
    if config_path.exists():
        existing = json.loads(config_path.read_text())
        if existing != config:
            changed = sorted(k for k in config if existing.get(k) != config.get(k))
            raise CacheError(f"{root} holds a cache made with other settings ({', '.join(changed)}); "
                             f"use a new folder or delete this one")
    else:
        write_manifest(table, root / "manifest.csv")
        atomic_write_bytes(config_path, json.dumps(config, indent=2).encode())


def prepare(table: pd.DataFrame, out: str | Path, *, size: int = 224, shard_size: int = 128,
            workers: int = 1, shard: tuple[int, int] = (0, 1), seg_model: str | Path | None = None,
            progress: bool = True, masked: bool = False,
            runner: Callable[[list[ShardJob]], Iterable[tuple[int, int, int]]] | None = None) -> dict[str, Any]:
    """Fill the cache for ``table`` (a manifest). Returns counts of what was done now and overall.
    ``masked``: crops of the lungs only (0 outside the lung mask), for a lung-masked classifier.
    ``runner``: runs the shard jobs elsewhere and yields (shard, images, errors) as each is done
    (``pneumoscan.apps.cluster.run_shards`` on Ray); by default a local process pool of ``workers``."""
    from pneumoscan.modelfile import load_model
    from pneumoscan.progress import bar as progress_bar
    from pneumoscan.segment import KIND as SEG_KIND
    from pneumoscan.segment import WORK_SIDE, default_model_path

    root = Path(out)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    index, count = shard
    if not 0 <= index < count:
        raise CacheError(f"--shard must be i/n with 0 ≤ i < n, got {index}/{count}")
    seg_path = Path(seg_model) if seg_model else default_model_path()
    _, seg_meta = load_model(seg_path, kind=SEG_KIND)
    table = table.reset_index(drop=True)
    config = {"version": CACHE_VERSION, "size": size, "shard_size": shard_size, "rows": len(table),
              "shards": (len(table) + shard_size - 1) // shard_size,
              "manifest_sha256": manifest_digest(table),
              "segmentation_model_sha256": seg_meta["weights_sha256"],
              "crop": f"lung box on the original image (margin 5 %, mask cleaned at ≤ {WORK_SIDE} px), "
                      f"resized to size×size, no CLAHE"
                      + ("; 0 outside the lung mask (pre-masked sources: their own mask, cleaned alike)"
                         if masked else ""),
              **({"lung_mask": True} if masked else {})}
    claim_folder(root, config, table)
    records = table[["path", "source"]].assign(row=np.arange(len(table))).to_dict("records")
    mine = [k for k in range(config["shards"]) if k % count == index]
    jobs = [ShardJob(str(root), k, records[k * shard_size:(k + 1) * shard_size], size,
                 str(seg_model) if seg_model else None, 2 if workers <= 1 else 1, masked) for k in mine]
    todo = [j for j in jobs if not shard_done(root, j.k, len(j.rows))]
    done_images = errors = 0
    bar = progress_bar(sum(len(j.rows) for j in jobs), "prepare", enabled=progress,
                       initial=sum(len(j.rows) for j in jobs if j not in todo))
    pool = None
    if runner is not None:
        results: Iterable = runner(todo)
    elif workers <= 1:
        worker_init(str(seg_model) if seg_model else None, one_thread=False)
        results = map(do_shard, todo)
    else:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, worker_init, (str(seg_model) if seg_model else None,))
        results = pool.imap_unordered(do_shard, todo)
    try:
        for _, n, bad in results:
            done_images += n
            errors += bad
            bar.update(n)
    except BaseException:
        if pool is not None:  # a failure or Ctrl-C: stop now, never wait for the queued shards
            pool.terminate()
            pool.join()
            pool = None
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    complete = all(shard_done(root, k, min(shard_size, len(table) - k * shard_size))
                   for k in range(config["shards"]))
    if complete:
        collect_errors(root)
    return {"shards_total": config["shards"], "shards_this_job": len(jobs), "shards_done_now": len(todo),
            "images_done_now": done_images, "errors_now": errors, "complete": complete}


def collect_errors(root: Path) -> pd.DataFrame:
    """Gather every shard's unreadable rows into ``errors.csv``."""
    frames = [pd.read_csv(p, keep_default_na=False) for p in sorted((root / "shards").glob("*.csv"))]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["row", "path", "error"])
    bad = table.loc[table["error"].astype(str) != "", ["row", "path", "error"]]
    atomic_write_bytes(root / "errors.csv", bad.to_csv(index=False).encode())
    return bad


class CropCache:
    """A complete cache, read back: ``table`` (manifest rows + boxes, readable rows only) and
    ``images`` (memory-mapped uint8 crops, indexed like ``table``)."""

    def __init__(self, root: str | Path, verify: bool = False):
        from pneumoscan.data.manifest import read_manifest

        self.root = Path(root)
        config_path = self.root / "config.json"
        if not config_path.exists():
            raise CacheError(f"{self.root} is not a crop cache (no config.json); run `pneumoscan prepare`")
        self.config = json.loads(config_path.read_text())
        self.size = int(self.config["size"])
        manifest = read_manifest(self.root / "manifest.csv")
        shard_size, n = self.config["shard_size"], self.config["rows"]
        arrays, metas = [], []
        for k in range(self.config["shards"]):
            rows = min(shard_size, n - k * shard_size)
            if not shard_done(self.root, k, rows):
                raise CacheError(f"{self.root}: shard {k} is missing or incomplete; rerun "
                                 f"`pneumoscan prepare` with the same arguments to finish it")
            npy, csv, mark = shard_paths(self.root, k)
            if verify:
                expected = json.loads(mark.read_text())["sha256"]
                if hashlib.sha256(npy.read_bytes()).hexdigest() != expected:
                    raise CacheError(f"{npy}: contents do not match their SHA-256 (damaged)")
            arrays.append(np.load(npy, mmap_mode="r"))
            metas.append(pd.read_csv(csv, keep_default_na=False))
        meta = pd.concat(metas, ignore_index=True)
        self._all_images = arrays
        self._offsets = np.cumsum([0] + [len(a) for a in arrays])
        ok = meta["error"].astype(str) == ""
        self.errors = meta.loc[~ok, ["path", "error"]].reset_index(drop=True)
        keep = meta.loc[ok, "row"].to_numpy()
        self._rows = keep
        boxes = meta.loc[ok, ["x0", "y0", "x1", "y1", "fallback", "lung_fraction"]].reset_index(drop=True)
        boxes["fallback"] = boxes["fallback"].astype(str).str.lower() == "true"
        self.table = pd.concat([manifest.iloc[keep].reset_index(drop=True), boxes], axis=1)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def lung_masked(self) -> bool:
        """True when the crops hold the lungs only (``prepare --lung-mask``)."""
        return bool(self.config.get("lung_mask", False))

    def image(self, i: int) -> np.ndarray:
        """uint8 S×S crop of ``table`` row i."""
        row = int(self._rows[i])
        k = int(np.searchsorted(self._offsets, row, side="right") - 1)
        return np.asarray(self._all_images[k][row - self._offsets[k]])

    def images(self, indices: Iterable[int]) -> np.ndarray:
        return np.stack([self.image(i) for i in indices])

    def original(self, i: int) -> np.ndarray:
        """Row i's original picture, read again (AG-CNN cuts its local crop from it)."""
        from pneumoscan.films import read_xray

        return read_xray(self.table["path"].iloc[i]).pixels

    def lung_box(self, i: int) -> tuple[int, int, int, int]:
        """Row i's lung box on its original picture (what its crop was cut from)."""
        return lung_boxes(self.table.iloc[[i]])[0]

    def scoring_inputs(self, classifier, indices: np.ndarray) -> dict[str, Any]:
        """:func:`scoring_inputs` for these rows of the cache."""
        return scoring_inputs(classifier, self.table.iloc[np.asarray(indices)], self.size)


def lung_boxes(rows: pd.DataFrame) -> list[tuple[int, int, int, int]]:
    """The ``x0 y0 x1 y1`` lung box of each row, as ints."""
    return [(int(x0), int(y0), int(x1), int(y1))
            for x0, y0, x1, y1 in rows[["x0", "y0", "x1", "y1"]].itertuples(index=False)]


def scoring_inputs(classifier, rows: pd.DataFrame, size: int) -> dict[str, Any]:
    """What ``classifier.predict_proba`` needs besides the crops of ``rows`` (manifest rows with
    their lung boxes ``x0 y0 x1 y1``): AG-CNN's local crops, cut from the originals (read again)
    as in prediction, and the patient-information codes from the manifest columns."""
    from pneumoscan.clinical import table_records
    from pneumoscan.crop import local_crop
    from pneumoscan.films import read_xray

    codes = None if classifier.clinical is None else classifier.clinical.encode(
        table_records(rows, classifier.clinical.names))
    paths = rows["path"].tolist()
    boxes = lung_boxes(rows)

    def local_from(k: int, box: tuple[int, int, int, int]) -> np.ndarray:
        return local_crop(read_xray(paths[k]).pixels, boxes[k], box, size)

    return {"local_from": local_from if classifier.arch == "agcnn" else None, "codes": codes}
