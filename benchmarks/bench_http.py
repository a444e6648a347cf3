"""HTTP benchmark: POST /api/v1/predict latency through gunicorn on loopback, and memory per worker with preload."""

import argparse
import concurrent.futures
import datetime
import http.client
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_inference  # noqa: E402

logger = logging.getLogger(__name__)

BOOT_SECONDS = 300  # the ONNX export of a ResNet-152 in the master takes tens of seconds on a busy machine
REQUEST_TIMEOUT = 120


def get_args_parser():
    """Command-line options of the HTTP benchmark."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=str(bench_inference.DEFAULT_CHECKPOINT),
                        help="serving checkpoint (default models/default.pt)")
    parser.add_argument("--stand-in", metavar="ARCH:SIZE", default=None,
                        help="a random-weight stand-in instead of --checkpoint (see bench_inference.py)")
    parser.add_argument("--data", default=str(bench_inference.DEFAULT_DATA),
                        help="where to take the real X-ray that is upscaled into a 2048x2048 upload")
    parser.add_argument("--quick", action="store_true", help="few requests, 1 and 2 workers only for memory")
    parser.add_argument("--requests", type=int, default=None, help="requests per measurement (default 60; 12 quick)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients of the second measurement")
    parser.add_argument("--workers", default="1,2", help="gunicorn worker counts for latency (default 1,2)")
    parser.add_argument("--memory-workers", default=None, help="worker counts for memory (default 1,2,4; quick 1,2)")
    parser.add_argument("--backend", default=None, help="COVIDSCAN_INFERENCE_BACKEND for the server (default: its own)")
    parser.add_argument("--output", default=None, help="JSON file (default artifacts/benchmarks/http-<time>.json)")
    return parser


def main(args):
    """Start gunicorn per worker count, measure latency and memory, print tables, write JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import psutil  # noqa: F401  (fail early, before servers start)

    from model.errors import CovidScanError

    requests = args.requests or (12 if args.quick else 60)
    latency_workers = [int(value) for value in args.workers.split(",")]
    memory_workers = [int(value) for value in (args.memory_workers or ("1,2" if args.quick else "1,2,4")).split(",")]
    try:
        checkpoint = (bench_inference.stand_in_checkpoint(args.stand_in, args.data) if args.stand_in
                      else Path(args.checkpoint))
        from model.checkpoint import load_checkpoint

        weights_mb = sum(value.numel() * 4 for value in load_checkpoint(checkpoint)["state_dict"].values()) / 2**20
    except CovidScanError as error:
        sys.exit(f"error: {error}")
    paths = bench_inference.image_paths(args.data, limit=1)
    upload, _ = bench_inference.realistic_uploads(paths[0] if paths else None)
    output = Path(args.output) if args.output else (
        bench_inference.DEFAULT_OUTPUT_DIR / f"http-{time.strftime('%Y%m%d-%H%M%S')}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    results = {"latency": [], "memory": [], "in_process": []}
    for workers in sorted(set(latency_workers) | set(memory_workers)):
        threads = bench_inference.server_thread_count(workers)
        reference = in_process_reference(checkpoint, upload, threads=threads, backend=args.backend,
                                         repeats=max(5, requests // 4))
        results["in_process"].append({"workers": workers, "torch_threads": threads, **reference})
        log_path = output.with_name(f"{output.stem}-gunicorn-{workers}w.log")
        with GunicornServer(checkpoint, workers=workers, backend=args.backend, log_path=log_path) as server:
            server.post(upload)  # first request per worker may open sessions; not timed
            if workers in latency_workers:
                for clients in (1, args.clients):
                    timings = measure_latency(server, upload, requests=requests, clients=clients)
                    results["latency"].append({"workers": workers, "clients": clients, "torch_threads": threads,
                                               **timings, "in_process_ms": reference["median_ms"]})
            if workers in memory_workers:
                measure_latency(server, upload, requests=workers * 3, clients=workers)  # touch every worker
                results["memory"].append({"workers": workers, **server.memory()})

    print_tables(results, weights_mb)
    report = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint),
        "stand_in": args.stand_in,
        "backend": args.backend or os.environ.get("COVIDSCAN_INFERENCE_BACKEND") or "server default",
        "weights_mib_float32": weights_mb,
        "upload_bytes": len(upload),
        "requests_per_measurement": requests,
        "cores": os.cpu_count(),
        "load_average_before_after": [load_before, os.getloadavg()],
        **results,
    }
    output.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {output}")


def in_process_reference(checkpoint, upload, *, threads, backend, repeats):
    """Median decode + preprocess + forward of the upload in this process, as one worker would run it."""
    import torch

    from model.inference import Predictor

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predictor = Predictor.from_path(checkpoint, backend=backend)
        seconds = bench_inference.time_round_robin(
            {"predict": lambda: predictor.predict_bytes(upload, with_heatmap=False)}, repeats)["predict"]
    finally:
        torch.set_num_threads(previous)
    return {"median_ms": seconds * 1000, "backend": predictor.backend}


class GunicornServer:
    """gunicorn on a free loopback port with the production environment; stopped on exit."""

    def __init__(self, checkpoint, *, workers, backend, log_path):
        self.port = free_port()
        self.workers = workers
        environment = {name: value for name, value in os.environ.items() if not name.startswith("COVIDSCAN_")}
        environment.update(COVIDSCAN_MODEL_PATH=str(Path(checkpoint).resolve()),
                           COVIDSCAN_SECRET_KEY=f"benchmark-{uuid.uuid4().hex}", COVIDSCAN_LOG_LEVEL="WARNING",
                           COVIDSCAN_RATE_LIMIT="off")  # a benchmark is one client sending many requests
        if backend:
            environment["COVIDSCAN_INFERENCE_BACKEND"] = backend
        self.environment = environment
        self.log_path = log_path
        self.command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app",
                        "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers)]
        self.process = None

    def __enter__(self):
        logger.info("starting gunicorn with %d worker(s) on 127.0.0.1:%d", self.workers, self.port)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.environment,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + BOOT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}; see {self.log_path}")
            if self._healthy() and len(self._workers()) == self.workers:
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"gunicorn did not answer /healthz within {BOOT_SECONDS} s; see {self.log_path}")

    def __exit__(self, *exc_info):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()

    def _healthy(self):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            connection.request("GET", "/healthz")
            return connection.getresponse().status == 200
        except OSError:
            return False

    def _workers(self):
        import psutil

        return psutil.Process(self.process.pid).children()

    def post(self, upload):
        """One multipart POST of the upload; returns seconds. Raises on a non-200 answer."""
        return self._post(upload)[0]

    def post_json(self, upload):
        """One multipart POST of the upload; returns the JSON answer."""
        return json.loads(self._post(upload)[1])

    def _post(self, upload):
        """(seconds, body) of one multipart POST; raises on a non-200 answer."""
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"upload.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + upload + f"\r\n--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(len(body))}
        start = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            connection.request("POST", "/api/v1/predict", body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
        finally:
            connection.close()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"POST /api/v1/predict answered {response.status}: {answer[:200]!r}")
        return elapsed, answer

    def memory(self):
        """Resident, unique and proportional memory (MiB) of the master and each worker."""
        import psutil

        master = psutil.Process(self.process.pid)

        def measure(process):
            info = process.memory_full_info()
            return {"pid": process.pid, "rss_mib": info.rss / 2**20, "uss_mib": info.uss / 2**20,
                    "pss_mib": getattr(info, "pss", float("nan")) / 2**20}

        workers = [measure(child) for child in master.children()]
        master_memory = measure(master)
        total = master_memory["pss_mib"] + sum(worker["pss_mib"] for worker in workers)
        return {"master": master_memory, "worker_processes": workers, "total_pss_mib": total}


