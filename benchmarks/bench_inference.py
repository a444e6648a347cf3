"""Inference benchmark: eager baseline, decoding, the full Predictor call and every runtime backend, as ratios."""

import argparse
import datetime
import io
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from model.errors import CovidScanError  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "default.pt"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cxr" / "test"
DEFAULT_OUTPUT_DIR = REPO_ROOT / "artifacts" / "benchmarks"
UPLOAD_SIDE = 2048  # a typical digital chest radiograph exported at full resolution
AGREEMENT_TOLERANCE = 0.01  # max |delta probability| a backend may differ from eager to become the default
BATCH_SIZE = 16
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def get_args_parser():
    """Command-line options of the inference benchmark."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help="serving checkpoint to measure (default models/default.pt)")
    parser.add_argument("--stand-in", metavar="ARCH:SIZE", default=None,
                        help="instead of --checkpoint, a random-weight stand-in (e.g. resnet152:128) whose batch-norm "
                             "statistics are re-estimated on real images: right for speed, indicative for agreement")
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="ImageFolder split for the agreement check and the upload image (default the test split)")
    parser.add_argument("--quick", action="store_true",
                        help="short run while the machine is busy: ~50 agreement images, few timing rounds")
    parser.add_argument("--images", type=int, default=None, help="agreement images (default all; 50 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per figure (default 30; 6 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: what one of 2 gunicorn workers gets, cores // 2)")
    parser.add_argument("--backends", default=None, help="comma-separated backends (default all)")
    parser.add_argument("--output", default=None, help="JSON file (default artifacts/benchmarks/inference-<time>.json)")
    return parser


def main(args):
    """Measure, print a table of ratios to the eager batch-1 forward, write JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from model import runtime
    from model.inference import Predictor

    rounds = args.rounds or (6 if args.quick else 30)
    image_limit = args.images or (50 if args.quick else None)
    threads = args.threads or server_thread_count()
    torch.set_num_threads(threads)
    backends = args.backends.split(",") if args.backends else list(runtime.BACKENDS)
    load_before = os.getloadavg()

    try:
        checkpoint_path = stand_in_checkpoint(args.stand_in, args.data) if args.stand_in else Path(args.checkpoint)
        eager = Predictor.from_path(checkpoint_path, backend="eager")
    except CovidScanError as error:
        sys.exit(f"error: {error}")
    sample_paths = image_paths(args.data, limit=image_limit)
    upload_jpeg, upload_png = realistic_uploads(sample_paths[0] if sample_paths else None)
    batch1 = eager.preprocess(Image.open(io.BytesIO(upload_jpeg)).convert("L"))
    batch16 = batch1.repeat(BATCH_SIZE, 1, 1, 1)

    logger.info("building backends %s", ", ".join(backends))
    candidates, build_seconds, failures = {}, {}, {}
    for name in backends:
        start = time.perf_counter()
        try:
            candidates[name] = Predictor.from_path(checkpoint_path, backend=name)
        except CovidScanError as error:
            failures[name] = str(error)
            logger.warning("%s", error)
            continue
        build_seconds[name] = time.perf_counter() - start

    # Every timed figure is taken round-robin, one call each per round, so load from other jobs hits all alike.
    network = eager.network
    timed = {"baseline: eager forward, batch 1": lambda: bare_forward(network, batch1)}
    from model.decode import decode_image

    timed["decode 2048x2048 JPEG"] = lambda: decode_image(upload_jpeg)
    timed["decode 2048x2048 PNG"] = lambda: decode_image(upload_png)
    decoded_jpeg = decode_image(upload_jpeg)
    timed["preprocess (eval transform)"] = lambda: eager.preprocess(decoded_jpeg)
    for name, predictor in candidates.items():
        timed[f"forward {name}, batch 1"] = lambda predictor=predictor: predictor.forward(batch1)
    default_name = runtime.resolve_backend(None)
    for name in sorted({"eager", default_name} & candidates.keys()):
        predictor = candidates[name]
        timed[f"Predictor.predict_bytes JPEG, {name}, no heatmap"] = (
            lambda predictor=predictor: predictor.predict_bytes(upload_jpeg, with_heatmap=False))
        timed[f"Predictor.predict_bytes JPEG, {name}, heatmap"] = (
            lambda predictor=predictor: predictor.predict_bytes(upload_jpeg, with_heatmap=True))
    batched_rounds = max(2, rounds // 4)
    batched = {f"forward {name}, batch {BATCH_SIZE}": (lambda predictor=predictor: predictor.forward(batch16))
               for name, predictor in candidates.items()}

    logger.info("timing %d figures x %d rounds on %d torch thread(s)", len(timed), rounds, threads)
    seconds = time_round_robin(timed, rounds)
    logger.info("timing batch %d x %d rounds", BATCH_SIZE, batched_rounds)
    seconds.update(time_round_robin(batched, batched_rounds))
    baseline = seconds["baseline: eager forward, batch 1"]

    logger.info("agreement with eager over %d images of %s", len(sample_paths), args.data)
    agreement = agreement_with_eager(eager, candidates, sample_paths)
    load_after = os.getloadavg()

    rows = []
    for label, value in seconds.items():
        per_image = value / BATCH_SIZE if f"batch {BATCH_SIZE}" in label else value
        rows.append({"figure": label, "ms": value * 1000, "ratio_to_baseline": value / baseline,
                     "per_image_ratio_to_baseline": per_image / baseline,
                     "images_per_s": (BATCH_SIZE if f"batch {BATCH_SIZE}" in label else 1) / value})
    backend_rows = []
    for name in backends:
        if name in failures:
            backend_rows.append({"backend": name, "error": failures[name]})
            continue
        single = seconds[f"forward {name}, batch 1"]
        many = seconds[f"forward {name}, batch {BATCH_SIZE}"]
        backend_rows.append({
            "backend": name,
            "speedup_batch1": baseline / single,
            "speedup_batch16_per_image": baseline / (many / BATCH_SIZE),
            "build_s": build_seconds[name],
            **agreement.get(name, {}),
        })
    recommended = recommend(backend_rows, seconds)
    print_tables(rows, backend_rows, baseline, recommended, default_name)

    report = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint_path),
        "stand_in": args.stand_in,
        "arch": eager.checkpoint["arch"],
        "input_size": eager.transform_params["crop_size"],
        "data": str(args.data),
        "agreement_images": len(sample_paths),
        "quick": args.quick,
        "rounds": rounds,
        "torch_threads": threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_before_after": [load_before, load_after],
        "baseline_ms": baseline * 1000,
        "figures": rows,
        "backends": backend_rows,
        "current_default": default_name,
        "recommended_default": recommended,
    }
    output = Path(args.output) if args.output else DEFAULT_OUTPUT_DIR / f"inference-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {output}")


