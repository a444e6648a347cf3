"""Checkpoint format: a dict of plain types plus a torchvision-compatible ``state_dict``."""

import datetime
import logging
import os
import pickle
import re
import tempfile
import warnings
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols of foreign files
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zips, pickles of foreign objects, random bytes...
        raise CheckpointError(
            f"{path} is not a readable CovidScan checkpoint (truncated, damaged or foreign file): {load_error_reason(error)}"
        ) from error
    validate_checkpoint(checkpoint, path)
    checkpoint["state_dict"] = {
        key: value.float() if value.is_floating_point() else value for key, value in checkpoint["state_dict"].items()
    }
    return checkpoint


def load_error_reason(error):
    """Why ``torch.load(..., weights_only=True)`` failed, in one sentence, without torch's advice to load unsafely."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in text:
        match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, flags=re.S)
        detail = " ".join(match.group(1).split()) if match else "content that is not plain tensors and types"
        return f"the safe loader refused its content ({detail.rstrip('.')})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {' '.join(lines)}" if lines else type(error).__name__


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
    class_count = len(checkpoint["class_names"])
    network = build_model(checkpoint["arch"], num_classes=class_count, weights="none")
    state_dict = checkpoint["state_dict"]
    head = state_dict.get("fc.weight") if isinstance(state_dict, dict) else None
    if head is not None and head.ndim == 2 and head.shape[0] != class_count:
        raise CheckpointError(
            f"checkpoint weights do not fit {checkpoint['arch']} with {class_count} classes: the weights' final "
            f"layer has {head.shape[0]} outputs but class_names lists {class_count} "
            f"({', '.join(checkpoint['class_names'])})"
        )
    try:
        network.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint weights do not fit {checkpoint['arch']} with {class_count} classes: "
            f"{state_dict_error_reason(error)}"
        ) from error
    return network.eval()


def state_dict_error_reason(error, limit=3):
    """torch's ``load_state_dict`` complaint without its "Error(s) in loading state_dict for ..." preamble.

    The first ``limit`` problems are named in full; the rest are counted.
    """
    problems = []
    for line in str(error).splitlines():
        line = line.strip()
        if not line or line.startswith("Error(s) in loading state_dict"):
            continue
        heading, colon, keys = line.partition(": ")
        names = re.findall(r'"([^"]+)"', keys) if colon and "key(s)" in heading else []
        if len(names) > limit:
            line = f"{heading}: {len(names)} keys ({', '.join(names[:limit])}, ...)"
        problems.append(line.rstrip("."))
    if not problems:
        return str(error).strip() or type(error).__name__
    shown = "; ".join(problems[:limit])
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return shown + more


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
