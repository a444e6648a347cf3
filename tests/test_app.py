"""The Flask app: upload form, result page, JSON API, error mapping, start-up checks and security headers."""

import base64
import dataclasses
import html
import io
import logging
import re
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

from conftest import CLASS_NAMES, encode, make_xray_array

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
NOTICE = "Research use only — not a diagnosis"
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
# A person's name in a file name must never reach the logs.
PRIVATE_FILENAME = "jane-doe-1961-03-07.png"
FAST_SECONDS = 3.0


# --------------------------------------------------------------------------- helpers and fixtures


@pytest.fixture
def make_app(tiny_checkpoint_path):
    """Build an app around the tiny checkpoint with extra config."""
    from app import create_app

    def build(**overrides):
        config = {
            "TESTING": True,
            "SECRET_KEY": "test-secret",
            "WTF_CSRF_ENABLED": False,
            "MODEL_PATH": str(tiny_checkpoint_path),
        }
        config.update(overrides)
        return create_app(config)

    return build


@pytest.fixture(scope="session")
def bomb_png():
    """A 20000x20000 black PNG: about 400 KB on disk, 400 megapixels decoded."""
    return encode(Image.new("L", (20000, 20000)))


def page_text(response):
    """The response body with HTML entities decoded, for message checks."""
    return html.unescape(response.get_data(as_text=True))


def post_form(client, data, filename="xray.png", **kwargs):
    """POST the upload form; ``data=None`` leaves the file field out."""
    fields = {} if data is None else {"file": (io.BytesIO(data), filename)}
    fields.update(kwargs.pop("extra_fields", {}))
    return client.post("/predict", data=fields, content_type="multipart/form-data", **kwargs)


def post_api(client, data, filename="xray.png", query=""):
    """POST the JSON API; ``data=None`` leaves the file field out."""
    fields = {"note": "no file here"} if data is None else {"file": (io.BytesIO(data), filename)}
    return client.post(f"/api/v1/predict{query}", data=fields, content_type="multipart/form-data")


def gray(seed=1, size=(256, 256)):
    """A synthetic X-ray as a PIL "L" image."""
    return Image.fromarray(make_xray_array(seed, size=size), mode="L")


def predicted_label(response):
    """The class named in the result page's headline."""
    match = re.search(r'class="predicted-label">\s*([^<\s]+)', response.get_data(as_text=True))
    assert match, "result page has no predicted label"
    return match.group(1)


def heatmap_data_uri(response):
    """The src of the heatmap <img> on the result page."""
    match = re.search(r'<img src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', response.get_data(as_text=True))
    assert match, "result page has no inline heatmap image"
    return match.group(1)


def csrf_token(response):
    """The hidden CSRF token of the upload form."""
    match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', response.get_data(as_text=True))
    assert match, "upload form has no CSRF token"
    return match.group(1)


# --------------------------------------------------------------------------- bad input


