"""DICOM films, by pydicom: the file meta and the header checked before any pixel is read (sizes,
a deflated body bounded before it is inflated), then the modality LUT (rescale slope/intercept),
the VOI LUT or window when the file has one, and MONOCHROME1 inversion."""

from __future__ import annotations

import io
import re
from typing import Any

import cv2
import numpy as np

from pneumoscan.films.base import (
    DICOM_CODEC_HINT,
    HEADER_ROOM,
    MAX_PIXELS,
    XrayReadError,
    _as_int,
    _check_size,
    _first,
    _min_max,
    _to_uint8_or_16,
    has_dicom_preamble,
)
from pneumoscan.films.raster import colour_fraction


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
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UID(sop_class), UID(uid)
    meta.TransferSyntaxUID = UID(DEFLATED)
    buffer = DicomBytesIO()
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
