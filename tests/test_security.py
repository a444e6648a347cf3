"""Security by default: headers, cookies, proxies, debug mode, API tokens, proxy sign-in, rate limits, privacy."""

import hashlib
import html
import io
import logging
import re

import numpy as np
import pytest
from PIL import Image

from conftest import CLASS_NAMES, collect_apps_now_and_then, encode, make_xray_array

API_TOKEN = "covidscan-test-token-7f3a9c"
OTHER_TOKEN = "a-second-client-token-41b2"
PRIVATE_FILENAME = "Doe-Jane-1961-03-07-MRN-0042.png"
# Identifying DICOM fields; none may reach a log line.
PATIENT_FIELDS = {
    "PatientName": "Quixote^Dulcinea",
    "PatientID": "PID-314159",
    "PatientBirthDate": "19610307",
    "InstitutionName": "St Elsewhere Hospital",
    "AccessionNumber": "ACC-271828",
}
CSP_PARTS = ("default-src 'self'", "img-src 'self' data:", "frame-ancestors 'none'")


def sha256_hex(text):
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def make_app(tiny_checkpoint_path, monkeypatch):
    """Build an app around the tiny checkpoint: testing mode unless ``production=True``; no COVIDSCAN_ env."""
    from app import create_app

    for name in ("COVIDSCAN_SECRET_KEY", "COVIDSCAN_DEV", "COVIDSCAN_RATE_LIMIT", "COVIDSCAN_API_TOKEN_HASHES",
                 "COVIDSCAN_PROXY_USER_HEADER", "COVIDSCAN_TRUSTED_PROXIES", "COVIDSCAN_SECURE_COOKIES",
                 "COVIDSCAN_RATE_LIMIT_STORAGE_URI", "FLASK_DEBUG"):
        monkeypatch.delenv(name, raising=False)

    def build(production=False, rate_limit_from_environment=False, **overrides):
        config = {"SECRET_KEY": "test-secret", "MODEL_PATH": str(tiny_checkpoint_path)}
        if not rate_limit_from_environment:
            config["RATE_LIMIT"] = "off"
        if not production:
            config.update(TESTING=True, WTF_CSRF_ENABLED=False)
        config.update(overrides)
        return create_app(config)

    yield build
    collect_apps_now_and_then()


def png_bytes(seed=1):
    return encode(Image.fromarray(make_xray_array(seed), mode="L"))


def upload(data=None, filename="xray.png"):
    return {"file": (io.BytesIO(png_bytes() if data is None else data), filename)}


def post_api(client, data=None, headers=None, filename="xray.png", query=""):
    return client.post(f"/api/v1/predict{query}", data=upload(data, filename), headers=headers or {},
                       content_type="multipart/form-data")


def post_form(client, data=None, headers=None, filename="xray.png"):
    return client.post("/predict", data=upload(data, filename), headers=headers or {},
                       content_type="multipart/form-data")


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- headers


def test_security_headers_on_every_kind_of_response(make_app):
    app = make_app(API_TOKEN_HASHES=sha256_hex(API_TOKEN), RATE_LIMIT="1 per minute", MAX_CONTENT_LENGTH=4096)
    client = app.test_client()
    roomy_client = make_app(MAX_CONTENT_LENGTH=4096).test_client()
    responses = {
        "page": client.get("/"),
        "result": post_form(roomy_client, encode(Image.fromarray(make_xray_array(1, size=(40, 40)), mode="L"))),
        "refused-upload": post_form(roomy_client, b"not an image"),
        "too-large": post_form(roomy_client, png_bytes()),
        "api-401": post_api(client),
        "api-200": post_api(client, encode(Image.fromarray(make_xray_array(1, size=(40, 40)), mode="L")),
                            headers=bearer(API_TOKEN)),
        "api-429": post_api(client, headers=bearer(API_TOKEN)),
        "healthz": client.get("/healthz"),
        "not-found": client.get("/nowhere"),
        "static": client.get("/static/style.css"),
    }
    expected = {"result": 200, "refused-upload": 415, "too-large": 413, "api-401": 401, "api-200": 200,
                "api-429": 429, "static": 200}
    for name, response in responses.items():
        assert response.status_code == expected.get(name, response.status_code), name
        csp = response.headers["Content-Security-Policy"]
        assert all(part in csp for part in CSP_PARTS), name
        assert response.headers["X-Content-Type-Options"] == "nosniff", name
        assert response.headers["X-Frame-Options"] == "DENY", name
        assert response.headers["Referrer-Policy"] == "no-referrer", name
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"]), name
        assert "Strict-Transport-Security" not in response.headers, "plain HTTP gets no HSTS"
        if name == "static":
            assert response.headers.get("Cache-Control") != "no-store"
        else:
            assert response.headers["Cache-Control"] == "no-store", f"{name} must not be cached"