def _truncated(png, jpeg, bomb):
    return png[: len(png) // 2]


def _corrupt_png(png, jpeg, bomb):
    damaged = bytearray(png)
    middle = len(damaged) // 2
    damaged[middle : middle + 64] = bytes(64)
    return bytes(damaged)


def _corrupt_jpeg(png, jpeg, bomb):
    damaged = bytearray(jpeg)
    middle = len(damaged) // 2
    damaged[middle : middle + 200] = b"\xff" * 200
    return bytes(damaged)


@dataclasses.dataclass
class BadInput:
    """One refused upload: how to make it, the status and the message (form and API may word it apart)."""

    name: str
    make: object
    status: int
    message: str
    form_message: str | None = None


BAD_INPUTS = [
    BadInput("no-file-field", lambda png, jpeg, bomb: None, 400, "No file was uploaded",
             form_message="Please choose a chest X-ray image (PNG, JPEG or DICOM) to upload."),
    BadInput("empty-file", lambda png, jpeg, bomb: b"", 400, "The file is empty."),
    BadInput("not-an-image", lambda png, jpeg, bomb: b"patient notes, not pixels\n" * 40, 415,
             "The file is not a PNG, JPEG or DICOM image."),
    BadInput("gif", lambda png, jpeg, bomb: encode(gray(), "GIF"), 415, "GIF images are not accepted"),
    BadInput("webp", lambda png, jpeg, bomb: encode(gray(), "WEBP"), 415, "WEBP images are not accepted"),
    BadInput("truncated-png", _truncated, 400, "damaged or truncated"),
    BadInput("corrupt-png", _corrupt_png, 400, "damaged or truncated"),
    BadInput("corrupt-jpeg", _corrupt_jpeg, 400, "damaged or truncated"),
    BadInput("decompression-bomb", lambda png, jpeg, bomb: bomb, 400, "too many pixels"),
    BadInput("absurd-dimensions", lambda png, jpeg, bomb: encode(Image.new("L", (1, 5000))), 400,
             "The image is 1x5000 pixels"),
    BadInput("too-small", lambda png, jpeg, bomb: encode(gray().resize((16, 16))), 400,
             "each side must be at least"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.name for case in BAD_INPUTS])
def test_form_refuses_bad_input_with_reason(client, xray_png, xray_jpeg, bomb_png, case):
    data = case.make(xray_png, xray_jpeg, bomb_png)
    start = time.perf_counter()
    response = post_form(client, data)
    elapsed = time.perf_counter() - start
    assert response.status_code == case.status
    assert response.mimetype == "text/html"
    text = page_text(response)
    assert (case.form_message or case.message) in text
    assert 'role="alert"' in text
    assert 'enctype="multipart/form-data"' in text, "the form comes back so the user can try again"
    assert elapsed < FAST_SECONDS


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.name for case in BAD_INPUTS])
def test_api_refuses_bad_input_with_json_reason(client, xray_png, xray_jpeg, bomb_png, case):
    data = case.make(xray_png, xray_jpeg, bomb_png)
    start = time.perf_counter()
    response = post_api(client, data)
    elapsed = time.perf_counter() - start
    assert response.status_code == case.status
    assert response.is_json
    assert set(response.json) == {"error"}
    assert case.message in response.json["error"]
    assert elapsed < FAST_SECONDS


def test_api_refuses_a_body_that_is_not_multipart(client, xray_png):
    response = client.post("/api/v1/predict", data=xray_png, content_type="image/png")
    assert response.status_code == 400
    assert "multipart/form-data" in response.json["error"]


@pytest.mark.parametrize("csrf_enabled", [False, True])
def test_too_large_upload_is_413_for_form_and_api(make_app, xray_png, csrf_enabled):
    app = make_app(MAX_CONTENT_LENGTH=8 * 1024, WTF_CSRF_ENABLED=csrf_enabled)
    client = app.test_client()
    assert len(xray_png) > 8 * 1024

    form_response = post_form(client, xray_png)
    assert form_response.status_code == 413
    assert "The upload is larger than the 8 KB limit." in page_text(form_response)
    assert 'enctype="multipart/form-data"' in page_text(form_response)

    api_response = post_api(client, xray_png)
    assert api_response.status_code == 413
    assert api_response.json == {"error": "The upload is larger than the 8 KB limit."}


# --------------------------------------------------------------------------- valid uploads


@pytest.mark.parametrize("image_fixture", ["xray_png", "xray_jpeg"])
def test_form_upload_renders_result_page(client, app, request, image_fixture):
    response = post_form(client, request.getfixturevalue(image_fixture))
    assert response.status_code == 200
    text = page_text(response)
    assert predicted_label(response) in CLASS_NAMES
    assert NOTICE in text
    for name in CLASS_NAMES:
        assert re.search(rf">{name}</label>\s*<meter[^>]*>[\d.]+%</meter>\s*<span[^>]*>[\d.]+%</span>", text), name
    heatmap = heatmap_data_uri(response)
    assert Image.open(io.BytesIO(base64.b64decode(heatmap.split(",", 1)[1]))).format == "PNG"
    assert re.search(r'<img src="data:image/png;base64,[^"]+"\s+alt="[^"]*heatmap[^"]*"', text)
    assert "covidscan-test" in text and "test-1" in text
    assert re.search(r"<dt>Prediction time</dt><dd>\d+ ms</dd>", text)


