"""Temperature scaling (Guo et al. 2017): one scalar fitted on held-out logits by minimising NLL."""

import numpy as np
import torch


def fit_temperature(logits, targets, *, max_iterations=200):
    """Return the temperature T > 0 that minimises the NLL of softmax(logits / T) on (logits, targets)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    log_temperature = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.1, max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_temperature.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    # Perfectly separated logits drive T towards 0; a clamp keeps the scaling sane.
    return float(log_temperature.exp().clamp(0.05, 20.0).item())


def negative_log_likelihood(logits, targets, temperature=1.0):
    """Mean NLL of softmax(logits / temperature)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    return float(torch.nn.functional.cross_entropy(logits / temperature, targets))


def calibrate_checkpoint(checkpoint, data_root, *, false_flag_rate=0.01, batch_size=32, workers=2, progress=True,
                         grid=None, components=None):
    """Add a fitted temperature (on val) and OOD statistics (fitted on train, threshold on val) to ``checkpoint``.

    Returns a report dict with the numbers behind the choice.
    """
    from pathlib import Path

    from model.evaluation import split_outputs
    from model.ood import DEFAULT_COMPONENTS, DEFAULT_GRID

    data_root = Path(data_root)
    grid = DEFAULT_GRID if grid is None else grid
    components = DEFAULT_COMPONENTS if components is None else components
    options = {"batch_size": batch_size, "workers": workers, "progress": progress, "with_features": True,
               "feature_grid": grid}
    _, train_features, train_targets, _ = split_outputs(checkpoint, data_root / "train", **options)
    val_logits, val_features, val_targets, _ = split_outputs(checkpoint, data_root / "val", **options)
    return calibrate_from_outputs(checkpoint, train_features, train_targets, val_logits, val_features, val_targets,
                                  components=components, grid=grid, false_flag_rate=false_flag_rate)


def calibrate_from_outputs(checkpoint, train_features, train_targets, val_logits, val_features, val_targets, *,
                           components, grid, false_flag_rate=0.01):
    """Fit the temperature on the val logits and the OOD statistics on the pooled train features (threshold on
    val); store both in ``checkpoint`` and return a report dict with the numbers behind the choice."""
    from model.metrics import expected_calibration_error, softmax
    from model.ood import fit_ood_statistics

    temperature = fit_temperature(val_logits, val_targets)
    statistics, val_scores = fit_ood_statistics(train_features, train_targets, val_features, components=components,
                                                grid=grid, false_flag_rate=false_flag_rate)
    checkpoint["temperature"] = temperature
    checkpoint["ood"] = statistics
    return {
        "temperature": temperature,
        "val_nll_before": negative_log_likelihood(val_logits, val_targets),
        "val_nll_after": negative_log_likelihood(val_logits, val_targets, temperature),
        "val_ece_before": expected_calibration_error(val_targets, softmax(val_logits)),
        "val_ece_after": expected_calibration_error(val_targets, softmax(val_logits, temperature)),
        "ood_threshold": statistics["threshold"],
        "ood_val_flag_rate": float((val_scores > statistics["threshold"]).mean()),
    }
