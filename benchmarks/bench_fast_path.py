"""The int8 fast path against float32 ONNX on the shipped model, in one run (issue 35).

Sections, each for float32 ONNX (``--backend onnx``, the baseline) and the default path:
  1. answers on the whole test split: top-1 agreement, largest probability difference, accuracy, COVID
     sensitivity, OOD verdicts (the test films and research/ood_evaluation.py's OOD sets) and the heatmap;
  2. bare forward ms per film at batch 1 and 8, with the other candidates measured beside them (PyTorch bf16, and
     OpenVINO bf16 / int8 when the ``openvino`` package is installed), and GMAC/s against the CPU's nominal peak;
  3. batch triage: whole ``scripts/predict.py`` runs over the same films (start-up included), best of two each;
  4. gunicorn (2 workers): POST /api/v1/predict p50 against decode + preprocess + forward in-process, and PSS/USS
     per worker (psutil ``memory_full_info``, from /proc/PID/smaps_rollup);
  5. the PACS worker (scripts/pacs_worker.py's loop, write-back on) against a throwaway Orthanc: films/s.

    .venv/bin/python benchmarks/bench_fast_path.py                 # about 15 min on 2 cores
    .venv/bin/python benchmarks/bench_fast_path.py --quick         # 200 agreement films, 60 triage films
"""

import argparse
import datetime
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_http  # noqa: E402
import bench_inference  # noqa: E402

logger = logging.getLogger(__name__)

BASELINE = "onnx"
TARGET_TRIAGE_SPEED_UP = 2.0
TARGET_HTTP_RATIO = 1.1
TARGET_AGREEMENT, TARGET_PROBABILITY_DIFFERENCE = 0.99, 0.03


def get_args_parser():
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(bench_inference.DEFAULT_CHECKPOINT))
    parser.add_argument("--data", default=str(bench_inference.DEFAULT_DATA.parent),
                        help="dataset root with test/ (default ../shared/data/cxr)")
    parser.add_argument("--quick", action="store_true", help="fewer films and requests, for a busy machine")
    parser.add_argument("--agreement-films", type=int, default=None, help="test films compared (default: all)")
    parser.add_argument("--triage-films", type=int, default=300, help="films per scripts/predict.py run")
    parser.add_argument("--requests", type=int, default=None, help="HTTP requests per server (default 40)")
    parser.add_argument("--pacs-films", type=int, default=16, help="studies for the PACS worker (0 skips it)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: answers,forward,triage,http,pacs")
    parser.add_argument("--output", default=None, help="JSON file (default artifacts/benchmarks/fast-path-<time>.json)")
    return parser


def main(args):
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from model.inference import Predictor

    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    if args.quick:
        args.agreement_films = args.agreement_films or 200
        args.triage_films = min(args.triage_films, 60)
    load_before = os.getloadavg()
    fast = Predictor.from_path(args.checkpoint)
    if fast.backend == BASELINE:
        sys.exit("error: the default path is float32 ONNX here (no int8 file, or no int8 instructions; see the log)")
    baseline = Predictor.from_path(args.checkpoint, backend=BASELINE)
    predictors = {BASELINE: baseline, fast.backend: fast}
    test_dir = Path(args.data) / "test"
    report = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "checkpoint": args.checkpoint,
              "default_backend": fast.backend, "machine": machine(), "load_before": load_before}
    if "answers" not in skip:
        report["answers"] = answers(baseline, fast, test_dir, limit=args.agreement_films)
        report["ood_sets"] = ood_verdicts(baseline, fast, test_dir)
    if "forward" not in skip:
        report["forward"] = bare_forward(baseline, fast, report["machine"], rounds=6 if args.quick else 12)
    if "triage" not in skip:
        report["triage"] = triage_runs(args.checkpoint, test_dir, [BASELINE, fast.backend], films=args.triage_films)
    if "http" not in skip:
        report["http"] = http(args.checkpoint, test_dir, [BASELINE, fast.backend],
                              requests=args.requests or (16 if args.quick else 40))
    if "pacs" not in skip and args.pacs_films:
        report["pacs"] = pacs_worker(predictors, films=args.pacs_films)
    report["load_after"] = os.getloadavg()
    print_report(report)
    output = Path(args.output) if args.output else (
        bench_inference.DEFAULT_OUTPUT_DIR / f"fast-path-{time.strftime('%Y%m%d-%H%M%S')}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=float))
    print(f"\nwrote {output}")


def machine():
    """CPU model, cores, clock and the int8 / bf16 flags the choice depends on."""
    from model.runtime import cpu_int8_support

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name", platform.processor()), "vendor": fields.get("vendor_id", ""),
        "family": fields.get("cpu family", ""), "model": fields.get("model", ""),
        "cores": bench_inference.server_thread_count(1), "mhz": float(fields.get("cpu MHz", 0) or 0),
        "int8": cpu_int8_support()[1], "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_int8" in flags, "platform": platform.platform(),
    }


