"""Out-of-distribution score: Mahalanobis distance of pooled features (Lee et al. 2018), kept small with PCA.

The features are the last block's activations average-pooled onto a coarse ``grid`` x ``grid`` layout
(2 x 2 by default: 4 x 2048 values for a ResNet-152) rather than the 1 x 1 global pool that feeds ``fc``. The
layout is what tells a chest X-ray from a CT slice or an X-ray on its side: on the shipped model the 2 x 2 pool
raised the AUROC for CT/MR slices from 0.968 to 0.999 and for rotated X-rays from 0.966 to 0.978, and the share
of CT/MR slices flagged at the 1 % threshold from 10 % to 87 % (docs/model/ood.md, ``--compare-grids 1 2``).
"""

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

# 256 rather than 128 since model 2026.11.27-4: on its 2 x 2 features the Mahalanobis score alone flagged 87 %
# instead of 78 % of the OOD sets of research/evaluate_ood.py on average (1500 train images, threshold at 1 % of
# val; every AUROC >= 0.99; 32 and 64 components did worse, a 3 x 3 grid too).
DEFAULT_COMPONENTS = 256
DEFAULT_GRID = 2
# ``colourfulness`` above this is a colour image. Measured: grayscale and sepia-tinted X-rays 0-1, a tinted
# X-ray with a red marker arrow 9; scikit-image's colour photos 21 (cat) to 59 (astronaut).
COLOURFUL_LIMIT = 15.0
COLOURFUL_REASON = "The image is in colour; chest X-rays are grayscale."
# ``neighbour_correlation`` below this is noise, not a radiograph. Measured: the lowest of the 6430 images of
# CXR-3 is 0.87 (a figure from a paper); uniform and Gaussian noise are near 0.
STRUCTURE_LIMIT = 0.5
STRUCTURE_REASON = "The image has almost no spatial structure; it looks like noise, not a radiograph."


def pooled_features(activations, grid=1):
    """Last-block activations (N x C x H x W) average-pooled to N x (C * grid * grid); grid 1 is ``fc``'s input."""
    activations = torch.as_tensor(activations).float()
    return F.adaptive_avg_pool2d(activations, grid).flatten(1)


def fit_mahalanobis(features, targets, *, components=DEFAULT_COMPONENTS, grid=1):
    """Fit class means and a shared (tied) covariance in a PCA subspace of the pooled features.

    ``features`` come from ``pooled_features(activations, grid)``; the grid is stored with the statistics.
    Returns a dict of tensors for the checkpoint: mean, projection (D x k), class_means (C x k),
    precision (k x k), and the grid.
    """
    features = np.asarray(features, dtype=np.float64)
    targets = np.asarray(targets)
    mean = features.mean(axis=0)
    centred = features - mean
    _, _, right_vectors = np.linalg.svd(centred, full_matrices=False)
    classes = np.unique(targets)
    # More components than samples per class would make the tied covariance singular.
    components = max(1, min(components, right_vectors.shape[0], len(features) - len(classes) - 1))
    # D x k, the largest part of the statistics (8192 x 256 for a ResNet-152 on the 2 x 2 grid), stored as float16;
    # the fit uses the rounded values, so the val threshold is computed with exactly what serving multiplies by.
    projection = right_vectors[:components].T.astype(np.float16).astype(np.float64)
    projected = centred @ projection
    class_means = np.stack([projected[targets == label].mean(axis=0) for label in classes])
    residuals = projected - class_means[np.searchsorted(classes, targets)]
    covariance = residuals.T @ residuals / len(residuals)
    covariance += np.eye(components) * 1e-6 * np.trace(covariance) / components  # keep it invertible
    return {
        "method": "mahalanobis",
        "grid": int(grid),
        "mean": torch.tensor(mean, dtype=torch.float32),
        "projection": torch.tensor(projection, dtype=torch.float16),
        "class_means": torch.tensor(class_means, dtype=torch.float32),
        "precision": torch.tensor(np.linalg.inv(covariance), dtype=torch.float32),
    }


