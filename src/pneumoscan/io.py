"""Stage 1 (read): any chest X-ray file to a float32 picture in [0, 1], 0 = air (black), 1 = bone.

PNG and JPEG are decoded with OpenCV (the fastest decoder measured here, ``../shared/STACK.md``);
DICOM with pydicom, applying the modality LUT (rescale slope/intercept), then the VOI LUT or
window when the file has one, then MONOCHROME1 inversion. Every way a file can be unusable ends
in :class:`XrayReadError` with a sentence a person understands, never a library's own exception.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from pneumoscan.errors import PneumoScanError

#: Refuse images above this many pixels before decoding them (decompression bombs). The largest
#: common chest radiographs (43×43 cm detectors at 0.1 mm) are about 4,300 × 4,300 = 18.5 M pixels.
MAX_PIXELS = 64_000_000
#: Below this side length a picture cannot hold a usable chest X-ray.
MIN_SIDE = 64
#: Bytes a file may hold per allowed pixel (a 32-bit uncompressed film is 4), plus room for the
#: header: larger files are refused before anything is read into memory.
BYTES_PER_PIXEL_CAP, HEADER_ROOM = 4, 16 * 2**20

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}

DICOM_CODEC_HINT = (
    "install a decoder for it: `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` "
    "(JPEG, JPEG-LS, JPEG 2000) or `pip install python-gdcm`"
)


class XrayReadError(PneumoScanError, ValueError):
    """A file that cannot be read as a chest X-ray; the message says why in plain words."""


@dataclass(frozen=True)
class XrayImage:
    """A decoded X-ray: ``pixels`` is float32 H×W in [0, 1]; ``meta`` describes the file."""

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape  # type: ignore[return-value]


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


T, R = TypeVar("T"), TypeVar("R")


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


def has_dicom_preamble(head: bytes) -> bool:
    """A DICOM Part 10 file whatever its name: "DICM" after the 128-byte preamble (PACS exports
    often have no extension). The one DICOM sniffer of the package."""
    return head[128:132] == b"DICM"


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


def _check_size(name: str, height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise XrayReadError(
            f"{name}: {width}×{height} = {height * width:,} pixels is above the limit of "
            f"{max_pixels:,} (refused to protect memory; pass a larger max_pixels if it is real)"
        )
    if min(height, width) < MIN_SIDE:
        raise XrayReadError(
            f"{name}: {width}×{height} pixels is too small for a chest X-ray "
            f"(each side must be at least {MIN_SIDE})"
        )


def _decode_raster(
    data: bytes, fmt: str, name: str, max_pixels: int
) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image  # header only: size and mode before any pixel is decoded

    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            mode = header.mode
            orientation = _as_int(header.getexif().get(EXIF_ORIENTATION, 1), 1) if fmt == "jpeg" else 1
    except Image.DecompressionBombError as exc:
        raise XrayReadError(f"{name}: refused as a decompression bomb ({exc})") from exc
    except Exception as exc:  # PIL raises many types for broken headers
        detail = re.sub(r"\s*<[^>]*object at 0x[0-9a-f]+>", "", str(exc))  # no memory addresses in messages
        raise XrayReadError(f"{name}: the {fmt.upper()} header is damaged ({detail})") from exc
    _check_size(name, height, width, max_pixels)
    if fmt == "png" and data.rfind(b"IEND") == -1:
        raise XrayReadError(f"{name}: the PNG file is truncated (no end chunk)")
    if fmt == "jpeg" and data[-64:].rfind(b"\xff\xd9") == -1:
        raise XrayReadError(f"{name}: the JPEG file is truncated (no end-of-image marker)")
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise XrayReadError(f"{name}: the {fmt.upper()} data cannot be decoded ({exc})") from exc
    if raw is None:
        raise XrayReadError(f"{name}: the {fmt.upper()} data is corrupt and cannot be decoded")
    colour = 0.0
    if raw.ndim == 3:
        if raw.shape[2] == 4:
            raw = raw[:, :, :3]  # alpha carries no anatomy; NIH's RGBA files are opaque
        if raw.shape[2] == 3:
            colour = colour_fraction(raw)
            raw = cv2.cvtColor(raw, cv2.COLOR_BGR2GRAY)
        else:
            raw = raw[:, :, 0]
    if raw.dtype not in (np.uint8, np.uint16):
        raise XrayReadError(f"{name}: unsupported pixel type {raw.dtype}")
    lo, hi = int(raw.min()), int(raw.max())
    if lo == hi:  # refused before a float copy is made (a small PNG can hold a huge blank picture)
        raise XrayReadError(f"{name}: every pixel has the same value, so the image shows nothing to read")
    if raw.dtype == np.uint8:
        bit_depth, value_range = 8, None
    else:  # 16-bit files often hold 10-14 bit data: scale by the bits the data uses, never by its own min–max
        bit_depth = png_significant_bits(data) if fmt == "png" else None
        bit_depth = bit_depth or significant_bits(hi)
        value_range = [0, 2 ** bit_depth - 1]
    # One float copy, scaled in place: a temporary of the same size would double the peak memory.
    pixels = raw.astype(np.float32)
    del raw
    pixels *= 1.0 / (2 ** bit_depth - 1)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    pixels = exif_upright(pixels, orientation)
    height, width = pixels.shape
    meta = {
        "format": fmt,
        "exif_orientation": orientation,
        "height": int(height),
        "width": int(width),
        "bit_depth": bit_depth,
        "mode": mode,
        "photometric": None,
        "view_position": None,
        "inverted": False,
        "windowed": False,
        "value_range": value_range,
        "colour_fraction": colour,
    }
    return pixels, meta


#: Channels further apart than this (of the channel's full scale) make a pixel "coloured".
COLOUR_STEP = 24 / 255


def colour_fraction(rgb: np.ndarray) -> float:
    """The share of pixels that are clearly coloured (channels apart by over :data:`COLOUR_STEP`),
    on every other pixel: a film stored as RGB is grey (0.0), an overlay with a heat map or a
    photograph is not. The gate refuses coloured pictures."""
    sample = rgb[::2, ::2].astype(np.int32)
    step = COLOUR_STEP * (255 if rgb.dtype == np.uint8 else 65535)
    spread = sample.max(axis=2) - sample.min(axis=2)
    return round(float((spread > step).mean()), 4)


def tag_value(ds: Any, keyword: str, default: Any = None) -> Any:
    """A header value, or ``default`` when the element cannot be decoded (an unknown VR, a broken
    encoding): one damaged optional tag never stops a read."""
    try:
        return ds.get(keyword, default)
    except Exception:  # noqa: BLE001  (pydicom converts lazily and raises many kinds)
        return default


def made_by_pneumoscan(ds: Any) -> bool:
    """Whether a DICOM header is one of PneumoScan's own results (its manufacturer, or its
    derivation or series description): never a film to score, so results never loop."""
    texts = (tag_value(ds, k) for k in ("Manufacturer", "DerivationDescription", "SeriesDescription"))
    return any(str(t or "").strip().startswith("PneumoScan") for t in texts)


EXIF_ORIENTATION = 0x0112


def significant_bits(highest: int) -> int:
    """The container depth a 16-bit raster's data uses: the least of 8, 10, 12, 14 and 16 bits that
    holds its highest value. Scaling by it (not by the picture's own min–max) gives the same
    picture whether a film is stored in 8 bits, as 8-bit values in 16 bits, or stretched to
    16 bits (×257), and one hot pixel moves the scale only when it crosses a depth."""
    return next(bits for bits in (8, 10, 12, 14, 16) if highest < 2 ** bits)


def png_significant_bits(data: bytes) -> int | None:
    """The grey depth a PNG's ``sBIT`` chunk declares (PNG spec 11.3.3.4), if it has one before
    its image data."""
    at, image = data.find(b"sBIT"), data.find(b"IDAT")
    if at < 4 or (0 <= image < at) or at + 5 > len(data):
        return None
    bits = data[at + 4]
    return int(bits) if 1 <= bits <= 16 else None


def exif_upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF Orientation (1–8) so the picture stands as the camera meant (a phone photo
    of a film is stored sideways with orientation 6 or 8); OpenCV's unchanged decode ignores it."""
    turned = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
              5: lambda a: a.T, 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].T,
              8: lambda a: np.rot90(a, 1)}.get(orientation)
    return np.ascontiguousarray(turned(pixels)) if turned else pixels


