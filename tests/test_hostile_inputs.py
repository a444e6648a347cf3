"""Hostile uploads, made in memory, sent to the form and the API: each gets its documented answer, never a 500."""

import dataclasses
import html
import io
import json
import re
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from conftest import CLASS_NAMES, encode, make_xray_array
from servers import BOUNDARY, Upload, file_upload, form_session, multipart, request, start_gunicorn

UPLOAD_LIMIT_MB = 8
NOT_AN_IMAGE = "The file is not a PNG, JPEG or DICOM image."
DAMAGED = "The image is damaged or truncated and cannot be read."
NO_FILE = "No file was uploaded: send the image as multipart/form-data in a field named 'file'."
CHOOSE_FILE = "Please choose a chest X-ray image (PNG, JPEG or DICOM) to upload."
CSRF_MISSING = "The form's security token is missing or has expired"
ONE_FILE = "Send one image per request; this request has 2 files in the field 'file'."
TOO_MANY_PARTS = "The request has too many form fields or an oversized text field"
TOO_LARGE = f"The upload is larger than the {UPLOAD_LIMIT_MB} MB limit."
TOO_MANY_PIXELS = "too many pixels"
UNREADABLE_FORM = "The upload could not be read: its multipart form data is malformed"
LONG_UNICODE_NAME = ("胸部X線写真-Ωμέγα-😷" * 20)[:296] + ".png"
ENDPOINTS = {"form": "/predict", "api": "/api/v1/predict"}


# --------------------------------------------------------------------------- images, made in memory


def gray(seed=1, size=(256, 256)):
    """A synthetic chest X-ray as a PIL "L" image (size is height, width)."""
    return Image.fromarray(make_xray_array(seed, size=size), mode="L")


def xray_png():
    return encode(gray())


def xray_jpeg():
    return encode(gray(2, size=(256, 320)), "JPEG", quality=90)


