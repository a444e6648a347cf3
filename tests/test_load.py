"""Load and faults against a real gunicorn on loopback: concurrency, memory, disk, killed and stuck workers, start-up.

The load test runs COVIDSCAN_LOAD_SECONDS (default 20) with COVIDSCAN_LOAD_CLIENTS (default 16) clients; the
documented full run is ``COVIDSCAN_LOAD_SECONDS=60 pytest -m slow tests/test_load.py -k load -s``. Numbers go to
artifacts/load-test.json.
"""

import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import CLASS_NAMES, REPO_ROOT, encode, make_xray_array
from servers import (
    BOOT_SECONDS,
    file_upload,
    form_session,
    free_port,
    gunicorn_command,
    production_environment,
    request,
    start_gunicorn,
)
from test_hostile_inputs import ENDPOINTS, HOSTILE_INPUTS, UPLOAD_LIMIT_MB

pytestmark = pytest.mark.slow

LOAD_SECONDS = float(os.environ.get("COVIDSCAN_LOAD_SECONDS", "20"))
LOAD_CLIENTS = int(os.environ.get("COVIDSCAN_LOAD_CLIENTS", "16"))
WARM_UP_SECONDS = float(os.environ.get("COVIDSCAN_LOAD_WARMUP_SECONDS", "8"))
# The acceptance run uses the shipped model: COVIDSCAN_LOAD_MODEL=models/default.pt (default: the tiny test model).
LOAD_MODEL = os.environ.get("COVIDSCAN_LOAD_MODEL")
MEMORY_GROWTH_LIMIT = 0.10
STUCK_TIMEOUT = 5  # gunicorn --timeout for the stuck-worker tests
ARTIFACTS = REPO_ROOT / "artifacts"


# --------------------------------------------------------------------------- the request mix


@dataclasses.dataclass(frozen=True)
class Planned:
    """One request of the mix, built once: where it goes, its body and the status it must get."""

    name: str
    path: str
    upload: object
    expected: int
    valid: bool
    form: bool


def request_mix(token):
    """Valid X-rays (API and form, with and without heatmap) and the whole hostile corpus, both endpoints."""
    fields = (("csrf_token", token),)
    xray = encode(Image.fromarray(make_xray_array(11), mode="L"))
    large = encode(Image.fromarray(make_xray_array(12, size=(1024, 768)), mode="L"))
    jpeg = encode(Image.fromarray(make_xray_array(13, size=(512, 640)), mode="L"), "JPEG", quality=90)
    planned = [
        Planned("api-png", "/api/v1/predict", file_upload(xray), 200, True, False),
        Planned("api-jpeg", "/api/v1/predict", file_upload(jpeg, filename="x.jpg", content_type="image/jpeg"),
                200, True, False),
        Planned("api-large-png-heatmap", "/api/v1/predict?heatmap=1", file_upload(large), 200, True, False),
        Planned("form-png", "/predict", file_upload(xray, fields=fields), 200, True, True),
        Planned("form-jpeg", "/predict", file_upload(jpeg, filename="x.jpg", fields=fields), 200, True, True),
    ]
    for case in HOSTILE_INPUTS:
        for endpoint, path in ENDPOINTS.items():
            status, _ = case.expected(endpoint)
            upload = case.build(fields if endpoint == "form" else ())
            planned.append(Planned(f"{case.name}-{endpoint}", path, upload, status, False, endpoint == "form"))
    return planned


@dataclasses.dataclass
class Outcome:
    name: str
    valid: bool
    status: int | None  # None: no HTTP answer at all
    expected: int
    elapsed: float
    error: str = ""


def run_load(server, mix, *, seconds, clients, cookie, on_tick=None, seed=0):
    """``clients`` threads send random requests from ``mix`` (half valid, half hostile) for ``seconds``."""
    valid = [item for item in mix if item.valid]
    hostile = [item for item in mix if not item.valid]
    outcomes, lock = [], threading.Lock()
    deadline = time.monotonic() + seconds

    def client(number):
        rng = random.Random(seed * 1000 + number)
        while time.monotonic() < deadline:
            item = rng.choice(valid if rng.random() < 0.5 else hostile)
            start = time.perf_counter()
            try:
                response = request(server, "POST", item.path, item.upload, headers=cookie if item.form else (),
                                   timeout=120)
                outcome = Outcome(item.name, item.valid, response.status, item.expected, response.elapsed)
                if response.status >= 500 or "Traceback" in response.text:
                    outcome.error = response.text[:300]
            except OSError as error:
                outcome = Outcome(item.name, item.valid, None, item.expected, time.perf_counter() - start,
                                  f"{type(error).__name__}: {error}")
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, args=(number,), daemon=True) for number in range(clients)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        if on_tick:
            on_tick()
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    return outcomes


