"""DICOM chest radiographs -> 8-bit grayscale images, with technical metadata and warnings, never patient data."""

import io
import logging
import struct

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

from model.errors import InvalidImageError, UnsupportedImageError

logger = logging.getLogger(__name__)

# DR is not a standard Modality code, but some digital radiography systems write it.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR"})
# Header strings reach metadata and messages only when they belong to these vocabularies, so free
# text (a name typed into the wrong field) can never leak through a "technical" field.
KNOWN_MODALITIES = RADIOGRAPH_MODALITIES | frozenset(
    {"CT", "MR", "US", "NM", "PT", "XA", "RF", "MG", "IO", "PX", "OT", "SC", "SR", "DOC", "KO", "PR", "SEG", "SM",
     "ES", "XC", "OP", "OPT", "BMD", "ECG", "RTIMAGE", "RTDOSE", "RTSTRUCT", "RTPLAN"}
)
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT", "L"})
KNOWN_VIEWS = LATERAL_VIEWS | frozenset({"PA", "AP", "RLD", "LLD", "RLO", "LLO"})
MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
# pydicom hands these over as RGB (YBR is converted on decoding, JPEG 2000 undoes its colour transform).
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
KNOWN_PHOTOMETRIC = MONOCHROME | COLOUR | frozenset(
    {"PALETTE COLOR", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "HSV", "ARGB", "CMYK"}
)
PERCENTILE_WINDOW = (0.5, 99.5)
PERCENTILE_SAMPLES = 4_000_000  # pixels the percentile window is computed on (every pixel of a 2000 x 2000 film)

LATERAL_WARNING = "lateral view: the model was trained on frontal (PA/AP) films"
NO_MODALITY_WARNING = "the DICOM file does not state its modality; make sure it is a chest radiograph (CR/DX)"
BURNED_IN_WARNING = "the DICOM file says the image has burned-in annotations, which may identify the patient"
INVALID_WINDOW_WARNING = "the DICOM file's display window (VOI) is invalid and was ignored"
NO_PIXEL_DATA_MESSAGE = "The DICOM file has no image (pixel data)."
DAMAGED_MESSAGE = "The DICOM file is damaged or truncated and cannot be read."

# What pydicom, numpy and the pixel-data plugins raise on malformed headers or pixel data.
_DECODING_ERRORS = (
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    RuntimeError,
    NotImplementedError,
    OverflowError,
    ZeroDivisionError,
    struct.error,
    EOFError,
    OSError,
    MemoryError,
    BytesLengthException,  # a value whose length does not fit its VR (e.g. a misaligned file-meta group)
)


def decode_dicom(data, *, check_size):
    """Decode DICOM Part 10 bytes into ``(image, metadata, warnings)``: an 8-bit "L" image, technical metadata,
    sentences for the reader.

    ``check_size(width, height)`` refuses absurd sizes from the header, before any pixel is decoded
    (``model.decode.check_image_size``). Raises ``InvalidImageError`` (400) for damaged, multi-frame, non-radiograph or image-less files and
    ``UnsupportedImageError`` (415) for transfer syntaxes or colour models that cannot be decoded.
    """
    dataset = _read_dataset(data)
    try:
        metadata, warnings = _check_dataset(dataset, len(data), check_size)
        pixels = dataset.pixel_array
        if metadata["photometric_interpretation"] in MONOCHROME:
            image, metadata["display_window"], window_warnings = _monochrome_to_uint8(pixels, dataset)
            warnings += window_warnings
        else:
            image, metadata["display_window"] = _colour_to_uint8(pixels, dataset.BitsStored), "colour to grayscale"
    except InvalidImageError:
        raise
    except _DECODING_ERRORS as error:
        # The type only: messages about a DICOM file may quote its field values.
        logger.warning("DICOM pixel data could not be decoded (%s)", type(error).__name__)
        raise InvalidImageError(DAMAGED_MESSAGE) from error
    if image.shape != (metadata["rows"], metadata["columns"]):
        raise InvalidImageError(DAMAGED_MESSAGE)
    return Image.fromarray(image, mode="L"), metadata, warnings


