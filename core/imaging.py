"""Safe intake of user uploads: bytes, paths, PIL images or arrays -> grayscale [0, 1].

This is the only entry point for images that come from outside the project (dashboard
uploads, files given to the predict CLI). It enforces, in this order:

1. the file size (:data:`MAX_FILE_BYTES`) before anything is parsed;
2. the format (PNG, JPEG, BMP, TIFF or DICOM), a single frame, and the image dimensions
   read from the *header* (:data:`MAX_PIXELS`, :data:`MIN_SIDE`) before any pixel is
   decoded. Pillow's decompression-bomb guard stays on and truncated files stay errors
   (this module never touches ``Image.MAX_IMAGE_PIXELS`` or ``LOAD_TRUNCATED_IMAGES``);
3. decoding, then conversion through the preprocessing contract
   (:func:`core.preprocess.to_gray`) for raster formats, or through the DICOM display
   pipeline (modality LUT / rescale, VOI LUT / window, MONOCHROME1 inversion) for DICOM.

Every refusal is an :class:`~core.errors.InvalidImageError` whose message tells a clinician
what to do. Privacy: nothing read from a DICOM file apart from the image attributes (size,
bit depth, photometric interpretation, rescale and window values, transfer syntax) ever
reaches a message, a note, a log record or an exception chain; file names are never logged
either (they often contain patient names).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from core.errors import InvalidImageError
from core.pixels import to_gray

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 50 * 1024 * 1024
"""Largest accepted file (50 MB), checked before anything is parsed."""
MAX_PIXELS = 50_000_000
"""Largest accepted image (50 megapixels), checked on the header before pixels are decoded."""
MIN_SIDE = 64
"""Smallest accepted image side in pixels."""

RASTER_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
ACCEPTED_FORMATS = (*RASTER_FORMATS, "DICOM")
ACCEPTED_TEXT = "PNG, JPEG, BMP, TIFF or DICOM (.dcm)"
_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff", "dcm")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_PIL_ALIASES = {"MPO": "JPEG"}  # multi-picture JPEG (phones): refused later as multi-frame
_PIL_BIT_DEPTH = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}
_DICOM_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422")
_DICOM_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_EXPORT_HINT = "Export the X-ray again from the PACS or viewer (as DICOM or PNG) and retry."

# Which package decodes which compressed DICOM transfer syntax (pydicom plugins).
_J2K = "pylibjpeg-openjpeg (with pylibjpeg)"
_LIBJPEG = "pylibjpeg-libjpeg (with pylibjpeg)"
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG,
    "1.2.840.10008.1.2.4.51": _LIBJPEG,
    "1.2.840.10008.1.2.4.57": _LIBJPEG,
    "1.2.840.10008.1.2.4.70": _LIBJPEG,
    "1.2.840.10008.1.2.4.80": "pyjpegls",
    "1.2.840.10008.1.2.4.81": "pyjpegls",
    "1.2.840.10008.1.2.4.90": _J2K,
    "1.2.840.10008.1.2.4.91": _J2K,
    "1.2.840.10008.1.2.4.201": _J2K,
    "1.2.840.10008.1.2.4.202": _J2K,
    "1.2.840.10008.1.2.4.203": _J2K,
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (with pylibjpeg)",
}
_DEFAULT_DECODER_HINT = "a pydicom decoder plugin (pylibjpeg or python-gdcm)"

# Signatures used only to word the message for files Pillow cannot open.
_ACCEPTED_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")
_OTHER_MAGIC = {
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive (or an Office document)",
    b"\xd0\xcf\x11\xe0": "an Office document",
}


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """An accepted image, decoded to the preprocessing contract.

    Attributes:
        gray: float32 H x W array in [0, 1] (input of :func:`core.preprocess.prepare`).
        format: "PNG", "JPEG", "BMP", "TIFF", "DICOM", "array" or "PIL".
        original_size: (H, W) of the decoded image (equal to ``gray.shape``).
        bit_depth: bits per sample of the source (8, 16, DICOM BitsStored, ...).
        mode: Pillow mode ("L", "I;16", "RGB", ...), DICOM photometric interpretation,
            or "gray" / "RGB" / "RGBA" for arrays.
        notes: what was done beyond a plain conversion, for display (never patient data).
    """

    gray: np.ndarray
    format: str
    original_size: tuple[int, int]
    bit_depth: int
    mode: str
    notes: tuple[str, ...] = ()


def accepted_extensions() -> list[str]:
    """File extensions (without dot) for the upload widget and the CLI's file filter."""
    return list(_EXTENSIONS)


