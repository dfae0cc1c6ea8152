"""Tests of core.imaging: the safe intake of user uploads (formats, values, limits, privacy)."""

from __future__ import annotations

import io
import logging
import struct
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from core import imaging
from core.errors import InvalidImageError
from core.imaging import DecodedImage, accepted_extensions, decode

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)

PATIENT_NAME = "Zqxdoe^Janexq"
PATIENT_ID = "PID-987654-XQ"
PATIENT_STRINGS = ("Zqxdoe", "Janexq", PATIENT_ID, "19610203")


# ------------------------------------------------------------------------------ helpers


def gradient(h: int = 64, w: int = 80, dtype: type = np.uint8) -> np.ndarray:
    """A deterministic H x W ramp covering the dtype's range."""
    top = np.iinfo(dtype).max
    ramp = np.linspace(0, top, h * w).reshape(h, w)
    return np.rint(ramp).astype(dtype)


def rgb_image(h: int = 64, w: int = 80) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0)
    return Image.fromarray(arr, "RGB")


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but holds almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)


def make_dicom(
    pixels: np.ndarray,
    *,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    photometric: str = "MONOCHROME2",
    rows_cols: tuple[int, int] | None = None,
    with_pixels: bool = True,
    **attrs: object,
) -> bytes:
    """A DX DICOM file (with preamble) around uint16 pixels, carrying fake patient data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # DX for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19610203"
    ds.StudyDate = "20240105"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows_cols or pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if with_pixels and transfer_syntax.is_compressed:
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])  # fake codestream
        ds["PixelData"].VR = "OB"
    elif with_pixels:
        ds.PixelData = pixels.astype("<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def refuse(data: object, *fragments: str, **kwargs: object) -> InvalidImageError:
    """Assert decode() raises InvalidImageError whose message contains every fragment."""
    with pytest.raises(InvalidImageError) as info:
        decode(data, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


# ------------------------------------------------------------------------ public API


_FORMAT_OF = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP", "tif": "TIFF",
              "tiff": "TIFF"}


@pytest.mark.parametrize("ext", accepted_extensions())
def test_every_accepted_extension_decodes_a_file_of_that_type(ext: str, tmp_path: Path) -> None:
    """What the upload widget and the CLI accept, decode() reads (as a named file on disk);
    and callers get their own copy of the list."""
    if ext == "dcm":
        data = make_dicom(gradient(64, 80, np.uint16), WindowCenter=32768, WindowWidth=65536)
    else:
        data = encode(Image.fromarray(gradient()), _FORMAT_OF[ext])
    path = tmp_path / f"scan.{ext}"
    path.write_bytes(data)
    out = decode(path, name=path.name)
    assert out.gray.shape == (64, 80) and out.format == ("DICOM" if ext == "dcm" else _FORMAT_OF[ext])
    mine = accepted_extensions()
    mine.append("exe")
    assert "exe" not in accepted_extensions()


def test_smallest_accepted_side_is_min_side() -> None:
    side = imaging.MIN_SIDE
    assert decode(encode(Image.fromarray(gradient(side, 200)), "PNG")).gray.shape == (side, 200)
    refuse(encode(Image.fromarray(gradient(side - 1, 200)), "PNG"), "too small")


def test_pillow_guards_stay_on() -> None:
    assert Image.MAX_IMAGE_PIXELS is not None
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# -------------------------------------------------------------------- raster formats


def test_png_16bit_keeps_full_range() -> None:
    arr = gradient(64, 80, np.uint16)
    arr[0, 0], arr[0, 1], arr[0, 2] = 65535, 30000, 1000  # convert("L") would clip these
    out = decode(encode(Image.fromarray(arr), "PNG"))
    assert (out.format, out.mode, out.bit_depth, out.original_size) == ("PNG", "I;16", 16, (64, 80))
    assert out.gray.dtype == np.float32
    assert out.gray[0, 0] == pytest.approx(1.0)
    assert out.gray[0, 1] == pytest.approx(30000 / 65535, abs=1e-6)
    assert out.gray[0, 2] == pytest.approx(1000 / 65535, abs=1e-6)
    np.testing.assert_allclose(out.gray, arr / 65535.0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_8bit_gray_lossless_formats(fmt: str) -> None:
    arr = gradient()
    out = decode(encode(Image.fromarray(arr), fmt))
    assert out.format == fmt and out.bit_depth == 8 and out.gray.shape == (64, 80)
    np.testing.assert_allclose(out.gray, arr / 255.0, atol=1e-6)


def test_tiff_16bit() -> None:
    arr = gradient(70, 64, np.uint16)
    out = decode(encode(Image.fromarray(arr), "TIFF"))
    assert (out.format, out.bit_depth, out.original_size) == ("TIFF", 16, (70, 64))
    np.testing.assert_allclose(out.gray, arr / 65535.0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_rgb_becomes_luma(fmt: str) -> None:
    img = rgb_image()
    out = decode(encode(img, fmt))
    expected = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    assert out.mode == "RGB"
    np.testing.assert_allclose(out.gray, expected, atol=1e-6)
    assert out.gray[0, 0] == pytest.approx(0.299, abs=0.005)  # pure red: ITU-R 601 luma


def test_rgba_drops_alpha() -> None:
    rgba = rgb_image().convert("RGBA")
    rgba.putalpha(0)  # fully transparent: the gray values must not depend on alpha
    out = decode(encode(rgba, "PNG"))
    expected = np.asarray(rgba.convert("RGB").convert("L"), dtype=np.float32) / 255.0
    assert out.mode == "RGBA"
    np.testing.assert_allclose(out.gray, expected, atol=1e-6)


def test_palette_png() -> None:
    pal = rgb_image().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out = decode(encode(pal, "PNG"))
    expected = np.asarray(pal.convert("RGB").convert("L"), dtype=np.float32) / 255.0
    assert out.mode == "P"
    np.testing.assert_allclose(out.gray, expected, atol=1e-6)


def test_jpeg_close_to_source() -> None:
    arr = gradient()
    out = decode(encode(Image.fromarray(arr), "JPEG", quality=95))
    assert (out.format, out.mode, out.bit_depth) == ("JPEG", "L", 8)
    assert np.abs(out.gray - arr / 255.0).mean() < 0.01


def test_jpeg_exif_orientation_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(gradient(64, 128)), "JPEG", exif=exif)
    out = decode(data)
    assert out.gray.shape == (128, 64) and out.original_size == (128, 64)
    assert "EXIF orientation applied" in out.notes


# ----------------------------------------------------------------------- other inputs


def test_path_stream_and_name(tmp_path: Path) -> None:
    arr = gradient()
    path = tmp_path / "scan.png"
    path.write_bytes(encode(Image.fromarray(arr), "PNG"))
    for source in (path, str(path)):
        np.testing.assert_allclose(decode(source).gray, arr / 255.0, atol=1e-6)
    stream = io.BytesIO(path.read_bytes())
    stream.read(10)  # a partly read upload is rewound
    assert decode(stream).format == "PNG"
    refuse(tmp_path / "missing.png", "could not be found")
    refuse(tmp_path, "folder")


def test_array_and_pil_inputs() -> None:
    arr = gradient(64, 64, np.uint16)
    out = decode(arr)
    assert (out.format, out.mode, out.bit_depth) == ("array", "gray", 16)
    np.testing.assert_allclose(out.gray, arr / 65535.0, atol=1e-6)
    out = decode(Image.fromarray(gradient()))
    assert (out.format, out.mode) == ("PIL", "L")
    refuse(np.zeros((3, 64, 64), np.uint8), "shape")
    refuse(np.zeros((32, 200), np.uint8), "too small")
    with pytest.raises(TypeError):
        decode(12345)


# ---------------------------------------------------------------------------- DICOM


def test_dicom_rescale_and_window() -> None:
    stored = np.full((64, 64), 300, np.uint16)
    stored[0, :4] = (0, 1000, 250, 350)
    # modality = 2 * stored - 100, window [400, 600]: 300 -> 500 (centre), 250 -> 400 (low
    # edge), 350 -> 600 (high edge), 0 and 1000 fall outside and must saturate.
    data = make_dicom(
        stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=500, WindowWidth=200
    )
    out = decode(data)
    assert (out.format, out.mode, out.bit_depth, out.original_size) == (
        "DICOM",
        "MONOCHROME2",
        16,
        (64, 64),
    )
    assert out.gray.dtype == np.float32
    assert out.gray[0, 0] == 0.0 and out.gray[0, 1] == 1.0  # saturated outside the window
    assert out.gray[0, 2] == pytest.approx(0.0, abs=0.01)
    assert out.gray[0, 3] == pytest.approx(1.0, abs=0.01)
    assert out.gray[1, 1] == pytest.approx(0.5, abs=0.01)  # without rescale: 300 < 400 -> 0
    assert "rescale slope 2, intercept -100 applied" in out.notes
    assert "window center 500, width 200 applied" in out.notes


def test_dicom_without_window_uses_min_max() -> None:
    stored = gradient(64, 64, np.uint16) // 16  # 12-bit data in 16-bit words
    out = decode(make_dicom(stored))
    assert out.gray.min() == 0.0 and out.gray.max() == 1.0
    assert any("min/max" in note for note in out.notes)


def test_dicom_monochrome1_is_inverted() -> None:
    stored = np.full((64, 64), 100, np.uint16)
    stored[0, 0] = 4000  # a high stored value is dark in MONOCHROME1
    out = decode(make_dicom(stored, photometric="MONOCHROME1"))
    assert out.gray[0, 0] == pytest.approx(0.0)
    assert out.gray[1, 1] == pytest.approx(1.0)
    assert "MONOCHROME1 inverted" in out.notes
    assert out.mode == "MONOCHROME1"


def test_dicom_by_name_without_preamble() -> None:
    png = encode(Image.fromarray(gradient()), "PNG")
    refuse(png, "not a valid DICOM file", name="chest.DCM")


def test_dicom_without_pixel_data() -> None:
    refuse(make_dicom(gradient(64, 64, np.uint16), with_pixels=False), "contains no image data")


def test_dicom_multiframe_refused() -> None:
    frames = np.stack([gradient(64, 64, np.uint16)] * 2)
    refuse(make_dicom(frames, NumberOfFrames=2), "contains 2 images", "multi-frame DICOM")


def test_dicom_compressed_without_plugin_names_syntax() -> None:
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder plugin is installed here")
    refuse(
        make_dicom(gradient(64, 64, np.uint16), transfer_syntax=JPEGLSLossless),
        "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80) cannot be decoded here",
        "install",
        "export the image as PNG",
    )


def test_dicom_missing_plugin_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever is installed here: a missing JPEG 2000 decoder gives the documented advice."""
    import pydicom.pixels

    class Unavailable:
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Unavailable())
    refuse(
        make_dicom(gradient(64, 64, np.uint16), transfer_syntax=JPEG2000Lossless),
        "JPEG 2000 Image Compression (Lossless Only) (1.2.840.10008.1.2.4.90) cannot be "
        "decoded here: install pylibjpeg-openjpeg",
    )


