"""Bad-input campaign: mutated PNG, JPEG and DICOM bytes end in a picture or an XrayReadError
(reader), a Prediction with ``error`` (predictor) or a 4xx (server) — never another exception,
never a 500.

Examples per property: ``PNEUMOSCAN_FUZZ_EXAMPLES`` (default 150 for the reader, a fifth of that
for the model-running properties); set it to thousands for a long campaign.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import cv2
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from pneumoscan.films import XrayImage, XrayReadError, decode_xray

from conftest import DATA

EXAMPLES = int(os.environ.get("PNEUMOSCAN_FUZZ_EXAMPLES", "150"))
SLOW_EXAMPLES = max(10, EXAMPLES // 5)
COMMON = {"deadline": 5000, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    grey = (rng.random((96, 80)) * 255).astype(np.uint8)
    seeds = {
        "png8": cv2.imencode(".png", grey)[1].tobytes(),
        "png16": cv2.imencode(".png", (grey.astype(np.uint16) * 16))[1].tobytes(),
        "png_rgb": cv2.imencode(".png", np.dstack([grey] * 3))[1].tobytes(),
        "jpeg": cv2.imencode(".jpg", grey)[1].tobytes(),
        "dicom_mr": open(get_testdata_file("MR_small.dcm"), "rb").read(),
        "dicom_rgb": open(get_testdata_file("SC_rgb_small_odd.dcm"), "rb").read(),
        "dicom_j2k": open(get_testdata_file("MR_small_jp2klossless.dcm"), "rb").read(),
    }
    nih = DATA / "nih-cxr14" / "images" / "00000100_000.png"
    if nih.exists():  # a real chest X-ray, shrunk so each example stays fast
        small = cv2.resize(cv2.imread(str(nih), cv2.IMREAD_GRAYSCALE), (128, 128), interpolation=cv2.INTER_AREA)
        seeds["nih_png"] = cv2.imencode(".png", small)[1].tobytes()
        seeds["nih_jpeg"] = cv2.imencode(".jpg", small)[1].tobytes()
        seeds["nih_cr_deflated"] = _deflated_cr(small)
    seeds["dicom_mr_deflated"] = _deflated_bytes(pydicom.dcmread(get_testdata_file("MR_small.dcm")))
    return seeds


def _deflated_bytes(ds: pydicom.Dataset) -> bytes:
    """``ds`` as a Deflated Explicit VR Little Endian file (the deflate path's seeds)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _deflated_cr(grey: np.ndarray) -> bytes:
    """A 12-bit CR instance of an 8-bit film, deflated: what a modality may send the listener."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid(entropy_srcs=["fuzz-cr"])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid(entropy_srcs=["fuzz-study"])
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "CR", "PA", "CHEST"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (grey.astype(np.uint16) * 16).tobytes()
    return _deflated_bytes(ds)


SEEDS = _seeds()


def _png_with_header(width: int, height: int, bit_depth: int, colour: int) -> bytes:
    """A PNG whose IHDR claims any size/format, with a tiny (wrong-sized) image stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@st.composite
def mutated(draw, seeds: tuple[str, ...] | None = None) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(seeds or SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "header"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "truncate":
            data = data[:at]
        elif op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at:at + len(chunk)] = chunk
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:  # damage the first bytes, where the format is recognised
            data[: min(16, len(data))] = draw(st.binary(min_size=min(16, len(data)), max_size=min(16, len(data))))
    return bytes(data)


def _check_reader(data: bytes, name: str) -> XrayImage | None:
    try:
        image = decode_xray(data, name=name)
    except XrayReadError:
        return None
    assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2
    assert np.isfinite(image.pixels).all()
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    return image


@settings(max_examples=EXAMPLES, **COMMON)
@given(data=mutated(), suffix=st.sampled_from(["x.png", "x.jpg", "x.dcm", "upload"]))
def test_reader_never_fails_otherwise(data, suffix):
    _check_reader(data, suffix)


@settings(max_examples=EXAMPLES, **COMMON)
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1),
       depth=st.sampled_from([1, 2, 4, 8, 16, 3, 0]), colour=st.sampled_from([0, 2, 3, 4, 6, 5]))