def decode(source: Any, *, name: str | None = None) -> DecodedImage:
    """Validate and decode an uploaded image.

    Args:
        source: file content (``bytes``), a path (``str`` / ``Path``), a binary file-like
            object (e.g. Streamlit's ``UploadedFile``), a PIL image or a NumPy array.
        name: original file name, used only to recognise DICOM files by their ``.dcm``
            extension (never logged).

    Raises:
        InvalidImageError: the input is empty, too large, too small, damaged, not an image,
            of an unaccepted format, multi-frame, or an undecodable DICOM.
    """
    if isinstance(source, Image.Image):
        return _decode_pil(source)
    if isinstance(source, np.ndarray):
        return _decode_array(source)
    if isinstance(source, bytes | bytearray | memoryview):
        _check_file_size(memoryview(source).nbytes)
        return _decode_bytes(bytes(source), name)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        return _decode_bytes(_read_path(path), name or path.name)
    if hasattr(source, "read"):
        file_name = getattr(source, "name", None)
        return _decode_bytes(_read_stream(source), name or _str_or_none(file_name))
    raise TypeError(
        "decode() expects bytes, a path, a binary file object, a PIL image or a NumPy array, "
        f"not {type(source).__name__}"
    )


# ----------------------------------------------------------------------------- reading


def _refuse(reason: str, message: str) -> InvalidImageError:
    """Log a refusal by its category only and build the error to raise."""
    logger.info("Image refused: %s", reason)
    return InvalidImageError(message)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _check_file_size(n_bytes: int) -> None:
    if n_bytes == 0:
        raise _refuse("empty", "The file is empty (0 bytes). Choose the X-ray image file again.")
    if n_bytes > MAX_FILE_BYTES:
        raise _refuse(
            "file too large",
            f"The file is too large ({n_bytes / 1e6:.1f} MB; the limit is "
            f"{MAX_FILE_BYTES / 1e6:.1f} MB). Export the X-ray at a lower resolution or as "
            "a compressed PNG or JPEG and try again.",
        )


def _read_path(path: Path) -> bytes:
    """Read a file after checking its size on disk (a huge file is never read)."""
    try:
        if path.is_dir():
            raise _refuse("directory", "This is a folder, not an image file. Choose the file.")
        size = path.stat().st_size
    except FileNotFoundError:
        raise _refuse(
            "not found", "The file could not be found. Check its name and folder."
        ) from None
    except OSError as exc:
        raise _refuse("unreadable", f"The file could not be opened ({exc.strerror}).") from None
    _check_file_size(size)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _refuse("unreadable", f"The file could not be read ({exc.strerror}).") from None
    _check_file_size(len(data))  # the file may have changed since stat()
    return data


def _read_stream(stream: Any) -> bytes:
    """Read at most one byte more than the limit from a binary file-like object."""
    if hasattr(stream, "seek"):
        stream.seek(0)
    data = stream.read(MAX_FILE_BYTES + 1)
    if not isinstance(data, bytes | bytearray):
        raise TypeError("decode() expects a file object opened in binary mode")
    _check_file_size(len(data))
    return bytes(data)


def _decode_bytes(data: bytes, name: str | None) -> DecodedImage:
    _check_file_size(len(data))
    if data[128:132] == b"DICM" or (name or "").lower().endswith(_DICOM_SUFFIXES):
        return _decode_dicom(data)
    return _decode_raster(data)