def decoded_films(test_dir, limit=None):
    """(decoded image, class index, path) of the test split, every class spread through the list."""
    from model.decode import decode_upload

    paths = bench_inference.image_paths(test_dir, limit=limit)
    class_names = sorted(folder.name for folder in Path(test_dir).iterdir() if folder.is_dir())
    return [(decode_upload(path.read_bytes()).image, class_names.index(path.parent.name), path) for path in paths]


def answers(baseline, fast, test_dir, *, limit=None):
    """Agreement, accuracy, COVID sensitivity, OOD verdicts and heatmap similarity over the test split."""
    from model.cam import class_activation_maps

    films = decoded_films(test_dir, limit)
    outputs = {}
    for name, predictor in (("baseline", baseline), ("fast", fast)):
        probabilities, features = [], []
        for start in range(0, len(films), 8):
            batch = torch.cat([predictor.preprocess(image) for image, _, _ in films[start:start + 8]])
            logits, activations = predictor.forward(batch)
            probabilities.append(predictor.probabilities_from_logits(logits))
            features.append(activations)
        outputs[name] = (torch.cat(probabilities), torch.cat(features))
    targets = torch.tensor([target for _, target, _ in films])
    (p_base, f_base), (p_fast, f_fast) = outputs["baseline"], outputs["fast"]
    difference = (p_base - p_fast).abs().max(dim=1).values
    covid = baseline.class_names.index("COVID")
    result = {"films": len(films), "top1_agreement": float((p_base.argmax(1) == p_fast.argmax(1)).float().mean()),
              "max_probability_difference": float(difference.max()),
              "p99_probability_difference": float(difference.quantile(0.99))}
    flags = {}
    for name, probabilities, features, predictor in (("baseline", p_base, f_base, baseline),
                                                     ("fast", p_fast, f_fast, fast)):
        predicted = probabilities.argmax(1)
        flags[name] = [verdict["flagged"] for verdict in predictor.ood_check(features)]
        result[name] = {"accuracy": float((predicted == targets).float().mean()),
                        "covid_sensitivity": float((predicted[targets == covid] == covid).float().mean()),
                        "ood_flagged": int(sum(flags[name]))}
    result["ood_verdicts_differ"] = int(sum(a != b for a, b in zip(flags["baseline"], flags["fast"])))
    # Heatmaps of the class float32 predicts, from each path's activations: Pearson correlation per film.
    classes = p_base.argmax(1)
    cams = [torch.from_numpy(class_activation_maps(features, baseline.network.fc.weight, classes)).flatten(1)
            for features in (f_base, f_fast)]
    correlation = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(*cams)])
    result["heatmap_correlation"] = {"median": float(correlation.nanmedian()),
                                     "min": float(correlation.nan_to_num(1.0).min())}
    return result


def ood_verdicts(baseline, fast, test_dir):
    """research/ood_evaluation.py's OOD sets: how many each path flags, and on how many they disagree."""
    from research.ood_evaluation import compare_ood_verdicts

    return compare_ood_verdicts(baseline, fast, test_dir, limit=100)