def percentile(values, fraction):
    return float(np.percentile(values, fraction * 100)) if values else float("nan")


def summarise(outcomes, seconds):
    """Counts and latency percentiles (ms) of a run."""
    answered = [outcome for outcome in outcomes if outcome.status is not None]
    valid = [outcome.elapsed * 1000 for outcome in answered if outcome.valid and outcome.status == 200]
    everything = [outcome.elapsed * 1000 for outcome in answered]
    statuses = {}
    for outcome in answered:
        statuses[str(outcome.status)] = statuses.get(str(outcome.status), 0) + 1
    return {
        "requests": len(outcomes),
        "requests_per_second": round(len(outcomes) / seconds, 1),
        "valid_predictions": len(valid),
        "hostile": sum(not outcome.valid for outcome in outcomes),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": sum(outcome.status >= 500 for outcome in answered),
        "connection_errors": sum(outcome.status is None for outcome in outcomes),
        "unexpected_status": sum(outcome.status != outcome.expected for outcome in answered),
        "p50_ms": round(percentile(everything, 0.50)),
        "p95_ms": round(percentile(everything, 0.95)),
        "p99_ms": round(percentile(everything, 0.99)),
        "valid_p50_ms": round(percentile(valid, 0.50)),
        "valid_p95_ms": round(percentile(valid, 0.95)),
    }


def failures(outcomes, limit=5):
    """A few failed outcomes, for assertion messages."""
    bad = [outcome for outcome in outcomes if outcome.status is None or outcome.status >= 500 or outcome.error
           or outcome.status != outcome.expected]
    return "\n".join(f"{outcome.name}: {outcome.status} (expected {outcome.expected}) {outcome.error}"
                     for outcome in bad[:limit])