def test_absurd_png_headers_are_refused_before_decoding(width, height, depth, colour):
    _check_reader(_png_with_header(width, height, depth, colour), "absurd.png")


@settings(max_examples=EXAMPLES, **COMMON)
@given(rows=st.integers(0, 65_535), cols=st.integers(0, 65_535),
       photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "bogus"]),
       bits=st.sampled_from([1, 8, 12, 16, 32]), signed=st.booleans(),
       frames=st.sampled_from([None, "1", "2", "0"]),
       window=st.sampled_from([None, (40.0, 400.0), (0.0, 0.0), (1e9, -5.0)]))
def test_dicom_with_wrong_tags_is_refused_or_read(rows, cols, photometric, bits, signed, frames, window):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows, ds.Columns, ds.PhotometricInterpretation = rows, cols, photometric
    ds.BitsStored = bits
    ds.PixelRepresentation = int(signed)
    if frames is not None:
        ds.NumberOfFrames = frames
    if window is None:
        for tag in ("WindowCenter", "WindowWidth"):
            if tag in ds:
                del ds[tag]
    else:
        ds.WindowCenter, ds.WindowWidth = window
    buffer = io.BytesIO()
    ds.save_as(buffer)
    _check_reader(buffer.getvalue(), "tags.dcm")


@pytest.fixture(scope="module")
def predictor(assessed_model):
    from pneumoscan.predict import Predictor

    return Predictor.from_paths(cls_model=assessed_model)


def _check_prediction(result) -> None:
    """An error, a refusal by the input gate (with reasons), or scores for the assessed labels."""
    if result.error is not None:
        assert result.probabilities is None
    elif not result.quality.frontal_chest:
        assert result.probabilities is None and result.findings is None and result.quality.reasons
    else:
        values = result.probabilities
        assert len(values) == 15 and all(values[l] is None for l in result.not_assessed)
        assert all(0 <= v <= 1 for v in values.values() if v is not None)


@settings(max_examples=SLOW_EXAMPLES, **COMMON)
@given(data=mutated())
def test_predictor_turns_bad_bytes_into_errors(predictor, data):
    _check_prediction(predictor.predict(data, cam="top", name="fuzz"))


@settings(max_examples=SLOW_EXAMPLES, **COMMON)
@given(array=st.one_of(
    st.just(np.full((100, 100), np.nan, np.float32)), st.just(np.zeros((100, 100), np.float32)),
    st.just(np.ones((100, 100, 3), np.float32)), st.just(np.full((100, 100), 7.0, np.float32)),
    st.integers(1, 300).map(lambda n: np.random.default_rng(n).random((n, 300)).astype(np.float32))))
def test_predictor_refuses_unusable_arrays(predictor, array):
    _check_prediction(predictor.predict(array))


@pytest.fixture(scope="module")
def client(predictor):
    from fastapi.testclient import TestClient

    from pneumoscan.apps.server import create_app

    return TestClient(create_app(predictor, max_upload_mb=2), raise_server_exceptions=False,
                      base_url="http://localhost")


@settings(max_examples=SLOW_EXAMPLES, **COMMON)
@given(data=mutated(), name=st.text(max_size=40),
       cam=st.sampled_from(["top", "TOP", "none", "Pneumonia", "pneumonia", "Nodule", "x"]))
def test_server_answers_4xx_never_500(client, data, name, cam):
    response = client.post(f"/v1/predict?cam={cam}&images=false", files={"file": (name or "f", data)})
    assert response.status_code in (200, 400, 413, 422), response.text
    body = response.json()
    assert (body.get("error") is not None) == (response.status_code != 200)



@settings(max_examples=EXAMPLES, **COMMON)
@given(orientation=st.one_of(st.integers(0, 9), st.integers(10, 65_535)), side=st.integers(64, 160))
def test_any_exif_orientation_reads_or_is_refused(orientation, side):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(side).random((side, 96)) * 255).astype(np.uint8)).save(
        buffer, "JPEG", exif=exif)
    image = _check_reader(buffer.getvalue(), "exif.jpg")
    if image is not None and orientation in (5, 6, 7, 8):
        assert image.pixels.shape == (96, side)  # turned on its side


