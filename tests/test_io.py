"""Stage 1: every encoding reads to the same kind of picture; every bad file gives XrayReadError."""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from pneumoscan.films import MAX_PIXELS, XrayReadError, decode_xray, read_xray
from pneumoscan.films.dicom import window

from conftest import DATA, needs_data

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}


def _gradient(height: int = 128, width: int = 96) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return ((x + y) / (height + width - 2)).astype(np.float32)


def _write_png(path: Path, array: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), array)
    return path


# --- good files ---------------------------------------------------------------------------


@needs_data
def test_every_image_in_shared_data_reads():
    paths = [p for p in DATA.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
             and "mask" not in p.as_posix().lower()]
    assert len(paths) >= 5_900  # 5,216 Kermany + 150 NIH + 485 Mont/Shen + 87 COVID + 1 DICOM
    for path in paths:
        image = read_xray(path)
        assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2
        assert 0.0 <= image.pixels.min() < image.pixels.max() <= 1.0, path
        assert (image.meta["height"], image.meta["width"]) == image.pixels.shape


@needs_data
def test_nih_png_metadata_and_scale(nih_png):
    image = read_xray(nih_png)
    raw = cv2.imread(str(nih_png), cv2.IMREAD_GRAYSCALE)
    assert image.shape == (1024, 1024)
    assert image.meta["format"] == "png" and image.meta["bit_depth"] == 8
    np.testing.assert_allclose(image.pixels, raw / 255.0, atol=1e-6)


@needs_data
def test_rgba_nih_png_becomes_grey(data_dir):
    rgba = [p for p in (data_dir / "nih-cxr14" / "images").glob("*.png")
            if Image.open(p).mode == "RGBA"]
    assert len(rgba) == 2  # as the data README says
    image = read_xray(rgba[0])
    assert image.meta["mode"] == "RGBA" and image.pixels.ndim == 2


@needs_data
def test_real_dicom_reads_like_its_pixels(siim_dicom):
    image = read_xray(siim_dicom)
    ds = pydicom.dcmread(siim_dicom)
    assert image.meta["format"] == "dicom"
    assert image.meta["photometric"] == "MONOCHROME2" and image.meta["view_position"] == "PA"
    assert image.shape == (1024, 1024) and not image.meta["inverted"]
    # no window in the file → scaled by its 8 stored bits, like an 8-bit PNG (never its own min–max)
    raw = ds.pixel_array.astype(np.float64)
    np.testing.assert_allclose(image.pixels, raw / 255.0, atol=1e-6)
    assert "PatientName" not in str(image.meta)


@needs_data
def test_monochrome1_reads_as_the_same_picture(siim_dicom, tmp_path):
    ds = pydicom.dcmread(siim_dicom)
    inverted = copy.deepcopy(ds)
    inverted.decompress()  # the SIIM file is JPEG-compressed; write the inverse uncompressed
    pixels = ds.pixel_array
    inverted.PixelData = (255 - pixels).astype(np.uint8).tobytes()
    inverted.PhotometricInterpretation = "MONOCHROME1"
    inverted.save_as(tmp_path / "mono1.dcm")
    normal, flipped = read_xray(siim_dicom), read_xray(tmp_path / "mono1.dcm")
    assert flipped.meta["inverted"] and not normal.meta["inverted"]
    np.testing.assert_allclose(flipped.pixels, normal.pixels, atol=1e-6)


def test_sixteen_bit_png_is_scaled_by_the_bits_its_data_uses(tmp_path):
    # 12-bit data stored in a 16-bit PNG: scaled by 4095 (its container depth), not by its own
    # min–max 400..3700, and not by 65535 (which would make it nearly black)
    data = (400 + _gradient() * 3300).astype(np.uint16)
    image = read_xray(_write_png(tmp_path / "x16.png", data))
    assert image.meta["bit_depth"] == 12 and image.meta["value_range"] == [0, 4095]
    np.testing.assert_allclose(image.pixels, data / 4095.0, atol=1e-6)


def test_one_hot_pixel_does_not_rescale_a_sixteen_bit_png(tmp_path):
    data = (_gradient() * 3000).astype(np.uint16)
    hot = data.copy()
    hot[5, 5] = 4000  # still inside 12 bits: the picture must not change
    plain, spiked = read_xray(_write_png(tmp_path / "a.png", data)), read_xray(_write_png(tmp_path / "b.png", hot))
    mask = np.ones(data.shape, bool)
    mask[5, 5] = False
    np.testing.assert_array_equal(plain.pixels[mask], spiked.pixels[mask])