def test_form_and_api_agree_on_the_label(client, xray_png):
    form_label = predicted_label(post_form(client, xray_png))
    assert post_api(client, xray_png).json["label"] == form_label


def test_api_json_shape(client, app, xray_png):
    response = post_api(client, xray_png)
    assert response.status_code == 200
    assert response.is_json
    answer = response.json
    assert {"label", "probabilities", "model", "elapsed_ms"} <= set(answer)
    assert "heatmap" not in answer
    probabilities = answer["probabilities"]
    assert list(probabilities) == CLASS_NAMES
    assert abs(sum(probabilities.values()) - 1.0) < 1e-5
    assert all(0.0 <= value <= 1.0 for value in probabilities.values())
    assert answer["label"] == max(probabilities, key=probabilities.get)
    predictor = app.extensions["predictor"]
    assert answer["model"]["name"] == "covidscan-test"
    assert answer["model"]["version"] == "test-1"
    assert answer["model"]["sha256"] == predictor.sha256
    assert answer["model"]["classes"] == CLASS_NAMES
    assert answer["elapsed_ms"] > 0


@pytest.mark.parametrize("query", ["?heatmap=1", "?heatmap=true"])
def test_api_heatmap_only_when_asked(client, xray_jpeg, query):
    answer = post_api(client, xray_jpeg, query=query).json
    heatmap = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"], validate=True)))
    assert heatmap.format == "PNG"
    assert heatmap.size == (320, 256)
    assert 0.0 <= answer["thorax_share"] <= 1.0
    without = post_api(client, xray_jpeg, query="?heatmap=0").json
    assert "heatmap" not in without and "thorax_share" not in without


def test_api_thorax_share_is_the_one_the_result_page_shows(client, app, xray_jpeg):
    """The same share, from the same prediction code, as the page's "inside the thorax box" figure."""
    from model.cam import thorax_share

    predictor = app.extensions["predictor"]
    prediction = predictor.predict_bytes(xray_jpeg, with_heatmap=True)
    answer = post_api(client, xray_jpeg, query="?heatmap=1").json
    assert answer["thorax_share"] == round(prediction.thorax_share, 3)
    assert thorax_share(np.zeros((4, 4))) is None


def _exif_rotated_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return encode(gray(4, size=(256, 320)), "JPEG", quality=90, exif=exif)


def _sixteen_bit_png():
    image = Image.fromarray(make_xray_array(5).astype(np.uint16) * 257)
    assert image.mode == "I;16"
    return encode(image)


ODD_FORMATS = {
    "rgb": lambda: encode(gray(6).convert("RGB")),
    "rgba": lambda: encode(gray(7).convert("RGBA")),
    "palette": lambda: encode(gray(8).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)),
    "16-bit": _sixteen_bit_png,
    "exif-rotated-jpeg": _exif_rotated_jpeg,
}


@pytest.mark.parametrize("name", list(ODD_FORMATS))
def test_odd_but_valid_formats_are_accepted(client, name):
    data = ODD_FORMATS[name]()
    assert post_form(client, data).status_code == 200
    response = post_api(client, data, query="?heatmap=1")
    assert response.status_code == 200
    assert response.json["label"] in CLASS_NAMES


def test_out_of_distribution_verdict_is_shown(app, client, xray_png, monkeypatch):
    predictor = app.extensions["predictor"]
    assert post_api(client, xray_png).json["ood"] is None, "the tiny checkpoint has no OOD statistics"
    predict_bytes = predictor.predict_bytes
    verdict = {"flagged": True, "score": 42.5, "threshold": 7.5}

    def flagged(*args, **kwargs):
        return dataclasses.replace(predict_bytes(*args, **kwargs), ood=verdict)

    monkeypatch.setattr(predictor, "predict_bytes", flagged)
    assert post_api(client, xray_png).json["ood"] == verdict
    text = page_text(post_form(client, xray_png))
    assert "does not look like a frontal chest X-ray" in text and "No prediction" in text
    assert "42.5" in text and "7.5" in text


