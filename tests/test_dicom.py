"""DICOM uploads: transfer syntaxes, the grey-level pipeline, sanity checks, privacy and ImageFolder loading."""

import io
import logging

import numpy as np
import pytest
from PIL import Image
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

import model.dicom
from model.data import IMAGE_EXTENSIONS, make_image_folder
from model.dicom import LATERAL_WARNING, NO_MODALITY_WARNING
from model.errors import InvalidImageError, UnsupportedImageError
from model.decode import decode_image, decode_upload
from tests.conftest import encode, make_xray_array

# Identifying fields written into every test file; none may surface in metadata, messages or logs.
PATIENT_FIELDS = {
    "PatientName": "Quixote^Dulcinea",
    "PatientID": "PID-314159",
    "PatientBirthDate": "19700101",
    "InstitutionName": "St Elsewhere Hospital",
    "ReferringPhysicianName": "Panza^Sancho",
    "AccessionNumber": "ACC-271828",
    "StudyDescription": "CHEST Dulcinea private note",
}
SECRETS = (
    "Quixote", "Dulcinea", "PID-314159", "19700101", "Elsewhere", "Panza", "Sancho", "ACC-271828", "private note"
)
TECHNICAL_KEYS = {
    "format",
    "modality",
    "view_position",
    "photometric_interpretation",
    "rows",
    "columns",
    "bits_stored",
    "transfer_syntax",
    "display_window",
}


def make_dataset(
    pixels, *, photometric="MONOCHROME2", bits_stored=None, transfer_syntax=ExplicitVRLittleEndian, **fields
):
    """A single-frame DX dataset around ``pixels`` (2-D, or rows x columns x 3 for RGB), with patient data."""
    with config.disable_value_validation():  # some tests write malformed values on purpose
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = transfer_syntax
        dataset = Dataset()
        dataset.file_meta = meta
        dataset.SOPClassUID = meta.MediaStorageSOPClassUID
        dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        for name, value in PATIENT_FIELDS.items():
            setattr(dataset, name, value)
        dataset.Modality = "DX"
        dataset.ViewPosition = "PA"
        dataset.Rows, dataset.Columns = pixels.shape[:2]
        dataset.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
        if pixels.ndim == 3:
            dataset.PlanarConfiguration = 0
        dataset.PhotometricInterpretation = photometric
        dataset.BitsAllocated = pixels.dtype.itemsize * 8
        dataset.BitsStored = bits_stored or dataset.BitsAllocated
        dataset.HighBit = dataset.BitsStored - 1
        dataset.PixelRepresentation = 0
        dataset.PixelData = pixels.tobytes()
        for name, value in fields.items():
            if value is None:
                delattr(dataset, name)
            else:
                setattr(dataset, name, value)
    return dataset


def to_bytes(dataset):
    """A DICOM Part 10 file (preamble, DICM, file meta) in memory."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_bytes(pixels, **options):
    """Shortcut: ``make_dataset`` then ``to_bytes``."""
    return to_bytes(make_dataset(pixels, **options))


def twelve_bit(seed=0, size=(128, 160)):
    """A 12-bit X-ray-like array (0..4080)."""
    return make_xray_array(seed, size=size).astype(np.uint16) * 16


def encapsulated(dataset, frame, transfer_syntax):
    """Replace the dataset's pixel data by one compressed frame in the given transfer syntax."""
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    dataset.PixelData = encapsulate([frame])
    dataset["PixelData"].VR = "OB"
    return dataset