def server_thread_count(workers=2):
    """Torch threads of one gunicorn worker as gunicorn.conf.py sets them: cores // workers."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // workers)


@torch.inference_mode()
def bare_forward(network, batch):
    """The plain network call the baseline measures."""
    return network(batch)


def time_round_robin(functions, rounds, *, warmup=2):
    """Median seconds per call of each function, calling each once per round in turn."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    samples = {label: [] for label in functions}
    for _ in range(rounds):
        for label, function in functions.items():
            start = time.perf_counter()
            function()
            samples[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in samples.items()}


def image_paths(root, *, limit=None):
    """Images under an ImageFolder split, spread over its classes (round-robin), at most ``limit``."""
    root = Path(root)
    if not root.is_dir():
        logger.warning("%s not found: using synthetic images", root)
        return []
    per_class = [sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
                 for folder in sorted(root.iterdir()) if folder.is_dir()]
    interleaved = [path for group in zip_longest_skip(per_class) for path in group]
    return interleaved[:limit] if limit else interleaved


def zip_longest_skip(lists):
    """Rows of the i-th element of each list, skipping lists that are exhausted."""
    for index in range(max((len(items) for items in lists), default=0)):
        yield [items[index] for items in lists if index < len(items)]


def realistic_uploads(sample_path):
    """A 2048x2048 JPEG and PNG made by upscaling a real test X-ray (or a synthetic one when there is no data)."""
    if sample_path is not None:
        image = Image.open(sample_path).convert("L")
    else:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from conftest import make_xray_array

        image = Image.fromarray(make_xray_array(0, size=(512, 512)), mode="L")
    large = image.resize((UPLOAD_SIDE, UPLOAD_SIDE), Image.BICUBIC)
    # Film grain, so the PNG compresses like a real radiograph rather than like a smooth upscale.
    pixels = np.asarray(large, dtype=np.int16) + np.random.default_rng(0).integers(-3, 4, large.size[::-1])
    large = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
    jpeg, png = io.BytesIO(), io.BytesIO()
    large.save(jpeg, format="JPEG", quality=92)
    large.save(png, format="PNG")
    return jpeg.getvalue(), png.getvalue()


def agreement_with_eager(eager, candidates, paths):
    """Per backend: same predicted class as eager on every image? max |delta p|, max |delta OOD score|."""
    from model.decode import decode_image

    if not paths:
        return {}
    tensors = torch.cat([eager.preprocess(decode_image(path.read_bytes())) for path in paths])
    reference_probabilities, reference_features = probabilities_and_features(eager, tensors)
    results = {}
    for name, predictor in candidates.items():
        probabilities, features = probabilities_and_features(predictor, tensors)
        same = (probabilities.argmax(1) == reference_probabilities.argmax(1))
        scale = reference_features.abs().max().clamp_min(1e-12)
        results[name] = {
            "images": len(paths),
            "same_class_all": bool(same.all()),
            "class_disagreements": int((~same).sum()),
            "max_abs_delta_probability": float((probabilities - reference_probabilities).abs().max()),
            "max_rel_delta_pooled_features": float((features - reference_features).abs().max() / scale),
        }
    return results