def test_exif_orientation_is_honoured(client):
    answer = post_api(client, _exif_rotated_jpeg(), query="?heatmap=1").json
    heatmap = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"])))
    assert heatmap.size == (256, 320), "stored 320 wide x 256 high, displayed turned a quarter"


# --------------------------------------------------------------------------- the form page and CSRF


def test_upload_form_page(client):
    from app.forms import ACCEPTED_TYPES
    from model.decode import ACCEPTED_FORMATS

    response = client.get("/")
    assert response.status_code == 200
    text = page_text(response)
    assert '<form class="card upload-form" method="post" action="/predict" enctype="multipart/form-data">' in text
    assert '<label class="field-label" for="file">Chest X-ray image</label>' in text
    assert 'accept="image/png,.png,image/jpeg,.jpg,.jpeg,application/dicom,.dcm"' in text
    assert NOTICE in text
    assert "covidscan-test" in text and "test-1" in text
    assert "64 MB" in text
    assert set(ACCEPTED_FORMATS) <= set(ACCEPTED_TYPES), "the pages advertise every format the decoder reads"
    assert re.findall(r"<script[^>]*>", text) == ['<script src="/static/upload.js" defer>'], "self-hosted, no inline code"


def test_csrf_token_required_when_enabled(make_app, xray_png):
    client = make_app(WTF_CSRF_ENABLED=True).test_client()
    page = client.get("/")
    token = csrf_token(page)

    refused = post_form(client, xray_png)
    assert refused.status_code == 400
    assert "security token is missing or has expired" in page_text(refused)

    forged = post_form(client, xray_png, extra_fields={"csrf_token": "not-the-token"})
    assert forged.status_code == 400

    accepted = post_form(client, xray_png, extra_fields={"csrf_token": token})
    assert accepted.status_code == 200
    assert predicted_label(accepted) in CLASS_NAMES


def test_api_is_exempt_from_csrf(make_app, xray_png):
    client = make_app(WTF_CSRF_ENABLED=True).test_client()
    assert post_api(client, xray_png).status_code == 200


# --------------------------------------------------------------------------- health, model, routing errors


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "model": {"name": "covidscan-test", "version": "test-1"}}


def test_model_endpoint(client, app):
    assert client.get("/api/v1/model").json == app.extensions["predictor"].model_info


def test_not_found_html_and_json(client):
    page = client.get("/no-such-page")
    assert page.status_code == 404
    assert page.mimetype == "text/html"
    assert page.headers["X-Request-ID"] in page_text(page)

    api = client.get("/api/v1/no-such-endpoint")
    assert api.status_code == 404
    assert api.is_json and "not found" in api.json["error"]

    prefers_json = client.get("/no-such-page", headers={"Accept": "application/json"})
    assert prefers_json.status_code == 404 and prefers_json.is_json


def test_wrong_method(client):
    api = client.get("/api/v1/predict")
    assert api.status_code == 405
    assert api.is_json and "not allowed" in api.json["error"]
    assert "POST" in api.headers["Allow"]

    page = client.get("/predict")
    assert page.status_code == 405
    assert page.mimetype == "text/html"
    assert "POST" in page.headers["Allow"]


@pytest.mark.parametrize("path", ["/predict", "/api/v1/predict"])
def test_unexpected_error_is_a_clean_500_with_request_id(client, app, xray_png, monkeypatch, caplog, path):
    def explode(*args, **kwargs):
        raise RuntimeError("internal-detail-that-must-not-leak")

    monkeypatch.setattr(app.extensions["predictor"], "predict_bytes", explode)
    with caplog.at_level(logging.INFO):
        if path == "/predict":
            response = post_form(client, xray_png)
        else:
            response = post_api(client, xray_png)
    assert response.status_code == 500
    request_id = response.headers["X-Request-ID"]
    body = response.get_data(as_text=True)
    assert "internal-detail-that-must-not-leak" not in body
    assert "Traceback" not in body
    assert request_id in body
    if path.startswith("/api/"):
        assert response.json == {"error": response.json["error"], "request_id": request_id}
    assert any(request_id in record.getMessage() and record.exc_info for record in caplog.records)