def test_result_page_is_never_cached_and_loads_nothing_from_elsewhere(make_app):
    response = post_form(make_app().test_client())
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    text = response.get_data(as_text=True)
    scripts = re.findall(r"<script\b[^>]*>", text)
    assert all(re.search(r'src="/static/[^"]+"', tag) for tag in scripts), "scripts are self-hosted files, none inline"
    assert not re.search(r'(src|href)="(https?:)?//', text), "every resource is self-hosted"


# --------------------------------------------------------------------------- cookies, proxies, debug mode


def test_production_cookies_are_secure_httponly_samesite(make_app):
    app = make_app(production=True)
    assert app.config["SESSION_COOKIE_SECURE"] is True
    assert app.debug is False
    cookie = app.test_client().get("/").headers["Set-Cookie"]
    assert "; Secure" in cookie and "; HttpOnly" in cookie and "SameSite=Lax" in cookie


@pytest.mark.parametrize("value, secure", [("0", False), ("off", False), ("1", True), ("true", True)])
def test_secure_cookies_follow_the_environment(make_app, monkeypatch, value, secure):
    monkeypatch.setenv("COVIDSCAN_SECURE_COOKIES", value)
    app = make_app(production=True)
    assert app.config["SESSION_COOKIE_SECURE"] is secure
    assert ("; Secure" in app.test_client().get("/").headers["Set-Cookie"]) is secure


def test_development_cookies_work_over_plain_http_by_default(make_app):
    assert make_app(DEV=True).config["SESSION_COOKIE_SECURE"] is False


def test_nonsense_secure_cookie_setting_stops_start_up(make_app):
    with pytest.raises(RuntimeError, match="SECURE_COOKIES must be on or off"):
        make_app(production=True, SECURE_COOKIES="sometimes")


def test_csrf_is_on_by_default_in_production(make_app):
    response = post_form(make_app(production=True).test_client())
    assert response.status_code == 400
    assert "security token is missing" in html.unescape(response.get_data(as_text=True))


def test_forwarded_headers_are_ignored_without_trusted_proxies(make_app):
    client = make_app().test_client()
    response = client.get("/", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"})
    assert "Strict-Transport-Security" not in response.headers


def test_forwarded_proto_is_honoured_behind_a_trusted_proxy(make_app):
    client = make_app(production=True, TRUSTED_PROXIES=1).test_client()
    response = client.get("/", headers={"X-Forwarded-Proto": "https"})
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert "; Secure" in response.headers["Set-Cookie"]
    plain = client.get("/", headers={"X-Forwarded-Proto": "http"})
    assert "Strict-Transport-Security" not in plain.headers


@pytest.mark.parametrize("value", ["two", "-1"])
def test_nonsense_trusted_proxies_stops_start_up(make_app, value):
    with pytest.raises(RuntimeError, match="TRUSTED_PROXIES"):
        make_app(TRUSTED_PROXIES=value)


def test_debug_mode_is_refused_in_production(make_app, monkeypatch):
    with pytest.raises(RuntimeError, match="Debug mode is on"):
        make_app(production=True, DEBUG=True)
    monkeypatch.setenv("FLASK_DEBUG", "1")
    with pytest.raises(RuntimeError, match="Debug mode is on"):
        make_app(production=True)
    assert make_app(production=True, DEV=True).debug is True, "a development machine may debug"


# --------------------------------------------------------------------------- API tokens


@pytest.fixture
def token_client(make_app):
    app = make_app(API_TOKEN_HASHES=f"{sha256_hex(API_TOKEN)}, {sha256_hex(OTHER_TOKEN).upper()}")
    return app.test_client()


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer    "},
    {"Authorization": f"Basic {API_TOKEN}"},
    {"Authorization": API_TOKEN},
], ids=["none", "empty-bearer", "blank-bearer", "basic-scheme", "no-scheme"])
def test_api_without_a_token_is_401_with_a_bearer_challenge(token_client, headers):
    for response in (post_api(token_client, headers=headers), token_client.get("/api/v1/model", headers=headers)):
        assert response.status_code == 401
        assert response.is_json
        assert response.json == {"error": "This API needs a token: send it as 'Authorization: Bearer <token>'."}
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="CovidScan"'