def probabilities_and_features(predictor, tensors):
    """Temperature-scaled probabilities and pooled layer4 features for a stack of preprocessed images."""
    probabilities, features = [], []
    for start in range(0, len(tensors), BATCH_SIZE):
        logits, activations = predictor.forward(tensors[start:start + BATCH_SIZE])
        probabilities.append(predictor.probabilities_from_logits(logits))
        features.append(activations.float().mean(dim=(2, 3)))
    return torch.cat(probabilities), torch.cat(features)


def recommend(backend_rows, seconds):
    """The fastest backend at batch 1 that agrees with eager (same class everywhere, |delta p| within tolerance)."""
    agreeing = [row for row in backend_rows if "error" not in row and row.get("same_class_all", True)
                and row.get("max_abs_delta_probability", 0.0) <= AGREEMENT_TOLERANCE]
    if not agreeing:
        return "eager"
    best = max(agreeing, key=lambda row: row["speedup_batch1"])
    return best["backend"] if best["speedup_batch1"] > 1.0 else "eager"


def print_tables(rows, backend_rows, baseline, recommended, default_name):
    """Both tables, ratios first; milliseconds only as context."""
    print(f"\nAll figures relative to the baseline, eager fp32 forward at batch 1 ({baseline * 1000:.1f} ms here).")
    print(f"Batch-{BATCH_SIZE} rows are per image. Lower is faster.")
    print(f"{'figure':<58} {'x baseline':>10} {'(ms)':>9}")
    for row in rows:
        batched = f"batch {BATCH_SIZE}" in row["figure"]
        ratio = row["per_image_ratio_to_baseline"] if batched else row["ratio_to_baseline"]
        milliseconds = row["ms"] / BATCH_SIZE if batched else row["ms"]
        print(f"{row['figure']:<58} {ratio:>10.2f} {milliseconds:>9.1f}")
    print(f"\nSpeed-ups are baseline time / backend time per image (higher is faster); agreement is against eager.")
    print(f"{'backend':<14} {'speed-up b1':>11} {'speed-up b16':>12} {'build s':>8} {'same class':>10} "
          f"{'max|dp|':>9} {'max rel dfeat':>13}")
    for row in backend_rows:
        if "error" in row:
            print(f"{row['backend']:<14} unavailable: {row['error']}")
            continue
        same = "-" if "same_class_all" not in row else ("yes" if row["same_class_all"]
                                                       else f"no ({row['class_disagreements']})")
        print(f"{row['backend']:<14} {row['speedup_batch1']:>11.2f} {row['speedup_batch16_per_image']:>12.2f} "
              f"{row['build_s']:>8.1f} {same:>10} {row.get('max_abs_delta_probability', float('nan')):>9.2g} "
              f"{row.get('max_rel_delta_pooled_features', float('nan')):>13.2g}")
    print(f"\nfastest agreeing backend (|dp| <= {AGREEMENT_TOLERANCE}, same class on every image): {recommended}; "
          f"current default: {default_name}")


def stand_in_checkpoint(spec, data_root):
    """A random-weight checkpoint of ARCH at SIZE px whose batch-norm statistics come from real images (cached)."""
    from model.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from model.network import build_model
    from model.decode import decode_image
    from model.transforms import build_eval_transform, eval_transform_params

    arch, _, size = spec.partition(":")
    size = int(size or 224)
    path = DEFAULT_OUTPUT_DIR / f"stand-in-{arch}-{size}.pt"
    if path.is_file():
        load_checkpoint(path)
        return path
    torch.manual_seed(0)
    network = build_model(arch, num_classes=3, weights="none")
    params = eval_transform_params(image_size=size, recipe="robust")
    transform = build_eval_transform(params)
    train_root = Path(data_root).parent / "train"
    paths = image_paths(train_root if train_root.is_dir() else data_root, limit=96)
    if paths:
        images = torch.stack([transform(decode_image(path.read_bytes())) for path in paths])
    else:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from conftest import make_xray_array

        images = torch.stack([transform(Image.fromarray(make_xray_array(seed), mode="L")) for seed in range(32)])
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    network.train()
    with torch.no_grad():
        for start in range(0, len(images), BATCH_SIZE):
            network(images[start:start + BATCH_SIZE])
    network.eval()
    checkpoint = make_checkpoint(network, arch=arch, class_names=["COVID", "NORMAL", "PNEUMONIA"], transform=params,
                                 model_name=f"stand-in-{arch}", model_version="random-weights")
    logger.info("wrote stand-in checkpoint %s (random weights, batch-norm statistics from %d images)", path, len(images))
    return save_checkpoint(checkpoint, path)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
