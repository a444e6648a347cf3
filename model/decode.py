"""Uploaded bytes (PNG, JPEG or DICOM) -> an 8-bit grayscale image with technical metadata, or a clear error."""

import dataclasses
import functools
import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from model.dicom import decode_dicom
from model.errors import InvalidImageError, UnsupportedImageError
from model.ood import colourfulness

logger = logging.getLogger(__name__)

# Raster formats we accept; others are well-formed but refused (415) rather than guessed at.
ACCEPTED_FORMATS = ("PNG", "JPEG")
# A 4096x4096 detector is the largest common CR/DX size; 50 MP leaves room and stops bombs early.
MAX_PIXELS = 50_000_000
MIN_SIDE = 32
MAX_ASPECT_RATIO = 8.0
# Bounded cost per upload (issue 33: at most 1.5 s and 300 MB of extra worker memory for any upload under the limits,
# benchmarks/bench_worst_inputs.py): a larger image is decoded or reduced to at most this many pixels a side before
# anything else is done with it. A JPEG larger than that decodes at 1/2, 1/4 or 1/8 scale directly (draft mode);
# other formats are decoded whole, then reduced. Far above what the model (224 px), the heatmap (768 px) or the border
# trim need, and above every common detector, whose films are decoded exactly as before.
WORKING_MAX_SIDE = 4096
# Decoded pixels of a raster image, in bytes, beyond which it is refused rather than decoded (a 50 MP RGBA image is
# 200 MB; Pillow decodes 16-bit colour PNGs to 8 bits a sample).
MAX_DECODED_BYTES = 210_000_000
# Modes that Image.reduce averages without a full-size copy (it premultiplies alpha modes into one).
BOX_REDUCIBLE_MODES = ("L", "RGB", "I", "F", "CMYK", "YCbCr")

# Pillow must never hand us a half-decoded image silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """An upload decoded for the model, with technical facts about the file and warnings for the reader."""

    image: Image.Image  # 8-bit grayscale ("L")
    metadata: dict  # format, rows, columns; for DICOM also technical header fields, never patient data
    warnings: list  # plain sentences to show next to the result, e.g. a lateral view
    colourfulness: float = 0.0  # model.ood.colourfulness of the file before the grayscale conversion


def decode_upload(data, *, max_pixels=MAX_PIXELS):
    """Decode uploaded bytes (PNG, JPEG or DICOM) into a ``DecodedImage``, or raise ``InvalidImageError``."""
    if not data:
        raise InvalidImageError("The file is empty.")
    if looks_like_dicom(data):
        image, metadata, warnings_for_reader = decode_dicom(
            data, check_size=functools.partial(check_image_size, max_pixels=max_pixels))
        return DecodedImage(reduce_to_working_size(image), metadata, warnings_for_reader)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image_format = image.format
            _check_header(image, image_format, max_pixels)
            original_size = image.size
            if image_format == "JPEG" and max(image.size) > WORKING_MAX_SIDE:
                # DCT scaling: decode at the 1/2^k scale that leaves at least half of WORKING_MAX_SIDE a side.
                image.draft(None, (WORKING_MAX_SIDE // 2, WORKING_MAX_SIDE // 2))
            _check_decoded_bytes(image)
            image.load()
            image = reduce_to_working_size(image)
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidImageError("The image has too many pixels to be a chest X-ray (possible decompression bomb).") from error
    except UnidentifiedImageError as error:
        raise UnsupportedImageError("The file is not a PNG, JPEG or DICOM image.") from error
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
        raise InvalidImageError("The image is damaged or truncated and cannot be read.") from error
    grayscale = to_grayscale(image)
    columns, rows = original_size
    if (grayscale.width > grayscale.height) != (image.width > image.height):
        columns, rows = rows, columns  # EXIF orientation turned it a quarter
    metadata = {"format": image_format, "rows": rows, "columns": columns}
    return DecodedImage(grayscale, metadata, [], colourfulness=colourfulness(image))


def decode_image(data, *, max_pixels=MAX_PIXELS):
    """Decode uploaded bytes into an 8-bit grayscale ``PIL.Image`` ("L"), or raise ``InvalidImageError``."""
    return decode_upload(data, max_pixels=max_pixels).image


def looks_like_dicom(data):
    """True for DICOM Part 10 files (128-byte preamble then ``DICM``), whatever their name."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _check_header(image, image_format, max_pixels):
    """Refuse wrong formats and absurd sizes before any pixel is decoded."""
    if image_format not in ACCEPTED_FORMATS:
        raise UnsupportedImageError(
            f"{image_format or 'This'} images are not accepted; please upload a PNG, JPEG or DICOM file."
        )
    check_image_size(*image.size, max_pixels=max_pixels)
    if getattr(image, "n_frames", 1) > 1:
        raise InvalidImageError("Animated or multi-frame images are not accepted; please upload a single image.")


def _check_decoded_bytes(image):
    """Refuse a raster image whose decoded pixels alone would exceed MAX_DECODED_BYTES (checked before decoding)."""
    bands = len(image.getbands())
    sample_bytes = 2 if image.mode.startswith("I;16") else 4 if image.mode in ("I", "F") else 1
    decoded = image.width * image.height * bands * sample_bytes
    if decoded > MAX_DECODED_BYTES:
        raise InvalidImageError(
            f"The image is too large to decode ({image.width}x{image.height} pixels, {image.mode}); "
            "please upload it at a lower resolution or as grayscale."
        )


def reduce_to_working_size(image, max_side=None):
    """The image at most ``max_side`` (default WORKING_MAX_SIDE) pixels a side; a smaller one is returned as it is.

    A box average where Pillow makes it without a full-size copy, else every n-th pixel.
    """
    factor = -(-max(image.size) // (max_side or WORKING_MAX_SIDE))
    if factor <= 1:
        return image
    if image.mode in BOX_REDUCIBLE_MODES:
        return image.reduce(factor)
    size = (-(-image.width // factor), -(-image.height // factor))
    return image.resize(size, Image.Resampling.NEAREST)  # alpha, palette and 16-bit modes: no full-size copy


def check_image_size(width, height, *, max_pixels=MAX_PIXELS):
    """Refuse absurd image sizes (bombs, slivers, thumbnails) from the header alone."""
    if width * height > max_pixels:
        raise InvalidImageError(
            f"The image has too many pixels ({width}x{height}); at most {max_pixels // 1_000_000} megapixels are accepted."
        )
    if min(width, height) < MIN_SIDE:
        raise InvalidImageError(f"The image is {width}x{height} pixels; each side must be at least {MIN_SIDE} pixels.")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InvalidImageError(f"The image is {width}x{height} pixels; that is not the shape of a chest X-ray.")


def to_grayscale(image):
    """Convert any Pillow mode to 8-bit grayscale, honouring EXIF orientation, alpha and bit depth."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _scale_to_uint8(np.asarray(image, dtype=np.float32))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent areas become black, the background of an X-ray.
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode != "L":
        image = image.convert("RGB").convert("L")
    return image


def _scale_to_uint8(pixels):
    """Linearly window a high-bit-depth array onto 0..255."""
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return Image.fromarray(np.zeros(pixels.shape, dtype=np.uint8), mode="L")
    scaled = (pixels - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), mode="L")
