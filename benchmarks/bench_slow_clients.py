"""Slow clients against a running server: does /healthz still answer, and how fast, while N connections dribble?

Half the connections send their request headers one byte at a time, half send headers and then the body one byte
at a time (every ``--delay`` seconds). Meanwhile /healthz is asked ``--checks`` times (timeout 5 s each) and one real
prediction is sent. Run it against plain gunicorn (`make serve`, http://127.0.0.1:8000) and against the production
front (`make serve-production`, https://127.0.0.1:8443) to compare; prints a table.

    .venv/bin/python benchmarks/bench_slow_clients.py --url https://127.0.0.1:8443 --connections 50 [--token T]
"""

import argparse
import http.client
import io
import socket
import ssl
import sys
import threading
import time
from urllib.parse import urlsplit


def get_args_parser():
    """Command-line options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="base URL, http:// (gunicorn) or https:// (the front)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds between two dribbled bytes")
    parser.add_argument("--checks", type=int, default=5, help="/healthz requests, one per second")
    parser.add_argument("--token", default=None, help="API token, when the server needs one")
    return parser


def connect(parts, timeout):
    """A socket to the server, wrapped in TLS (certificate not verified: a benchmark on loopback) for https."""
    raw = socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                   timeout=timeout)
    if parts.scheme != "https":
        return raw
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context.wrap_socket(raw, server_hostname=parts.hostname)


def dribble(parts, kind, token, delay, stop):
    """Hold one connection, sending headers (or, after the headers, the body) a byte at a time until ``stop``."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (f"POST /api/v1/predict HTTP/1.1\r\nHost: {parts.hostname}\r\n{auth}"
            "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n").encode()
    try:
        with connect(parts, 60) as connection:
            if kind == "body":
                connection.sendall(head)
            for byte in (b"x" * 100000 if kind == "body" else head):
                if stop.wait(delay):
                    return
                connection.sendall(bytes([byte]))
    except OSError:
        return


def timed_request(parts, method, path, body=None, headers=None, timeout=5.0):
    """(status or the error's name, seconds)."""
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    options = {"context": ssl._create_unverified_context()} if parts.scheme == "https" else {}
    connection = connection_class(parts.hostname, parts.port, timeout=timeout, **options)
    started = time.perf_counter()
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    except (OSError, http.client.HTTPException) as error:
        return type(error).__name__, time.perf_counter() - started
    finally:
        connection.close()


def prediction_body():
    """A small synthetic grayscale PNG as a multipart body."""
    import numpy as np
    from PIL import Image

    rows, columns = np.mgrid[0:256, 0:256]
    buffer = io.BytesIO()
    Image.fromarray(((np.sin(rows / 20) + np.cos(columns / 25)) * 60 + 128).astype(np.uint8)).save(buffer, "PNG")
    return (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\nContent-Type: image/png"
            b"\r\n\r\n" + buffer.getvalue() + b"\r\n--x--\r\n")


def main(args):
    """Open the slow connections, check /healthz and one prediction, print the table."""
    parts = urlsplit(args.url)
    stop = threading.Event()
    threads = [threading.Thread(target=dribble, args=(parts, ("headers", "body")[index % 2], args.token, args.delay,
                                                      stop), daemon=True) for index in range(args.connections)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    checks = []
    for _ in range(args.checks):
        checks.append(timed_request(parts, "GET", "/healthz"))
        time.sleep(1)
    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    prediction = timed_request(parts, "POST", "/api/v1/predict", prediction_body(), headers, timeout=60)
    stop.set()
    answered = [seconds for status, seconds in checks if status == 200]
    print(f"{'server':<28} {'slow conns':>10} {'healthz ok':>10} {'healthz max s':>13} {'predict':>8} {'predict s':>9}")
    print(f"{args.url:<28} {args.connections:>10} {len(answered):>7}/{len(checks):<2} "
          f"{max(answered) if answered else float('nan'):>13.3f} {prediction[0]!s:>8} {prediction[1]:>9.2f}")
    return 0 if len(answered) == len(checks) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
