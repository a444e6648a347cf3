"""Evaluate a checkpoint on an ImageFolder split: logits, metrics, plots."""

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from model.checkpoint import build_model_from_checkpoint, load_checkpoint
from model.data import make_image_folder
from model.engine import predict_logits
from model.metrics import (
    compute_metrics,
    expected_calibration_error,
    plot_confusion_matrix,
    plot_reliability,
    plot_roc_curves,
    softmax,
)
from model.transforms import build_eval_transform

logger = logging.getLogger(__name__)


def split_logits(checkpoint, data_dir, *, batch_size=32, workers=2, device="cpu", progress=False):
    """Run the checkpoint's network over an ImageFolder split with its stored eval transform.

    Returns (logits, targets, image paths).
    """
    logits, _, targets, paths = split_outputs(
        checkpoint, data_dir, batch_size=batch_size, workers=workers, device=device, progress=progress
    )
    return logits, targets, paths


def split_outputs(checkpoint, data_dir, *, batch_size=32, workers=2, device="cpu", progress=False,
                  with_features=False, feature_grid=1):
    """Like ``split_logits`` but also returns pooled features (None unless ``with_features``), see ``predict_logits``.

    Returns (logits, features, targets, image paths).
    """
    dataset = make_image_folder(
        data_dir, build_eval_transform(checkpoint["transform"]), class_names=checkpoint["class_names"]
    )
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    network = build_model_from_checkpoint(checkpoint).to(device)
    outputs = predict_logits(
        network, loader, torch.device(device), progress=progress, description=Path(data_dir).name,
        with_features=with_features, feature_grid=feature_grid,
    )
    logits, features, targets = outputs if with_features else (outputs[0], None, outputs[1])
    return logits, features, targets, [path for path, _ in dataset.samples]


def evaluate_checkpoint(checkpoint_path, data_dir, output_dir, *, batch_size=32, workers=2, device="cpu",
                        progress=True):
    """Write metrics.json and PNG plots for a checkpoint on a split; return the metrics dict."""
    checkpoint = load_checkpoint(checkpoint_path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    logits, targets, _ = split_logits(
        checkpoint, data_dir, batch_size=batch_size, workers=workers, device=device, progress=progress
    )
    class_names = checkpoint["class_names"]
    temperature = float(checkpoint.get("temperature", 1.0))
    probabilities = softmax(logits, temperature)
    metrics = compute_metrics(targets, probabilities, class_names)
    uncalibrated = softmax(logits)
    metrics["temperature"] = temperature
    metrics["ece_uncalibrated"] = expected_calibration_error(targets, uncalibrated)
    metrics["checkpoint"] = {
        "path": Path(checkpoint_path).name,
        "arch": checkpoint["arch"],
        "model_name": checkpoint.get("model_name"),
        "model_version": checkpoint.get("model_version", checkpoint.get("created_at")),
    }
    metrics["data"] = str(Path(data_dir))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_confusion_matrix(metrics, output_dir / "confusion_matrix.png")
    plot_roc_curves(targets, probabilities, class_names, output_dir / "roc.png")
    curves = {"uncalibrated": uncalibrated}
    if temperature != 1.0:
        curves[f"temperature {temperature:.2f}"] = probabilities
    plot_reliability(targets, curves, output_dir / "reliability.png")
    return metrics
