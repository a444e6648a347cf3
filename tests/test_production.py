"""The production front, for real: deploy/serve-production.sh starts Debian's nginx (TLS) in front of gunicorn.

Slow clients, TLS, sign-in, a label-swapped checkpoint, patient data in a malformed DICOM field, the
cross-worker rate limit and stray files, each against the real processes on loopback.
"""

import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import CLASS_NAMES, REPO_ROOT
from servers import BOUNDARY, file_upload, free_port, production_environment

pytestmark = pytest.mark.slow

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
START_SCRIPT = REPO_ROOT / "deploy" / "serve-production.sh"
BOOT_SECONDS = 900  # torch, the model and its ONNX export, on two cores shared with training and other test runs
API_TOKEN = "production-test-token-5d1e"
RATE_PER_MINUTE = 120
RATE_BURST = 20
SLOW_CONNECTIONS = 50
PATIENT_NAME = "Quixote^Dulcinea"
MALFORMED_VALUE = "Doe^Jane"

if not Path(NGINX).exists():
    pytest.skip("nginx is not installed (make nginx)", allow_module_level=True)


def make_certificate(folder):
    """A self-signed certificate for localhost / 127.0.0.1, as PEM files (cert, key)."""
    cert, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class Front:
    """deploy/serve-production.sh running in its own process group; ``stop()`` ends nginx and gunicorn."""

    def __init__(self, model_path, folder, *, cert=None, key=None, **settings):
        self.port = free_port()
        self.folder = Path(folder)
        self.tmpdir = self.folder / "tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.folder / "front.log"
        self.cert = cert
        environment = production_environment(model_path, WORKERS=2, LISTEN_ADDRESS="127.0.0.1", **settings)
        environment.update(HTTPS_PORT=str(self.port), TMPDIR=str(self.tmpdir),
                           COVIDSCAN_FRONT_RATE_PER_MINUTE=str(RATE_PER_MINUTE),
                           COVIDSCAN_FRONT_RATE_BURST=str(RATE_BURST))
        if cert:
            environment.update(COVIDSCAN_TLS_CERT=str(cert), COVIDSCAN_TLS_KEY=str(key))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(["bash", str(START_SCRIPT)], cwd=REPO_ROOT, env=environment, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def log(self):
        """Everything nginx, gunicorn, the app and the script have written."""
        return self.log_path.read_text(errors="replace")

    def context(self):
        """A TLS context that trusts this front's certificate only."""
        context = ssl.create_default_context(cafile=str(self.cert))
        return context

    def connect(self, timeout=30):
        """An HTTPS connection to the front (certificate and host name verified)."""
        return http.client.HTTPSConnection("localhost", self.port, timeout=timeout, context=self.context())

    def request(self, method, path, body=None, headers=None, timeout=60):
        """(status, headers, body) of one request on a fresh connection."""
        connection = self.connect(timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def wait_until_ready(self, timeout=BOOT_SECONDS):
        """Wait for /healthz through nginx; fail with the log if the script exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve-production.sh exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/healthz", timeout=5)[0] == 200:
                    return self
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(1)
        raise AssertionError(f"the front did not answer /healthz within {timeout} s:\n{self.log()}")

    def stop(self):
        """SIGTERM to the script's process group (as Ctrl-C on `make serve-production` would), then SIGKILL."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def front(tiny_checkpoint_path, tmp_path_factory):
    """The production front around the tiny checkpoint, with an API token and a certificate of our own."""
    folder = tmp_path_factory.mktemp("front")
    cert, key = make_certificate(folder)
    server = Front(tiny_checkpoint_path, folder, cert=cert, key=key,
                   API_TOKEN_HASHES=hashlib.sha256(API_TOKEN.encode()).hexdigest())
    try:
        yield server.wait_until_ready()
    finally:
        server.stop()


def bearer():
    return {"Authorization": f"Bearer {API_TOKEN}"}


def predict(front, data=None, timeout=120):
    """A real prediction through the front (the API, with the token)."""
    from test_security import png_bytes

    upload = file_upload(png_bytes() if data is None else data)
    return front.request("POST", "/api/v1/predict", body=upload.body,
                         headers={"Content-Type": upload.content_type, **bearer()}, timeout=timeout)


# --------------------------------------------------------------------------- TLS


def test_tls_works_and_the_app_knows_the_request_is_secure(front):
    status, headers, body = front.request("GET", "/healthz")
    assert status == 200 and b'"status":"ok"' in body
    assert headers.get("Strict-Transport-Security"), "the app believes nginx's X-Forwarded-Proto: https"
    assert "nginx/" not in headers.get("Server", ""), "no version in the Server header"
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as raw:
        with front.context().wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_plain_http_on_the_tls_port_gets_no_app_page(front):
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = raw.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


# --------------------------------------------------------------------------- slow clients


def slow_connection(front, kind, stop, results):
    """Dribble a request's headers (``headers``) or body (``body``) one byte at a time until ``stop`` or closed."""
    head = (f"POST /api/v1/predict HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_TOKEN}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: 100000\r\n\r\n").encode()
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", front.port), timeout=30) as raw:
            tls = front.context().wrap_socket(raw, server_hostname="localhost")
            if kind == "body":
                tls.sendall(head)
                payload = b"x" * 100000
            else:
                payload = head
            for byte in payload:
                if stop.is_set():
                    break
                tls.sendall(bytes([byte]))
                time.sleep(0.5)
            results.append((kind, "held", time.monotonic() - started))
    except OSError:
        results.append((kind, "closed by the server", time.monotonic() - started))


def test_slow_clients_leave_health_checks_and_predictions_flowing(front):
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=slow_connection, args=(front, ("headers", "body")[index % 2], stop, results),
                                daemon=True) for index in range(SLOW_CONNECTIONS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)  # every slow connection is open and dribbling
        health_times = []
        for _ in range(5):
            started = time.monotonic()
            status, _, _ = front.request("GET", "/healthz", timeout=5)
            health_times.append(time.monotonic() - started)
            assert status == 200
            time.sleep(0.5)
        status, _, body = predict(front)
        assert status == 200, body[:500]
        assert re.search(rb'"label":\s*(null|"(' + "|".join(CLASS_NAMES).encode() + rb')")', body)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    print(f"/healthz under {SLOW_CONNECTIONS} slow connections: {', '.join(f'{t:.3f}' for t in health_times)} s")
    assert max(health_times) < 1.0, health_times


def test_a_stalled_header_or_body_is_cut_off_by_the_front(front):
    """nginx's client_header_timeout and client_body_timeout (10 s) end a stalled request, not a worker."""
    for kind in ("headers", "body"):
        with socket.create_connection(("127.0.0.1", front.port), timeout=40) as raw:
            tls = front.context().wrap_socket(raw, server_hostname="localhost")
            started = time.monotonic()
            if kind == "headers":
                tls.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: loc")
            else:
                tls.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n\r\nab")
            try:
                while tls.recv(4096):
                    pass
            except OSError:
                pass
            assert time.monotonic() - started < 30, f"a stalled {kind} held the connection"


# --------------------------------------------------------------------------- access control


def test_an_unauthenticated_form_post_gets_no_prediction(front):
    status, headers, page = front.request("GET", "/")
    assert status == 302 and headers["Location"].startswith("/login")
    status, headers, page = front.request("GET", "/login")
    assert status == 200
    csrf = re.search(rb'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1).decode()
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    from test_security import png_bytes

    upload = file_upload(png_bytes(), fields=[("csrf_token", csrf)])
    status, _, body = front.request("POST", "/predict", body=upload.body,
                                    headers={"Content-Type": upload.content_type, "Cookie": cookie})
    assert status == 401
    assert not any(name.encode() in body for name in CLASS_NAMES), "no class, no probability"
    assert b"Please sign in" in body


# --------------------------------------------------------------------------- patient data and stray files


def test_a_patient_name_in_a_malformed_dicom_field_reaches_no_log_line(front):
    from test_security import malformed_dicom_naming_a_patient

    status, _, body = predict(front, malformed_dicom_naming_a_patient())
    assert status < 500, body[:500]
    time.sleep(1)  # let the workers' log lines reach the file
    log = front.log()
    assert "value withheld" in log, "pydicom's warning was logged, without its value"
    for secret in (MALFORMED_VALUE, "Doe", "Jane", PATIENT_NAME, "Quixote", "Dulcinea"):
        assert secret not in log, f"{secret!r} reached the logs"


def test_serving_leaves_no_stray_files_in_tmpdir(front):
    assert predict(front)[0] == 200
    assert sorted(path.name for path in front.tmpdir.iterdir()) == [], "e.g. ONNX Runtime's mat-debug-<pid>.log"


# --------------------------------------------------------------------------- rate limit across workers


def test_the_rate_limit_holds_across_workers(front):
    """The last test of the module: it spends the client's allowance (limit_req in nginx, shared by all workers)."""
    statuses, bodies = [], []
    started = time.monotonic()
    for _ in range(RATE_BURST + 15):
        status, headers, body = front.request("POST", "/api/v1/predict", body=b"",
                                              headers={"Content-Type": "text/plain", **bearer()})
        statuses.append(status)
        bodies.append((headers, body))
    elapsed = time.monotonic() - started
    limited = [index for index, status in enumerate(statuses) if status == 429]
    passed = len(statuses) - len(limited)
    allowance = RATE_BURST + 1 + elapsed * RATE_PER_MINUTE / 60  # the burst, plus what the rate refilled meanwhile
    assert limited, statuses
    assert passed <= allowance, f"{passed} of {len(statuses)} passed in {elapsed:.1f} s (allowance {allowance:.0f})"
    headers, body = bodies[limited[0]]
    assert headers["Content-Type"].startswith("application/json") and b"Too many requests" in body
    assert headers["Retry-After"] == "60"


# --------------------------------------------------------------------------- start-up refusals


def test_a_label_swapped_checkpoint_is_refused_at_start_up(tiny_checkpoint_path, tmp_path):
    import torch

    from model.checkpoint import save_checkpoint

    checkpoint = torch.load(tiny_checkpoint_path, weights_only=True)
    checkpoint["class_names"] = ["NORMAL", "COVID", "PNEUMONIA"]
    swapped = save_checkpoint(checkpoint, tmp_path / "swapped.pt")
    server = Front(swapped, tmp_path)
    try:
        server.process.wait(timeout=BOOT_SECONDS)
    finally:
        server.stop()
    log = server.log()
    assert server.process.returncode != 0
    assert "CovidScan cannot start: the checkpoint's class names are [NORMAL, COVID, PNEUMONIA]" in log
    assert "gunicorn stopped before it served" in log
    assert "Traceback" not in log
    assert "SELF-SIGNED" in log, "no certificate given: a loud warning"
    assert not list(Path("/dev/shm").glob(f"covidscan-{server.port}.*")), "the run folder is removed"