@pytest.mark.parametrize("token", ["wrong", API_TOKEN + "x", API_TOKEN[:-1], sha256_hex(API_TOKEN), "é" * 40])
def test_api_with_a_wrong_token_is_401_invalid_token(token_client, token):
    response = post_api(token_client, headers=bearer(token))
    assert response.status_code == 401
    assert response.json == {"error": "The API token is not valid."}
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="CovidScan", error="invalid_token"'


@pytest.mark.parametrize("token", [API_TOKEN, OTHER_TOKEN])
def test_api_accepts_each_configured_token(token_client, token):
    response = post_api(token_client, headers=bearer(token))
    assert response.status_code == 200
    assert response.json["label"] in CLASS_NAMES
    assert token_client.get("/api/v1/model", headers={"Authorization": f"bearer {token}"}).status_code == 200


def test_unknown_api_paths_need_the_token_too(token_client):
    assert token_client.get("/api/v1/secret-admin").status_code == 401
    assert token_client.get("/api/v1/secret-admin", headers=bearer(API_TOKEN)).status_code == 404


def test_health_check_stays_open_with_api_tokens(token_client):
    assert token_client.get("/healthz").status_code == 200
    assert token_client.get("/static/style.css").status_code == 200
    assert token_client.get("/login").status_code == 200


# --------------------------------------------------------------------------- sign-in for the pages


def sign_in(client, token=API_TOKEN, next_path=None):
    query = f"?next={next_path}" if next_path else ""
    return client.post(f"/login{query}", data={"token": token})


def test_pages_redirect_to_sign_in_when_tokens_are_configured(token_client):
    response = token_client.get("/")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/"
    page = token_client.get("/login?next=/")
    assert page.status_code == 200
    assert re.search(r'<input[^>]*name="token"[^>]*type="password"', page.get_data(as_text=True))


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Cookie": "session=forged"}], ids=["none", "bad-bearer",
                                                                                               "forged-cookie"])
def test_unauthenticated_form_post_gets_no_prediction(token_client, headers):
    response = post_form(token_client, headers=headers)
    assert response.status_code == 401
    text = html.unescape(response.get_data(as_text=True))
    assert "Please sign in" in text
    assert not any(name in text for name in CLASS_NAMES), "no class name, no probability"


def test_an_api_bearer_token_does_not_open_the_pages(token_client):
    assert post_form(token_client, headers=bearer(API_TOKEN)).status_code == 401


def test_signing_in_with_a_valid_token_opens_the_pages(token_client):
    response = sign_in(token_client, next_path="/")
    assert response.status_code == 302 and response.headers["Location"] == "/"
    assert token_client.get("/").status_code == 200
    result = post_form(token_client)
    assert result.status_code == 200
    assert any(name in result.get_data(as_text=True) for name in CLASS_NAMES)
    assert token_client.post("/logout").status_code == 302
    assert post_form(token_client).status_code == 401, "signed out"


@pytest.mark.parametrize("token", ["wrong", API_TOKEN + "x", sha256_hex(API_TOKEN)])
def test_signing_in_with_a_wrong_token_is_refused(token_client, token):
    response = sign_in(token_client, token)
    assert response.status_code == 401
    assert "That access token is not valid." in response.get_data(as_text=True)
    assert post_form(token_client).status_code == 401


def test_the_session_holds_no_token_and_ends_when_the_token_is_revoked(make_app):
    app = make_app(API_TOKEN_HASHES=sha256_hex(API_TOKEN))
    client = app.test_client()
    sign_in(client)
    with client.session_transaction() as session:
        assert API_TOKEN not in str(dict(session)) and sha256_hex(API_TOKEN) not in str(dict(session))
    app.config["API_TOKEN_HASHES"] = (sha256_hex(OTHER_TOKEN),)
    assert post_form(client).status_code == 401


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/", "/\\evil.example", "javascript:x"])
def test_sign_in_never_redirects_to_another_site(token_client, target):
    response = sign_in(token_client, next_path=target)
    assert response.status_code == 302
    assert response.headers["Location"] == "/"


def test_sign_in_form_is_csrf_protected_in_production(make_app):
    client = make_app(production=True, SECURE_COOKIES=False, API_TOKEN_HASHES=sha256_hex(API_TOKEN)).test_client()
    refused = sign_in(client)
    assert refused.status_code == 400
    assert "security token" in html.unescape(refused.get_data(as_text=True))
    page = client.get("/login")
    csrf_token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    response = client.post("/login", data={"token": API_TOKEN, "csrf_token": csrf_token})
    assert response.status_code == 302
    assert client.get("/").status_code == 200


