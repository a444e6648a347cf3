"""Tests of the heatmap-location audit (research/heatmap_audit.py) on synthetic data."""

import json

import numpy as np
import pytest

from research import heatmap_audit
from research.tests.conftest import fixtures

AUDIT_COUNTS = {"test": {"COVID": {"srca": 5, "srcb": 5}, "NORMAL": {"srca": 2, "srcb": 2, "srcc": 1},
                         "PNEUMONIA": {"srca": 2, "srcb": 2}}}

LETTERBOX = {"image_size": 64, "crop_size": 64, "resize_mode": "letterbox"}


def test_regions_partition_the_frame():
    masks = heatmap_audit.region_masks(grid=20)
    stacked = np.stack([masks[name] for name in heatmap_audit.REGIONS]).astype(int)
    assert (stacked.sum(axis=0) == 1).all()  # every cell in exactly one region
    assert masks["bottom"][15:].all() and not masks["bottom"][:15].any()  # the bottom quarter: rows 15-19
    assert masks["band"][0, 10] and masks["band"][10, 0] and masks["band"][10, 19] and not masks["band"][18, 0]
    assert masks["centre"][10, 10] and masks["centre"].mean() == pytest.approx(0.8 * 0.65)


def test_heat_in_the_bottom_rows_of_the_cam_lands_in_the_bottom_quarter_of_the_image():
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[6, 2:5] = 1.0
    masks = heatmap_audit.region_masks()
    frame = heatmap_audit.heat_frame(cam, LETTERBOX, (300, 300))
    assert frame.shape == (heatmap_audit.GRID, heatmap_audit.GRID)
    assert heatmap_audit.heat_shares(frame, masks)["bottom"] > 0.6
    assert heatmap_audit.peak_region(frame, masks) == "bottom"
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[3, 3] = 1.0
    assert heatmap_audit.peak_region(heatmap_audit.heat_frame(cam, LETTERBOX, (300, 300)), masks) == "centre"


def test_heat_of_a_border_trimmed_film_lies_inside_the_part_the_model_saw():
    """With trimming, the whole CAM covers the content box: the trimmed top quarter gets no heat."""
    squash = {"image_size": 64, "crop_size": 64, "resize_mode": "squash", "trim_borders": True}
    cam = np.ones((7, 7), dtype=np.float32)
    frame = heatmap_audit.heat_frame(cam, squash, (300, 300), content_box=(0.0, 0.25, 1.0, 1.0))
    rows = heatmap_audit.GRID // 4
    assert frame[:rows - 1].max() == 0 and frame[rows + 1:].min() > 0.9


def test_heat_on_the_letterbox_padding_is_not_counted_on_the_image():
    """A wide image fills only the middle rows of the square input: heat in the top rows lies off the image."""
    top, middle = np.zeros((7, 7), dtype=np.float32), np.zeros((7, 7), dtype=np.float32)
    top[0, :] = 1.0
    middle[3, :] = 1.0
    wide = (400, 100)
    assert heatmap_audit.heat_frame(top, LETTERBOX, wide).sum() < 0.05 * heatmap_audit.heat_frame(middle, LETTERBOX,
                                                                                                  wide).sum()
    assert np.isnan(heatmap_audit.heat_shares(np.zeros((4, 4)), heatmap_audit.region_masks(grid=4))["centre"])


def run_cli(*arguments):
    heatmap_audit.main(heatmap_audit.get_args_parser().parse_args(list(map(str, arguments))))


def test_cli_writes_a_row_per_class_and_source(tiny_checkpoint_path, tmp_path, capsys):
    root = fixtures.write_sourced_dataset(tmp_path / "data", AUDIT_COUNTS, size=(48, 40))
    output = tmp_path / "heatmaps"
    run_cli("--checkpoint", tiny_checkpoint_path, "--data", root / "test", "--output-dir", output,
            "--batch-size", "4", "--workers", "0")
    assert "heatmaps NORMAL" in capsys.readouterr().out
    result = json.loads((output / "heatmaps.json").read_text())
    assert (output / "mean_heatmaps.png").stat().st_size > 1000
    counts = {(group["class"], group["source"]): group["n"] for group in result["groups"]}
    assert counts[("COVID", "srca")] == 5 and counts[("NORMAL", "srcc")] == 1 and counts[("NORMAL", "all")] == 5
    for group in result["groups"]:
        assert sum(group[f"share_{name}"] for name in heatmap_audit.REGIONS) == pytest.approx(1.0)
        assert sum(group[f"peak_{name}"] for name in heatmap_audit.REGIONS) == pytest.approx(1.0)
        assert np.asarray(group["mean_frame"]).shape == (heatmap_audit.GRID, heatmap_audit.GRID)
    report = (output / "heatmaps.md").read_text()
    assert "not anatomy" in report and "| NORMAL | `srcc` | 1 |" in report
    with pytest.raises(SystemExit, match="error: data folder not found"):
        run_cli("--checkpoint", tiny_checkpoint_path, "--data", tmp_path / "nowhere", "--output-dir", output)