def test_dicom_compressed_undecodable_names_syntax() -> None:
    """Fake JPEG 2000 data: whether a plugin is missing or fails, the syntax is named."""
    err = refuse(
        make_dicom(gradient(64, 64, np.uint16), transfer_syntax=JPEG2000Lossless),
        "1.2.840.10008.1.2.4.90",
        "JPEG 2000",
    )
    assert err.__cause__ is None  # nothing from pydicom travels with the error


# ----------------------------------------------------------------------- bad inputs


def test_empty() -> None:
    refuse(b"", "The file is empty (0 bytes). Choose the X-ray image file again.")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt: str) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (256, 256), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    refuse(data[: len(data) // 2], "incomplete or damaged")
    refuse(data[:30], "incomplete or damaged")  # cut inside the header


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"Patient chest film, see attached.\nThanks\n", "text file"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "PDF document"),
        (bytes(range(256)) * 4, "not an image"),
    ],
)
def test_not_an_image(data: bytes, what: str) -> None:
    refuse(data, what, "PNG, JPEG, BMP, TIFF or DICOM")


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_unsupported_formats(fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    data = encode(Image.fromarray(gradient()), fmt)
    refuse(data, f"{fmt} images are not accepted", "PNG, JPEG, BMP, TIFF or DICOM")


def test_tiny_image() -> None:
    refuse(encode(Image.fromarray(gradient(32, 32)), "PNG"), "too small", "32 x 32", "64")


def test_multipage_tiff() -> None:
    first, second = Image.fromarray(gradient()), Image.fromarray(255 - gradient())
    data = encode(first, "TIFF", save_all=True, append_images=[second])
    refuse(data, "contains 2 images", "multi-page TIFF")
    with Image.open(io.BytesIO(data)) as img:  # the same check for an open PIL image
        refuse(img, "contains 2 images")


def test_animated_png() -> None:
    first, second = Image.fromarray(gradient()), Image.fromarray(255 - gradient())
    data = encode(first, "PNG", save_all=True, append_images=[second])
    refuse(data, "contains 2 images")


def test_file_too_large(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = encode(Image.fromarray(gradient()), "PNG")
    monkeypatch.setattr(imaging, "MAX_FILE_BYTES", len(data) - 1)
    refuse(data, "too large", "MB")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    refuse(path, "too large", "MB")
    refuse(io.BytesIO(data), "too large", "MB")


def test_too_many_pixels_checked_on_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """The header-only PNG would fail as truncated if its pixels were decoded first."""
    monkeypatch.setattr(imaging, "MAX_PIXELS", 500_000)
    refuse(png_header_only(1000, 1000), "too large", "1000 x 1000", "megapixels")
    # DICOM: Rows/Columns are checked before pixel_array (its data is far too short).
    short = make_dicom(gradient(64, 64, np.uint16), rows_cols=(1000, 1000))
    refuse(short, "too large", "1000 x 1000", "megapixels")


def test_decompression_bomb_guard_active(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imaging, "MAX_PIXELS", 10**12)  # only Pillow's guard can stop these
    err = refuse(png_header_only(20_000, 20_000), "too large")
    assert isinstance(err.__cause__, Image.DecompressionBombError)
    with pytest.warns(Image.DecompressionBombWarning):  # the warning range is refused too
        refuse(png_header_only(10_000, 10_000), "too large", "megapixels")


# --------------------------------------------------------------------------- privacy


def _dicom_cases() -> list[Callable[[], object]]:
    img = gradient(64, 64, np.uint16)
    name = "Zqxdoe_Janexq_chest.dcm"
    return [
        lambda: decode(make_dicom(img, WindowCenter=3000, WindowWidth=0), name=name),
        lambda: decode(make_dicom(img, photometric="MONOCHROME1"), name=name),
        lambda: decode(make_dicom(np.stack([img] * 2), NumberOfFrames=2), name=name),
        lambda: decode(make_dicom(img, transfer_syntax=JPEGLSLossless), name=name),
        lambda: decode(make_dicom(img, transfer_syntax=JPEG2000Lossless), name=name),
        lambda: decode(make_dicom(img, rows_cols=(32, 32)), name=name),
        lambda: decode(make_dicom(img, rows_cols=(128, 128)), name=name),  # short pixel data
        lambda: decode(make_dicom(img, photometric="PALETTE COLOR"), name=name),
        lambda: decode(make_dicom(img)[:400], name=name),  # truncated inside the dataset
    ]


def test_patient_data_never_logged_or_in_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    for case in _dicom_cases():
        try:
            out = case()
        except InvalidImageError as exc:
            texts.append("".join(traceback.format_exception(exc)))
        else:
            assert isinstance(out, DecodedImage)
            texts.append(" ".join(out.notes) + out.mode + out.format)
    assert any("invalid VOI window ignored" in text for text in texts)
    assert caplog.records, "refusals should be logged"
    for secret in PATIENT_STRINGS:
        assert secret not in caplog.text
        for text in texts:
            assert secret not in text


def test_intake_imports_neither_torch_nor_the_lung_segmenter() -> None:
    """Upload intake uses the contract's decode (core.pixels) without loading torch."""
    import subprocess
    import sys

    code = "import sys, core.imaging; sys.exit(sum(m in sys.modules for m in ('torch', 'core.lungs')))"
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
