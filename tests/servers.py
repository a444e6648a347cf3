"""Real gunicorn servers on loopback and a raw HTTP/1.1 client that can send what browsers never would."""

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from conftest import REPO_ROOT

BOOT_SECONDS = 180  # importing torch and loading the model, on two cores shared with a training job
BOUNDARY = "covidscan-test-boundary"
CSRF_FIELD = re.compile(rb'name="csrf_token" type="hidden" value="([^"]+)"')


def free_port():
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def production_environment(model_path, **settings):
    """A production start's environment (no COVIDSCAN_DEV), plus ``settings`` as COVIDSCAN_<NAME> variables."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith(("COVIDSCAN_", "FLASK_"))}
    environment.update(
        COVIDSCAN_MODEL_PATH=str(model_path),
        COVIDSCAN_SECRET_KEY="test-secret-key-not-for-production",
        COVIDSCAN_TORCH_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    environment.update({f"COVIDSCAN_{name}": str(value) for name, value in settings.items()})
    return environment


def gunicorn_command(port, *extra_args, workers=2):
    """The production command line (gunicorn.conf.py) on loopback; the repository is found from any folder."""
    return [
        sys.executable, "-m", "gunicorn", "-c", str(REPO_ROOT / "gunicorn.conf.py"), "wsgi:app",
        "--pythonpath", str(REPO_ROOT), "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
        # Workers exit at once when idle; a short grace keeps a test's shutdown short when one does not.
        "--no-control-socket", "--graceful-timeout", "5", *extra_args,
    ]


class Gunicorn:
    """A gunicorn master started for a test: its URL, its workers, its log; ``stop()`` ends it."""

    def __init__(self, environment, log_path, *, workers=2, extra_args=(), cwd=None):
        self.port = free_port()
        self.host = "127.0.0.1"
        self.base_url = f"http://{self.host}:{self.port}"
        self.workers = workers
        self.log_path = Path(log_path)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                gunicorn_command(self.port, *extra_args, workers=workers),
                cwd=cwd or REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
            )

    def log(self):
        """Everything gunicorn and the app have written so far."""
        return self.log_path.read_text(errors="replace")

    def wait_until_ready(self, timeout=BOOT_SECONDS):
        """Wait for /healthz and for every worker to have booted; fail with the log otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.process.returncode}:\n{self.log()}")
            if len(self.worker_pids()) == self.workers:
                try:
                    if request(self, "GET", "/healthz", timeout=10).status == 200:
                        return self
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"gunicorn did not answer /healthz within {timeout} s:\n{self.log()}")
            time.sleep(0.5)

    def worker_pids(self):
        """The pids of the master's live worker processes."""
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []
        return sorted(child.pid for child in children if child.status() != psutil.STATUS_ZOMBIE)

    def worker_rss(self):
        """Resident memory of each worker, in bytes, by pid."""
        sizes = {}
        for pid in self.worker_pids():
            try:
                sizes[pid] = psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return sizes

    def wait_for_workers(self, predicate, timeout):
        """Poll the worker pids until ``predicate(pids)`` holds; return them, or the last seen on timeout."""
        deadline = time.monotonic() + timeout
        pids = self.worker_pids()
        while not predicate(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = self.worker_pids()
        return pids

    def stop(self):
        """SIGTERM, then SIGKILL for the whole group of processes if the master lingers."""
        if self.process.poll() is None:
            workers = self.worker_pids()
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def start_gunicorn(model_path, log_path, *, workers=2, extra_args=(), cwd=None, environment=None, **settings):
    """Start gunicorn on a free loopback port and wait until it answers; ``settings`` become COVIDSCAN_ vars."""
    environment = environment or production_environment(model_path, **settings)
    server = Gunicorn(environment, log_path, workers=workers, extra_args=extra_args, cwd=cwd)
    try:
        return server.wait_until_ready()
    except BaseException:
        server.stop()
        raise


# --------------------------------------------------------------------------- requests


@dataclasses.dataclass(frozen=True)
class Upload:
    """A request body as the wire carries it: bytes, its Content-Type (None: no header) and extra headers."""

    body: bytes
    content_type: str | None
    headers: tuple = ()


@dataclasses.dataclass
class Response:
    """A parsed HTTP response; ``headers`` keys are lower-case."""

    status: int
    headers: dict
    body: bytes
    elapsed: float

    @property
    def text(self):
        return self.body.decode("utf-8", errors="replace")


def multipart(parts, boundary=BOUNDARY):
    """Encode ``parts`` (name, file name or None, Content-Type or None, bytes) as multipart/form-data.

    Names and file names go out as raw UTF-8, so a test can put a NUL or ``../`` in them.
    """
    body = bytearray()
    for name, filename, content_type, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode("utf-8")
        if content_type:
            body += f"Content-Type: {content_type}\r\n".encode("utf-8")
        body += b"\r\n" + bytes(data) + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body)


