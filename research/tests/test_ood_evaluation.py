"""The OOD evaluation (research/evaluate_ood.py) end to end on the tiny model."""

import json

import numpy as np
import pytest
import torch

from model.ood import fit_mahalanobis, mahalanobis_score
from research import evaluate_ood


@pytest.mark.slow  # research: scores six OOD sets end to end
def test_ood_evaluation_reports_every_set(tiny_checkpoint_path, image_folder, tmp_path, capsys):
    """The OOD evaluation runs end to end on the tiny model and reports an AUROC per set."""
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.inference import Predictor

    checkpoint = load_checkpoint(tiny_checkpoint_path)
    predictor = Predictor(checkpoint, backend="eager")
    from model.data import load_image

    images = [load_image(path) for path in sorted((image_folder / "train").rglob("*.png"))]
    batch = torch.cat([predictor.preprocess(image) for image in images])
    _, activations = predictor.forward(batch)
    pooled = activations.float().mean(dim=(2, 3)).numpy()
    checkpoint["ood"] = fit_mahalanobis(pooled, np.arange(len(images)) % 3, components=8)
    checkpoint["ood"]["threshold"] = float(np.quantile(mahalanobis_score(checkpoint["ood"], pooled), 0.99))
    path = save_checkpoint(checkpoint, tmp_path / "ood.pt")
    evaluate_ood.main(evaluate_ood.get_args_parser().parse_args([
        "--checkpoint", str(path), "--data", str(image_folder / "test"), "--limit", "12",
        "--output-dir", str(tmp_path / "out"), "--compare-grids", "1", "2", "--fit-data", str(image_folder),
        "--components", "4", "6"]))
    stdout = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "ood.json").read_text())
    assert len(report["sets"]) == 6
    for values in report["sets"].values():
        assert 0.0 <= values["auroc_mahalanobis"] <= values["auroc_with_input_checks"] <= 1.0 and values["n"] > 0
        expected = {f"{grid}x{grid} pool, {size} components" for grid in (1, 2) for size in (4, 6)}
        assert set(values["compare"]) == expected
    photos = report["sets"]["natural photos (scikit-image)"]
    assert photos["input_check_rate"] > 0.25, "5 of the 14 scikit-image sample photos are in colour"
    assert photos["flag_rate"] >= photos["input_check_rate"]
    assert report["compare"]["2x2 pool, 6 components"]["grid"] == 2
    assert "AUROC" in stdout and "2x2 pool, 6 components" in stdout


@pytest.mark.slow  # research: builds the six OOD sets
def test_compare_ood_verdicts_counts_every_set_and_finds_a_difference(tiny_checkpoint_path, image_folder):
    """Two predictors with the same statistics agree everywhere; a lower threshold on one shows up as differences."""
    from model.inference import Predictor
    from research.ood_evaluation import compare_ood_verdicts

    reference = Predictor.from_path(tiny_checkpoint_path, backend="eager")
    candidate = Predictor.from_path(tiny_checkpoint_path, backend="onnx")
    statistics = fit_mahalanobis(np.random.default_rng(0).normal(size=(60, 512)), np.arange(60) % 3, components=8)
    reference.ood_statistics = {**statistics, "threshold": 1e9}
    candidate.ood_statistics = {**statistics, "threshold": 1e9}
    report = compare_ood_verdicts(reference, candidate, image_folder / "test", limit=12)
    assert len(report) == 7 and report["real test X-rays"]["n"] == 12
    assert all(row["differ"] == 0 and row["flagged_reference"] == row["flagged_candidate"] for row in report.values())
    candidate.ood_statistics = {**statistics, "threshold": -1.0}  # flags everything
    report = compare_ood_verdicts(reference, candidate, image_folder / "test", limit=12)
    assert report["real test X-rays"]["differ"] == 12 - report["real test X-rays"]["flagged_reference"] > 0
