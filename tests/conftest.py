"""Shared fixtures: synthetic X-ray-like images, a tiny random-weight checkpoint, the Flask app and client."""

import csv
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "cxr"
CLASS_NAMES = ["COVID", "NORMAL", "PNEUMONIA"]
SOURCE_REPOS = {"srca": "fake/source-a", "srcb": "fake/source-b", "srcc": "fake/source-c"}


def run_script(script, *arguments, check=True, env=None, timeout=600):
    """Run ``scripts/<script>`` in a fresh Python as a user would; return the completed process.

    A fresh interpreter costs seconds (torch imports); test argument errors in-process with ``load_script`` instead
    and keep this for what only a real process shows: exit codes, messages without a traceback, torchrun.
    """
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / script), *map(str, arguments)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )
    if check and completed.returncode != 0:
        raise AssertionError(f"{script} failed:\n{completed.stdout}\n{completed.stderr}")
    return completed


def load_script(script):
    """``scripts/<script>`` imported as a module (``get_args_parser``, ``main``), for tests that stay in-process."""
    name = f"covidscan_script_{Path(script).stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parse_error(parser, arguments, capsys):
    """The message with which ``parser`` refuses ``arguments`` (argparse exits with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(list(map(str, arguments)))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def make_xray_array(seed=0, size=(256, 256), label=None):
    """A grayscale array that looks vaguely like a chest film: dark lungs in a bright body, with noise.

    With a ``label`` the image carries a simple class-specific pattern, so a tiny model can learn it.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    rows, columns = np.mgrid[0:height, 0:width]
    body = 170 - 60 * (((columns - width / 2) / (width / 2)) ** 2)
    for centre in (0.3, 0.7):
        lung = ((columns - centre * width) / (0.16 * width)) ** 2 + ((rows - 0.5 * height) / (0.3 * height)) ** 2
        body = np.where(lung < 1, 60 + 20 * lung, body)
    if label == "COVID":
        body = body + 70 * (np.abs(((rows // 16) + (columns // 16)) % 2))
    elif label == "PNEUMONIA":
        body = np.where(rows > height * 0.55, body + 90, body)
    return np.clip(body + rng.normal(0, 8, size), 0, 255).astype(np.uint8)


def encode(image, image_format="PNG", **options):
    """Encode a PIL image into bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


@pytest.fixture
def xray_png():
    """A 256x256 grayscale PNG, as bytes."""
    return encode(Image.fromarray(make_xray_array(1), mode="L"))


@pytest.fixture
def xray_jpeg():
    """A 320x256 grayscale JPEG, as bytes."""
    return encode(Image.fromarray(make_xray_array(2, size=(256, 320)), mode="L"), "JPEG", quality=90)


def write_image_folder(root, per_class=(24, 8, 8), size=(64, 64)):
    """Write a learnable synthetic ImageFolder with train/val/test splits under ``root``."""
    seed = 0
    for split, count in zip(("train", "val", "test"), per_class):
        for label in CLASS_NAMES:
            folder = Path(root) / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                seed += 1
                Image.fromarray(make_xray_array(seed, size=size, label=label), mode="L").save(folder / f"{index}.png")
    return Path(root)


def write_sourced_dataset(root, counts, size=(64, 64)):
    """Write an ImageFolder with ``<source>_<n>.png`` files and a MANIFEST.csv naming each image's source_repo."""
    root = Path(root)
    rows, seed = [], 0
    for split, classes in counts.items():
        for label, sources in classes.items():
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for source, count in sources.items():
                for index in range(count):
                    seed += 1
                    pixels = make_xray_array(seed, size=size, label=label).astype(np.float32)
                    if source == "srca":
                        pixels = pixels * 0.6
                        pixels[2:8, 2:8] = 255
                    name = f"{source}_{index}.png"
                    Image.fromarray(pixels.astype(np.uint8), mode="L").save(folder / name)
                    rows.append({"split": split, "label": label, "path": f"{split}/{label}/{name}",
                                 "source_repo": SOURCE_REPOS[source], "patient_id": f"{source}:{seed}"})
    with (root / "MANIFEST.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["split", "label", "path", "source_repo", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A small synthetic, learnable ImageFolder dataset (train/val/test x COVID/NORMAL/PNEUMONIA)."""
    return write_image_folder(tmp_path_factory.mktemp("cxr"))


@pytest.fixture(scope="session")
def tiny_checkpoint_path(tmp_path_factory):
    """A random-weight resnet18 checkpoint at 64 px, written through the real save function."""
    import torch

    from model.checkpoint import make_checkpoint, save_checkpoint
    from model.network import build_model
    from model.transforms import eval_transform_params

    torch.manual_seed(0)
    network = build_model("resnet18", num_classes=len(CLASS_NAMES), weights="none")
    checkpoint = make_checkpoint(
        network,
        arch="resnet18",
        class_names=CLASS_NAMES,
        transform=eval_transform_params(image_size=64, recipe="robust"),
        model_name="covidscan-test",
        model_version="test-1",
    )
    return save_checkpoint(checkpoint, tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="session")
def tiny_int8_checkpoint_path(tiny_checkpoint_path, image_folder, tmp_path_factory):
    """A copy of the tiny checkpoint with its int8 fast-path file beside it, written by scripts/export.py --int8."""
    import shutil

    from scripts.export import get_args_parser, main

    path = tmp_path_factory.mktemp("fast") / "tiny.pt"
    shutil.copyfile(tiny_checkpoint_path, path)
    main(get_args_parser().parse_args(["--checkpoint", str(path), "--int8", str(image_folder), "--int8-films", "12"]))
    return path


@pytest.fixture
def app(tiny_checkpoint_path):
    """The Flask app in testing mode around the tiny checkpoint (CSRF off unless a test turns it on)."""
    from app import create_app

    yield create_app(
        {
            "TESTING": True,
            "SECRET_KEY": "test-secret",
            "WTF_CSRF_ENABLED": False,
            "MODEL_PATH": str(tiny_checkpoint_path),
        }
    )
    collect_apps_now_and_then()


_apps_since_collection = 0


def collect_apps_now_and_then(every=12):
    """A Flask app sits in reference cycles with its model; collect every few apps rather than after each (a full
    collection costs ~0.3 s with torch loaded, which after every test was a quarter of the fast suite)."""
    import gc

    global _apps_since_collection
    _apps_since_collection += 1
    if _apps_since_collection >= every:
        _apps_since_collection = 0
        gc.collect()


@pytest.fixture
def client(app):
    """A Flask test client."""
    return app.test_client()


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``needs_shared_data`` when ../shared/data/cxr is absent."""
    if SHARED_DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"{SHARED_DATA} not present")
    for item in items:
        if "needs_shared_data" in item.keywords:
            item.add_marker(skip)