def record(name, result):
    """Add ``result`` under ``name`` to artifacts/load-test.json."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "load-test.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    recorded[name] = result
    path.write_text(json.dumps(recorded, indent=2) + "\n")
    print(f"\n{name}: {json.dumps(result)}")


class DiskWatch:
    """Notes any file that appears in the watched folders, or that a worker opens there or unlinked, after now."""

    def __init__(self, server, folders):
        self.server, self.folders = server, folders
        self.seen = set()
        self.baseline = self.snapshot()

    def snapshot(self):
        found = {f"file {path}" for folder in self.folders for path in folder.rglob("*")}
        for pid in self.server.worker_pids():
            try:
                for handle in psutil.Process(pid).open_files():
                    if handle.path.endswith(" (deleted)") or any(handle.path.startswith(str(folder))
                                                                 for folder in self.folders):
                        found.add(f"open {handle.path}")
            except psutil.Error:
                pass
        return found

    def poll(self):
        self.seen |= self.snapshot() - self.baseline


@pytest.fixture(scope="module")
def load_server(tiny_checkpoint_path, tmp_path_factory):
    """gunicorn, 2 workers, production settings, rate limit off, started in an empty folder with its own TMPDIR."""
    workdir, scratch = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("tmpdir")
    model_path = os.path.abspath(LOAD_MODEL) if LOAD_MODEL else tiny_checkpoint_path
    environment = production_environment(model_path, MAX_UPLOAD_MB=UPLOAD_LIMIT_MB, RATE_LIMIT="off")
    environment["TMPDIR"] = str(scratch)
    server = start_gunicorn(model_path, tmp_path_factory.mktemp("gunicorn") / "gunicorn.log",
                            cwd=workdir, environment=environment)
    server.watched_folders = (workdir, scratch)
    try:
        yield server
    finally:
        server.stop()


def test_load_mixed_valid_and_hostile_no_errors_steady_memory_no_disk(load_server):
    server = load_server
    token, cookie = form_session(server)
    mix = request_mix(token)
    warm = run_load(server, mix, seconds=WARM_UP_SECONDS, clients=LOAD_CLIENTS, cookie=cookie, seed=1)
    assert not failures(warm), failures(warm)
    workers = server.worker_pids()
    memory_after_warm_up = server.worker_rss()
    watch = DiskWatch(server, server.watched_folders)

    start = time.monotonic()
    outcomes = run_load(server, mix, seconds=LOAD_SECONDS, clients=LOAD_CLIENTS, cookie=cookie, on_tick=watch.poll)
    elapsed = time.monotonic() - start
    memory_after_run = server.worker_rss()
    watch.poll()

    result = summarise(outcomes, elapsed)
    before, after = sum(memory_after_warm_up.values()), sum(memory_after_run.values())
    result.update(
        seconds=round(elapsed, 1), clients=LOAD_CLIENTS, kinds_in_mix=len(mix),
        worker_rss_after_warm_up_mb=round(before / 2**20, 1), worker_rss_after_run_mb=round(after / 2**20, 1),
        worker_rss_growth=round(after / before - 1, 4), cpu_count=psutil.cpu_count(),
        load_average=[round(value, 2) for value in os.getloadavg()], disk_files_seen=sorted(watch.seen),
    )
    record("load", result)

    assert result["server_errors"] == 0, failures(outcomes)
    assert result["connection_errors"] == 0, failures(outcomes)
    assert result["unexpected_status"] == 0, failures(outcomes)
    assert result["valid_predictions"] > 0 and result["hostile"] > 0
    assert server.worker_pids() == workers, "no worker died or was recycled under load"
    assert after <= before * (1 + MEMORY_GROWTH_LIMIT), f"worker memory grew {result['worker_rss_growth']:.1%}"
    assert watch.seen == set(), "uploads never touch the disk"
    assert request(server, "GET", "/healthz").status == 200
    log = server.log()
    assert "Traceback" not in log and "WORKER TIMEOUT" not in log


def test_killed_worker_is_replaced_and_only_its_request_fails(load_server):
    server = load_server
    token, cookie = form_session(server)
    workers = server.worker_pids()
    victim = workers[0]
    killed = threading.Event()
    start = time.monotonic()

    def kill_once():
        if not killed.is_set() and time.monotonic() - start > 3:
            os.kill(victim, signal.SIGKILL)
            killed.set()

    outcomes = run_load(server, request_mix(token), seconds=10, clients=LOAD_CLIENTS, cookie=cookie,
                        on_tick=kill_once, seed=2)
    replaced = server.wait_for_workers(lambda pids: len(pids) == 2 and victim not in pids, timeout=60)
    result = summarise(outcomes, time.monotonic() - start)
    result["replacement_worker"] = sorted(set(replaced) - set(workers))
    record("sigkill", result)

    assert killed.is_set()
    assert victim not in replaced and len(replaced) == 2, "gunicorn forked a replacement"
    failed = result["server_errors"] + result["connection_errors"]
    assert failed <= 1, f"only the request in flight on the killed worker may fail:\n{failures(outcomes)}"
    assert result["unexpected_status"] - result["server_errors"] == 0, failures(outcomes)
    assert request(server, "GET", "/healthz").status == 200
    assert f"Worker (pid:{victim}) was sent SIGKILL" in server.log()


# --------------------------------------------------------------------------- stuck workers


@pytest.fixture(scope="module")
def impatient_server(tiny_checkpoint_path, tmp_path_factory):
    """gunicorn with a tiny worker timeout, to see stuck workers recycled within seconds."""
    server = start_gunicorn(
        tiny_checkpoint_path, tmp_path_factory.mktemp("gunicorn") / "gunicorn.log",
        extra_args=("--timeout", str(STUCK_TIMEOUT), "--graceful-timeout", "3"), RATE_LIMIT="off",
    )
    try:
        yield server
    finally:
        server.stop()


def answers_health_checks_until(server, condition, timeout):
    """Ask /healthz every half second until ``condition()``; return (condition met, health statuses)."""
    statuses, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True, statuses
        try:
            statuses.append(request(server, "GET", "/healthz", timeout=10).status)
        except OSError as error:
            statuses.append(type(error).__name__)
        time.sleep(0.5)
    return condition(), statuses


def test_stopped_worker_is_recycled_after_the_timeout(impatient_server):
    server = impatient_server
    workers = server.worker_pids()
    victim = workers[0]
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        replaced, statuses = answers_health_checks_until(
            server, lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 2,
            timeout=STUCK_TIMEOUT + 30,
        )
        recycled_after = time.monotonic() - stopped_at
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGCONT)
    record("sigstop", {"timeout_s": STUCK_TIMEOUT, "recycled_after_s": round(recycled_after, 1),
                       "health_checks": len(statuses), "health_failures": sum(s != 200 for s in statuses)})
    assert replaced, f"the stopped worker {victim} was not replaced:\n{server.log()[-3000:]}"
    assert recycled_after >= STUCK_TIMEOUT - 1, "not before the timeout"
    assert f"WORKER TIMEOUT (pid:{victim})" in server.log()
    assert all(status == 200 for status in statuses), "the other worker kept answering"


def test_stalled_upload_holds_a_worker_only_until_the_timeout(impatient_server):
    server = impatient_server
    before = server.worker_pids()
    stalled = socket.create_connection((server.host, server.port), timeout=STUCK_TIMEOUT + 30)
    try:
        stalled.sendall(
            f"POST /api/v1/predict HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: multipart/form-data; "
            "boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\n".encode()
        )
        cut_off, statuses = answers_health_checks_until(
            server, lambda: len(set(server.worker_pids()) - set(before)) == 1 and len(server.worker_pids()) == 2,
            timeout=STUCK_TIMEOUT + 30,
        )
        assert cut_off, f"the worker holding the stalled upload was not recycled:\n{server.log()[-3000:]}"
        try:
            leftover = stalled.recv(1024)
        except OSError:
            leftover = b""
        assert b"200 OK" not in leftover
    finally:
        stalled.close()
    assert "WORKER TIMEOUT" in server.log()
    assert all(status == 200 for status in statuses), "the other worker kept answering"
    assert request(server, "GET", "/healthz").status == 200


# --------------------------------------------------------------------------- start-up faults


def wrong_architecture_checkpoint(path):
    """resnet18 weights in a checkpoint that says resnet34."""
    import torch

    from model.checkpoint import make_checkpoint, save_checkpoint
    from model.network import build_model
    from model.transforms import eval_transform_params

    torch.manual_seed(0)
    network = build_model("resnet18", num_classes=len(CLASS_NAMES), weights="none")
    checkpoint = make_checkpoint(network, arch="resnet34", class_names=CLASS_NAMES,
                                 transform=eval_transform_params(image_size=64), model_name="m", model_version="1")
    return save_checkpoint(checkpoint, path)


def without_file_access_override():
    """A command prefix that takes root's power to read any file away, or None if that is not possible here."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    capabilities = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={capabilities}", f"--bounding-set={capabilities}", "--"]


