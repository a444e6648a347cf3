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
        return DecodedImage(image, metadata, warnings_for_reader)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image_format = image.format
            _check_header(image, image_format, max_pixels)
            image.load()
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidImageError("The image has too many pixels to be a chest X-ray (possible decompression bomb).") from error
    except UnidentifiedImageError as error:
        raise UnsupportedImageError("The file is not a PNG, JPEG or DICOM image.") from error
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
        raise InvalidImageError("The image is damaged or truncated and cannot be read.") from error
    grayscale = to_grayscale(image)
    metadata = {"format": image_format, "rows": grayscale.height, "columns": grayscale.width}
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
