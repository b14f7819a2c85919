"""Crops shared between commands: ``evaluate``, ``calibrate`` and ``compare`` read, segment and
crop a film once per preprocessing, whichever of them comes first, and the next one takes the crop
from disk.

A crop is kept under the per-user cache (:func:`pneumoscan.backends.onnx.cache_root`, i.e.
``$PNEUMOSCAN_CACHE`` or ``~/.cache/pneumoscan``) in ``crops/``, in a folder named by what makes
it: the lung model's SHA-256 (weights and metadata), the crop size, whether the lungs are masked
and the version of the code that crops (PneumoScan's version and its clean-up resolution); the
file is named by the film's SHA-256, so a film renamed or moved is found again and a
film changed in place is not. The store is bounded (``PNEUMOSCAN_CROP_CACHE_MB``, default 2,048
MiB): past it the least recently used crops are removed. ``PNEUMOSCAN_CROP_CACHE_MB=0`` turns it
off. Unreadable films are never stored (they are tried again). Each entry is written under a
temporary name and renamed, so a crash leaves no half entry, and an entry that does not load is
treated as absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.modelfile import atomic_write_bytes

DEFAULT_LIMIT_MB = 2048
#: the record fields a crop carries (the box and what the crop step found)
FIELDS = ("x0", "y0", "x1", "y1", "fallback", "lung_fraction")


def limit_from_env() -> int:
    """``PNEUMOSCAN_CROP_CACHE_MB`` in bytes (a clear ValueError for anything but a size)."""
    raw = os.environ.get("PNEUMOSCAN_CROP_CACHE_MB", str(DEFAULT_LIMIT_MB))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"PNEUMOSCAN_CROP_CACHE_MB={raw[:40]!r}: expected a size in MiB (0 turns the shared crop "
                         f"cache off)")
    return int(value * 2**20)


class CropStore:
    """Crops on disk for one preprocessing (lung model, size, masking)."""

    def __init__(self, lung_sha256: str, size: int, masked: bool, root: Path | None = None,
                 limit_bytes: int | None = None):
        from pneumoscan import __version__
        from pneumoscan.backends.onnx import cache_root
        from pneumoscan.segment import WORK_SIDE

        # the code that crops is part of what makes a crop: another version starts afresh
        code = hashlib.sha256(f"{__version__}:{WORK_SIDE}".encode()).hexdigest()[:8]
        name = f"{lung_sha256[:16]}-{size}-{'masked' if masked else 'plain'}-{code}"
        self.folder = (root or cache_root().parent / "crops") / name
        self.limit = limit_bytes if limit_bytes is not None else limit_from_env()
        self.size = size

    @classmethod
    def for_segmenter(cls, segmenter, size: int, masked: bool) -> CropStore | None:
        """The store for this lung model's crops; None when turned off or the model has no hash."""
        store = cls(str(segmenter.meta.get("sha256") or ""), size, masked)
        return store if store.limit > 0 and segmenter.meta.get("sha256") else None

    def _path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.npz"

    def get(self, digest: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The crop and its record fields, or None (absent, or an entry that does not load)."""
        path = self._path(digest)
        try:
            with np.load(path) as data:
                crop, fields = data["crop"], json.loads(str(data["fields"]))
            os.utime(path)  # recently used: kept longest
        except (OSError, ValueError, KeyError):
            return None
        if crop.shape != (self.size, self.size) or crop.dtype != np.uint8:
            return None
        return crop, fields

    def put(self, digest: str, crop: np.ndarray, fields: dict[str, Any]) -> None:
        """Keep a crop (best effort: a full disk only means it is made again next time)."""
        path = self._path(digest)
        buffer = io.BytesIO()
        np.savez(buffer, crop=crop, fields=np.array(json.dumps({k: _plain(fields[k]) for k in FIELDS})))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue(), sync=False)  # a lost crop is only made again
        except OSError:
            return

    def trim(self) -> int:
        """Remove the least recently used entries past the limit; how many were removed."""
        entries = []
        for path in self.folder.glob("*/*.npz"):
            try:
                info = path.stat()
            except OSError:
                continue
            entries.append((info.st_mtime, info.st_size, path))
        total, removed = sum(size for _, size, _ in entries), 0
        for _, size, path in sorted(entries):
            if total <= self.limit:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars to Python, NaN to None."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value
