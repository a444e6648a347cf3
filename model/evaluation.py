"""Evaluate a checkpoint on an ImageFolder split: logits, metrics, plots."""

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from model.checkpoint import build_model_from_checkpoint, load_checkpoint
from model.data import make_image_folder, read_manifest_groups
from model.engine import predict_logits
from model.metrics import (
    compute_metrics,
    expected_calibration_error,
    group_metrics,
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
                        progress=True, manifest=None):
    """Write metrics.json and PNG plots for a checkpoint on a split; return the metrics dict.

    With a ``manifest`` (MANIFEST.csv) the metrics also hold ``per_group``: sensitivity per class x source and per
    class x age band (where the manifest knows the age), so a shortcut shows in an ordinary evaluation.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    logits, targets, paths = split_logits(
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
    if manifest is not None:
        metrics["per_group"] = subgroup_metrics(targets, probabilities.argmax(axis=1), class_names, paths, manifest)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_confusion_matrix(metrics, output_dir / "confusion_matrix.png")
    plot_roc_curves(targets, probabilities, class_names, output_dir / "roc.png")
    curves = {"uncalibrated": uncalibrated}
    if temperature != 1.0:
        curves[f"temperature {temperature:.2f}"] = probabilities
    plot_reliability(targets, curves, output_dir / "reliability.png")
    return metrics


def default_manifest(data_dir):
    """The MANIFEST.csv beside a split folder (``DATA/test`` -> ``DATA/MANIFEST.csv``), or None."""
    candidate = Path(data_dir).resolve().parent / "MANIFEST.csv"
    return candidate if candidate.is_file() else None


def subgroup_metrics(targets, predictions, class_names, paths, manifest):
    """``{"source": group_metrics by class x source, "age_band": by class x age band (films with a known age)}``.

    Films missing from the manifest count as source "unknown".
    """
    groups = read_manifest_groups(manifest)
    rows = [groups.get(str(Path(path).resolve()), {"source": "unknown", "age_band": None}) for path in paths]
    by_source = group_metrics(targets, predictions, class_names, [row["source"] for row in rows])
    aged = [index for index, row in enumerate(rows) if row["age_band"] is not None]
    by_age = group_metrics(np.asarray(targets)[aged], np.asarray(predictions)[aged], class_names,
                           [rows[index]["age_band"] for index in aged]) if aged else {}
    return {"source": by_source, "age_band": by_age}