def file_upload(data, *, filename="xray.png", content_type="image/png", fields=()):
    """A multipart body with ``fields`` (name, value) first, then ``data`` as the file field ``file``."""
    parts = [(name, None, None, value.encode()) for name, value in fields]
    parts.append(("file", filename, content_type, data))
    return Upload(multipart(parts), f"multipart/form-data; boundary={BOUNDARY}")


def request(server, method, path, upload=None, *, headers=(), timeout=60, chunk_size=None, chunk_delay=0.0,
            declared_length=None, chunked=False):
    """Send one request on a fresh connection and read the whole answer.

    ``chunk_size``/``chunk_delay`` dribble the body (a slow client); ``declared_length`` lies about it;
    ``chunked`` uses Transfer-Encoding: chunked. A server that answers before reading the whole body (413)
    may close the connection while the body is still going out: the send error is ignored and the answer
    read all the same, as a browser does.
    """
    upload = upload or Upload(b"", None)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {server.host}:{server.port}", "Connection: close"]
    if upload.content_type is not None:
        lines.append(f"Content-Type: {upload.content_type}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif method != "GET" or upload.body:
        lines.append(f"Content-Length: {len(upload.body) if declared_length is None else declared_length}")
    lines += [f"{name}: {value}" for name, value in (*upload.headers, *headers)]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    start = time.perf_counter()
    with socket.create_connection((server.host, server.port), timeout=timeout) as connection:
        try:
            connection.sendall(head)
            _send_body(connection, upload.body, chunk_size, chunk_delay, chunked)
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = _read_until_closed(connection)
    return _parse_response(raw, time.perf_counter() - start)


def _send_body(connection, body, chunk_size, chunk_delay, chunked):
    """Write the body, in pieces with pauses when asked."""
    step = chunk_size or max(1, len(body))
    for offset in range(0, len(body), step):
        piece = body[offset : offset + step]
        connection.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
        if chunk_delay:
            time.sleep(chunk_delay)
    if chunked:
        connection.sendall(b"0\r\n\r\n")


def _read_until_closed(connection):
    """Read until the server closes the connection (we asked for Connection: close)."""
    received = bytearray()
    while True:
        try:
            data = connection.recv(1 << 16)
        except ConnectionResetError:
            if received:
                break
            raise
        if not data:
            break
        received += data
    return bytes(received)


def _parse_response(raw, elapsed):
    """Status, headers and body of a Connection: close HTTP/1.1 response; ConnectionError if there is none."""
    head, separator, body = raw.partition(b"\r\n\r\n")
    if not separator:
        raise ConnectionError(f"no HTTP response, {len(raw)} bytes received")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(int(status_line.split()[1]), headers, body, elapsed)


def form_session(server):
    """A browser's first visit: the upload form's CSRF token and the session cookie that goes with it."""
    page = request(server, "GET", "/")
    token = CSRF_FIELD.search(page.body)
    assert page.status == 200 and token, f"no upload form at {server.base_url}/"
    cookie = page.headers["set-cookie"].split(";", 1)[0]
    return token.group(1).decode(), (("Cookie", cookie),)