def fit_ood_statistics(train_features, train_targets, val_features, *, components=DEFAULT_COMPONENTS, grid=1,
                       false_flag_rate=0.01):
    """``fit_mahalanobis`` on train features plus the threshold that flags ``false_flag_rate`` of val.

    Returns (statistics with "threshold", the val scores).
    """
    statistics = fit_mahalanobis(train_features, train_targets, components=components, grid=grid)
    val_scores = mahalanobis_score(statistics, val_features)
    statistics["threshold"] = threshold_for_false_flag_rate(val_scores, false_flag_rate)
    return statistics, val_scores


def mahalanobis_score(statistics, features):
    """Smallest Mahalanobis distance to a class mean (higher = less like the training X-rays)."""
    features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    projected = (features - statistics["mean"]) @ statistics["projection"].float()  # float16 since 2026.11.27-4
    differences = projected[:, None, :] - statistics["class_means"][None, :, :]  # N x C x k
    distances = torch.einsum("nck,kl,ncl->nc", differences, statistics["precision"], differences)
    return distances.min(dim=1).values.clamp_min(0).sqrt().numpy()


def activation_score(statistics, activations):
    """``mahalanobis_score`` of last-block activations, pooled onto the grid the statistics were fitted on."""
    return mahalanobis_score(statistics, pooled_features(activations, int(statistics.get("grid", 1))))


def energy_score(logits, temperature=1.0):
    """Negative free energy -T * logsumexp(logits / T), sign flipped so that higher = more OOD."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    return (-temperature * torch.logsumexp(logits / temperature, dim=1)).numpy()


def threshold_for_false_flag_rate(scores, rate=0.01):
    """Score above which only ``rate`` of the given in-distribution scores lie."""
    return float(np.quantile(np.asarray(scores), 1.0 - rate))


def colourfulness(image, *, max_side=256):
    """Colour in a PIL image that a tint cannot explain (0 for grayscale modes and tinted grayscale).

    Hasler & Suesstrunk's opponent channels (red-green, yellow-blue), each with its least-squares linear fit on
    luminance removed (that is what a sepia or warm-light tint is), then the spread of what is left.
    """
    if image.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return 0.0
    thumbnail = _shrink(image if image.mode == "RGB" else image.convert("RGB"), max_side)
    pixels = np.asarray(thumbnail, dtype=np.float64).reshape(-1, 3)
    red, green, blue = pixels.T
    luminance = np.c_[0.299 * red + 0.587 * green + 0.114 * blue, np.ones(len(pixels))]
    spreads = []
    for opponent in (red - green, 0.5 * (red + green) - blue):
        coefficients, *_ = np.linalg.lstsq(luminance, opponent, rcond=None)
        spreads.append((opponent - luminance @ coefficients).std())
    return float(np.hypot(*spreads))


def neighbour_correlation(image, *, max_side=256):
    """Correlation of horizontally adjacent pixels of a grayscale thumbnail (1 for a flat image).

    Any photograph or radiograph is smooth at this scale (close to 1); noise is not (close to 0).
    """
    thumbnail = _shrink(image if image.mode == "L" else image.convert("L"), max_side)
    pixels = np.asarray(thumbnail, dtype=np.float64)
    left, right = pixels[:, :-1].ravel(), pixels[:, 1:].ravel()
    if left.size < 2 or left.std() == 0 or right.std() == 0:
        return 1.0
    return float(np.corrcoef(left, right)[0, 1])


def _shrink(image, max_side):
    """A copy whose longer side is at most ``max_side`` (the input itself is never modified)."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BILINEAR, reducing_gap=2.0)


def input_check_reasons(decoded):
    """Model-independent reasons why a decoded upload (``model.decode.DecodedImage``) is not a chest X-ray."""
    reasons = []
    if decoded.colourfulness > COLOURFUL_LIMIT:
        reasons.append(COLOURFUL_REASON)
    if neighbour_correlation(decoded.image) < STRUCTURE_LIMIT:
        reasons.append(STRUCTURE_REASON)
    return reasons