def test_eight_bit_film_reads_alike_from_every_container(tmp_path):
    """The same 8-bit pixels as 8-bit PNG, as 16-bit PNG (×257), and as 8- and 16-bit DICOMs
    without a window give the same picture (SPEC: one intensity convention)."""
    grey = (_gradient() * 255).astype(np.uint8)
    eight = read_xray(_write_png(tmp_path / "x8.png", grey)).pixels
    sixteen = read_xray(_write_png(tmp_path / "x16.png", grey.astype(np.uint16) * 257)).pixels
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for tag in ("WindowCenter", "WindowWidth"):
        del ds[tag]
    ds.Rows, ds.Columns = grey.shape
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    for bits, stored in ((8, grey), (16, grey.astype(np.uint16) * 257)):
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
        ds.PixelData = stored.tobytes()
        ds.save_as(tmp_path / f"x{bits}.dcm")
        np.testing.assert_allclose(read_xray(tmp_path / f"x{bits}.dcm").pixels, eight, atol=1e-6)
    np.testing.assert_allclose(sixteen, eight, atol=1e-6)


def test_colour_and_palette_png_become_grey(tmp_path):
    grey = (_gradient() * 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, axis=-1)
    rgb_img = read_xray(_write_png(tmp_path / "rgb.png", rgb))
    np.testing.assert_allclose(rgb_img.pixels, grey / 255.0, atol=1 / 255)
    Image.fromarray(grey, "L").convert("P").save(tmp_path / "palette.png")
    pal = read_xray(tmp_path / "palette.png")
    assert pal.meta["mode"] == "P" and pal.pixels.ndim == 2
    assert np.abs(pal.pixels - grey / 255.0).mean() < 0.02


def test_jpeg_reads(tmp_path):
    grey = (_gradient() * 255).astype(np.uint8)
    assert cv2.imwrite(str(tmp_path / "x.jpg"), grey, [cv2.IMWRITE_JPEG_QUALITY, 95])
    image = read_xray(tmp_path / "x.jpg")
    assert image.meta["format"] == "jpeg"
    assert np.abs(image.pixels - grey / 255.0).max() < 0.05


def test_signed_ct_with_rescale_and_window():
    path = get_testdata_file("CT_small.dcm")  # signed 16-bit, rescale intercept -1024
    ds = pydicom.dcmread(path)
    assert ds.PixelRepresentation == 1 and float(ds.RescaleIntercept) != 0
    image = read_xray(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if "WindowCenter" in ds:
        assert image.meta["windowed"] == "window"
    else:  # scaled by the range its 16 signed stored bits can hold, through the rescale
        lo = -(2 ** 15) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(image.pixels, (hu - lo) / (65535 * float(ds.RescaleSlope)), atol=1e-5)


def test_window_centre_width_applied():
    image = read_xray(get_testdata_file("MR_small.dcm"))  # has WindowCenter/Width
    assert image.meta["windowed"] == "window"
    assert image.pixels.min() >= 0 and image.pixels.max() <= 1


def test_window_formula_matches_dicom_standard():
    values = np.array([0.0, 99.5, 100.0, 150.0, 300.0])
    out = window(values, centre=100, width=101)  # linear: (x - 99.5) / 100 + 0.5
    np.testing.assert_allclose(out, [0.0, 0.5, 0.505, 1.0, 1.0])
    assert window(np.array([100.0]), 100, 50, "SIGMOID")[0] == pytest.approx(0.5)


def test_twelve_bit_in_sixteen_bit_storage(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    data = (_gradient(64, 64) * 4095).astype(np.uint16)
    ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 0, 16, 12, 11
    ds.PixelData = data.tobytes()
    for tag in ("WindowCenter", "WindowWidth"):
        del ds[tag]
    ds.save_as(tmp_path / "twelve.dcm")
    image = read_xray(tmp_path / "twelve.dcm")
    assert image.meta["bit_depth"] == 12
    np.testing.assert_allclose(image.pixels, data / 4095.0, atol=1e-6)


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
                                  "SC_rgb_jpeg_dcmtk.dcm", "examples_palette.dcm"])
def test_compressed_and_colour_dicoms_decode(name):
    image = read_xray(get_testdata_file(name))
    assert image.pixels.ndim == 2 and image.pixels.max() > image.pixels.min()


def test_decode_bytes_of_upload(tmp_path):
    path = _write_png(tmp_path / "x.png", (_gradient() * 255).astype(np.uint8))
    image = decode_xray(path.read_bytes(), name="upload.png")
    assert image.shape == (128, 96)


# --- bad files ------------------------------------------------------------------------------