def _check_dimensions(height: int, width: int, limit: int | None = None) -> None:
    """Refuse images with too many pixels or a side under :data:`MIN_SIDE` (header sizes)."""
    pixels = height * width
    limit = MAX_PIXELS if limit is None else min(limit, MAX_PIXELS)
    if pixels > limit:
        raise _refuse(
            "too many pixels",
            f"The image is too large ({width} x {height} pixels = {pixels / 1e6:.1f} "
            f"megapixels; the limit is {limit / 1e6:.1f} megapixels). Reduce its resolution "
            "and try again.",
        )
    if min(height, width) < MIN_SIDE:
        raise _refuse(
            "too small",
            f"The image is too small ({width} x {height} pixels; each side must be at least "
            f"{MIN_SIDE} pixels). Use the original, full-resolution X-ray rather than a "
            "thumbnail or icon.",
        )


def _multi_frame_error(count: int | str, kind: str) -> InvalidImageError:
    return _refuse(
        "multi-frame",
        f"The file contains {count} images ({kind}); only single images are accepted. Save "
        "the one X-ray view to analyse as a separate file and upload that.",
    )


# ------------------------------------------------------------------- PNG/JPEG/BMP/TIFF


def _decode_raster(data: bytes) -> DecodedImage:
    """Open with Pillow, check the header, then decode and convert through ``to_gray``."""
    img = _open_pil(data)
    try:
        fmt = _check_raster_header(img)
        _load(img)
        notes: list[str] = []
        oriented = _apply_exif_orientation(img, notes)
        gray = to_gray(oriented)
        bit_depth, mode = _PIL_BIT_DEPTH.get(img.mode, 8), img.mode
    finally:
        img.close()
    logger.debug("Decoded %s image, %dx%d, %d-bit %s", fmt, *gray.shape, bit_depth, mode)
    return DecodedImage(gray, fmt, _shape(gray), bit_depth, mode, tuple(notes))


def _open_pil(data: bytes) -> Image.Image:
    """``Image.open`` (lazy: reads the header only), with its errors made clinical."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # its message holds only pixel counts
        raise _bomb_error() from exc
    except UnidentifiedImageError:
        raise _refuse("not an image", _not_image_message(data)) from None
    except Exception as exc:  # damaged header: anything a Pillow plugin may raise
        raise _refuse("damaged header", _damaged_message()) from exc


def _bomb_error() -> InvalidImageError:
    return _refuse(
        "decompression bomb",
        "The image is too large to open safely (its header declares far more pixels than "
        f"allowed; the limit is {MAX_PIXELS / 1e6:.0f} megapixels). Reduce its resolution "
        "and try again.",
    )


def _damaged_message() -> str:
    return (
        "The image file is incomplete or damaged (it may have been cut off while copying or "
        "uploading). Upload the file again, or export it again from the viewer."
    )


def _not_image_message(data: bytes) -> str:
    """Word the refusal of a file Pillow cannot identify by what it looks like."""
    if data.startswith(_ACCEPTED_MAGIC):
        return _damaged_message()
    what = next((kind for magic, kind in _OTHER_MAGIC.items() if data.startswith(magic)), None)
    if what is None and _looks_like_text(data):
        what = "a text file"
    prefix = f"This file is {what}, not an image." if what else "This file is not an image."
    return f"{prefix} Choose the X-ray image file ({ACCEPTED_TEXT})."


def _looks_like_text(data: bytes) -> bool:
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t\f" for ch in text)


def _check_raster_header(img: Image.Image) -> str:
    """Format, frame count and dimensions, all from the header (no pixel decoded)."""
    fmt = _PIL_ALIASES.get(img.format or "", img.format or "unknown")
    if fmt not in RASTER_FORMATS:
        raise _refuse(
            "unsupported format",
            f"{fmt} images are not accepted. Accepted formats: {ACCEPTED_TEXT}. Export the "
            "X-ray in one of these formats and try again.",
        )
    _check_pil_frames(img)
    width, height = img.size
    _check_dimensions(height, width, limit=Image.MAX_IMAGE_PIXELS)
    return fmt


def _check_pil_frames(img: Image.Image) -> None:
    try:
        frames = int(getattr(img, "n_frames", 1))
    except Exception as exc:  # walking a damaged TIFF's page list
        raise _refuse("damaged header", _damaged_message()) from exc
    if frames > 1:
        kind = "a multi-page TIFF" if img.format == "TIFF" else "an animated or multi-picture image"
        raise _multi_frame_error(frames, kind)


def _load(img: Image.Image) -> None:
    """Decode the pixels; a truncated or corrupt file is an error, never a partial image."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True elsewhere in this process: "
            "truncated uploads cannot be detected"
        )
    try:
        img.load()
    except Image.DecompressionBombError as exc:  # its message holds only pixel counts
        raise _bomb_error() from exc
    except OSError as exc:
        if "not available" in str(exc):  # e.g. "decoder group4 not available" (TIFF codecs)
            raise _refuse(
                "codec missing",
                f"This {img.format} file uses a compression that cannot be decoded here. "
                "Export the X-ray as PNG and try again.",
            ) from exc
        raise _refuse("truncated or corrupt", _damaged_message()) from exc
    except Exception as exc:  # corrupt data: anything a decoder may raise
        raise _refuse("truncated or corrupt", _damaged_message()) from exc