@settings(max_examples=EXAMPLES, **COMMON)
@given(entries=st.integers(0, 70_000), first=st.integers(-5, 5_000), bits=st.sampled_from([8, 10, 12, 16, 0, 31]),
       length=st.integers(0, 5_000), as_ow=st.booleans())
def test_voi_lut_sequences_of_any_shape_read_or_are_refused(entries, first, bits, length, as_ow):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    item = Dataset()
    item.LUTDescriptor = [entries % 65_536, first, bits]
    values = (np.arange(length) * 7 % 4096).astype(np.uint16)
    item.add_new(0x00283006, "OW" if as_ow else "US", values.astype("<u2").tobytes() if as_ow else values.tolist())
    ds.VOILUTSequence = Sequence([item])
    buffer = io.BytesIO()
    ds.save_as(buffer)
    _check_reader(buffer.getvalue(), "voi.dcm")


@settings(max_examples=SLOW_EXAMPLES, **COMMON)
@given(size=st.integers(0, 3 * 2**20), chunk=st.integers(1, 2**18), seed=st.sampled_from(sorted(SEEDS)))
def test_chunked_uploads_of_any_size_get_an_answer(client, size, chunk, seed):
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n"
            + (SEEDS[seed] + bytes(size))[: max(size, len(SEEDS[seed]))] + b"\r\n--b--\r\n")
    parts = (body[i:i + chunk] for i in range(0, len(body), chunk))  # no Content-Length: chunked
    response = client.post("/v1/predict?images=false", content=parts,
                           headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code in (200, 400, 413, 422), response.text
    assert (response.json().get("error") is not None) == (response.status_code != 200)


def test_concurrent_huge_header_pngs_get_4xx(client):
    import concurrent.futures

    absurd = [_png_with_header(7_900, 7_900, 8, 0), _png_with_header(60_000, 60_000, 16, 0),
              _png_with_header(2**31 - 1, 1, 8, 2)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda k: client.post("/v1/predict", files={"file": ("h.png", absurd[k % 3])}).status_code,
                              range(24)))
    assert set(codes) <= {400, 503}, codes


@settings(max_examples=EXAMPLES, **COMMON)
@given(data=mutated(), suffix=st.sampled_from([".png", ".jpg", ".dcm", ""]))
def test_file_reader_never_fails_otherwise(tmp_path_factory, data, suffix):
    """The file path: size and DICOM header checked before the bytes are read."""
    from pneumoscan.films import read_xray

    path = tmp_path_factory.mktemp("f") / f"x{suffix}"
    path.write_bytes(data)
    try:
        image = read_xray(path)
    except XrayReadError:
        return
    assert image.pixels.dtype == np.float32 and np.isfinite(image.pixels).all()


@settings(max_examples=EXAMPLES, **COMMON)
@given(name=st.text(max_size=60), error=st.one_of(st.none(), st.text(max_size=60)))
def test_any_name_makes_one_safe_csv_row(name, error):
    """Any file name or error text: one CSV row that reads back as written, no formula cell."""
    import csv

    from pneumoscan.labels import LABELS
    from pneumoscan.outputs.writer import (
        CSV_TAIL,
        csv_line,
        csv_row,
        from_spreadsheet_safe,
    )

    record = {"path": name, "probabilities": None, "findings": None, "not_assessed": None, "quality": None,
              "box": None, "error": error}
    (row,) = list(csv.reader(io.StringIO(csv_line(csv_row(record)), newline="")))
    assert len(row) == 1 + len(LABELS) + len(CSV_TAIL) and from_spreadsheet_safe(row[0]) == name
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row)


@settings(max_examples=SLOW_EXAMPLES, **COMMON)
@given(clinical=st.one_of(st.text(max_size=200), st.just("[" * 50_000), st.just('{"a": ' * 3000)),
       age=st.one_of(st.none(), st.text(max_size=10)))