def _expect(path_or_bytes, *words: str) -> str:
    with pytest.raises(XrayReadError) as info:
        if isinstance(path_or_bytes, bytes):
            decode_xray(path_or_bytes, name="upload")
        else:
            read_xray(path_or_bytes)
    message = str(info.value)
    for word in words:
        assert word in message, message
    return message


def test_error_is_a_value_error():
    assert issubclass(XrayReadError, ValueError)


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.png", "no such file")


def test_folder(tmp_path):
    _expect(tmp_path, "folder")


def test_zero_bytes(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    _expect(tmp_path / "empty.png", "empty")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("this is a text file, not a radiograph\n" * 20)
    _expect(tmp_path / "notes.png", "not a PNG, JPEG or DICOM")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    assert cv2.imwrite(str(path), (np.random.default_rng(0).random((256, 256)) * 255).astype(np.uint8))
    data = path.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    _expect(tmp_path / f"cut{suffix}", "truncated")


def test_corrupt_png_body(tmp_path):
    path = _write_png(tmp_path / "x.png", (np.random.default_rng(1).random((128, 128)) * 255).astype(np.uint8))
    data = bytearray(path.read_bytes())
    data[60:400] = bytes(340)  # zero the compressed stream but keep header and IEND
    _expect(bytes(data), "corrupt")


def test_damaged_header(tmp_path):
    _expect(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "header")


def test_constant_image(tmp_path):
    _expect(_write_png(tmp_path / "grey.png", np.full((128, 128), 90, np.uint8)), "same value")


def test_too_small(tmp_path):
    _expect(_write_png(tmp_path / "tiny.png", (_gradient(32, 200) * 255).astype(np.uint8)),
            "too small")


@pytest.mark.parametrize("side", [9_000, 20_000])
def test_decompression_bomb_refused_before_decoding(tmp_path, side):
    # A real side × side PNG compresses to a few hundred kB; it must be refused from its header.
    path = tmp_path / "bomb.png"
    Image.new("L", (side, side)).save(path)
    assert path.stat().st_size < 2_000_000 and side * side > MAX_PIXELS
    _expect(path, "limit")


def test_multi_frame_dicom():
    _expect(Path(get_testdata_file("SC_rgb_rle_2frame.dcm")), "multi-frame", "2 frames")


def test_dicom_without_pixel_data():
    _expect(Path(get_testdata_file("rtplan.dcm")), "no pixel data")


def test_dicom_truncated_pixel_data():
    _expect(Path(get_testdata_file("MR_truncated.dcm")), "cannot be decoded")


def test_undecodable_transfer_syntax_names_the_package(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists here
    ds.save_as(tmp_path / "mpeg.dcm")
    _expect(tmp_path / "mpeg.dcm", "MPEG2", "pip install")


def test_not_dicom_with_dcm_suffix(tmp_path):
    (tmp_path / "fake.dcm").write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(XrayReadError):
        read_xray(tmp_path / "fake.dcm")


# --- issue 9: EXIF orientation, VOI LUT as OW, Presentation LUT Shape, no tag text echoed ----


@pytest.mark.parametrize("orientation, upright", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                                  (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_jpeg_exif_orientation_is_applied_and_recorded(tmp_path, orientation, upright):
    picture = (_gradient(120, 80) * 255).astype(np.uint8)
    picture[:20, :20] = 255  # a corner marker makes every turn distinguishable
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(picture).save(tmp_path / "photo.jpg", quality=98, exif=exif)
    image = read_xray(tmp_path / "photo.jpg")
    assert image.meta["exif_orientation"] == orientation
    expected = upright(picture).astype(np.float32) / 255
    assert image.pixels.shape == expected.shape and image.meta["width"] == expected.shape[1]
    assert np.abs(image.pixels - expected).mean() < 0.02


def _mr_with_voi_lut(tmp_path, as_ow: bool) -> Path:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for tag in ("WindowCenter", "WindowWidth"):
        del ds[tag]
    item = Dataset()
    lut = (np.linspace(0, 1, 4096) ** 0.5 * 4095).astype(np.uint16)  # a gamma curve over 0…4095
    item.LUTDescriptor = [4096, 0, 12]
    if as_ow:
        item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())
    else:
        item.add_new(0x00283006, "US", lut.tolist())
    ds.VOILUTSequence = Sequence([item])
    path = tmp_path / f"voi_{'ow' if as_ow else 'us'}.dcm"
    ds.save_as(path)
    return path


def test_voi_lut_data_stored_as_ow_reads_like_us(tmp_path):
    ow, us = read_xray(_mr_with_voi_lut(tmp_path, True)), read_xray(_mr_with_voi_lut(tmp_path, False))
    assert ow.meta["windowed"] == us.meta["windowed"] == "voi_lut"
    np.testing.assert_allclose(ow.pixels, us.pixels, atol=1e-6)


@needs_data
def test_presentation_lut_shape_inverse(siim_dicom, tmp_path):
    ds = pydicom.dcmread(siim_dicom)
    ds.decompress()
    normal = read_xray(siim_dicom).pixels
    ds.PresentationLUTShape = "INVERSE"  # MONOCHROME2 shown inverted
    ds.save_as(tmp_path / "inverse.dcm")
    inverse = read_xray(tmp_path / "inverse.dcm")
    assert inverse.meta["inverted"]
    np.testing.assert_allclose(inverse.pixels, 1 - normal, atol=1e-6)
    ds.PixelData = (255 - ds.pixel_array).astype(np.uint8).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"  # with INVERSE: the standard's normal case, one inversion
    ds.save_as(tmp_path / "mono1.dcm")
    np.testing.assert_allclose(read_xray(tmp_path / "mono1.dcm").pixels, normal, atol=1e-6)


def test_dicom_tag_text_is_never_echoed(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.ViewPosition = "<b>LL</b>"
    ds.save_as(tmp_path / "view.dcm")
    assert read_xray(tmp_path / "view.dcm").meta["view_position"] == "BLLB"
    ds.add_new(0x00281050, "LO", "EVIL<script>alert(1)</script>")  # WindowCenter holding text
    ds.save_as(tmp_path / "evil.dcm")
    with pytest.raises(XrayReadError) as caught:
        read_xray(tmp_path / "evil.dcm")
    assert "script" not in str(caught.value) and "EVIL" not in str(caught.value)
    assert "inconsistent" in str(caught.value)


def _sparse_multiframe(path: Path, frames: int, side: int = 2048) -> None:
    """A multi-frame DICOM whose pixel data is a hole in the file (sparse): large on disk by
    its size, no real bytes behind it."""
    import struct

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.NumberOfFrames, ds.Rows, ds.Columns = "DX", frames, side, side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.save_as(path, enforce_file_format=True)
    size = frames * side * side * 2
    with open(path, "ab") as handle:
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size))
        handle.truncate(handle.tell() + size)


@pytest.mark.parametrize("frames", [256, 20])  # 2 GiB (over the file limit), 160 MiB (refused by its header)
def test_huge_multi_frame_dicom_is_refused_without_reading_it(tmp_path, frames):
    """It used to be read whole first: 4.7 GB of memory to refuse a sparse 2 GiB file."""
    import subprocess
    import sys

    path = tmp_path / "huge.dcm"
    _sparse_multiframe(path, frames)
    probe = ("import resource, sys\n"
             "from pneumoscan.films import read_xray, XrayReadError\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "try:\n    read_xray(sys.argv[1])\nexcept XrayReadError as exc:\n    print(exc)\n"
             "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    run = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120, check=False)
    message, grown_mb = run.stdout.strip().splitlines()
    assert ("file limit" if frames == 256 else "multi-frame DICOM (20 frames)") in message, run.stdout + run.stderr
    assert int(grown_mb) < 50, f"refusing it took {grown_mb} MB more memory"


@pytest.mark.parametrize("width, function", [(1e-300, "LINEAR"), (1e-9, "SIGMOID"), (0.5, "LINEAR_EXACT")])
def test_a_window_narrower_than_one_grey_step_is_refused(tmp_path, width, function):
    """It turned the film into two grey levels, which the gate accepted (No Finding 1.0)."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 600, width, function
    ds.save_as(tmp_path / "w.dcm")
    _expect(tmp_path / "w.dcm", "narrower than one stored grey step", "w.dcm")
    ds.WindowWidth = 400  # a sane window on the same film reads
    ds.save_as(tmp_path / "w.dcm")
    assert read_xray(tmp_path / "w.dcm").meta["windowed"] == "window"


def test_an_undecodable_optional_tag_does_not_stop_a_read(tmp_path):
    """Found by the 10,000-input campaign: Manufacturer with an unknown VR ('MO') raised
    NotImplementedError from the loop guard's look at the header."""
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    assert b"\x08\x00p\x00LO" in data
    (tmp_path / "mo.dcm").write_bytes(data.replace(b"\x08\x00p\x00LO", b"\x08\x00p\x00MO", 1))
    image = read_xray(tmp_path / "mo.dcm")
    assert image.meta["made_by_pneumoscan"] is False and image.pixels.shape == (64, 64)


def test_a_damaged_size_tag_is_refused_in_one_line(tmp_path):
    """Found by the campaign: Columns stored in 3 bytes raised pydicom's BytesLengthException from
    the header check of a file."""
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    columns = b"(\x00\x11\x00US\x02\x00@\x00"
    assert columns in data
    (tmp_path / "cols.dcm").write_bytes(data.replace(columns, b"(\x00\x11\x00US\x03\x00@\x00(", 1))
    _expect(tmp_path / "cols.dcm", "cols.dcm")


def _deflated(ds: pydicom.Dataset, path: Path, junk_mib: int = 0) -> Path:
    """``ds`` saved as Deflated Explicit VR Little Endian, with ``junk_mib`` MiB of zeros
    appended inside the compressed body (a compressed-size bomb: about 1 KB on disk per MiB)."""
    import io
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from pneumoscan.films.dicom import file_meta_layout

    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    end = file_meta_layout(raw)[0]
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [raw[:end], packer.compress(zlib.decompress(raw[end:], -zlib.MAX_WBITS))]
    parts += [packer.compress(bytes(2**20)) for _ in range(junk_mib)]
    path.write_bytes(b"".join(parts) + packer.flush())
    return path


@needs_data
def test_a_deflated_dicom_reads_like_the_plain_one_and_a_deflate_bomb_is_refused_while_inflating(tmp_path):
    """Issue 36: pydicom inflates a deflated body in one unbounded call (a 2 MB file became 2 GiB in
    memory before any size check). Now an honest deflated film reads exactly as its plain copy,
    and a 1 GiB bomb (1 MB on disk) behind a 64 x 64 header is refused while inflating, costing
    the reading process less than 100 MB more than reading an ordinary film does."""
    import subprocess
    import sys

    from dicom_films import film_to_dicom

    plain = film_to_dicom(DATA / "nih-cxr14/images/00000129_000.png", tmp_path / "plain.dcm", modality="CR")
    ds = pydicom.dcmread(plain)
    honest = read_xray(_deflated(ds, tmp_path / "deflated.dcm"))
    assert np.array_equal(honest.pixels, read_xray(plain).pixels)
    assert honest.meta["transfer_syntax"] == "Deflated Explicit VR Little Endian"
    small = copy.deepcopy(ds)
    small.Rows = small.Columns = 64
    small.PixelData = np.zeros((64, 64), np.uint16).tobytes()
    bomb = _deflated(small, tmp_path / "bomb.dcm", junk_mib=1024)
    assert bomb.stat().st_size < 2 * 2**20
    with pytest.raises(XrayReadError, match="inflates past"):
        decode_xray(bomb.read_bytes(), name="bomb.dcm")
    probe = ("import resource, sys; from pneumoscan.films import read_xray, XrayReadError\n"
             "try: read_xray(sys.argv[1])\nexcept XrayReadError: pass\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peak = {name: int(subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                                     check=True, timeout=120).stdout) for name, path in (("film", plain), ("bomb", bomb))}
    assert (peak["bomb"] - peak["film"]) / 1024 < 100, peak  # ru_maxrss is in KiB on Linux


def test_a_deflated_dicom_with_a_wrong_meta_group_length_is_a_clear_error(tmp_path):
    """Found by issue 36's fuzz campaign: a deflated file whose (0002,0000) group length is 0 raised
    OverflowError while its meta group was rewritten for inflating."""
    from pydicom.data import get_testdata_file

    from pneumoscan.films.dicom import file_meta_layout

    data = bytearray(_deflated(pydicom.dcmread(get_testdata_file("MR_small.dcm")), tmp_path / "ok.dcm").read_bytes())
    group_length = 132 + 8
    assert file_meta_layout(bytes(data))[3] == group_length
    data[group_length:group_length + 4] = bytes(4)
    with pytest.raises(XrayReadError, match="group length is wrong"):
        decode_xray(bytes(data), name="damaged.dcm")


def test_a_pipe_or_a_link_loop_is_refused_in_one_line_not_waited_on(tmp_path):
    """A manifest row or an argument naming a FIFO would block ``open`` until a writer came (for
    ever); a device never ends. Both are refused before opening, as are link loops."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "film.png"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    script = ("import sys; from pneumoscan.films import read_xray, XrayReadError\n"
              "for p in sys.argv[1:]:\n"
              "    try: read_xray(p)\n"
              "    except XrayReadError as e: print(e)\n")
    run = subprocess.run([sys.executable, "-c", script, str(fifo), "/dev/zero", str(loop)], capture_output=True,
                         text=True, check=False, timeout=60)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and len(lines) == 3, run.stderr[-1500:]
    assert "not a regular file" in lines[0] and "not a regular file" in lines[1]
    assert "symbolic links" in lines[2]