def _apply_exif_orientation(img: Image.Image, notes: list[str]) -> Image.Image:
    """Rotate as the EXIF Orientation tag says (phone photos of films carry one)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
        if orientation in (None, 1):
            return img
        oriented = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block only loses the orientation
        logger.debug("EXIF orientation could not be read; ignored")
        return img
    notes.append("EXIF orientation applied")
    return oriented


def _shape(gray: np.ndarray) -> tuple[int, int]:
    return int(gray.shape[0]), int(gray.shape[1])


# ------------------------------------------------------------------ PIL images, arrays


def _decode_pil(img: Image.Image) -> DecodedImage:
    """An already-open PIL image (e.g. from a notebook): same checks, format "PIL"."""
    _check_pil_frames(img)
    width, height = img.size
    _check_dimensions(height, width)
    _load(img)
    gray = to_gray(img)
    return DecodedImage(gray, "PIL", _shape(gray), _PIL_BIT_DEPTH.get(img.mode, 8), img.mode)


def _decode_array(arr: np.ndarray) -> DecodedImage:
    """An H x W, H x W x 1, H x W x 3 or H x W x 4 array of numbers, format "array"."""
    if arr.dtype.kind not in "biuf":
        raise _refuse("array dtype", f"Arrays of type {arr.dtype} are not images.")
    channels = arr.shape[2] if arr.ndim == 3 else 1
    if arr.ndim not in (2, 3) or channels not in (1, 3, 4):
        raise _refuse(
            "array shape",
            f"Unsupported array shape {arr.shape}: expected H x W, H x W x 1, H x W x 3 or "
            "H x W x 4.",
        )
    _check_dimensions(int(arr.shape[0]), int(arr.shape[1]))
    gray = to_gray(arr)
    mode = {1: "gray", 3: "RGB", 4: "RGBA"}[channels]
    bit_depth = 1 if arr.dtype.kind == "b" else arr.dtype.itemsize * 8
    return DecodedImage(gray, "array", _shape(gray), bit_depth, mode)


# ----------------------------------------------------------------------------- DICOM


def _decode_dicom(data: bytes) -> DecodedImage:
    """Parse, check the header, decode the pixels and apply the display pipeline."""
    ds = _read_dicom(data)
    photometric = _check_dicom_header(ds)
    arr = _dicom_pixels(ds)
    if photometric.startswith("MONOCHROME"):
        gray, notes = _dicom_monochrome(arr, ds, photometric)
    else:
        gray, notes = to_gray(arr), ["colour DICOM converted to grayscale"]
    bit_depth = _int_attr(ds, "BitsStored") or arr.dtype.itemsize * 8
    logger.debug("Decoded DICOM image, %dx%d, %d-bit %s", *gray.shape, bit_depth, photometric)
    return DecodedImage(gray, "DICOM", _shape(gray), bit_depth, photometric, tuple(notes))


def _read_dicom(data: bytes) -> Dataset:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:  # pragma: no cover - pydicom is a project dependency
        raise _refuse(
            "no pydicom", "DICOM support is not installed (pip install pydicom)."
        ) from None
    try:
        return pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError:
        raise _refuse(
            "not DICOM",
            "The file is not a valid DICOM file (the 'DICM' marker at byte 128 is missing). "
            + _EXPORT_HINT,
        ) from None
    except Exception:  # parse errors may quote element values: keep them out of the chain
        raise _refuse(
            "damaged DICOM", "The DICOM file is damaged or incomplete. " + _EXPORT_HINT
        ) from None


def _int_attr(ds: Dataset, keyword: str, default: int = 0) -> int:
    """An integer image attribute (IS / US), ``default`` when absent or unreadable."""
    try:
        value = ds.get(keyword, None)
        return default if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return default


def _check_dicom_header(ds: Dataset) -> str:
    """Pixel data present, one frame, size limits and photometric interpretation."""
    if not any(keyword in ds for keyword in _DICOM_PIXEL_KEYWORDS):
        raise _refuse(
            "DICOM without image",
            "The DICOM file contains no image data: it may be incomplete (cut off while "
            "copying or uploading) or not an image (a report, structured document or "
            "presentation state). Choose the DICOM file of the X-ray image itself.",
        )
    frames = _int_attr(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise _multi_frame_error(frames, "a multi-frame DICOM")
    rows, columns = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    if rows <= 0 or columns <= 0:
        raise _refuse("DICOM size", "The DICOM file does not state the image size. " + _EXPORT_HINT)
    _check_dimensions(rows, columns)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in _DICOM_PHOTOMETRIC:
        raise _refuse(
            "DICOM photometric",
            f"DICOM images with photometric interpretation {photometric or 'missing'} are not "
            "supported. Export the X-ray as a grayscale (MONOCHROME) DICOM or as PNG.",
        )
    return photometric


def _syntax_label(uid: UID) -> str:
    return f"{uid.name} ({uid})" if uid.name != str(uid) else str(uid)


def _transfer_syntax(ds: Dataset) -> UID:
    from pydicom.uid import UID

    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not uid:
        raise _refuse("DICOM syntax", "The DICOM file does not state its encoding. " + _EXPORT_HINT)
    return UID(str(uid))


def _require_decoder(uid: UID) -> None:
    """Refuse, naming the transfer syntax, when no installed plugin can decode it."""
    from pydicom.pixels import get_decoder

    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:
        available = False
    if not available:
        hint = _DECODER_HINTS.get(str(uid), _DEFAULT_DECODER_HINT)
        raise _refuse(
            "DICOM decoder missing",
            f"{_syntax_label(uid)} cannot be decoded here: install {hint} or export the image "
            "as PNG.",
        )


def _dicom_pixels(ds: Dataset) -> np.ndarray:
    """Decode the pixel data (compressed syntaxes need an installed pydicom plugin)."""
    uid = _transfer_syntax(ds)
    if uid.is_compressed:
        _require_decoder(uid)
    try:
        arr = ds.pixel_array
    except Exception as exc:
        logger.debug("DICOM pixel decoding failed: %s", type(exc).__name__)
        raise _refuse(
            "DICOM pixels",
            f"The DICOM image data ({_syntax_label(uid)}) could not be decoded: the file may be "
            "damaged or incomplete. " + _EXPORT_HINT,
        ) from None
    if arr.ndim not in (2, 3):
        raise _multi_frame_error("several", "a multi-frame DICOM")
    return arr


def _voi_kind(ds: Dataset) -> str | None:
    """What :func:`pydicom.pixels.apply_voi_lut` will apply: "lut", "window" or None."""
    seq = ds.get("VOILUTSequence", None)
    if (
        seq
        and seq[0].get("LUTDescriptor", None) is not None
        and seq[0].get("LUTData", None) is not None
    ):
        return "lut"
    if ds.get("WindowCenter", None) is not None and ds.get("WindowWidth", None) is not None:
        return "window"
    return None


def _first_value(value: Any) -> float:
    """First value of a possibly multi-valued DS element (e.g. several windows)."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return float(value[0])
    return float(value)