def measure_latency(server, upload, *, requests, clients):
    """p50/p95 and throughput of ``requests`` POSTs from ``clients`` concurrent clients."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = list(pool.map(lambda _: server.post(upload), range(requests)))
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "requests": requests,
        "p50_ms": statistics.median(ordered) * 1000,
        "p95_ms": ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))] * 1000,
        "requests_per_s": requests / wall,
    }


def free_port():
    """A free TCP port on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def print_tables(results, weights_mb):
    """Latency as ratios to the in-process decode + preprocess + forward; memory in MiB."""
    reference = {row["workers"]: row for row in results["in_process"]}
    print("\nPOST /api/v1/predict (2048x2048 JPEG, no heatmap), relative to decode + preprocess + forward in-process "
          "with the same thread count (ms as context)")
    print(f"{'workers':>7} {'clients':>7} {'threads':>7} {'p50 x':>7} {'p95 x':>7} {'req/s':>7} "
          f"{'p50 ms':>8} {'p95 ms':>8} {'in-proc ms':>10}")
    for row in results["latency"]:
        base = row["in_process_ms"]
        print(f"{row['workers']:>7} {row['clients']:>7} {row['torch_threads']:>7} {row['p50_ms'] / base:>7.2f} "
              f"{row['p95_ms'] / base:>7.2f} {row['requests_per_s']:>7.2f} {row['p50_ms']:>8.1f} "
              f"{row['p95_ms']:>8.1f} {base:>10.1f}")
    for workers, row in sorted(reference.items()):
        print(f"  in-process reference for {workers} worker(s): backend {row['backend']}, "
              f"{row['torch_threads']} thread(s), {row['median_ms']:.1f} ms")
    print(f"\nMemory with preload_app (MiB; float32 weights are {weights_mb:.0f} MiB). USS = only this process's pages; "
          "PSS = shared pages split between the processes that map them.")
    print(f"{'workers':>7} {'process':>9} {'RSS':>8} {'USS':>8} {'PSS':>8}")
    for row in results["memory"]:
        print(f"{row['workers']:>7} {'master':>9} {row['master']['rss_mib']:>8.0f} {row['master']['uss_mib']:>8.0f} "
              f"{row['master']['pss_mib']:>8.0f}")
        for index, worker in enumerate(row["worker_processes"]):
            print(f"{'':>7} {f'worker {index + 1}':>9} {worker['rss_mib']:>8.0f} {worker['uss_mib']:>8.0f} "
                  f"{worker['pss_mib']:>8.0f}")
        print(f"{'':>7} {'total PSS':>9} {'':>8} {'':>8} {row['total_pss_mib']:>8.0f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