def _read_dataset(data):
    """Parse the header and keep the pixel data as bytes; only InvalidImageError gets out."""
    try:
        return pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError as error:
        raise InvalidImageError("The file starts like a DICOM file but is not a valid one.") from error
    except _DECODING_ERRORS as error:
        raise InvalidImageError(DAMAGED_MESSAGE) from error


def _check_dataset(dataset, size, check_size):
    """Refuse what cannot be a decodable chest radiograph before any pixel is decoded; return metadata, warnings."""
    if "PixelData" not in dataset:
        raise InvalidImageError(NO_PIXEL_DATA_MESSAGE if _parsed_to_the_end(dataset, size) else DAMAGED_MESSAGE)
    warnings = []
    modality = _header_code(dataset, "Modality", KNOWN_MODALITIES)
    if modality is None:
        warnings.append(NO_MODALITY_WARNING)
    elif modality not in RADIOGRAPH_MODALITIES:
        kind = "not a radiograph" if modality == "other" else f"a {modality} image"
        raise InvalidImageError(f"This DICOM is {kind}; CovidScan reads chest radiographs (CR/DX/DR) only.")
    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames > 1:
        raise InvalidImageError(
            f"This DICOM holds {frames} frames (multi-frame); please upload a single chest radiograph."
        )
    transfer_syntax = dataset.file_meta.get("TransferSyntaxUID")
    if not transfer_syntax:
        raise InvalidImageError("The DICOM file does not say how its pixel data is encoded (no transfer syntax).")
    _check_decoder(transfer_syntax)
    photometric = _header_code(dataset, "PhotometricInterpretation", KNOWN_PHOTOMETRIC)
    if photometric not in MONOCHROME | COLOUR:
        shown = {None: "(missing)", "other": "(unknown)"}.get(photometric, photometric)
        raise UnsupportedImageError(
            f"DICOM images with photometric interpretation {shown} are not supported; "
            "CovidScan reads grayscale (MONOCHROME1/2) or RGB images."
        )
    samples = int(dataset.get("SamplesPerPixel") or 1)
    if samples != (1 if photometric in MONOCHROME else 3):
        raise InvalidImageError(DAMAGED_MESSAGE)
    rows, columns = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
    if rows < 1 or columns < 1:
        raise InvalidImageError("The DICOM file does not give the size of its image (Rows, Columns).")
    check_size(columns, rows)
    view_position = _header_code(dataset, "ViewPosition", KNOWN_VIEWS)
    if view_position in LATERAL_VIEWS:
        warnings.append(LATERAL_WARNING)
    if _header_code(dataset, "BurnedInAnnotation", {"YES"}) == "YES":
        warnings.append(BURNED_IN_WARNING)
    metadata = {
        "format": "DICOM",
        "modality": modality,
        "view_position": view_position,
        "photometric_interpretation": photometric,
        "rows": rows,
        "columns": columns,
        "bits_stored": int(dataset.get("BitsStored") or dataset.get("BitsAllocated") or 8),
        "transfer_syntax": _syntax_name(transfer_syntax),
    }
    return metadata, warnings


def _check_decoder(transfer_syntax):
    """415 unless pydicom has an installed plugin that decodes this transfer syntax."""
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as error:
        raise UnsupportedImageError(
            f"DICOM pixel data in the transfer syntax '{_syntax_name(transfer_syntax)}' cannot be decoded by CovidScan."
        ) from error
    if not decoder.is_available:
        raise UnsupportedImageError(
            f"DICOM pixel data in the transfer syntax '{_syntax_name(transfer_syntax)}' needs a decoder plugin "
            "that is not installed on this server."
        )


def _syntax_name(transfer_syntax):
    """The transfer syntax's name (its UID when pydicom does not know it), never arbitrary text."""
    return transfer_syntax.name if transfer_syntax.is_valid else "(not a valid UID)"


def _parsed_to_the_end(dataset, size):
    """True when the last element read ends exactly at the end of the bytes, i.e. nothing was cut off."""
    if not len(dataset):
        return False
    last = dataset.get_item(max(dataset.keys()))
    value_tell = getattr(last, "value_tell", None)
    if value_tell is None or last.length == 0xFFFFFFFF:
        return True  # already converted or of undefined length: its extent is unknown, assume complete
    return len(last.value or b"") == last.length and value_tell + last.length == size


