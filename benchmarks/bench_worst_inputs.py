"""Cost of decoding + preprocessing the worst uploads under the size limit: seconds and extra worker memory.

Each input is decoded (model.decode.decode_upload), checked (model.ood.input_check_reasons) and preprocessed with the
eval transform of a checkpoint (default models/default.pt), in a fresh process per input, so that one input's
memory does not hide another's. Printed as a table; the budget (issue 33) is 1.5 s and 300 MB per upload.

    .venv/bin/python benchmarks/bench_worst_inputs.py [--checkpoint models/default.pt] [--repeats 3]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

BUDGET_SECONDS = 1.5
BUDGET_MB = 300
SIDE = 7000  # 49 MP: just under the decoder's 50 MP limit


def get_args_parser():
    """Command-line options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(REPO_ROOT / "models" / "default.pt"),
                        help="whose eval transform to apply (only its transform parameters are read)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per input; the table shows the slowest")
    parser.add_argument("--inputs", default=None, metavar="DIR",
                        help="keep the generated inputs in DIR and reuse them on the next run (default: a temporary "
                             "folder, removed afterwards)")
    parser.add_argument("--one", nargs=2, metavar=("FILE", "CHECKPOINT"), help=argparse.SUPPRESS)
    return parser


INPUT_NAMES = (f"rgba-{SIDE}.png", f"gray16-{SIDE}.png", f"palette-{SIDE}.png", f"rgb-{SIDE}.jpg", f"gray-{SIDE}.jpg",
               f"cmyk-{SIDE}.jpg", "noise-4096.png", "dicom16-5000.dcm")


def make_inputs(folder):
    """The worst inputs, written to ``folder`` unless already there: {name: path}. Each is under the 64 MB limit."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if all((folder / name).is_file() for name in INPUT_NAMES):
        return {name: folder / name for name in INPUT_NAMES}
    paths = {}

    def save(name, image, image_format, **options):
        path = folder / name
        if not path.is_file():  # written under another name, then renamed: an interrupted run leaves no half file
            image.save(folder / f".{name}.partial", format=image_format, **options)
            (folder / f".{name}.partial").replace(path)
        paths[name] = path

    rows = np.sin(np.arange(SIDE, dtype=np.float32) / 300.0)[:, None]
    columns = np.cos(np.arange(SIDE, dtype=np.float32) / 250.0)[None, :]
    film = ((rows + columns) * 60 + 128).astype(np.uint8)
    rgba = np.dstack([film, film, film, np.full_like(film, 255)])
    rgba[: SIDE // 2, :, 3] = 128
    save(f"rgba-{SIDE}.png", Image.fromarray(rgba, "RGBA"), "PNG", compress_level=9)
    save(f"gray16-{SIDE}.png", Image.fromarray(film.astype(np.uint16) * 257), "PNG", compress_level=1)
    palette = Image.fromarray(film // 16).convert("P")
    palette.info["transparency"] = 0
    save(f"palette-{SIDE}.png", palette, "PNG", compress_level=1, transparency=0)
    save(f"rgb-{SIDE}.jpg", Image.fromarray(np.dstack([film, film // 2, 255 - film])), "JPEG", quality=90)
    save(f"gray-{SIDE}.jpg", Image.fromarray(film), "JPEG", quality=90)
    save(f"cmyk-{SIDE}.jpg", Image.fromarray(np.dstack([film, film, film, film // 2]), "CMYK"), "JPEG", quality=90)
    noise = rng.integers(0, 256, (4096, 4096), dtype=np.uint8)
    save("noise-4096.png", Image.fromarray(noise), "PNG")
    paths["dicom16-5000.dcm"] = write_dicom(folder / "dicom16-5000.dcm", (film[:5000, :5000].astype(np.uint16) * 16))
    return paths


def write_dicom(path, pixels):
    """An uncompressed 12-bit DX DICOM file around ``pixels`` (tests/test_dicom.py's maker, made-up patient)."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from test_dicom import dicom_bytes

    path.write_bytes(dicom_bytes(pixels, bits_stored=12))
    return path


def transform_params(checkpoint_path):
    """The checkpoint's eval-transform parameters (or the robust 224 px defaults when there is no checkpoint)."""
    import torch

    from model.transforms import eval_transform_params

    if Path(checkpoint_path).is_file():
        return torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)["transform"]
    return eval_transform_params(image_size=224, recipe="robust")


def measure_one(path, checkpoint_path):
    """In this process: seconds (wall and CPU) and peak extra resident memory of decode + checks + transform."""
    import psutil
    import torch

    from model.decode import decode_upload
    from model.errors import InvalidImageError
    from model.ood import input_check_reasons
    from model.transforms import build_eval_transform

    torch.set_num_threads(1)
    transform = build_eval_transform(transform_params(checkpoint_path))
    data = Path(path).read_bytes()
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    wall, cpu = time.perf_counter(), time.process_time()
    outcome = "ok"
    try:
        decoded = decode_upload(data)
        input_check_reasons(decoded)
        transform(decoded.image)
    except InvalidImageError as error:
        outcome = f"refused: {str(error)[:60]}"
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    done.set()
    sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return {"wall_s": wall, "cpu_s": cpu, "extra_mb": (peak[0] - baseline) / 2**20, "outcome": outcome,
            "file_mb": len(data) / 2**20}


def main(args):
    """Write the inputs, measure each in fresh processes, print the table."""
    if args.one:
        print(json.dumps(measure_one(*args.one)))
        return
    with tempfile.TemporaryDirectory(prefix="covidscan-worst-") as temporary:
        inputs = make_inputs(args.inputs or temporary)
        print(f"{'input':<20} {'file MB':>8} {'wall s':>7} {'CPU s':>6} {'extra MB':>9}  within budget  outcome")
        for name, path in inputs.items():
            runs = []
            for _ in range(args.repeats):
                result = subprocess.run([sys.executable, __file__, "--one", str(path), args.checkpoint],
                                        capture_output=True, text=True, check=True)
                runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
            worst = {key: max(run[key] for run in runs) for key in ("wall_s", "cpu_s", "extra_mb")}
            within = worst["cpu_s"] <= BUDGET_SECONDS and worst["extra_mb"] <= BUDGET_MB
            print(f"{name:<20} {runs[0]['file_mb']:>8.1f} {worst['wall_s']:>7.2f} {worst['cpu_s']:>6.2f} "
                  f"{worst['extra_mb']:>9.0f}  {'yes' if within else 'NO':<13}  {runs[0]['outcome']}")
    print(f"budget: {BUDGET_SECONDS} s of CPU and {BUDGET_MB} MB of extra memory per upload "
          f"(slowest of {args.repeats} fresh processes; CPU seconds, since wall time depends on other load)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
