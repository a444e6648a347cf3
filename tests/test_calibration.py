"""Temperature scaling and the Mahalanobis OOD score."""

import numpy as np
import pytest
import torch

from model.calibration import fit_temperature, negative_log_likelihood
from model.metrics import expected_calibration_error, softmax
from model.ood import fit_mahalanobis, mahalanobis_score, threshold_for_false_flag_rate


def test_fit_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 3))
    targets = np.array([rng.choice(3, p=p) for p in softmax(true_logits)])
    overconfident = true_logits * 3.0  # a network three times too sure of itself
    temperature = fit_temperature(overconfident, targets)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert negative_log_likelihood(overconfident, targets, temperature) < negative_log_likelihood(overconfident, targets)
    assert expected_calibration_error(targets, softmax(overconfident, temperature)) < 0.03
    assert expected_calibration_error(targets, softmax(overconfident)) > 0.1


def test_mahalanobis_flags_far_points_and_threshold_rate():
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 5, (3, 32))
    targets = rng.integers(0, 3, 3000)
    features = centres[targets] + rng.normal(0, 1, (3000, 32))
    statistics = fit_mahalanobis(features, targets, components=16)
    held_out_targets = rng.integers(0, 3, 1000)
    held_out = centres[held_out_targets] + rng.normal(0, 1, (1000, 32))
    scores = mahalanobis_score(statistics, held_out)
    threshold = threshold_for_false_flag_rate(scores, 0.01)
    assert (scores > threshold).mean() == pytest.approx(0.01, abs=0.005)
    outliers = rng.normal(0, 1, (200, 32)) * 8 + 20
    assert (mahalanobis_score(statistics, outliers) > threshold).mean() > 0.95
    assert statistics["projection"].shape == (32, 16)


def test_mahalanobis_projection_is_stored_as_float16_and_float32_statistics_still_score():
    """The D x k projection is stored as float16; checkpoints calibrated before that (float32) score the same."""
    import torch

    rng = np.random.default_rng(3)
    targets = rng.integers(0, 3, 500)
    features = rng.normal(0, 1, (3, 64))[targets] + rng.normal(0, 1, (500, 64))
    statistics = fit_mahalanobis(features, targets, components=16)
    assert statistics["projection"].dtype == torch.float16
    older = dict(statistics, projection=statistics["projection"].float())
    np.testing.assert_allclose(mahalanobis_score(older, features), mahalanobis_score(statistics, features), rtol=1e-6)


def test_predictor_reports_ood_and_applies_temperature(tiny_checkpoint_path, xray_png, tmp_path):
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.inference import Predictor

    checkpoint = load_checkpoint(tiny_checkpoint_path)
    plain = Predictor(checkpoint).predict_bytes(xray_png, with_heatmap=False)
    assert plain.ood is None
    features = np.random.default_rng(2).normal(0, 1, (100, 512))
    checkpoint["ood"] = fit_mahalanobis(features, np.arange(100) % 3, components=8)
    checkpoint["ood"]["threshold"] = 1e9
    checkpoint["temperature"] = 2.0
    path = save_checkpoint(checkpoint, tmp_path / "calibrated.pt")
    calibrated = Predictor.from_path(path).predict_bytes(xray_png, with_heatmap=False)
    assert calibrated.ood["flagged"] is False and calibrated.ood["threshold"] == 1e9
    assert calibrated.label == plain.label
    # Softer probabilities at T = 2: the top probability moves towards 1/3.
    assert max(calibrated.probabilities.values()) <= max(plain.probabilities.values()) + 1e-6
    logits = torch.log(torch.tensor(list(plain.probabilities.values())))
    expected = torch.softmax(logits / 2.0, 0)
    assert np.allclose(list(calibrated.probabilities.values()), expected.numpy(), atol=1e-4)