def _header_code(dataset, keyword, vocabulary):
    """A code-string field, normalised, if it is in ``vocabulary``; "other" if not; None if absent or empty.

    The value is read from its raw bytes: pydicom's value validation would quote a malformed value
    (a name typed into the wrong field, say) in a warning and in its log.
    """
    element = dataset.get_item(keyword)
    value = None if element is None else element.value
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace").replace("\0", " ").split("\\")[0]
    elif isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if value else None
    text = " ".join(str(value or "").upper().split())
    if not text:
        return None
    return text if text in vocabulary else "other"


def _monochrome_to_uint8(pixels, dataset):
    """Modality LUT, then the file's VOI LUT or window (else a percentile window), MONOCHROME1 inverted."""
    values = apply_modality_lut(pixels, dataset)
    warnings = []
    window = None
    if _has_voi(dataset):
        try:
            window = _apply_voi(values, dataset)
        except _DECODING_ERRORS:
            window = None  # a malformed VOI is ignored, and the reader is told so just below
        if window is None:
            warnings.append(INVALID_WINDOW_WARNING)
    if window is not None:
        image, description = window
    elif _is_plain_8bit(pixels, values, dataset):
        # Already display values: keep them, as a PNG export of the same 8-bit data would be read.
        image, description = pixels, "none (8-bit values)"
    else:
        step = max(1, int(np.sqrt(values.size / PERCENTILE_SAMPLES)))  # a regular subsample of a huge film
        low, high = np.percentile(values[::step, ::step], PERCENTILE_WINDOW)
        if high <= low:
            low, high = float(values.min()), float(values.max())
        image = _linear_to_uint8(values, low, high)
        description = f"percentile {PERCENTILE_WINDOW[0]}-{PERCENTILE_WINDOW[1]}%"
    if _header_code(dataset, "PhotometricInterpretation", MONOCHROME) == "MONOCHROME1":
        image = 255 - image  # MONOCHROME1 stores bone dark; the model was trained with bone bright
    return np.ascontiguousarray(image, dtype=np.uint8), description, warnings


def _is_plain_8bit(pixels, values, dataset):
    """True for unsigned 8-bit pixels that the modality LUT left as they were."""
    if pixels.dtype != np.uint8 or int(dataset.BitsStored) != 8:
        return False
    return values is pixels or np.array_equal(values, pixels)


def _has_voi(dataset):
    """True when the file carries a VOI LUT or a window centre and width (the VOI pydicom would apply)."""
    if dataset.get("VOILUTSequence"):
        return True
    return dataset.get("WindowCenter") not in (None, "") and dataset.get("WindowWidth") not in (None, "")


def _apply_voi(values, dataset):
    """The file's VOI transform scaled to 0..255 with its description, or None when its output range is empty."""
    if dataset.get("VOILUTSequence"):
        # A VOI LUT is indexed by integers, and its output spans its own entries.
        values = np.rint(values).astype(np.int64)
        entries, first = (int(number) for number in dataset.VOILUTSequence[0].LUTDescriptor[:2])
        probe = np.arange(first, first + (entries or 2**16))
        description = "VOI LUT"
    else:
        # A window clamps to its bottom and top: mapping that range (not the image's) keeps the file's contrast.
        probe = np.array([-1e300, 1e300])
        description = "window centre/width"
    windowed = apply_voi_lut(values, dataset)
    with np.errstate(over="ignore"):
        output = apply_voi_lut(probe, dataset)
    low, high = float(np.min(output)), float(np.max(output))
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        return None
    return _linear_to_uint8(windowed, low, high), description


def _colour_to_uint8(pixels, bits_stored):
    """RGB pixels of any bit depth to 8-bit luma (ITU-R 601, as Pillow's RGB -> L)."""
    rgb = pixels.astype(np.float64)
    if pixels.dtype != np.uint8:
        rgb *= 255.0 / float(2 ** int(bits_stored) - 1)
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(luma + 0.5, 0, 255).astype(np.uint8)


def _linear_to_uint8(values, low, high):
    """Map low..high linearly onto 0..255, clipping outside."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    # float32, in place: one working copy of the film (a 25 MP float64 pipeline held 600 MB; issue 33)
    scaled = np.array(values, dtype=np.float32)
    scaled -= low
    scaled *= 255.0 / (high - low)
    scaled += 0.5
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)