def multiply_accumulates(network, crop_size):
    """Multiply-accumulates of one forward pass (convolutions and linear layers), by forward hooks."""
    total = [0]

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total[0] += output.numel() * kernel
        elif isinstance(module, torch.nn.Linear):
            total[0] += output.numel() * module.in_features

    hooks = [module.register_forward_hook(count) for module in network.modules()
             if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.inference_mode():
            network(torch.zeros(1, 3, crop_size, crop_size))
    finally:
        for hook in hooks:
            hook.remove()
    return total[0]


def nominal_peaks(info):
    """GMAC/s this CPU can reach at most in fp32, bf16 and int8, and how that was worked out.

    fp32: cores x clock x (FMA pipes x lanes). Intel cores with AVX-512 have two 512-bit FMA pipes (32 fp32 MAC a
    cycle); AMD Zen 4 executes AVX-512 on two 256-bit FMA pipes (16); AVX2-only cores 16. VNNI's VPDPBUSD does 4 int8
    MACs per 32-bit lane in an FMA's time (4x fp32) and AVX512-BF16's VDPBF16PS 2 per lane (2x). Clock: the
    /proc/cpuinfo figure, which a virtual machine reports as the base clock (turbo would raise all three).
    """
    per_cycle = 32 if info["avx512f"] and "Intel" in info["vendor"] else 16
    fp32 = info["cores"] * info["mhz"] / 1000 * per_cycle
    how = (f"{info['cores']} cores x {info['mhz'] / 1000:.2f} GHz x {per_cycle} fp32 MAC/cycle "
           f"({'2 x 512-bit' if per_cycle == 32 else '2 x 256-bit'} FMA pipes); bf16 2x and int8 (VNNI) 4x that")
    return {"fp32": fp32, "bf16": 2 * fp32, "int8": 4 * fp32, "how": how}


def gemm_ceilings(threads, size=1024, repeats=5):
    """GMAC/s of ONNX Runtime's own float32 MatMul and int8 MatMulInteger (uint8 x int8) on size^3 products: what
    the runtime's kernels reach on this machine at best, a measured ceiling beside the nominal peak."""
    import onnx
    from onnx import TensorProto, helper

    from model.runtime import _open_onnx_session

    rng = np.random.default_rng(0)
    results = {}
    for kind, operator, a_type, b_type, out_type, a, b in (
            ("fp32", "MatMul", TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT,
             rng.standard_normal((size, size), dtype=np.float32), rng.standard_normal((size, size), dtype=np.float32)),
            ("int8", "MatMulInteger", TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32,
             rng.integers(0, 255, (size, size), dtype=np.uint8), rng.integers(-127, 127, (size, size), dtype=np.int8))):
        graph = helper.make_graph(
            [helper.make_node(operator, ["a", "b"], ["c"])], kind,
            [helper.make_tensor_value_info("a", a_type, [size, size])],
            [helper.make_tensor_value_info("c", out_type, [size, size])],
            [onnx.numpy_helper.from_array(b, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
        session = _open_onnx_session(model.SerializeToString(), threads=threads)
        session.run(None, {"a": a})
        seconds = bench_inference.time_round_robin({kind: lambda: session.run(None, {"a": a})}, repeats, warmup=1)
        results[kind] = size ** 3 / seconds[kind] / 1e9
    return results


def bare_forward(baseline, fast, info, *, rounds):
    """ms per film of each candidate's forward pass at batch 1 and 8, round-robin, 2 threads (batch triage's)."""
    from model.runtime import build_runtime

    params = baseline.transform_params
    example = torch.zeros(1, params["channels"], params["crop_size"], params["crop_size"])
    candidates = {BASELINE: baseline.runtime, fast.backend: fast.runtime,
                  "bf16 (PyTorch)": build_runtime(baseline.network, "bf16", example_input=example)}
    candidates.update(openvino_candidates(baseline, fast))
    generator = torch.Generator().manual_seed(0)
    inputs = {size: torch.randn(size, *example.shape[1:], generator=generator) for size in (1, 8)}
    rows = {}
    for size in (1, 8):
        seconds = bench_inference.time_round_robin(
            {name: (lambda run=run: run(inputs[size])) for name, run in candidates.items()},
            max(3, rounds // (2 if size == 8 else 1)), warmup=1)
        for name, value in seconds.items():
            rows.setdefault(name, {})[f"batch{size}_ms_per_film"] = value * 1000 / size
    macs = multiply_accumulates(baseline.network, params["crop_size"])
    peaks = nominal_peaks(info)
    ceilings = gemm_ceilings(torch.get_num_threads())
    for name, row in rows.items():
        kind = "int8" if "int8" in name else ("bf16" if "bf16" in name else "fp32")
        reached = macs / 1e9 / (row["batch8_ms_per_film"] / 1000)
        row.update(gmac_per_s=reached, peak_gmac_per_s=peaks[kind], share_of_peak=reached / peaks[kind],
                   gemm_ceiling_gmac_per_s=ceilings.get(kind), share_of_gemm_ceiling=reached / ceilings[kind]
                   if kind in ceilings else None)
    return {"gmac_per_film": macs / 1e9, "peaks": peaks, "gemm_ceilings": ceilings,
            "threads": torch.get_num_threads(), "rows": rows}


def openvino_candidates(baseline, fast):
    """OpenVINO bf16 (from the float32 ONNX export) and int8 (the same QDQ file) when openvino is installed."""
    try:
        import openvino
    except ImportError:
        logger.warning("openvino is not installed: its candidates are not measured (pip install openvino)")
        return {}
    core = openvino.Core()
    models = {"OpenVINO bf16": (core.read_model(baseline.runtime.model_bytes, b""), "bf16"),
              "OpenVINO int8": (core.read_model(fast.runtime.model_path), "f32")}
    candidates = {}
    for name, (model, precision) in models.items():
        compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                     "INFERENCE_PRECISION_HINT": precision,
                                                     "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        candidates[name] = lambda batch, request=request: request.infer({"images": batch.numpy()})
    return candidates


def triage_films(test_dir, count):
    """A folder of links to ``count`` test films (a fixed random choice), for scripts/predict.py."""
    paths = bench_inference.image_paths(test_dir)
    random.Random(0).shuffle(paths)
    folder = Path(tempfile.mkdtemp(prefix="covidscan-bench-triage-"))
    for index, path in enumerate(paths[:count]):
        (folder / f"{index:04d}{path.suffix}").symlink_to(path.resolve())
    return folder


def triage_runs(checkpoint, test_dir, backends, *, films, repeats=2):
    """Whole scripts/predict.py runs (start-up included), alternating backends, best of ``repeats`` each."""
    folder = triage_films(test_dir, films)
    seconds = {backend: [] for backend in backends}
    try:
        for _ in range(repeats):
            for backend in backends:
                command = [sys.executable, str(REPO_ROOT / "scripts" / "predict.py"), str(folder), "--checkpoint",
                           checkpoint, "--output", str(folder.with_suffix(".csv")), "--no-progress",
                           "--backend", backend]
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True, cwd=REPO_ROOT)
                seconds[backend].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        folder.with_suffix(".csv").unlink(missing_ok=True)
    return {backend: {"films": films, "seconds": values, "best_films_per_s": films / min(values)}
            for backend, values in seconds.items()}


def http(checkpoint, test_dir, backends, *, requests, workers=2):
    """p50 of POST /api/v1/predict (a 2048 px JPEG) against in-process decode+preprocess+forward, and memory."""
    paths = bench_inference.image_paths(test_dir, limit=1)
    upload, _ = bench_inference.realistic_uploads(paths[0] if paths else None)
    results = {}
    threads = bench_inference.server_thread_count(workers)
    log_dir = Path(tempfile.mkdtemp(prefix="covidscan-bench-http-"))
    try:
        for backend in backends:
            reference = bench_http.in_process_reference(checkpoint, upload, threads=threads, backend=backend,
                                                        repeats=max(5, requests // 4))
            with bench_http.GunicornServer(checkpoint, workers=workers, backend=backend,
                                           log_path=log_dir / f"{backend}.log") as server:
                for _ in range(workers * 2):
                    server.post(upload)  # every worker has answered once
                latency = bench_http.measure_latency(server, upload, requests=requests, clients=1)
                server_ms = [server.post_json(upload)["elapsed_ms"] for _ in range(max(5, requests // 4))]
                memory = server.memory()
            results[backend] = {"in_process_ms": reference["median_ms"], **latency,
                                "server_predict_ms": float(np.median(server_ms)),
                                "ratio_to_in_process": latency["p50_ms"] / reference["median_ms"],
                                "memory": memory, "workers": workers, "threads_per_worker": threads}
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    return results


def pacs_worker(predictors, *, films, size=1024):
    """Films/s of the PACS worker's loop (write-back on), one fresh store per backend, on the same studies."""
    import bench_pacs
    from pacs.orthanc import OrthancServer
    from pacs.worker import silence_dicom_libraries

    if not shutil.which("Orthanc") and not Path("/usr/sbin/Orthanc").exists():
        logger.warning("Orthanc is not installed (make pacs-deps): the PACS worker is not measured")
        return {}
    silence_dicom_libraries()
    folder = Path(tempfile.mkdtemp(prefix="covidscan-bench-pacs-"))
    orthanc = OrthancServer(folder / "orthanc", stable_age=1).start()
    results = {}
    try:
        bench_pacs.stored_studies(orthanc, films, size=size)
        for backend, predictor in predictors.items():
            processed, elapsed = bench_pacs.time_worker(orthanc, predictor, folder / f"{backend}.sqlite3",
                                                        write_back=True)
            results[backend] = {"films": processed, "seconds": elapsed, "films_per_s": processed / elapsed}
    finally:
        orthanc.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return results


def print_report(report):
    fast = report["default_backend"]
    info = report["machine"]
    print(f"\nint8 fast path vs float32 ONNX: {info['cpu']} ({info['cores']} cores, {info['mhz']:.0f} MHz, int8: "
          f"{info['int8']}), load {report['load_before'][0]:.1f} -> {report['load_after'][0]:.1f}")
    if "answers" in report:
        a = report["answers"]
        print(f"\nAnswers on {a['films']} test films: top-1 agreement {a['top1_agreement']:.4f} (target >= "
              f"{TARGET_AGREEMENT}), largest |dp| {a['max_probability_difference']:.4f} (target <= "
              f"{TARGET_PROBABILITY_DIFFERENCE}), p99 {a['p99_probability_difference']:.4f}")
        print(f"{'path':10s} {'accuracy':>9s} {'COVID sens':>11s} {'OOD flagged':>12s}")
        for name in ("baseline", "fast"):
            row = a[name]
            print(f"{BASELINE if name == 'baseline' else fast:10s} {row['accuracy']:9.4f} "
                  f"{row['covid_sensitivity']:11.4f} {row['ood_flagged']:12d}")
        print(f"OOD verdicts that differ on the test films: {a['ood_verdicts_differ']}; heatmap correlation with "
              f"float32 median {a['heatmap_correlation']['median']:.3f}, lowest {a['heatmap_correlation']['min']:.3f}")
        print(f"\n{'OOD set':32s} {'n':>4s} {'flagged fp32':>13s} {'flagged ' + fast:>13s} {'differ':>7s}")
        for name, row in report["ood_sets"].items():
            print(f"{name:32s} {row['n']:4d} {row['flagged_reference']:13d} {row['flagged_candidate']:13d} "
                  f"{row['differ']:7d}")
    if "forward" in report:
        f = report["forward"]
        base = f["rows"][BASELINE]
        print(f"\nBare forward, {f['threads']} threads, {f['gmac_per_film']:.2f} GMAC per film; peak: "
              f"{f['peaks']['how']}")
        print(f"ONNX Runtime's own 1024^3 GEMM on this machine (a measured ceiling): fp32 "
              f"{f['gemm_ceilings']['fp32']:.0f}, int8 {f['gemm_ceilings']['int8']:.0f} GMAC/s")
        print(f"{'candidate':16s} {'b1 ms':>7s} {'b8 ms/film':>11s} {'speed-up b8':>12s} {'GMAC/s':>7s} "
              f"{'nominal':>8s} {'of it':>6s} {'GEMM':>6s} {'of it':>6s}")
        for name, row in f["rows"].items():
            ceiling = row["gemm_ceiling_gmac_per_s"]
            print(f"{name:16s} {row['batch1_ms_per_film']:7.1f} {row['batch8_ms_per_film']:11.1f} "
                  f"{base['batch8_ms_per_film'] / row['batch8_ms_per_film']:11.2f}x {row['gmac_per_s']:7.0f} "
                  f"{row['peak_gmac_per_s']:8.0f} {row['share_of_peak']:6.0%} "
                  + (f"{ceiling:6.0f} {row['share_of_gemm_ceiling']:6.0%}" if ceiling else f"{'-':>6s} {'-':>6s}"))
    if "triage" in report:
        t = report["triage"]
        base = t[BASELINE]["best_films_per_s"]
        print(f"\nBatch triage, whole scripts/predict.py runs over {t[BASELINE]['films']} test films (best of "
              f"{len(t[BASELINE]['seconds'])}; target >= {TARGET_TRIAGE_SPEED_UP}x)")
        for name, row in t.items():
            print(f"{name:10s} {row['best_films_per_s']:7.2f} films/s  {row['best_films_per_s'] / base:5.2f}x  "
                  f"runs {', '.join(f'{value:.1f}' for value in row['seconds'])} s")
    if "http" in report:
        print(f"\ngunicorn, 2 workers, 1 client, 2048 px JPEG to POST /api/v1/predict (target p50 <= "
              f"{TARGET_HTTP_RATIO} x in-process decode+preprocess+forward)")
        print(f"{'path':10s} {'p50 ms':>7s} {'in-proc':>8s} {'ratio':>6s} {'in worker':>10s} {'worker PSS':>11s} "
              f"{'worker USS':>11s} {'master PSS':>11s}")
        for name, row in report["http"].items():
            workers = row["memory"]["worker_processes"]
            pss = sum(worker["pss_mib"] for worker in workers) / len(workers)
            uss = sum(worker["uss_mib"] for worker in workers) / len(workers)
            print(f"{name:10s} {row['p50_ms']:7.0f} {row['in_process_ms']:8.0f} {row['ratio_to_in_process']:6.2f} "
                  f"{row['server_predict_ms']:10.0f} {pss:9.0f} M {uss:9.0f} M {row['memory']['master']['pss_mib']:9.0f} M")
    if report.get("pacs"):
        base = report["pacs"][BASELINE]["films_per_s"]
        print("\nPACS worker, write-back on (SR + heatmap STOW), 1024 px DICOM films")
        for name, row in report["pacs"].items():
            print(f"{name:10s} {row['films_per_s']:6.2f} films/s  {row['films_per_s'] / base:5.2f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