def png_chunk(kind, data):
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width, height, pixels=b""):
    """A PNG whose header claims ``width`` x ``height`` 8-bit gray pixels, with whatever data follows."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(pixels))
            + png_chunk(b"IEND", b""))


def chunk_offset(png, kind):
    """Offset of the length field of the first chunk of ``kind``."""
    return png.index(kind) - 4


def bad_crc(png, kind):
    """``png`` with the CRC of its first ``kind`` chunk zeroed (the chunk's data untouched)."""
    start = chunk_offset(png, kind)
    (length,) = struct.unpack(">I", png[start : start + 4])
    crc = start + 8 + length
    return png[:crc] + b"\0\0\0\0" + png[crc + 4 :]


def corrupt_idat(png):
    """Scramble the compressed pixels inside the IDAT chunk (and so its CRC no longer matches)."""
    start = chunk_offset(png, b"IDAT") + 8
    damaged = bytearray(png)
    damaged[start + 20 : start + 220] = bytes(range(200))
    return bytes(damaged)


def with_text_chunk(png, kind, data):
    """Insert a chunk right after IHDR."""
    after_header = 8 + 25
    return png[:after_header] + png_chunk(kind, data) + png[after_header:]


def huge_itxt_png():
    """A valid X-ray carrying 4 MB of uncompressed iTXt text (under Pillow's text-memory limits)."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("Comment", "x" * (4 * 1024 * 1024), zip=False)
    return encode(gray(), pnginfo=info)


def itxt_zlib_bomb_png():
    """A valid X-ray with an iTXt chunk that inflates to 64 MB (Pillow stops at its text limit)."""
    payload = zlib.compress(b"A" * (64 * 1024 * 1024), 9)
    return with_text_chunk(xray_png(), b"iTXt", b"Comment\0\x01\x00\0\0" + payload)


def jpeg_claiming(width, height):
    """A small JPEG whose start-of-frame header claims ``width`` x ``height``."""
    data = xray_jpeg()
    frame = data.index(b"\xff\xc0")
    return data[: frame + 5] + struct.pack(">HH", height, width) + data[frame + 9 :]


def animated(image_format):
    frames = [gray(seed) for seed in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, image_format, save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def sixteen_bit_png():
    image = Image.fromarray(make_xray_array(5).astype(np.uint16) * 257)
    assert image.mode == "I;16"
    return encode(image)


def palette_png_with_transparency():
    return encode(gray(8).convert("P", palette=Image.Palette.ADAPTIVE), transparency=0)


def exif_rotated_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to display
    return encode(gray(4, size=(256, 320)), "JPEG", quality=90, exif=exif)


def zip_archive():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("xray.png", xray_png())
    return buffer.getvalue()


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
HTML_PAGE = b"<!doctype html><html><body><script>alert('x')</script><img src=x onerror=alert(1)></body></html>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script><rect width="64" height="64"/></svg>'


# --------------------------------------------------------------------------- the corpus


def send_file(make, **options):
    """A case that uploads ``make()`` as the field ``file`` (after the form's CSRF field, if any)."""
    return lambda fields: file_upload(make(), fields=fields, **options)


def send_raw(body, content_type):
    """A case whose whole body is ``body`` (no form fields can ride along, so the form lacks its token)."""
    return lambda fields: Upload(body, content_type)


def send_parts(*parts):
    """A multipart body of ``parts`` (name, file name, Content-Type, bytes) after the form fields."""
    def build(fields):
        form_parts = [(name, None, None, value.encode()) for name, value in fields]
        return Upload(multipart(form_parts + [part() if callable(part) else part for part in parts]),
                      f"multipart/form-data; boundary={BOUNDARY}")
    return build


@dataclasses.dataclass(frozen=True)
class Hostile:
    """One hostile request: how to build it, and the documented answer of the API and of the form."""

    name: str
    build: object  # fields (the form's CSRF token, or nothing) -> Upload
    status: int
    message: str | None  # in the API's {"error": ...}; None for a 200
    form_status: int | None = None
    form_message: str | None = None

    def expected(self, endpoint):
        if endpoint == "form":
            return self.form_status or self.status, self.form_message or self.message
        return self.status, self.message


HOSTILE_INPUTS = [
    # the request itself
    Hostile("empty-body", send_raw(b"", None), 400, NO_FILE, form_message=CSRF_MISSING),
    Hostile("missing-file-field", send_parts(("note", None, None, b"no file here")), 400, NO_FILE,
            form_message=CHOOSE_FILE),
    Hostile("file-sent-as-text-field", send_parts(("file", None, None, b"not a file part")), 400, NO_FILE,
            form_message=CHOOSE_FILE),
    Hostile("two-file-fields", send_parts(lambda: ("file", "a.png", "image/png", xray_png()),
                                          lambda: ("file", "b.png", "image/png", xray_png())), 400, ONE_FILE),
    Hostile("body-not-multipart", send_raw(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png"), 400, NO_FILE,
            form_message=CSRF_MISSING),
    Hostile("json-body", send_raw(b'{"file": "aGVsbG8="}', "application/json"), 400, NO_FILE,
            form_message=CSRF_MISSING),
    Hostile("multipart-without-boundary", lambda fields: Upload(file_upload(xray_png()).body, "multipart/form-data"),
            400, UNREADABLE_FORM),
    Hostile("malformed-multipart", send_raw(b"--" + BOUNDARY.encode() + b"\r\ngarbage without end",
                                            f"multipart/form-data; boundary={BOUNDARY}"), 400, UNREADABLE_FORM),
    Hostile("too-many-form-parts", send_parts(*[(f"field{index}", None, None, b"x") for index in range(1500)]),
            413, TOO_MANY_PARTS),
    Hostile("oversized-text-field", send_parts(("note", None, None, b"x" * (700 * 1024))), 413, TOO_MANY_PARTS),
    Hostile("over-limit-body", send_file(lambda: xray_png() + b"\0" * (UPLOAD_LIMIT_MB * 1024 * 1024)), 413,
            TOO_LARGE),
    # files that are not images, under an image's name
    Hostile("empty-file", send_file(lambda: b""), 400, "The file is empty."),
    Hostile("plain-text-as-png", send_file(lambda: b"patient notes, not pixels\n" * 40), 415, NOT_AN_IMAGE),
    Hostile("html-as-png", send_file(lambda: HTML_PAGE), 415, NOT_AN_IMAGE),
    Hostile("svg-with-script-as-png", send_file(lambda: SVG), 415, NOT_AN_IMAGE),
    Hostile("pdf-as-png", send_file(lambda: PDF), 415, NOT_AN_IMAGE),
    Hostile("zip-as-png", send_file(zip_archive), 415, NOT_AN_IMAGE),
    Hostile("png-signature-only", send_file(lambda: b"\x89PNG\r\n\x1a\n"), 415, NOT_AN_IMAGE),
    # damaged images
    Hostile("truncated-png", send_file(lambda: xray_png()[: len(xray_png()) // 2]), 400, DAMAGED),
    Hostile("truncated-jpeg", send_file(lambda: xray_jpeg()[: len(xray_jpeg()) // 2], filename="x.jpg",
                                        content_type="image/jpeg"), 400, DAMAGED),
    Hostile("jpeg-headers-only", send_file(lambda: xray_jpeg()[:300], filename="x.jpg"), 400, DAMAGED),
    Hostile("png-bad-header-crc", send_file(lambda: bad_crc(xray_png(), b"IHDR")), 415, NOT_AN_IMAGE),
    Hostile("png-bad-pixel-crc-intact-pixels", send_file(lambda: bad_crc(xray_png(), b"IDAT")), 200, None),
    Hostile("png-scrambled-pixels", send_file(lambda: corrupt_idat(xray_png())), 400, DAMAGED),
    # absurd sizes
    Hostile("png-0x0-header", send_file(lambda: crafted_png(0, 0)), 415, NOT_AN_IMAGE),
    Hostile("png-1x1", send_file(lambda: encode(Image.new("L", (1, 1)))), 400,
            "The image is 1x1 pixels; each side must be at least 32 pixels."),
    Hostile("png-1x100000-strip", send_file(lambda: encode(Image.new("L", (1, 100_000)))), 400,
            "The image is 1x100000 pixels"),
    Hostile("png-bomb-over-pillow-limit", send_file(lambda: crafted_png(40_000, 40_000, b"\0" * 64)), 400,
            TOO_MANY_PIXELS),
    Hostile("png-64-megapixel-header", send_file(lambda: crafted_png(8_000, 8_000, b"\0" * 64)), 400,
            "The image has too many pixels (8000x8000)"),
    Hostile("jpeg-65000x65000-header", send_file(lambda: jpeg_claiming(65_000, 65_000), filename="x.jpg"), 400,
            TOO_MANY_PIXELS),
    Hostile("png-huge-itxt-chunk", send_file(huge_itxt_png), 200, None),
    Hostile("png-itxt-zlib-bomb", send_file(itxt_zlib_bomb_png), 400, DAMAGED),
    # other formats and odd but valid images
    Hostile("animated-gif", send_file(lambda: animated("GIF"), filename="x.gif"), 415,
            "GIF images are not accepted; please upload a PNG, JPEG or DICOM file."),
    Hostile("animated-png", send_file(lambda: animated("PNG")), 400, "Animated or multi-frame images are not accepted"),
    Hostile("tiff", send_file(lambda: encode(gray(), "TIFF"), filename="x.tif"), 415, "TIFF images are not accepted"),
    Hostile("webp", send_file(lambda: encode(gray(), "WEBP"), filename="x.webp"), 415, "WEBP images are not accepted"),
    Hostile("bmp", send_file(lambda: encode(gray(), "BMP"), filename="x.bmp"), 415, "BMP images are not accepted"),
    Hostile("cmyk-jpeg", send_file(lambda: encode(gray(3).convert("CMYK"), "JPEG"), filename="x.jpg"), 200, None),
    Hostile("progressive-jpeg", send_file(lambda: encode(gray(3), "JPEG", progressive=True)), 200, None),
    Hostile("16-bit-grayscale-png", send_file(sixteen_bit_png), 200, None),
    Hostile("palette-png-with-transparency", send_file(palette_png_with_transparency), 200, None),
    Hostile("exif-rotated-jpeg", send_file(exif_rotated_jpeg, filename="x.jpg"), 200, None),
    # names and labels
    Hostile("file-name-with-dot-dot", send_file(xray_png, filename="../../../etc/passwd.png"), 200, None),
    Hostile("file-name-with-nul", send_file(xray_png, filename="xray.png\x00.exe"), 200, None),
    Hostile("file-name-300-unicode-characters", send_file(xray_png, filename=LONG_UNICODE_NAME), 200, None),
    Hostile("wrong-part-content-type", send_file(xray_png, content_type="application/x-msdownload"), 200, None),
]
CASE_IDS = [case.name for case in HOSTILE_INPUTS]
# Never echoed back: the app does not use upload names at all.
NAME_FRAGMENTS = ("passwd", ".exe", LONG_UNICODE_NAME[:12])


# --------------------------------------------------------------------------- checking an answer


@dataclasses.dataclass
class Answer:
    """The parts of a response the checks need, from Flask's test client or from a real server."""

    status: int
    content_type: str
    text: str
    request_id: str

    @classmethod
    def from_flask(cls, response):
        return cls(response.status_code, response.mimetype, response.get_data(as_text=True),
                   response.headers.get("X-Request-ID", ""))

    @classmethod
    def from_wire(cls, response):
        return cls(response.status, response.headers.get("content-type", "").split(";")[0], response.text,
                   response.headers.get("x-request-id", ""))


def check_answer(case, endpoint, answer):
    """The documented status and message, the right kind of page, no trace of internals."""
    status, message = case.expected(endpoint)
    assert answer.status == status, f"{case.name} via {endpoint}: {answer.status}\n{answer.text[:2000]}"
    assert "Traceback" not in answer.text and 'File "/' not in answer.text
    assert len(answer.request_id) == 32
    # The result page shows the upload's name (issue 34) in one element only, as its last path part without
    # control characters, escaped and shortened; nothing else (errors, the API, the title) ever echoes it.
    shown = re.findall(r'<strong data-role="filename">(.*?)</strong>', answer.text, flags=re.S)
    assert len(shown) <= 1 and (not shown or (endpoint == "form" and status == 200))
    for name in map(html.unescape, shown):
        assert "/" not in name and "\\" not in name and not any(ord(char) < 32 for char in name), name
        assert len(name) <= 120
    rest = re.sub(r'<strong data-role="filename">.*?</strong>', "", answer.text, flags=re.S)
    for fragment in NAME_FRAGMENTS:
        assert fragment not in rest, "the upload's name is echoed nowhere but its place on the result page"
    if endpoint == "api":
        assert answer.content_type == "application/json"
    else:
        assert answer.content_type == "text/html"
    if status == 200:
        if endpoint == "api":
            result = json.loads(answer.text)
            flagged = bool(result["ood"] and result["ood"]["flagged"])
            assert result["label"] is None if flagged else result["label"] in CLASS_NAMES
        else:
            assert 'class="predicted-label"' in answer.text
        return
    text = html.unescape(answer.text)
    assert message in text, f"{case.name} via {endpoint}: {message!r} not in\n{text[:2000]}"
    if endpoint == "form":
        assert 'role="alert"' in text and 'enctype="multipart/form-data"' in text, "the form comes back"
        assert answer.request_id in text, "the refused-upload page shows the request id"


# --------------------------------------------------------------------------- through Flask's test client


@pytest.fixture(scope="module")
def corpus_app(tiny_checkpoint_path):
    """A production-like app (CSRF on, no rate limit) with a small upload limit, shared by the corpus."""
    from app import create_app

    return create_app({
        "TESTING": True,
        "SECRET_KEY": "test-secret",
        "MODEL_PATH": str(tiny_checkpoint_path),
        "MAX_UPLOAD_MB": UPLOAD_LIMIT_MB,
        "RATE_LIMIT": "off",
    })


@pytest.fixture(scope="module")
def browser_client(corpus_app):
    """A test client that has loaded the upload form, so it holds the session cookie and the CSRF token."""
    client = corpus_app.test_client()
    page = client.get("/").get_data(as_text=True)
    client.csrf_token = page.split('name="csrf_token" type="hidden" value="', 1)[1].split('"', 1)[0]
    return client


def post(client, endpoint, upload):
    """POST an ``Upload`` through the test client, byte for byte."""
    headers = dict(upload.headers)
    if upload.content_type is not None:
        headers["Content-Type"] = upload.content_type
    return client.post(ENDPOINTS[endpoint], data=upload.body, headers=headers)


def test_corpus_is_large_enough():
    assert len(HOSTILE_INPUTS) >= 30
    assert len(set(CASE_IDS)) == len(CASE_IDS)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize("case", HOSTILE_INPUTS, ids=CASE_IDS)
def test_hostile_input_gets_its_documented_answer(browser_client, case, endpoint):
    fields = (("csrf_token", browser_client.csrf_token),) if endpoint == "form" else ()
    response = post(browser_client, endpoint, case.build(fields))
    check_answer(case, endpoint, Answer.from_flask(response))
    assert browser_client.get("/healthz").status_code == 200


def test_form_without_csrf_token_is_refused_even_with_a_valid_image(browser_client):
    response = post(browser_client, "form", file_upload(xray_png()))
    assert response.status_code == 400
    assert CSRF_MISSING in html.unescape(response.get_data(as_text=True))


# --------------------------------------------------------------------------- through a real gunicorn


@pytest.fixture(scope="module")
def hostile_server(tiny_checkpoint_path, tmp_path_factory):
    """gunicorn with two workers, production settings, the corpus's upload limit and no rate limit."""
    server = start_gunicorn(
        tiny_checkpoint_path, tmp_path_factory.mktemp("gunicorn") / "gunicorn.log",
        MAX_UPLOAD_MB=UPLOAD_LIMIT_MB, RATE_LIMIT="off",
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_gunicorn_answers_every_hostile_input_and_keeps_serving(hostile_server):
    token, cookie = form_session(hostile_server)
    for case in HOSTILE_INPUTS:
        for endpoint, path in ENDPOINTS.items():
            fields = (("csrf_token", token),) if endpoint == "form" else ()
            response = request(hostile_server, "POST", path, case.build(fields), headers=cookie)
            check_answer(case, endpoint, Answer.from_wire(response))
    assert request(hostile_server, "GET", "/healthz").status == 200
    log = hostile_server.log()
    assert "Traceback" not in log and "WORKER TIMEOUT" not in log and "Unhandled" not in log


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_slow_body_is_answered_once_it_arrives(hostile_server, endpoint):
    token, cookie = form_session(hostile_server)
    fields = (("csrf_token", token),) if endpoint == "form" else ()
    upload = file_upload(xray_png(), fields=fields)
    chunk_size = len(upload.body) // 12 + 1
    response = request(hostile_server, "POST", ENDPOINTS[endpoint], upload, headers=cookie,
                       chunk_size=chunk_size, chunk_delay=0.25)
    assert response.elapsed >= 2.5, "the body really was sent slowly"
    assert response.status == 200
    assert request(hostile_server, "GET", "/healthz").status == 200


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_over_limit_bodies_on_the_wire_get_413(hostile_server, endpoint):
    token, cookie = form_session(hostile_server)
    fields = (("csrf_token", token),) if endpoint == "form" else ()
    path = ENDPOINTS[endpoint]
    big = file_upload(b"\0" * (3 * UPLOAD_LIMIT_MB * 1024 * 1024), fields=fields)
    small = file_upload(xray_png(), fields=fields)
    answers = {
        "declared-too-large": request(hostile_server, "POST", path, big, headers=cookie),
        "chunked-without-length": request(hostile_server, "POST", path, big, headers=cookie, chunked=True),
        "content-length-lies-upwards": request(hostile_server, "POST", path, small, headers=cookie,
                                               declared_length=10**12),
    }
    for name, response in answers.items():
        assert response.status == 413, name
        assert TOO_LARGE in html.unescape(response.text), name
        assert "Traceback" not in response.text
    assert request(hostile_server, "GET", "/healthz").status == 200


def colour_photo():
    """A saturated colour photograph-like image: the input check flags it whatever the checkpoint."""
    pixels = np.zeros((128, 128, 3), dtype=np.uint8)
    for index, colour in enumerate([(200, 40, 40), (40, 160, 60), (40, 60, 200), (230, 200, 40)]):
        pixels[:, index * 32:(index + 1) * 32] = colour
    return encode(Image.fromarray(pixels), "JPEG", quality=95)


def test_a_flagged_image_gets_no_label_from_the_api(browser_client):
    response = browser_client.post("/api/v1/predict", data={"file": (io.BytesIO(colour_photo()), "photo.jpg")},
                                   content_type="multipart/form-data")
    assert response.status_code == 200
    answer = response.json
    assert answer["ood"]["flagged"] is True and any("colour" in reason for reason in answer["ood"]["reasons"])
    assert answer["label"] is None, "a flagged image gets no class"
    assert list(answer["probabilities"]) == CLASS_NAMES, "its probabilities stay"


# --------------------------------------------------------------------------- bounded cost of decoding


@pytest.fixture
def small_working_size(monkeypatch):
    """Shrink the decoder's working size, so that bounded decoding shows on images a test can afford to make."""
    import model.decode

    monkeypatch.setattr(model.decode, "WORKING_MAX_SIDE", 256)
    return 256


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_large_images_are_decoded_at_a_bounded_size(small_working_size, mode):
    from model.decode import decode_upload

    pixels = make_xray_array(3, size=(600, 900))
    image = Image.fromarray(pixels, mode="L")
    if mode == "I;16":
        image = Image.fromarray(pixels.astype(np.uint16) * 257)
    elif mode != "L":
        image = image.convert(mode)
    decoded = decode_upload(encode(image, "PNG"))
    assert max(decoded.image.size) <= small_working_size and decoded.image.mode == "L"
    assert (decoded.metadata["columns"], decoded.metadata["rows"]) == (900, 600), "the file's own size is reported"
    reference = np.asarray(Image.fromarray(pixels, mode="L").resize(decoded.image.size, Image.BOX), dtype=float)
    correlation = np.corrcoef(np.asarray(decoded.image, dtype=float).ravel(), reference.ravel())[0, 1]
    assert correlation > 0.8, "the same film, smaller (16-bit films are windowed, so compare the pattern)"


def test_a_large_jpeg_is_decoded_at_reduced_scale(small_working_size):
    from model.decode import decode_upload

    jpeg = encode(Image.fromarray(make_xray_array(4, size=(1200, 1600)), mode="L"), "JPEG", quality=90)
    decoded = decode_upload(jpeg)
    assert max(decoded.image.size) <= small_working_size
    assert (decoded.metadata["columns"], decoded.metadata["rows"]) == (1600, 1200)


def test_transparent_areas_stay_black_after_reduction(small_working_size):
    from model.decode import decode_upload

    rgba = np.zeros((600, 600, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, 300:, 3] = 255  # left half fully transparent
    decoded = np.asarray(decode_upload(encode(Image.fromarray(rgba, "RGBA"), "PNG")).image)
    assert decoded[:, : decoded.shape[1] // 2 - 2].max() == 0 and decoded[:, decoded.shape[1] // 2 + 2:].min() > 150


def test_films_within_the_working_size_decode_exactly_as_before(xray_png):
    from model.decode import decode_upload

    decoded = decode_upload(xray_png)
    assert np.array_equal(np.asarray(decoded.image), np.asarray(Image.open(io.BytesIO(xray_png)).convert("L")))


def test_an_image_too_large_to_decode_within_the_budget_is_refused(monkeypatch):
    import model.decode
    from model.decode import decode_upload
    from model.errors import InvalidImageError

    monkeypatch.setattr(model.decode, "MAX_DECODED_BYTES", 100_000)
    with pytest.raises(InvalidImageError, match="too large to decode"):
        decode_upload(encode(Image.new("RGBA", (400, 400), (10, 20, 30, 255)), "PNG"))