def test_the_proxy_user_header_still_works_beside_sign_in(make_app):
    client = make_app(API_TOKEN_HASHES=sha256_hex(API_TOKEN), PROXY_USER_HEADER="X-Remote-User").test_client()
    assert post_form(client, headers={"X-Remote-User": "dr.house"}).status_code == 200
    assert post_form(client).status_code == 401


def test_access_required_guards_another_blueprint(make_app):
    from flask import Blueprint

    from app.security import access_required

    app = make_app(API_TOKEN_HASHES=sha256_hex(API_TOKEN))
    worklist = Blueprint("worklist_test", __name__)

    @worklist.get("/worklist-test")
    @access_required
    def listing():
        return "studies"

    app.register_blueprint(worklist)
    client = app.test_client()
    with app.test_request_context("/worklist-test"):
        from werkzeug.exceptions import Unauthorized

        with pytest.raises(Unauthorized):
            app.view_functions["worklist_test.listing"]()
    assert client.get("/worklist-test").status_code == 302
    sign_in(client)
    assert client.get("/worklist-test").get_data(as_text=True) == "studies"


def test_tokens_are_compared_in_constant_time_against_every_hash(make_app, monkeypatch):
    import app.security

    client = make_app(API_TOKEN_HASHES=",".join(sha256_hex(token) for token in (API_TOKEN, OTHER_TOKEN, "third"))) \
        .test_client()
    calls = []
    real_compare = app.security.hmac.compare_digest

    def spy(left, right):
        calls.append((left, right))
        return real_compare(left, right)

    monkeypatch.setattr(app.security.hmac, "compare_digest", spy)
    assert client.get("/api/v1/model", headers=bearer(API_TOKEN)).status_code == 200
    assert len(calls) == 3, "no early exit on the first match"
    assert all(left == sha256_hex(API_TOKEN) for left, _ in calls), "only digests are compared, never the token"


def test_token_hashes_are_read_as_text_from_the_environment(make_app, monkeypatch):
    digest = sha256_hex(API_TOKEN)
    monkeypatch.setenv("COVIDSCAN_API_TOKEN_HASHES", f" {digest} ,")
    app = make_app()
    assert app.config["API_TOKEN_HASHES"] == (digest,)
    assert app.test_client().get("/api/v1/model", headers=bearer(API_TOKEN)).status_code == 200


@pytest.mark.parametrize("value", ["1234e5", "not-hex" * 9 + "a", sha256_hex("x")[:-1]])
def test_malformed_token_hashes_stop_start_up(make_app, monkeypatch, value):
    monkeypatch.setenv("COVIDSCAN_API_TOKEN_HASHES", value)
    with pytest.raises(RuntimeError, match="SHA-256 hex digests"):
        make_app()


# --------------------------------------------------------------------------- the proxy's user header


@pytest.fixture
def proxied_client(make_app):
    return make_app(production=True, PROXY_USER_HEADER="X-Remote-User").test_client()


@pytest.mark.parametrize("headers", [{}, {"X-Remote-User": ""}, {"X-Remote-User": "   "}, {"X-Remote-Usr": "eve"}])
def test_pages_without_the_proxy_user_header_are_403(proxied_client, headers):
    for response in (proxied_client.get("/", headers=headers), post_form(proxied_client, headers=headers),
                     proxied_client.get("/nowhere", headers=headers)):
        assert response.status_code == 403
        assert response.mimetype == "text/html"
        text = html.unescape(response.get_data(as_text=True))
        assert "only available through the organisation's sign-in proxy" in text
        assert response.headers["X-Request-ID"] in text


def test_pages_with_the_proxy_user_header_work(proxied_client):
    page = proxied_client.get("/", headers={"X-Remote-User": "dr.house"})
    assert page.status_code == 200
    assert "csrf_token" in page.get_data(as_text=True)


def test_health_check_static_files_and_api_ignore_the_proxy_user_header(proxied_client):
    assert proxied_client.get("/healthz").status_code == 200
    assert proxied_client.get("/static/style.css").status_code == 200
    assert post_api(proxied_client).status_code == 200, "the API has its own tokens (none configured here)"