#: Deflated Explicit VR Little Endian: pydicom inflates such a body in one unbounded call, so a
#: 2 MB file can become gigabytes before any size check; :func:`inflated` bounds it first.
DEFLATED = "1.2.840.10008.1.2.1.99"
_EXPLICIT_LE = b"1.2.840.10008.1.2.1\x00"
#: Explicit-VR value representations with a 4-byte length (after 2 reserved bytes).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def file_meta_layout(data: bytes) -> tuple[int, str | None, tuple[int, int] | None, int | None]:
    """Where a DICOM file's meta group (0002, explicit VR little endian) ends, its transfer
    syntax UID, the span of that UID's length field and value, and the offset of the group
    length's value; (0, None, None, None) for a file without the DICM preamble."""
    if not has_dicom_preamble(data):
        return 0, None, None, None
    at, syntax, span, group_length = 132, None, None, None
    while at + 8 <= len(data) and int.from_bytes(data[at:at + 2], "little") == 0x0002:
        element, vr = int.from_bytes(data[at + 2:at + 4], "little"), data[at + 4:at + 6]
        if vr in _LONG_VRS:
            length, value = int.from_bytes(data[at + 8:at + 12], "little"), at + 12
        else:
            length, value = int.from_bytes(data[at + 6:at + 8], "little"), at + 8
        if element == 0x0000:
            group_length = value
        elif element == 0x0010:
            syntax, span = data[value:value + length].rstrip(b"\x00 ").decode("ascii", "replace"), (at + 6, value + length)
        at = value + length
    return at, syntax, span, group_length