def _modality_lut(arr: np.ndarray, ds: Dataset, notes: list[str] | None = None) -> np.ndarray:
    """Modality LUT or rescale slope/intercept (stored values -> modality units)."""
    from pydicom.pixels import apply_modality_lut

    out = apply_modality_lut(arr, ds)
    if notes is not None:
        if ds.get("ModalityLUTSequence", None):
            notes.append("Modality LUT applied")
        elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            if (slope, intercept) != (1.0, 0.0):
                notes.append(f"rescale slope {slope:g}, intercept {intercept:g} applied")
    return out


def _window_range(arr: np.ndarray, ds: Dataset) -> tuple[float, float]:
    """Output range of modality + VOI transform over every value the pixel type can hold.

    Values outside the window therefore saturate to exactly 0 or 1, and an image that lies
    inside the window keeps the window's contrast (it is not stretched to its own min/max).
    """
    from pydicom.pixels import apply_voi_lut

    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
        info = np.iinfo(arr.dtype)
        probe = np.arange(int(info.min), int(info.max) + 1, dtype=np.int64)
    elif arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        probe = np.array([info.min, info.max], dtype=arr.dtype)
    else:
        probe = np.array([-1e15, 1e15])
    out = apply_voi_lut(_modality_lut(probe, ds), ds)
    return float(np.min(out)), float(np.max(out))


