"""Stage 1 (read): any chest X-ray file to a float32 picture in [0, 1], 0 = air (black), 1 = bone.

PNG and JPEG are decoded with OpenCV (:mod:`.raster`), DICOM with pydicom (:mod:`.dicom`). Every way
a file can be unusable ends in :class:`XrayReadError` with a sentence a person understands, never a
library's own exception.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from pneumoscan.films.base import (
    BYTES_PER_PIXEL_CAP,
    DICOM_SUFFIXES,
    HEADER_ROOM,
    JPEG_MAGIC,
    MAX_PIXELS,
    MIN_SIDE,
    PNG_MAGIC,
    XrayImage,
    XrayReadError,
    has_dicom_preamble,
)
from pneumoscan.films.dicom import _decode_dicom, check_dicom_header
from pneumoscan.films.raster import _decode_raster

__all__ = ["MAX_PIXELS", "MIN_SIDE", "XrayImage", "XrayReadError", "decode_xray", "display_name", "file_limit",
           "has_dicom_preamble", "is_dicom_file", "read_ahead", "read_xray"]


T = TypeVar("T")
R = TypeVar("R")


def display_name(path: str | Path) -> str:
    """A path as printable UTF-8 text: bytes that are not UTF-8 (kept by Python as lone
    surrogates) shown as ``\\xNN``, so one odd file name can be written to JSON, CSV or a
    terminal instead of stopping a batch."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def file_limit(max_pixels: int = MAX_PIXELS) -> int:
    """The largest file read for ``max_pixels``: checked before any byte is read."""
    return BYTES_PER_PIXEL_CAP * max_pixels + HEADER_ROOM


def read_xray(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> XrayImage:
    """Read a PNG, JPEG or DICOM file. Raises :class:`XrayReadError` for anything unusable.
    Nothing is read into memory before the file's size, and a DICOM file's header (frames, rows,
    columns), pass their limits."""
    path, name = Path(path), display_name(path)
    try:
        info = path.stat()
        size = info.st_size
        if stat.S_ISDIR(info.st_mode):
            raise XrayReadError(f"{name}: is a folder, not an image file")
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the reader forever; a device never ends
            raise XrayReadError(f"{name}: not a regular file (a pipe, socket or device), not read")
        if size > file_limit(max_pixels):
            raise XrayReadError(f"{name}: {size:,} bytes is above the {file_limit(max_pixels):,}-byte file limit "
                                f"for {max_pixels:,} pixels (refused unread to protect memory)")
        with open(path, "rb") as handle:
            head = handle.read(132)
            if has_dicom_preamble(head) or path.suffix.lower() in DICOM_SUFFIXES:
                handle.seek(0)
                check_dicom_header(handle, name, max_pixels, force=not has_dicom_preamble(head))
            handle.seek(0)
            data = handle.read()
    except FileNotFoundError:
        raise XrayReadError(f"{name}: no such file") from None
    except OSError as exc:
        raise XrayReadError(f"{name}: cannot be opened ({exc.strerror or exc})") from exc
    image = decode_xray(data, name=name, max_pixels=max_pixels)
    image.meta["path"] = name
    return image


def read_ahead(fn: Callable[[T], R], items: Iterable[T], *, threads: int = 2, ahead: int = 16) -> Iterator[R]:
    """``map(fn, items)`` in order, with ``fn`` running on ``threads`` threads at most ``ahead``
    items in front of the consumer: decoding (OpenCV and pydicom's codecs release the GIL) overlaps
    the model work, and memory stays bounded however many files there are."""
    if threads <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="pneumoscan-read") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def is_dicom_file(path: str | Path) -> bool:
    """:func:`has_dicom_preamble` of a file's first bytes; False when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return has_dicom_preamble(handle.read(132))
    except OSError:
        return False


def decode_xray(data: bytes, *, name: str = "<upload>", max_pixels: int = MAX_PIXELS) -> XrayImage:
    """Decode X-ray bytes (an upload, say); ``name`` is used in messages and to spot ``.dcm``."""
    if len(data) == 0:
        raise XrayReadError(f"{name}: the file is empty (0 bytes)")
    if data.startswith(PNG_MAGIC):
        pixels, meta = _decode_raster(data, "png", name, max_pixels)
    elif data.startswith(JPEG_MAGIC):
        pixels, meta = _decode_raster(data, "jpeg", name, max_pixels)
    elif has_dicom_preamble(data) or Path(name).suffix.lower() in DICOM_SUFFIXES:
        pixels, meta = _decode_dicom(data, name, max_pixels)
    else:
        raise XrayReadError(f"{name}: not a PNG, JPEG or DICOM file (unrecognised content)")
    span = float(pixels.max() - pixels.min())
    if not np.isfinite(span):
        raise XrayReadError(f"{name}: pixel values are not finite numbers")
    if span < 1e-6:
        raise XrayReadError(
            f"{name}: every pixel has the same value, so the image shows nothing to read"
        )
    return XrayImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32), meta=meta)