# --------------------------------------------------------------------------- headers, logs, disk


@pytest.mark.parametrize(
    "method, path",
    [("get", "/"), ("post", "/predict"), ("post", "/api/v1/predict"), ("get", "/healthz"),
     ("get", "/missing"), ("get", "/static/style.css")],
)
def test_security_headers_on_every_response(client, xray_png, method, path):
    if method == "post":
        response = post_api(client, xray_png) if path.startswith("/api/") else post_form(client, xray_png)
        assert response.status_code == 200
    else:
        response = client.get(path)
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name
    assert REQUEST_ID.match(response.headers["X-Request-ID"])
    if path.startswith("/static/"):
        assert response.headers.get("Cache-Control") != "no-store"
    else:
        assert response.headers["Cache-Control"] == "no-store"


def test_request_ids_are_unique(client):
    ids = {client.get("/healthz").headers["X-Request-ID"] for _ in range(5)}
    assert len(ids) == 5


def test_file_names_and_content_never_reach_the_logs(client, xray_png, caplog):
    with caplog.at_level(logging.DEBUG):
        assert post_form(client, xray_png, filename=PRIVATE_FILENAME).status_code == 200
        assert post_api(client, xray_png, filename=PRIVATE_FILENAME).status_code == 200
        assert post_form(client, b"not an image" * 20, filename=PRIVATE_FILENAME).status_code == 415
        assert post_api(client, b"", filename=PRIVATE_FILENAME).status_code == 400
    assert "jane-doe" not in caplog.text
    assert "prediction" in caplog.text, "predictions are logged, without the file's name"


def test_uploads_are_never_written_to_disk(client, tmp_path, monkeypatch):
    workdir, scratch = tmp_path / "cwd", tmp_path / "tmp"
    workdir.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def no_temporary_files(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, no_temporary_files)
    noise = np.random.default_rng(0).integers(0, 256, size=(768, 1024), dtype=np.uint8)
    large_png = encode(Image.fromarray(noise, mode="L"))
    assert len(large_png) > 600_000, "larger than werkzeug's 500 KB in-memory threshold"

    assert post_form(client, large_png, filename=PRIVATE_FILENAME).status_code == 200
    assert post_api(client, large_png, filename=PRIVATE_FILENAME, query="?heatmap=1").status_code == 200
    assert list(workdir.rglob("*")) == []
    assert list(scratch.rglob("*")) == []


# --------------------------------------------------------------------------- start-up and configuration


def test_predictor_is_built_once_at_start_up(app, client, xray_png, monkeypatch):
    from model.inference import Predictor

    predictor = app.extensions["predictor"]
    assert isinstance(predictor, Predictor)

    def no_loading(*args, **kwargs):
        raise AssertionError("a request loaded the model")

    monkeypatch.setattr(Predictor, "from_path", no_loading)
    assert post_form(client, xray_png).status_code == 200
    assert post_api(client, xray_png).status_code == 200
    assert app.extensions["predictor"] is predictor


def test_start_up_logs_model_identity(make_app, caplog):
    with caplog.at_level(logging.INFO, logger="app"):
        app = make_app()
    predictor = app.extensions["predictor"]
    assert len(predictor.sha256) == 64
    messages = [record.getMessage() for record in caplog.records]
    assert any(
        "covidscan-test" in message and "test-1" in message and predictor.sha256 in message for message in messages
    )