def launch(model_path, port=None, prefix=(), **settings):
    """Run gunicorn to its end (it must not start) and return the finished process."""
    return subprocess.run(
        [*prefix, *gunicorn_command(port or free_port(), workers=1)], cwd=REPO_ROOT,
        env=production_environment(model_path, **settings), capture_output=True, text=True, timeout=BOOT_SECONDS,
    )


def check_refused(process, reason):
    """A non-zero exit, the reason on one line of stderr, and no Python traceback."""
    assert process.returncode != 0
    lines = [line for line in process.stderr.splitlines() if reason in line]
    assert lines, f"{reason!r} not in stderr:\n{process.stderr[-3000:]}"
    assert "Traceback" not in process.stderr


@pytest.mark.parametrize("fault", ["missing", "truncated", "wrong-architecture", "directory", "no-secret-key"])
def test_start_up_faults_end_gunicorn_with_a_reason(fault, tiny_checkpoint_path, tmp_path):
    model_path = tmp_path / "model.pt"
    settings = {}
    if fault == "missing":
        reason = f"CovidScan cannot start: no model checkpoint at {model_path}"
    elif fault == "truncated":
        data = tiny_checkpoint_path.read_bytes()
        model_path.write_bytes(data[: len(data) // 3])
        reason = f"CovidScan cannot start: {model_path}"
    elif fault == "wrong-architecture":
        wrong_architecture_checkpoint(model_path)
        reason = "CovidScan cannot start: checkpoint weights do not fit resnet34"
    elif fault == "directory":
        model_path.mkdir()
        reason = f"CovidScan cannot start: no model checkpoint at {model_path}"
    else:
        model_path = tiny_checkpoint_path
        settings["SECRET_KEY"] = ""
        reason = "COVIDSCAN_SECRET_KEY is not set; CovidScan refuses to start in production"
    process = launch(model_path, **settings)
    check_refused(process, reason)
    assert "Error: " in process.stderr, "gunicorn's own one-line error, not a traceback"


def test_unreadable_model_folder_ends_gunicorn_with_a_reason(tiny_checkpoint_path, tmp_path):
    prefix = without_file_access_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot make a folder unreadable")
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_checkpoint_path, folder / "model.pt")
    folder.chmod(0)
    try:
        process = launch(folder / "model.pt", prefix=prefix)
    finally:
        folder.chmod(0o755)
    check_refused(process, f"CovidScan cannot start: cannot read the model checkpoint {folder / 'model.pt'} "
                           "(Permission denied)")


def test_port_in_use_ends_gunicorn_with_a_reason(tiny_checkpoint_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        process = launch(tiny_checkpoint_path, port=port)
    check_refused(process, f"Can't connect to ('127.0.0.1', {port})")