def _apply_voi(
    values: np.ndarray, arr: np.ndarray, ds: Dataset, notes: list[str]
) -> tuple[np.ndarray, tuple[float, float]] | None:
    """VOI LUT or window: (windowed values, their output range), or None if there is none."""
    from pydicom.pixels import apply_voi_lut

    kind = _voi_kind(ds)
    if kind is None:
        return None
    try:
        windowed = apply_voi_lut(values, ds)
        lo_hi = _window_range(arr, ds)
    except Exception as exc:  # e.g. width < 1, unknown VOI function, malformed LUT
        logger.debug("VOI transform ignored: %s", type(exc).__name__)
        notes.append("invalid VOI window ignored")
        return None
    if kind == "lut":
        notes.append("VOI LUT applied")
    else:
        center, width = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
        notes.append(f"window center {center:g}, width {width:g} applied")
    return windowed, lo_hi


def _dicom_monochrome(
    arr: np.ndarray, ds: Dataset, photometric: str
) -> tuple[np.ndarray, list[str]]:
    """Modality LUT, VOI LUT / window, scaling to [0, 1] and MONOCHROME1 inversion."""
    notes: list[str] = []
    values = np.asarray(_modality_lut(arr, ds, notes), dtype=np.float64)
    voi = _apply_voi(values, arr, ds, notes)
    if voi is None:
        windowed, (lo, hi) = values, (float(values.min()), float(values.max()))
        notes.append("no VOI window: scaled by the image's min/max")
    else:
        windowed, (lo, hi) = np.asarray(voi[0], dtype=np.float64), voi[1]
    span = hi - lo
    gray = np.clip((windowed - lo) / span, 0.0, 1.0) if span > 0 else np.zeros_like(windowed)
    if photometric == "MONOCHROME1":
        gray = 1.0 - gray
        notes.append("MONOCHROME1 inverted")
    return gray.astype(np.float32), notes