def test_missing_model_stops_start_up(make_app, tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(RuntimeError) as raised:
        make_app(MODEL_PATH=str(missing))
    message = str(raised.value)
    assert str(missing) in message
    assert "scripts/train.py" in message and "COVIDSCAN_MODEL_PATH" in message


def test_missing_default_model_says_how_to_make_one(tmp_path, monkeypatch):
    from app import config, create_app

    default = tmp_path / "models" / "default.pt"
    monkeypatch.setattr(config, "DEFAULT_MODEL_PATH", default)
    monkeypatch.setattr(config.Defaults, "MODEL_PATH", str(default))
    monkeypatch.delenv("COVIDSCAN_MODEL_PATH", raising=False)
    with pytest.raises(RuntimeError, match="default model") as raised:
        create_app({"TESTING": True, "SECRET_KEY": "test-secret"})
    assert "python scripts/train.py" in str(raised.value)
    assert "COVIDSCAN_MODEL_PATH" in str(raised.value)


@pytest.mark.parametrize("damage", ["random-bytes", "truncated", "foreign-pickle"])
def test_broken_model_stops_start_up(make_app, tiny_checkpoint_path, tmp_path, damage):
    import torch

    broken = tmp_path / "broken.pt"
    if damage == "random-bytes":
        broken.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        data = tiny_checkpoint_path.read_bytes()
        broken.write_bytes(data[: len(data) // 3])
    else:
        torch.save({"weights": torch.zeros(3)}, broken)
    with pytest.raises(RuntimeError) as raised:
        make_app(MODEL_PATH=str(broken))
    message = str(raised.value)
    assert "CovidScan cannot start" in message
    assert str(broken) in message
    assert "checkpoint" in message


def test_production_refuses_to_start_without_secret_key(tiny_checkpoint_path, monkeypatch):
    from app import create_app

    for name in ("COVIDSCAN_SECRET_KEY", "COVIDSCAN_DEV"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="COVIDSCAN_SECRET_KEY is not set"):
        create_app({"MODEL_PATH": str(tiny_checkpoint_path)})


def test_development_generates_a_secret_key_with_a_warning(tiny_checkpoint_path, monkeypatch, caplog):
    from app import create_app

    monkeypatch.delenv("COVIDSCAN_SECRET_KEY", raising=False)
    monkeypatch.setenv("COVIDSCAN_DEV", "1")
    with caplog.at_level(logging.WARNING):
        first = create_app({"MODEL_PATH": str(tiny_checkpoint_path)})
    assert len(first.config["SECRET_KEY"]) >= 32
    assert "COVIDSCAN_SECRET_KEY is not set" in caplog.text
    second = create_app({"MODEL_PATH": str(tiny_checkpoint_path)})
    assert second.config["SECRET_KEY"] != first.config["SECRET_KEY"]


def test_environment_overrides_defaults_and_config_overrides_environment(tiny_checkpoint_path, monkeypatch):
    from app import create_app

    monkeypatch.setenv("COVIDSCAN_MODEL_PATH", str(tiny_checkpoint_path))
    monkeypatch.setenv("COVIDSCAN_SECRET_KEY", "from-the-environment")
    monkeypatch.setenv("COVIDSCAN_MAX_UPLOAD_MB", "2")
    monkeypatch.delenv("COVIDSCAN_DEV", raising=False)
    app = create_app()
    assert app.config["SECRET_KEY"] == "from-the-environment"
    assert app.config["MAX_CONTENT_LENGTH"] == 2 * 1024 * 1024
    assert app.config["MODEL_PATH"] == str(tiny_checkpoint_path)

    overridden = create_app({"MAX_UPLOAD_MB": 1, "SECRET_KEY": "from-the-config"})
    assert overridden.config["MAX_CONTENT_LENGTH"] == 1024 * 1024
    assert overridden.config["SECRET_KEY"] == "from-the-config"


def test_default_upload_limit_is_64_mb(app):
    assert app.config["MAX_CONTENT_LENGTH"] == 64 * 1024 * 1024


@pytest.mark.parametrize("value", ["lots", "0", "-5"])
def test_nonsense_upload_limit_stops_start_up(make_app, value):
    with pytest.raises(RuntimeError, match="MAX_UPLOAD_MB"):
        make_app(MAX_UPLOAD_MB=value)
