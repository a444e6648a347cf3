"""Property tests of the upload decoder: whatever the bytes, it returns an image or raises one of our two errors."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import encode, make_xray_array
from model.errors import InvalidImageError, UnsupportedImageError
from model.decode import MAX_PIXELS, decode_upload

# A few hundred examples per property keeps the suite quick; raise it for a longer hunt.
EXAMPLES = int(os.environ.get("COVIDSCAN_FUZZ_EXAMPLES", "300"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI must not fail by luck
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def small_gray(seed=0, size=(64, 80)):
    return Image.fromarray(make_xray_array(seed, size=size), mode="L")


def dicom_seed():
    """A small valid DICOM file (the shared test factory of tests/test_dicom.py)."""
    from test_dicom import make_dataset, to_bytes

    pixels = make_xray_array(3, size=(48, 40)).astype(np.uint16) * 16
    return to_bytes(make_dataset(pixels, bits_stored=12, PatientName="Fuzz^Patient"))


SEEDS = {
    "png": encode(small_gray(1)),
    "png-rgba": encode(small_gray(2).convert("RGBA")),
    "png-16-bit": encode(Image.fromarray(make_xray_array(3, size=(64, 80)).astype(np.uint16) * 257)),
    "png-palette": encode(small_gray(4).convert("P", palette=Image.Palette.ADAPTIVE), transparency=0),
    "jpeg": encode(small_gray(5), "JPEG", quality=85),
    "jpeg-progressive": encode(small_gray(6), "JPEG", quality=85, progressive=True),
    "jpeg-cmyk": encode(small_gray(7).convert("CMYK"), "JPEG"),
}


SIGNATURES = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"II*\x00", b"BM", b"RIFF", b"\0" * 128 + b"DICM"]


def check_decodes_or_refuses(data):
    """The property: a usable 8-bit grayscale image, or InvalidImageError / UnsupportedImageError."""
    try:
        decoded = decode_upload(data)
    except (InvalidImageError, UnsupportedImageError) as error:
        assert str(error), "every refusal says why"
        return
    image = decoded.image
    assert image.mode == "L"
    assert 0 < image.width * image.height <= MAX_PIXELS


@st.composite
def mutated(draw, seeds):
    """A valid file with a few random edits: flipped bytes, overwritten runs, cuts, insertions, duplications."""
    data = bytearray(seeds[draw(st.sampled_from(sorted(seeds)))])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete", "duplicate", "header"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            patch = draw(st.binary(min_size=1, max_size=32))
            data[position : position + len(patch)] = patch
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 64))]
        elif kind == "duplicate":
            data[position:position] = data[position : position + draw(st.integers(1, 256))]
        elif kind == "header":
            # Headers hold sizes and lengths: the likeliest place for a decoder to trust a lie.
            offset = draw(st.integers(0, min(64, max(0, len(data) - 1))))
            data[offset : offset + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(data)


@FUZZ_SETTINGS
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data):
    check_decodes_or_refuses(data)


@FUZZ_SETTINGS
@given(st.sampled_from(SIGNATURES), st.binary(max_size=2048))
def test_known_signatures_followed_by_garbage(signature, tail):
    check_decodes_or_refuses(signature + tail)


@FUZZ_SETTINGS
@given(mutated(SEEDS))
def test_mutated_png_and_jpeg(data):
    check_decodes_or_refuses(data)


@pytest.fixture(scope="module")
def dicom_seeds():
    return {"dicom": dicom_seed()}


@settings(FUZZ_SETTINGS, max_examples=max(50, EXAMPLES // 2))
@given(data=st.data())
def test_mutated_dicom(dicom_seeds, data):
    check_decodes_or_refuses(data.draw(mutated(dicom_seeds)))


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_unmutated_seeds_decode(name):
    assert decode_upload(SEEDS[name]).image.mode == "L"


def test_dicom_with_a_misaligned_file_meta_group_is_refused(dicom_seeds):
    seed = dicom_seeds["dicom"]
    # One byte inserted after the (0002,0000) tag: pydicom then reads 4289 bytes as a 4-byte UL.
    check_decodes_or_refuses(seed[:136] + b"\0" + seed[136:])