def test_open_app_warns_at_start_up(make_app, caplog):
    with caplog.at_level(logging.WARNING):
        make_app(production=True)
    assert "CovidScan is open to anyone who can reach it" in caplog.text
    assert "COVIDSCAN_API_TOKEN_HASHES" in caplog.text and "COVIDSCAN_PROXY_USER_HEADER" in caplog.text


def test_half_open_app_names_the_open_half(make_app, caplog):
    with caplog.at_level(logging.WARNING):
        make_app(production=True, PROXY_USER_HEADER="X-Remote-User")
    assert "the JSON API (no COVIDSCAN_API_TOKEN_HASHES)" in caplog.text
    assert "the upload pages" not in caplog.text


def test_tokens_close_the_pages_too(make_app, caplog):
    with caplog.at_level(logging.WARNING):
        make_app(production=True, API_TOKEN_HASHES=sha256_hex(API_TOKEN))
    assert "is open" not in caplog.text


def test_closed_app_does_not_warn(make_app, caplog):
    with caplog.at_level(logging.WARNING):
        make_app(production=True, API_TOKEN_HASHES=sha256_hex(API_TOKEN), PROXY_USER_HEADER="X-Remote-User")
    assert "is open" not in caplog.text


# --------------------------------------------------------------------------- rate limits


