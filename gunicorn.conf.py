"""gunicorn settings for CovidScan: ``gunicorn -c gunicorn.conf.py wsgi:app`` (CLI flags and GUNICORN_CMD_ARGS win)."""

import logging
import os
import sys

# The master loads the model before forking (preload_app). OpenMP is not fork-safe: if the master ran torch
# with a thread pool, workers can hang on their first forward pass (seen as WORKER TIMEOUT). So the master
# stays single-threaded, and each worker picks its own thread count in post_fork.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
# No ONNX Runtime telemetry (files under ~/.cache/Microsoft and /tmp/mat-debug-<pid>.log); model/runtime.py sets it too.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

wsgi_app = "wsgi:app"
bind = os.environ.get("COVIDSCAN_BIND") or f"127.0.0.1:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("COVIDSCAN_WORKERS") or os.environ.get("WEB_CONCURRENCY") or 2)
worker_class = "sync"
threads = 1
# A sync worker is busy from the first byte of a request to the last of its answer, so this bounds a slow client
# that reaches gunicorn directly (a prediction takes seconds); in production nginx buffers requests in front of it.
timeout = 60
graceful_timeout = 30
# A request line, header count and header size that no browser or API client needs more than.
limit_request_line = 8190
limit_request_fields = 50
limit_request_field_size = 8190
preload_app = True  # one copy of the model in the master; workers share its memory pages
accesslog = "-"
# X-Forwarded-* headers are believed by the app alone, and only from COVIDSCAN_TRUSTED_PROXIES proxies (ProxyFix);
# gunicorn's default would take X-Forwarded-Proto from any local process as proof of HTTPS.
forwarded_allow_ips = ""
# gunicorn's control socket defaults to one path per user (~/.gunicorn/gunicorn.ctl), shared by every instance on
# the host: each instance names its own (deploy/serve-production.sh puts it in its run folder), or has none.
if os.environ.get("COVIDSCAN_CONTROL_SOCKET"):
    control_socket = os.environ["COVIDSCAN_CONTROL_SOCKET"]
else:
    control_socket_disable = True


def post_fork(server, worker):
    """Give each worker its share of the CPU cores for torch (COVIDSCAN_TORCH_THREADS overrides)."""
    requested = int(os.environ.get("COVIDSCAN_TORCH_THREADS") or 0)
    torch_threads = requested or max(1, _cpu_count() // max(1, server.cfg.workers))
    torch.set_num_threads(torch_threads)
    server.log.info("worker %s uses %d torch thread(s)", worker.pid, torch_threads)


def worker_exit(server, worker):
    """Leave the worker process at once once gunicorn has finished with it.

    Interpreter finalisation can deadlock on runtime state inherited across the fork (ONNX Runtime's
    session and thread-pool objects created in the master), which held every shutdown for the whole
    graceful timeout. A worker stores nothing, so after flushing the logs there is nothing left to run.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _cpu_count():
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