def file_meta_bytes(handle: Any) -> bytes:
    """A file's first bytes through its meta group, read by the group length (0002,0000) that
    opens it, so that a header check reads a few hundred bytes, not the film; without that
    element, at most :data:`HEADER_ROOM` bytes."""
    head = handle.read(144)
    if has_dicom_preamble(head) and head[132:138] == b"\x02\x00\x00\x00UL":
        return head + handle.read(min(int.from_bytes(head[140:144], "little"), HEADER_ROOM))
    return head + handle.read(HEADER_ROOM - len(head))


def inflated(data: bytes, name: str, max_pixels: int) -> bytes:
    """A Deflated Explicit VR Little Endian file as the same file in Explicit VR Little Endian,
    inflated only as far as its own header allows: first at most :data:`HEADER_ROOM` bytes, whose
    header must declare an image within ``max_pixels``, then at most that image's bytes more.
    Anything else is returned unchanged. A compressed-size bomb is refused while inflating, so it
    costs at most what an honest film of its declared size would."""
    import zlib

    end, syntax, span, group_length = file_meta_layout(data)
    if syntax != DEFLATED or span is None:
        return data
    stream = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = stream.decompress(data[end:], HEADER_ROOM)
        meta = data[:span[0]] + len(_EXPLICIT_LE).to_bytes(2, "little") + _EXPLICIT_LE + data[span[1]:end]
        if group_length is not None:
            fixed = int.from_bytes(data[group_length:group_length + 4], "little") + len(meta) - end
            if not 0 <= fixed < 2**32:  # found by the fuzz campaign: a group length of 0
                raise XrayReadError(f"{name}: its file meta group length is wrong (the file is damaged)")
            meta = meta[:group_length] + fixed.to_bytes(4, "little") + meta[group_length + 4:]
        header = _parse_dicom(io.BytesIO(meta + body), name, force=False, header_only=True)
        rows, cols = _check_dicom_size(header, name, max_pixels)
        samples = _as_int(tag_value(header, "SamplesPerPixel", 1), 1)
        per_pixel = samples * -(-_as_int(tag_value(header, "BitsAllocated", 16), 16) // 8)
        room = rows * cols * max(per_pixel, 1) + HEADER_ROOM
        body += stream.decompress(stream.unconsumed_tail, room - len(body) + 1)
    except zlib.error as exc:
        raise XrayReadError(f"{name}: the deflated DICOM body cannot be inflated ({exc})") from exc
    if len(body) > room or stream.unconsumed_tail:
        raise XrayReadError(f"{name}: the deflated DICOM body inflates past the {room:,} bytes its "
                            f"{rows} x {cols} image needs (refused while inflating, to protect memory)")
    return meta + body


def inflated_instance(raw: bytes, sop_class: str, uid: str, max_pixels: int = MAX_PIXELS) -> bytes:
    """A dataset received over the network in Deflated Explicit VR Little Endian (the bytes after
    the file meta, as DIMSE carries them) as a whole file in Explicit VR Little Endian, inflated
    with the same bounds as a file (:func:`inflated`); :class:`XrayReadError` for a bomb."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = sop_class, uid, DEFLATED
    buffer = io.BytesIO()
    buffer.write(bytes(128) + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return inflated(buffer.getvalue() + raw, uid, max_pixels)


def _parse_dicom(source: Any, name: str, *, force: bool, header_only: bool = False) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(source, force=force, stop_before_pixels=header_only)
    except InvalidDicomError as exc:
        raise XrayReadError(f"{name}: not a valid DICOM file ({exc})") from exc
    except Exception as exc:  # broken element encodings raise many types
        raise XrayReadError(f"{name}: the DICOM header cannot be parsed ({exc})") from exc


def _check_dicom_size(ds: Any, name: str, max_pixels: int) -> tuple[int, int]:
    """Rows and columns of a single-frame DICOM within the pixel limit, else XrayReadError."""
    frames = _as_int(tag_value(ds, "NumberOfFrames", 1), default=1)
    if frames > 1:
        raise XrayReadError(
            f"{name}: multi-frame DICOM ({frames} frames); PneumoScan reads single radiographs"
        )
    rows, cols = _as_int(tag_value(ds, "Rows"), 0), _as_int(tag_value(ds, "Columns"), 0)
    if rows <= 0 or cols <= 0:
        raise XrayReadError(f"{name}: the DICOM file does not say its image size (Rows/Columns)")
    _check_size(name, rows, cols, max_pixels)
    return rows, cols


def check_dicom_header(handle: Any, name: str, max_pixels: int, *, force: bool = False) -> None:
    """Frames and size from a DICOM file's header alone (parsing stops before the pixel data),
    so that a huge multi-frame file is refused without reading its pixels. A deflated file's
    header lies inside its compressed body: :func:`inflated` checks it, bounded, when decoding."""
    start = handle.tell()
    if file_meta_layout(file_meta_bytes(handle))[1] == DEFLATED:
        return
    handle.seek(start)
    ds = _parse_dicom(handle, name, force=force, header_only=True)
    if "Rows" in ds or "NumberOfFrames" in ds:
        _check_dicom_size(ds, name, max_pixels)


def _decode_dicom(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    plain = inflated(data, name, max_pixels)
    deflated, data = plain is not data, plain  # inflated() returns other bytes only for a deflated file
    ds = _parse_dicom(io.BytesIO(data), name, force=not has_dicom_preamble(data))
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise XrayReadError(
            f"{name}: the DICOM file has no pixel data (a report or structured document?)"
        )
    rows, cols = _check_dicom_size(ds, name, max_pixels)

    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    tsyntax_name = _uid_name(DeflatedExplicitVRLittleEndian if deflated else tsyntax) if tsyntax else "implicit little endian"
    try:
        arr = ds.pixel_array
    except NotImplementedError as exc:
        raise XrayReadError(
            f"{name}: no installed decoder handles its transfer syntax '{tsyntax_name}'; "
            f"{DICOM_CODEC_HINT}"
        ) from exc
    except RuntimeError as exc:  # decoders present, but every one of them failed
        detail = str(exc).strip().splitlines()[-1].strip()
        raise XrayReadError(
            f"{name}: the installed decoders failed on its '{tsyntax_name}' pixel data "
            f"({detail}); if other viewers open it, {DICOM_CODEC_HINT}"
        ) from exc
    except Exception as exc:
        raise XrayReadError(f"{name}: the DICOM pixel data cannot be decoded ({exc})") from exc

    photometric = str(tag_value(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        values, windowed, colour = _dicom_to_unit(arr, ds, photometric)
    except XrayReadError as exc:
        raise XrayReadError(f"{name}: {exc}") from None
    except Exception as exc:  # the message may quote tag text: only its kind is reported
        raise XrayReadError(f"{name}: the DICOM grey-level tags are inconsistent (window, rescale or "
                            f"LUT values cannot be used: {type(exc).__name__})") from exc
    # MONOCHROME1 shows low values white. A MONOCHROME2 image with Presentation LUT Shape INVERSE
    # is shown inverted too (for MONOCHROME1 that shape is the standard's normal case, not a
    # second inversion).
    presentation = str(tag_value(ds, "PresentationLUTShape", "")).strip().upper()
    inverted = photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and presentation == "INVERSE")
    if inverted:
        values = 1.0 - values
    meta = {
        "format": "dicom",
        "height": int(rows),
        "width": int(cols),
        "bit_depth": _as_int(tag_value(ds, "BitsStored", tag_value(ds, "BitsAllocated", 0)), 0),
        "mode": None,
        "photometric": photometric,
        "view_position": code_string(tag_value(ds, "ViewPosition")),
        "modality": code_string(tag_value(ds, "Modality")),
        "body_part": code_string(tag_value(ds, "BodyPartExamined")),
        # Patient information a model may fuse (pneumoscan.clinical); never in outputs.
        "patient_age": code_string(tag_value(ds, "PatientAge")),
        "patient_sex": code_string(tag_value(ds, "PatientSex")),
        "transfer_syntax": tsyntax_name,
        "inverted": inverted,
        "windowed": windowed if windowed != "colour" else False,
        "value_range": None,
        "colour_fraction": colour,
        "made_by_pneumoscan": made_by_pneumoscan(ds),
    }
    return values.astype(np.float32), meta


def _dicom_to_unit(arr: np.ndarray, ds: Any, photometric: str) -> tuple[np.ndarray, str | bool, float]:
    """Stored values → modality values → VOI (LUT or window) → [0, 1]; how it was windowed, and
    the picture's :func:`colour_fraction` (0 for a grey film)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        photometric = "RGB"
    if arr.ndim == 3:  # RGB / YBR (pydicom already converted YBR to RGB)
        stored = _to_uint8_or_16(arr)
        grey = cv2.cvtColor(stored, cv2.COLOR_RGB2GRAY).astype(np.float64)
        return grey / (255.0 if stored.dtype == np.uint8 else 65535.0), "colour", colour_fraction(stored)
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        lut = _lut_values(ds.VOILUTSequence[0])
        out = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        lo, hi = float(lut.min()), float(lut.max())
        return np.clip((out - lo) / max(hi - lo, 1e-12), 0.0, 1.0), "voi_lut", 0.0
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is not None and width is not None:
        c, w = _first(centre), _first(width)
        step = abs(float(ds.get("RescaleSlope", 1) or 1))
        if 0 < w < step:  # every pixel lands on one side of the window: a black-and-white film
            raise XrayReadError(f"the window width ({w:.3g}) is narrower than one stored grey step ({step:.3g}), "
                                f"so the window would leave two grey levels; the file's window tags are broken")
        if w > 0:
            function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
            return window(values, c, w, function), "window", 0.0
    return stored_range_to_unit(values, ds), False, 0.0


def stored_range_to_unit(values: np.ndarray, ds: Any) -> np.ndarray:
    """Modality values of a film without a VOI → [0, 1] by the range its stored bits can hold
    (Bits Stored, Pixel Representation, through the modality rescale), never by the film's own
    min–max: the same 8-bit pixels in a PNG and in a DICOM give the same picture, and one hot
    pixel cannot darken the rest."""
    from pydicom.pixels import apply_modality_lut

    bits = _as_int(ds.get("BitsStored", ds.get("BitsAllocated", 8)), 8)
    bits = min(max(bits, 1), 32)
    signed = _as_int(ds.get("PixelRepresentation", 0), 0) == 1
    extremes = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2 ** bits - 1])
    lo, hi = sorted(float(v) for v in np.asarray(apply_modality_lut(extremes, ds), np.float64))
    if hi <= lo:
        return _min_max(values)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _lut_values(item: Any) -> np.ndarray:
    """LUT Data as numbers: stored as US (a list) or, also permitted, OW (raw 16-bit words)."""
    data = item.LUTData
    if isinstance(data, bytes | bytearray):
        entries = _as_int(item.LUTDescriptor[0], 0) or 65536
        return np.frombuffer(data, "<u1" if len(data) == entries else "<u2").astype(np.float64)
    return np.asarray(data if hasattr(data, "__len__") else [data], dtype=np.float64)


def code_string(value: Any) -> str | None:
    """A DICOM code string (ViewPosition, Modality, ...) as safe text: upper-case letters, digits,
    spaces and underscores, at most 16 characters; tag text never leaves the reader verbatim."""
    text = re.sub(r"[^A-Z0-9 _]", "", str(value or "").upper()).strip()[:16]
    return text or None


def _uid_name(uid: Any) -> str:
    """A transfer syntax's registered name, or its UID reduced to digits and dots."""
    name = getattr(uid, "name", "")
    if name and name != str(uid):
        return name
    return re.sub(r"[^0-9.]", "", str(uid))[:64] or "unknown"


def window(values: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) mapped straight to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - centre) / width + 0.5, 0.0, 1.0)
    w = max(width - 1.0, 1e-12)
    return np.clip((values - (centre - 0.5)) / w + 0.5, 0.0, 1.0)


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _to_uint8_or_16(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.uint8 if arr.max() <= 255 else np.uint16)


def _first(value: Any) -> float:
    """Window tags may be multi-valued; the first pair is the default view."""
    if hasattr(value, "__len__") and not isinstance(value, str | bytes):
        value = value[0]
    return float(value)


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