def encode_jpeg_lossless(pixels, precision):
    """A JPEG lossless (process 14, first-order prediction, selection value 1) codestream, written by hand.

    No installed package encodes this syntax; it is the most common compression of CR/DX archives.
    """
    values = pixels.astype(np.int64)
    predicted = np.empty_like(values)
    predicted[0, 0] = 1 << (precision - 1)
    predicted[0, 1:] = values[0, :-1]
    predicted[1:, 0] = values[:-1, 0]
    predicted[1:, 1:] = values[1:, :-1]
    bits = []
    for difference in (values - predicted).ravel().tolist():
        category = abs(difference).bit_length()
        bits.append(format(category, "05b"))  # every category has a 5-bit Huffman code (table below)
        if category:
            extra = difference if difference > 0 else difference - 1
            bits.append(format(extra & ((1 << category) - 1), f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    payload = bytearray()
    for start in range(0, len(stream), 8):
        payload.append(int(stream[start : start + 8], 2))
        if payload[-1] == 0xFF:
            payload.append(0x00)

    def segment(marker, body):
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    rows, columns = pixels.shape
    frame_header = bytes([precision]) + rows.to_bytes(2, "big") + columns.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    huffman_table = bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    scan_header = bytes([1, 1, 0x00, 1, 0, 0])
    return (
        b"\xff\xd8"
        + segment(0xC3, frame_header)
        + segment(0xC4, huffman_table)
        + segment(0xDA, scan_header)
        + bytes(payload)
        + b"\xff\xd9"
    )


def window_linear(values, centre, width):
    """DICOM PS3.3 C.11.2.1.2 LINEAR window onto 0..255, computed independently of the decoder."""
    scaled = ((values - (centre - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(scaled, 0, 255)


def percentile_window(values):
    """The decoder's fallback window: 0.5 and 99.5 percentiles onto 0..255."""
    low, high = np.percentile(values.astype(np.float64), [0.5, 99.5])
    return np.clip((values - low) * 255.0 / (high - low), 0, 255)


def assert_close(decoded, expected, tolerance=2):
    """Every pixel within ``tolerance`` grey levels."""
    difference = np.abs(np.asarray(decoded, dtype=np.float64) - np.asarray(expected, dtype=np.float64))
    assert difference.max() <= tolerance, f"max difference {difference.max():.1f} grey levels"


def as_array(image):
    assert isinstance(image, Image.Image) and image.mode == "L"
    return np.asarray(image)


def test_monochrome2_8bit_is_read_as_stored():
    pixels = make_xray_array(1)
    decoded = decode_upload(dicom_bytes(pixels))
    np.testing.assert_array_equal(as_array(decoded.image), pixels)
    assert decoded.warnings == []
    assert decoded.metadata == {
        "format": "DICOM",
        "modality": "DX",
        "view_position": "PA",
        "photometric_interpretation": "MONOCHROME2",
        "rows": 256,
        "columns": 256,
        "bits_stored": 8,
        "transfer_syntax": "Explicit VR Little Endian",
        "display_window": "none (8-bit values)",
    }
    np.testing.assert_array_equal(as_array(decode_image(dicom_bytes(pixels))), pixels)


def test_monochrome1_16bit_applies_rescale_then_window_then_inverts():
    stored = twelve_bit(2)
    slope, intercept, centre, width = 2.0, -1024.0, 3000.0, 4000.0
    data = dicom_bytes(
        stored,
        photometric="MONOCHROME1",
        bits_stored=12,
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        WindowCenter=centre,
        WindowWidth=width,
    )
    decoded = decode_upload(data)
    expected = 255 - window_linear(stored * slope + intercept, centre, width)
    assert_close(as_array(decoded.image), expected)
    # The window clips at both ends on this image, so the test sees both the window and the inversion.
    assert as_array(decoded.image).min() == 0 and as_array(decoded.image).max() == 255
    assert decoded.metadata["display_window"] == "window centre/width"
    assert (decoded.metadata["photometric_interpretation"], decoded.metadata["bits_stored"]) == ("MONOCHROME1", 12)


def test_voi_lut_sequence_is_applied_over_its_own_output_range():
    stored = twelve_bit(3)
    first, entries = 500, 3000
    lut = np.round(4095 * (np.arange(entries) / (entries - 1)) ** 0.5).astype(int)  # a gamma curve, 12-bit out
    item = Dataset()
    item.add_new(0x00283002, "US", [entries, first, 12])  # LUT Descriptor
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    decoded = decode_upload(dicom_bytes(stored, bits_stored=12, VOILUTSequence=[item]))
    expected = lut[np.clip(stored.astype(int) - first, 0, entries - 1)] * 255.0 / 4095
    assert_close(as_array(decoded.image), expected)
    assert decoded.metadata["display_window"] == "VOI LUT"


def test_high_bit_depth_without_window_uses_a_percentile_window():
    stored = twelve_bit(4)
    decoded = decode_upload(dicom_bytes(stored, bits_stored=12))
    assert_close(as_array(decoded.image), percentile_window(stored))
    assert decoded.metadata["display_window"] == "percentile 0.5-99.5%"


def test_signed_pixels_with_rescale_and_window():
    stored = (twelve_bit(10).astype(np.int16) - 2048).astype(np.int16)
    data = dicom_bytes(
        stored, bits_stored=12, PixelRepresentation=1, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=-1500,
        WindowWidth=2000,
    )
    assert_close(as_array(decode_upload(data).image), window_linear(stored - 1000.0, -1500, 2000))


def test_invalid_window_is_ignored_with_a_warning():
    stored = twelve_bit(5)
    decoded = decode_upload(dicom_bytes(stored, bits_stored=12, WindowCenter=2000, WindowWidth=0))
    assert_close(as_array(decoded.image), percentile_window(stored))
    assert decoded.warnings == ["the DICOM file's display window (VOI) is invalid and was ignored"]


def test_implicit_vr_little_endian_is_read():
    pixels = make_xray_array(6)
    decoded = decode_upload(dicom_bytes(pixels, transfer_syntax=ImplicitVRLittleEndian))
    np.testing.assert_array_equal(as_array(decoded.image), pixels)
    assert decoded.metadata["transfer_syntax"] == "Implicit VR Little Endian"


def compress_native(dataset, transfer_syntax):
    dataset.compress(transfer_syntax)
    return dataset


def compress_jpeg_lossless(dataset, transfer_syntax):
    stored = dataset.pixel_array
    return encapsulated(dataset, encode_jpeg_lossless(stored, int(dataset.BitsStored)), transfer_syntax)


@pytest.mark.parametrize(
    ("transfer_syntax", "compress", "name"),
    [
        (RLELossless, compress_native, "RLE Lossless"),  # pydicom's own encoder and decoder
        (JPEG2000Lossless, compress_native, "JPEG 2000 Image Compression (Lossless Only)"),  # pylibjpeg-openjpeg
        (JPEGLSLossless, compress_native, "JPEG-LS Lossless Image Compression"),  # pyjpegls / pylibjpeg-libjpeg
        (JPEGLosslessSV1, compress_jpeg_lossless, "JPEG Lossless, Non-Hierarchical, First-Order Prediction"),
    ],
)
def test_lossless_transfer_syntaxes_decode_to_the_uncompressed_result(transfer_syntax, compress, name):
    stored = twelve_bit(7)
    options = dict(photometric="MONOCHROME1", bits_stored=12, WindowCenter=1800.0, WindowWidth=2500.0)
    reference = decode_upload(dicom_bytes(stored, **options))
    compressed = to_bytes(compress(make_dataset(stored, **options), transfer_syntax))
    decoded = decode_upload(compressed)
    np.testing.assert_array_equal(as_array(decoded.image), as_array(reference.image))
    assert decoded.metadata["transfer_syntax"].startswith(name)
    assert len(compressed) < len(dicom_bytes(stored, **options))


def test_jpeg_baseline_matches_pillows_decoding_of_the_same_codestream():
    pixels = make_xray_array(8)
    codestream = encode(Image.fromarray(pixels, mode="L"), "JPEG", quality=90)
    data = to_bytes(encapsulated(make_dataset(pixels), codestream, JPEGBaseline8Bit))
    decoded = decode_upload(data)
    assert_close(as_array(decoded.image), np.asarray(Image.open(io.BytesIO(codestream))), tolerance=1)
    assert decoded.metadata["transfer_syntax"] == "JPEG Baseline (Process 1)"


def test_rgb_dicom_is_converted_to_grayscale():
    gray = make_xray_array(9)
    rgb = np.stack([gray, np.flipud(gray), np.fliplr(gray)], axis=-1)
    decoded = decode_upload(dicom_bytes(rgb, photometric="RGB"))
    assert_close(as_array(decoded.image), np.asarray(Image.fromarray(rgb, mode="RGB").convert("L")), tolerance=1)
    assert decoded.metadata["photometric_interpretation"] == "RGB"


def multi_frame():
    frames = np.stack([make_xray_array(seed) for seed in (1, 2, 3)])
    dataset = make_dataset(frames[0])
    dataset.NumberOfFrames = 3
    dataset.PixelData = frames.tobytes()
    return to_bytes(dataset)


def without_pixel_data():
    dataset = make_dataset(make_xray_array(1))
    del dataset.PixelData
    return to_bytes(dataset)


def without_transfer_syntax():
    dataset = make_dataset(make_xray_array(1))
    del dataset.file_meta.TransferSyntaxUID
    dataset.preamble = bytes(128)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=False, little_endian=True, implicit_vr=False)
    assert buffer.getvalue()[128:132] == b"DICM"
    return buffer.getvalue()


def truncated(fraction):
    data = dicom_bytes(twelve_bit(1), bits_stored=12)
    return data[: int(len(data) * fraction)]


def truncated_compressed():
    dataset = make_dataset(twelve_bit(1), bits_stored=12)
    dataset.compress(JPEG2000Lossless)
    data = to_bytes(dataset)
    return data[: len(data) * 2 // 3]


def mpeg2():
    mpeg2_main_profile = UID("1.2.840.10008.1.2.4.100")
    return to_bytes(encapsulated(make_dataset(make_xray_array(1)), b"\x00\x00\x01\xb3" + bytes(60), mpeg2_main_profile))


@pytest.mark.parametrize(
    ("build", "error", "status", "message"),
    [
        (lambda: dicom_bytes(make_xray_array(1), Modality="CT"), InvalidImageError, 400,
         "This DICOM is a CT image; CovidScan reads chest radiographs (CR/DX/DR) only."),
        (lambda: dicom_bytes(make_xray_array(1), Modality="MR"), InvalidImageError, 400, "This DICOM is a MR image"),
        (lambda: dicom_bytes(make_xray_array(1), Modality="Quixote"), InvalidImageError, 400,
         "This DICOM is not a radiograph; CovidScan reads chest radiographs"),
        (multi_frame, InvalidImageError, 400, "This DICOM holds 3 frames (multi-frame)"),
        (without_pixel_data, InvalidImageError, 400, "The DICOM file has no image (pixel data)."),
        (without_transfer_syntax, InvalidImageError, 400, "no transfer syntax"),
        (lambda: truncated(0.1), InvalidImageError, 400, "damaged or truncated"),
        (lambda: truncated(0.5), InvalidImageError, 400, "damaged or truncated"),
        (lambda: truncated(0.999), InvalidImageError, 400, "damaged or truncated"),
        (truncated_compressed, InvalidImageError, 400, "damaged or truncated"),
        (lambda: bytes(128) + b"DICM", InvalidImageError, 400, "damaged or truncated"),
        (lambda: bytes(128) + b"DICM" + b"not a data set at all" * 8, InvalidImageError, 400, "DICOM"),
        (lambda: dicom_bytes(make_xray_array(1, size=(16, 256))), InvalidImageError, 400, "at least 32 pixels"),
        (lambda: dicom_bytes(make_xray_array(1, size=(40, 400))), InvalidImageError, 400, "not the shape"),
        (mpeg2, UnsupportedImageError, 415,
         "DICOM pixel data in the transfer syntax 'MPEG2 Main Profile / Main Level' cannot be decoded"),
        (lambda: dicom_bytes(make_xray_array(1), photometric="PALETTE COLOR"), UnsupportedImageError, 415,
         "photometric interpretation PALETTE COLOR are not supported"),
    ],
    ids=["ct", "mr", "free-text-modality", "multi-frame", "no-pixel-data", "no-transfer-syntax", "truncated-header",
         "truncated-pixels", "truncated-last-byte", "truncated-jpeg2000", "bare-preamble", "garbage-after-preamble",
         "too-small", "sliver", "mpeg2", "palette-colour"],
)
@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_bad_dicom_is_refused_with_a_reason(build, error, status, message):
    with pytest.raises(error) as raised:
        decode_upload(build())
    assert type(raised.value) is error
    assert raised.value.status_code == status
    assert message in str(raised.value)


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    data = dicom_bytes(make_xray_array(1, size=(256, 320)))
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda self: pytest.fail("pixels decoded")))
    with pytest.raises(InvalidImageError, match=r"too many pixels \(320x256\)"):
        decode_upload(data, max_pixels=50_000)


def test_missing_decoder_plugin_is_415_with_the_syntax_name(monkeypatch):
    dataset = make_dataset(twelve_bit(1), bits_stored=12)
    dataset.compress(JPEG2000Lossless)
    data = to_bytes(dataset)

    class MissingPlugins:
        is_available = False

    monkeypatch.setattr(model.dicom, "get_decoder", lambda transfer_syntax: MissingPlugins())
    with pytest.raises(UnsupportedImageError, match=r"'JPEG 2000 Image Compression \(Lossless Only\)' needs a decoder"):
        decode_upload(data)


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "L", "lateral "])
def test_lateral_view_is_accepted_with_a_warning(view):
    decoded = decode_upload(dicom_bytes(make_xray_array(1), ViewPosition=view))
    assert decoded.warnings == [LATERAL_WARNING]
    assert decoded.metadata["view_position"] == view.strip().upper()


@pytest.mark.parametrize("view", ["PA", "AP", None])
def test_frontal_or_unknown_view_has_no_warning(view):
    decoded = decode_upload(dicom_bytes(make_xray_array(1), ViewPosition=view))
    assert decoded.warnings == []
    assert decoded.metadata["view_position"] == view


@pytest.mark.parametrize("modality", ["CR", "DX", "DR"])
def test_radiograph_modalities_are_accepted(modality):
    assert decode_upload(dicom_bytes(make_xray_array(1), Modality=modality)).metadata["modality"] == modality


def test_missing_modality_is_accepted_with_a_warning():
    decoded = decode_upload(dicom_bytes(make_xray_array(1), Modality=None))
    assert decoded.warnings == [NO_MODALITY_WARNING]
    assert decoded.metadata["modality"] is None


def test_burned_in_annotation_is_flagged():
    decoded = decode_upload(dicom_bytes(make_xray_array(1), BurnedInAnnotation="YES"))
    assert any("burned-in" in warning for warning in decoded.warnings)


def test_dicom_is_recognised_by_content_not_name(tmp_path):
    path = tmp_path / "IM000001"  # PACS exports often have no extension
    path.write_bytes(dicom_bytes(make_xray_array(1)))
    np.testing.assert_array_equal(as_array(decode_image(path.read_bytes())), make_xray_array(1))


def test_preambleless_dicom_is_not_an_image():
    data = dicom_bytes(make_xray_array(1))[128:]  # starts with DICM, no preamble
    with pytest.raises(UnsupportedImageError, match="not a PNG, JPEG or DICOM image"):
        decode_upload(data)


def test_png_upload_gets_the_same_result_shape():
    decoded = decode_upload(encode(Image.fromarray(make_xray_array(1, size=(200, 240)), mode="L")))
    assert decoded.metadata == {"format": "PNG", "rows": 200, "columns": 240}
    assert decoded.warnings == []


PRIVACY_CASES = {
    "accepted": lambda: dicom_bytes(twelve_bit(1), bits_stored=12, WindowCenter=2000, WindowWidth=3000),
    "lateral": lambda: dicom_bytes(make_xray_array(1), ViewPosition="LL"),
    "names-in-technical-fields": lambda: dicom_bytes(
        make_xray_array(1), ViewPosition="Quixote^Dulcinea", BurnedInAnnotation="Dulcinea", Modality="Panza"
    ),
    "bad-window": lambda: dicom_bytes(twelve_bit(1), bits_stored=12, WindowCenter=1, WindowWidth=0),
    "ct": lambda: dicom_bytes(make_xray_array(1), Modality="CT"),
    "truncated": lambda: truncated(0.5),
    "no-pixels": without_pixel_data,
}


@pytest.mark.parametrize("case", sorted(PRIVACY_CASES))
def test_no_patient_or_institution_data_in_metadata_messages_or_logs(case, caplog, recwarn):
    data = PRIVACY_CASES[case]()
    caplog.clear()
    recwarn.clear()  # writing the test file may warn about the odd values; only decoding is under test
    caplog.set_level(logging.DEBUG)
    try:
        decoded = decode_upload(data)
    except InvalidImageError as error:
        shown = str(error)
    else:
        shown = repr(decoded.metadata) + repr(decoded.warnings)
        assert set(decoded.metadata) == TECHNICAL_KEYS
    if case == "names-in-technical-fields":
        assert shown.startswith("This DICOM is not a radiograph")
    shown += caplog.text + "".join(str(warning.message) for warning in recwarn)
    for secret in SECRETS:
        assert secret.lower() not in shown.lower()


def test_image_folder_loads_dicom_files(tmp_path):
    assert ".dcm" in IMAGE_EXTENSIONS
    arrays = {}
    for label, seed in (("NORMAL", 1), ("PNEUMONIA", 2)):
        folder = tmp_path / label
        folder.mkdir()
        arrays[label] = make_xray_array(seed, size=(64, 64), label=label)
        (folder / "a.dcm").write_bytes(dicom_bytes(arrays[label], photometric="MONOCHROME2"))
        (folder / "b.DCM").write_bytes(dicom_bytes(255 - arrays[label], photometric="MONOCHROME1"))
        Image.fromarray(arrays[label], mode="L").save(folder / "c.png")
    dataset = make_image_folder(tmp_path)
    assert len(dataset) == 6 and dataset.classes == ["NORMAL", "PNEUMONIA"]
    for path, target in dataset.samples:
        image, label_index = dataset[dataset.samples.index((path, target))]
        np.testing.assert_array_equal(as_array(image), arrays[dataset.classes[label_index]])


def test_predictor_passes_dicom_warnings_and_metadata(tiny_checkpoint_path):
    from model.inference import Predictor

    predictor = Predictor.from_path(tiny_checkpoint_path)
    prediction = predictor.predict_bytes(dicom_bytes(make_xray_array(1), ViewPosition="LL"), with_heatmap=False)
    assert prediction.warnings == [LATERAL_WARNING]
    assert prediction.metadata["modality"] == "DX" and prediction.metadata["view_position"] == "LL"
    png = predictor.predict_bytes(encode(Image.fromarray(make_xray_array(1), mode="L")), with_heatmap=False)
    assert png.warnings == [] and png.metadata == {"format": "PNG", "rows": 256, "columns": 256}