def test_rate_limit_answers_429_with_a_reason_and_retry_after(make_app):
    client = make_app(RATE_LIMIT="3 per minute").test_client()
    tiny_png = encode(Image.fromarray(make_xray_array(1, size=(40, 40)), mode="L"))
    statuses = [post_api(client, tiny_png).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    refused = post_api(client, tiny_png)
    assert refused.status_code == 429
    assert refused.json == {"error": "Too many requests: at most 3 per minute from one client. "
                                     "Please wait a moment and try again."}
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Limit"] == "3"

    assert [post_form(client, tiny_png).status_code for _ in range(3)] == [200, 200, 200], "each route has its own"
    form = post_form(client, tiny_png)
    assert form.status_code == 429
    text = html.unescape(form.get_data(as_text=True))
    assert "Too many requests: at most 3 per minute" in text
    assert 'enctype="multipart/form-data"' in text and 'role="alert"' in text

    assert all(client.get("/healthz").status_code == 200 for _ in range(10)), "the health check is never limited"
    assert all(client.get("/").status_code == 200 for _ in range(10))
    assert client.get("/api/v1/model").status_code == 200


def test_rate_limit_counts_each_client_separately_behind_a_trusted_proxy(make_app):
    client = make_app(RATE_LIMIT="2 per minute", TRUSTED_PROXIES=1).test_client()
    first, second = {"X-Forwarded-For": "198.51.100.7"}, {"X-Forwarded-For": "198.51.100.8"}
    assert [post_api(client, headers=first).status_code for _ in range(3)] == [200, 200, 429]
    assert post_api(client, headers=second).status_code == 200


def test_forged_forwarded_for_does_not_escape_the_limit_without_trusted_proxies(make_app):
    client = make_app(RATE_LIMIT="2 per minute").test_client()
    statuses = [post_api(client, headers={"X-Forwarded-For": f"198.51.100.{index}"}).status_code
                for index in range(3)]
    assert statuses == [200, 200, 429]


def test_default_rate_limit_is_60_per_minute_in_process_memory(make_app):
    app = make_app(rate_limit_from_environment=True)
    assert app.config["RATE_LIMIT"] == "60 per minute"
    assert app.config["RATE_LIMIT_STORAGE_URI"] == "memory://"


def test_rate_limit_is_read_from_the_environment(make_app, monkeypatch):
    monkeypatch.setenv("COVIDSCAN_RATE_LIMIT", "1/second;100/hour")
    client = make_app(rate_limit_from_environment=True).test_client()
    assert [post_api(client).status_code for _ in range(2)] == [200, 429]


@pytest.mark.parametrize("value", ["off", "0", "", "none", "false"])
def test_rate_limit_can_be_switched_off(make_app, monkeypatch, value):
    monkeypatch.setenv("COVIDSCAN_RATE_LIMIT", value)
    app = make_app(rate_limit_from_environment=True)
    assert app.config["RATE_LIMIT"] is None
    assert "limiter" not in app.extensions


def test_nonsense_rate_limit_stops_start_up(make_app, monkeypatch):
    monkeypatch.setenv("COVIDSCAN_RATE_LIMIT", "lots per minute")
    with pytest.raises(RuntimeError, match="COVIDSCAN_RATE_LIMIT must read like"):
        make_app(rate_limit_from_environment=True)


def test_unusable_rate_limit_storage_stops_start_up(make_app, monkeypatch):
    monkeypatch.setenv("COVIDSCAN_RATE_LIMIT_STORAGE_URI", "nosuchstore://127.0.0.1:9")
    with pytest.raises(RuntimeError, match="rate-limit storage COVIDSCAN_RATE_LIMIT_STORAGE_URI cannot be used"):
        make_app(RATE_LIMIT="5 per minute")


# --------------------------------------------------------------------------- privacy and request ids


def dicom_with_patient_fields():
    """A small DX DICOM file whose header names a patient (pydicom writes it in memory)."""
    from test_dicom import make_dataset, to_bytes

    pixels = make_xray_array(9, size=(128, 128)).astype(np.uint16) * 16
    return to_bytes(make_dataset(pixels, bits_stored=12, **PATIENT_FIELDS))


def test_logs_hold_request_ids_but_no_file_names_pixels_or_patient_fields(make_app, caplog):
    client = make_app().test_client()
    dicom = dicom_with_patient_fields()
    with caplog.at_level(logging.DEBUG):
        responses = [
            post_api(client, filename=PRIVATE_FILENAME),
            post_form(client, filename=PRIVATE_FILENAME),
            post_api(client, b"Jane Doe's discharge letter\n" * 30, filename=PRIVATE_FILENAME),
            post_form(client, png_bytes()[:500], filename=PRIVATE_FILENAME),
            post_api(client, dicom, filename="Quixote-Dulcinea.dcm"),
            post_form(client, dicom, filename="Quixote-Dulcinea.dcm"),
            post_api(client, dicom[: len(dicom) // 2], filename="Quixote-Dulcinea.dcm"),
        ]
    assert [response.status_code for response in responses[:4]] == [200, 200, 415, 400]
    assert all(response.status_code < 500 for response in responses)
    logged = caplog.text
    for secret in ("Doe", "Jane", "MRN", "Quixote", "Dulcinea", "PID-314159", "19610307", "Elsewhere", "ACC-271828"):
        assert secret not in logged, f"{secret!r} reached the logs"
    assert "iVBOR" not in logged and "\\x89PNG" not in logged and "DICM" not in logged, "no image bytes"
    assert max(len(record.getMessage()) for record in caplog.records) < 400
    for response in responses:
        assert response.headers["X-Request-ID"] in logged, "every upload leaves a line with its request id"


def malformed_dicom_naming_a_patient():
    """A DX DICOM whose NumberOfFrames (an integer string) holds a patient's name: pydicom warns, quoting it."""
    from test_dicom import make_dataset, to_bytes

    pixels = make_xray_array(9, size=(128, 128)).astype(np.uint16) * 16
    data = to_bytes(make_dataset(pixels, bits_stored=12, NumberOfFrames="31415926", **PATIENT_FIELDS))
    assert data.count(b"31415926") == 1
    return data.replace(b"31415926", b"Doe^Jane")  # same length: pydicom would not write it itself


def test_library_warnings_are_logged_without_the_values_they_quote(make_app, caplog, capfd):
    client = make_app().test_client()
    with caplog.at_level(logging.DEBUG):
        response = post_api(client, malformed_dicom_naming_a_patient(), filename="study.dcm")
    assert response.status_code < 500
    logged = caplog.text + "".join(capfd.readouterr())
    assert "<value withheld>" in logged, "the library's warning is logged, without its value"
    for secret in ("Doe", "Jane", "Quixote", "Dulcinea", "PID-314159"):
        assert secret not in logged, f"{secret!r} reached the logs"


def test_request_id_is_on_refused_upload_pages_and_in_error_json_headers(make_app):
    client = make_app().test_client()
    page = post_form(client, b"not an image")
    assert page.headers["X-Request-ID"] in page.get_data(as_text=True)
    api = post_api(client, b"not an image")
    assert api.status_code == 415 and re.fullmatch(r"[0-9a-f]{32}", api.headers["X-Request-ID"])


# --------------------------------------------------------------------------- through a real gunicorn


@pytest.mark.slow
def test_gunicorn_leaves_forwarded_headers_to_the_app(tiny_checkpoint_path, tmp_path):
    from servers import request, start_gunicorn

    forwarded = (("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "203.0.113.9"))
    for proxies, secure in ((0, False), (1, True)):
        server = start_gunicorn(tiny_checkpoint_path, tmp_path / f"gunicorn-{proxies}.log", workers=1,
                                TRUSTED_PROXIES=proxies, RATE_LIMIT="off")
        try:
            response = request(server, "GET", "/", headers=forwarded)
        finally:
            server.stop()
        assert response.status == 200
        assert ("strict-transport-security" in response.headers) is secure, f"TRUSTED_PROXIES={proxies}"
        assert "Secure" in response.headers["set-cookie"], "production cookies are Secure either way"


# --------------------------------------------------------------------------- smaller points


def test_static_404_is_not_cacheable(make_app):
    response = make_app().test_client().get("/static/no-such-file.css")
    assert response.status_code == 404
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("endpoint", ["/predict", "/api/v1/predict"])
def test_non_utf8_file_name_gets_a_clear_answer(make_app, endpoint):
    client = make_app(production=True, SECURE_COOKIES=False).test_client()
    page = client.get("/")
    csrf_token = re.search(rb'name="csrf_token" type="hidden" value="([^"]+)"', page.data).group(1)
    body = (b'--BB\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\n' + csrf_token +
            b'\r\n--BB\r\nContent-Disposition: form-data; name="file"; filename="r\xe9sum\xff.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + png_bytes() + b"\r\n--BB--\r\n")
    response = client.post(endpoint, data=body, content_type="multipart/form-data; boundary=BB")
    assert response.status_code == 400
    text = html.unescape(response.get_data(as_text=True))
    assert "not UTF-8" in text
    assert "security token" not in text


# --------------------------------------------------------------------------- checkpoint integrity


def run_export(*arguments):
    """scripts/export.py's main, in this process."""
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("export_script", REPO_ROOT / "scripts" / "export.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    export.main(export.get_args_parser().parse_args([str(argument) for argument in arguments]))


@pytest.fixture(scope="session")
def referenced_checkpoint_path(tmp_path_factory, image_folder):
    """A tiny resnet18 whose head prefers COVID > NORMAL > PNEUMONIA, exported --half with reference inputs."""
    import torch

    from model.checkpoint import make_checkpoint, save_checkpoint
    from model.network import build_model
    from model.transforms import eval_transform_params

    torch.manual_seed(1)
    network = build_model("resnet18", num_classes=len(CLASS_NAMES), weights="none")
    with torch.no_grad():
        network.fc.bias.copy_(torch.tensor([2.0, 0.5, -1.0]))
    folder = tmp_path_factory.mktemp("referenced")
    trained = save_checkpoint(make_checkpoint(network, arch="resnet18", class_names=CLASS_NAMES,
                                              transform=eval_transform_params(image_size=64, recipe="robust"),
                                              model_name="covidscan-test", model_version="ref-1"),
                              folder / "best.pt")
    run_export("--checkpoint", trained, "--output", folder / "served.pt", "--half", "--references", image_folder,
               "--workers", "0")
    return folder / "served.pt"


def altered_checkpoint(source, destination, **changes):
    """A copy of a checkpoint with some entries replaced, written through the real save function."""
    import torch

    from model.checkpoint import save_checkpoint

    checkpoint = torch.load(source, weights_only=True)
    checkpoint.update(changes)
    return save_checkpoint(checkpoint, destination)


def test_export_stores_reference_inputs_keyed_by_class_name(referenced_checkpoint_path):
    import torch

    checkpoint = torch.load(referenced_checkpoint_path, weights_only=True)
    references = checkpoint["references"]
    assert list(references) == CLASS_NAMES
    for reference in references.values():
        assert reference["input"].dtype == torch.float16
        assert tuple(reference["input"].shape) == (1, 64, 64), "one channel: the transform replicates grayscale"
        assert sorted(reference["probabilities"]) == sorted(CLASS_NAMES)
        assert abs(sum(reference["probabilities"].values()) - 1) < 1e-4
    assert checkpoint["storage_dtype"] == "float16"


def test_a_checkpoint_with_references_starts_and_checks_them(make_app, referenced_checkpoint_path, caplog):
    with caplog.at_level(logging.INFO):
        make_app(MODEL_PATH=str(referenced_checkpoint_path))
    assert "reference check passed: 3 reference input(s)" in caplog.text


def test_a_checkpoint_without_references_starts_with_a_warning(make_app, caplog):
    with caplog.at_level(logging.WARNING):
        make_app()
    assert "holds no reference inputs" in caplog.text


def test_swapped_labels_are_refused_even_when_the_list_is_allowed(make_app, referenced_checkpoint_path, tmp_path):
    swapped = altered_checkpoint(referenced_checkpoint_path, tmp_path / "swapped.pt",
                                 class_names=["NORMAL", "COVID", "PNEUMONIA"])
    with pytest.raises(RuntimeError) as refused:
        make_app(MODEL_PATH=str(swapped), ALLOWED_CLASS_NAMES="NORMAL,COVID,PNEUMONIA")
    message = str(refused.value)
    assert message.startswith("CovidScan cannot start: the checkpoint fails its reference check: ")
    assert "the reference film for COVID now comes out NORMAL" in message


@pytest.mark.parametrize("class_names", [["NORMAL", "COVID", "PNEUMONIA"], ["cat", "dog", "bird"]])
def test_class_names_other_than_the_products_are_refused(make_app, referenced_checkpoint_path, tmp_path,
                                                         class_names):
    wrong = altered_checkpoint(referenced_checkpoint_path, tmp_path / "wrong.pt", class_names=class_names)
    with pytest.raises(RuntimeError) as refused:
        make_app(MODEL_PATH=str(wrong))
    message = str(refused.value)
    assert f"the checkpoint's class names are [{', '.join(class_names)}]" in message
    assert "exactly [COVID, NORMAL, PNEUMONIA] in that order" in message
    assert f"COVIDSCAN_ALLOWED_CLASS_NAMES={','.join(class_names)}" in message


def test_damaged_weights_fail_the_reference_check(make_app, referenced_checkpoint_path, tmp_path):
    import torch

    checkpoint = torch.load(referenced_checkpoint_path, weights_only=True)
    state = dict(checkpoint["state_dict"])
    state["fc.bias"] = state["fc.bias"].flip(0)
    damaged = altered_checkpoint(referenced_checkpoint_path, tmp_path / "damaged.pt", state_dict=state)
    with pytest.raises(RuntimeError, match="fails its reference check"):
        make_app(MODEL_PATH=str(damaged))


def test_references_can_be_added_to_an_existing_serving_checkpoint(make_app, tiny_checkpoint_path, image_folder,
                                                                   tmp_path, caplog):
    import torch

    served = tmp_path / "served.pt"
    run_export("--checkpoint", tiny_checkpoint_path, "--output", served, "--half", "--workers", "0")
    assert "references" not in torch.load(served, weights_only=True)
    run_export("--checkpoint", served, "--output", served, "--references", image_folder, "--workers", "0")
    checkpoint = torch.load(served, weights_only=True)
    assert list(checkpoint["references"]) == CLASS_NAMES
    assert checkpoint["storage_dtype"] == "float16", "a float16 serving checkpoint stays float16"
    with caplog.at_level(logging.INFO):
        make_app(MODEL_PATH=str(served))
    assert "reference check passed" in caplog.text


def test_model_sha256_pins_the_file(make_app, tiny_checkpoint_path):
    from model.inference import file_sha256

    digest = file_sha256(tiny_checkpoint_path)
    assert make_app(MODEL_SHA256=digest.upper()).extensions["predictor"].sha256 == digest
    with pytest.raises(RuntimeError) as refused:
        make_app(MODEL_SHA256="0" * 64)
    assert f"has SHA-256 {digest}, but COVIDSCAN_MODEL_SHA256 pins {'0' * 64}" in str(refused.value)
    with pytest.raises(RuntimeError, match="COVIDSCAN_MODEL_SHA256 must be the checkpoint's SHA-256"):
        make_app(MODEL_SHA256="abc")


def test_checkpoint_errors_name_their_reason_in_full(make_app, tiny_checkpoint_path, tmp_path):
    import os

    import torch

    garbage = tmp_path / "random.pt"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(RuntimeError) as refused:
        make_app(MODEL_PATH=str(garbage))
    message = str(refused.value)
    assert "not a readable CovidScan checkpoint" in message and "weights_only" not in message
    assert "arbitrary code" not in message

    checkpoint = torch.load(tiny_checkpoint_path, weights_only=True)
    state = dict(checkpoint["state_dict"])
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][:2], state["fc.bias"][:2]
    two_outputs = altered_checkpoint(tiny_checkpoint_path, tmp_path / "two.pt", state_dict=state)
    with pytest.raises(RuntimeError) as refused:
        make_app(MODEL_PATH=str(two_outputs))
    message = str(refused.value)
    assert "the weights' final layer has 2 outputs but class_names lists 3 (COVID, NORMAL, PNEUMONIA)" in message
    assert "Error(s) in loading state_dict" not in message