def test_server_patient_fields_answer_4xx_never_500(client, clinical, age):
    data = {"clinical": clinical} | ({"age": age} if age is not None else {})
    response = client.post("/v1/predict?images=false", files={"file": ("f.png", SEEDS["png8"])}, data=data)
    assert response.status_code in (200, 400, 422), response.text


DEFLATED_SEEDS = tuple(name for name in SEEDS if name.endswith("_deflated"))


@settings(max_examples=EXAMPLES, **COMMON)
@given(data=mutated(DEFLATED_SEEDS))
def test_deflated_dicom_reads_or_is_refused_at_every_door(data):
    """Issue 36's deflate path, damaged anywhere (header, compressed body, its end): a file or an
    upload reads or is an XrayReadError, and the listener's inflation of a network instance (the
    dataset after the file meta, as DIMSE carries it) gives bytes or an XrayReadError."""
    from pneumoscan.films.dicom import file_meta_layout, inflated_instance

    _check_reader(data, "x.dcm")
    try:
        end = file_meta_layout(data)[0]
    except Exception:  # a damaged file meta: the network carries none, so nothing to inflate
        return
    try:
        assert isinstance(inflated_instance(data[end:], "1.2.840.10008.5.1.4.1.1.1", "1.2.3"), bytes)
    except XrayReadError:
        pass


@pytest.fixture(scope="module")
def stow(tmp_path_factory):
    """The listener's STOW-RS door, called as an ASGI app (no socket: thousands of examples)."""
    import asyncio

    pytest.importorskip("pynetdicom", reason="the dicom extra is not installed")
    from pneumoscan.apps.listen import Listener

    root = tmp_path_factory.mktemp("stow")
    app = Listener(None, root / "out", root / "out" / ".spool", queue_size=10**9).stow_app()

    def post(body: bytes, content_type: bytes, path: str = "/studies") -> int:
        sent: list[dict] = []
        chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)] or [b""]

        async def receive():
            chunk = chunks.pop(0) if chunks else b""
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [(b"content-type", content_type)], "client": ("127.0.0.1", 40000),
                 "server": ("127.0.0.1", 8042), "scheme": "http", "root_path": "", "http_version": "1.1"}
        asyncio.run(app(scope, receive, send))
        return sent[0]["status"]

    return post


@st.composite
def stow_bodies(draw) -> tuple[bytes, bytes, str]:
    """A multipart/related body of 0–4 parts (damaged films, deflated ones, random bytes), with
    damaged part headers, boundaries and request content types among them."""
    boundary = draw(st.sampled_from([b"b0undary", b"x" * 70, b"a b", b""]))
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        payload = draw(st.one_of(mutated(), mutated(DEFLATED_SEEDS), st.binary(max_size=256),
                                 st.sampled_from([SEEDS[n] for n in DEFLATED_SEEDS])))
        header = draw(st.sampled_from([b"Content-Type: application/dicom", b"Content-Type: text/plain",
                                       b"Content-Transfer-Encoding: base64", b"\x00\xff", b""]))
        parts.append(b"--" + boundary + b"\r\n" + header + b"\r\n\r\n" + payload + b"\r\n")
    body = b"".join(parts) + draw(st.sampled_from([b"--" + boundary + b"--\r\n", b"", b"--"]))
    content_type = draw(st.sampled_from([
        b'multipart/related; type="application/dicom"; boundary=' + boundary,
        b"multipart/related; boundary=" + boundary, b"multipart/related", b"multipart/related; boundary=\"",
        b"application/dicom", b"multipart/related; type=application/dicom; boundary=other"]))
    path = draw(st.sampled_from(["/studies", "/studies/1.2.3", "/studies/" + "9" * 70]))
    return body, content_type, path


@settings(max_examples=EXAMPLES, **COMMON)
@given(request=stow_bodies())
def test_stow_rs_door_answers_any_body_without_5xx(stow, request):
    """Issue 36: whatever a sender posts to the STOW-RS door is answered with a 2xx or 4xx status,
    never an exception (500) or another 5xx (the queue is never full here)."""
    body, content_type, path = request
    assert stow(body, content_type, path) < 500
