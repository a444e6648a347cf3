"""Out-of-distribution score: Mahalanobis distance of pooled features (Lee et al. 2018), kept small with PCA."""

import numpy as np
import torch

DEFAULT_COMPONENTS = 128


def fit_mahalanobis(features, targets, *, components=DEFAULT_COMPONENTS):
    """Fit class means and a shared (tied) covariance in a PCA subspace of the pooled features.

    Returns a dict of plain lists/tensors for the checkpoint: mean, projection (D x k),
    class_means (C x k), precision (k x k).
    """
    features = np.asarray(features, dtype=np.float64)
    targets = np.asarray(targets)
    mean = features.mean(axis=0)
    centred = features - mean
    _, _, right_vectors = np.linalg.svd(centred, full_matrices=False)
    classes = np.unique(targets)
    # More components than samples per class would make the tied covariance singular.
    components = max(1, min(components, right_vectors.shape[0], len(features) - len(classes) - 1))
    projection = right_vectors[:components].T  # D x k
    projected = centred @ projection
    class_means = np.stack([projected[targets == label].mean(axis=0) for label in classes])
    residuals = projected - class_means[np.searchsorted(classes, targets)]
    covariance = residuals.T @ residuals / len(residuals)
    covariance += np.eye(components) * 1e-6 * np.trace(covariance) / components  # keep it invertible
    return {
        "method": "mahalanobis",
        "mean": torch.tensor(mean, dtype=torch.float32),
        "projection": torch.tensor(projection, dtype=torch.float32),
        "class_means": torch.tensor(class_means, dtype=torch.float32),
        "precision": torch.tensor(np.linalg.inv(covariance), dtype=torch.float32),
    }


def mahalanobis_score(statistics, features):
    """Smallest Mahalanobis distance to a class mean (higher = less like the training X-rays)."""
    features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    projected = (features - statistics["mean"]) @ statistics["projection"]
    differences = projected[:, None, :] - statistics["class_means"][None, :, :]  # N x C x k
    distances = torch.einsum("nck,kl,ncl->nc", differences, statistics["precision"], differences)
    return distances.min(dim=1).values.clamp_min(0).sqrt().numpy()


def energy_score(logits, temperature=1.0):
    """Negative free energy -T * logsumexp(logits / T), sign flipped so that higher = more OOD."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    return (-temperature * torch.logsumexp(logits / temperature, dim=1)).numpy()


def threshold_for_false_flag_rate(scores, rate=0.01):
    """Score above which only ``rate`` of the given in-distribution scores lie."""
    return float(np.quantile(np.asarray(scores), 1.0 - rate))
