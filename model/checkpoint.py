"""Checkpoint format: a dict of plain types plus a torchvision-compatible ``state_dict``."""

import datetime
import logging
import os
import tempfile
from pathlib import Path

import torch

from model.errors import CheckpointError
from model.network import ARCHITECTURES, build_model

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "arch", "class_names", "transform", "state_dict")
TRAINING_ONLY_KEYS = ("optimizer", "scheduler", "scaler", "rng_state", "ema_state_dict", "adversary_state_dict",
                      "end_epoch")
TRANSFORM_KEYS = ("image_size", "resize_mode", "crop_size", "intensity", "channels", "mean", "std")


def make_checkpoint(network, *, arch, class_names, transform, **metadata):
    """Assemble a serving checkpoint from an (unwrapped) network and plain-type metadata."""
    return {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "class_names": list(class_names),
        "transform": dict(transform),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **metadata,
        "state_dict": {key: value.detach().cpu() for key, value in network.state_dict().items()},
    }


def save_checkpoint(checkpoint, path):
    """Write ``checkpoint`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o644)  # mkstemp's 0600 would hide the model from a service account
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path):
    """Load and validate a checkpoint (``weights_only=True``); float16 weights come back as float32."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zips, pickles of foreign objects, random bytes...
        raise CheckpointError(
            f"{path} is not a readable CovidScan checkpoint (truncated, damaged or foreign file): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    validate_checkpoint(checkpoint, path)
    checkpoint["state_dict"] = {
        key: value.float() if value.is_floating_point() else value for key, value in checkpoint["state_dict"].items()
    }
    return checkpoint


def validate_checkpoint(checkpoint, path="checkpoint"):
    """Raise ``CheckpointError`` naming what is wrong with a loaded checkpoint dict."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a CovidScan checkpoint dict")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a CovidScan checkpoint: missing {', '.join(missing)}")
    if checkpoint["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {checkpoint['format_version']!r}; this version reads format {FORMAT_VERSION}"
        )
    if checkpoint["arch"] not in ARCHITECTURES:
        raise CheckpointError(f"{path} has unknown architecture {checkpoint['arch']!r}")
    class_names = checkpoint["class_names"]
    if not isinstance(class_names, list) or len(class_names) < 2 or not all(isinstance(n, str) for n in class_names):
        raise CheckpointError(f"{path} has invalid class_names {class_names!r}")
    missing_transform = [key for key in TRANSFORM_KEYS if key not in checkpoint["transform"]]
    if missing_transform:
        raise CheckpointError(f"{path} lacks eval-transform parameters: {', '.join(missing_transform)}")


def build_model_from_checkpoint(checkpoint):
    """Rebuild the network described by a loaded checkpoint, in eval mode."""
    network = build_model(checkpoint["arch"], num_classes=len(checkpoint["class_names"]), weights="none")
    try:
        network.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint weights do not fit {checkpoint['arch']} with {len(checkpoint['class_names'])} classes: "
            f"{str(error).splitlines()[0]}"
        ) from error
    return network.eval()


def to_serving(checkpoint, *, half=False):
    """Strip training-only state; optionally store weights as float16 to halve the file.

    Batch-norm running statistics stay float32: their small variances lose too much in float16.
    """
    serving = {key: value for key, value in checkpoint.items() if key not in TRAINING_ONLY_KEYS}
    if half:
        serving["state_dict"] = {
            key: value.half() if value.is_floating_point() and "running_" not in key else value
            for key, value in checkpoint["state_dict"].items()
        }
        serving["storage_dtype"] = "float16"
    return serving
