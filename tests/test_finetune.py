"""The CPU retraining path (scripts/finetune.py) and the per-group evaluation (scripts/evaluate.py --manifest)."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import CLASS_NAMES, write_image_folder


def write_manifest(root, *, ages=True):
    """A MANIFEST.csv beside the splits: alternate films come from sources "a" and "b"; source b carries ages."""
    rows = []
    for split in ("train", "val", "test"):
        for label in CLASS_NAMES:
            for index, path in enumerate(sorted((root / split / label).glob("*.png"))):
                source = "b" if index % 2 else "a"
                new_path = path.with_name(f"{source}_{path.name}")
                path.rename(new_path)
                original = f"{label} (age {20 + 15 * (index % 4)}, F, PA)" if ages and source == "b" else label
                rows.append({"split": split, "label": label, "path": str(new_path.relative_to(root)),
                             "source_repo": f"owner/{source}", "original_label": original})
    with (root / "MANIFEST.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "MANIFEST.csv"


@pytest.fixture(scope="module")
def sourced_folder(tmp_path_factory):
    """A synthetic ImageFolder with a MANIFEST.csv naming two sources and some ages."""
    root = write_image_folder(tmp_path_factory.mktemp("sourced"), per_class=(12, 6, 6))
    write_manifest(root)
    return root


def test_group_balanced_weights_give_each_large_group_an_equal_share_of_its_class():
    from model.data import group_balanced_weights

    targets = [0] * 300 + [1] * 100 + [1] * 20 + [1] * 280
    sources = ["a"] * 300 + ["b"] * 100 + ["tiny"] * 20 + ["c"] * 280
    weights = group_balanced_weights(targets, sources, min_group=50).numpy()
    share = {source: weights[[s == source for s in sources]].sum() for source in ("a", "b", "tiny", "c")}
    assert share["a"] == pytest.approx(0.5)  # one class, one group: the class's half
    assert share["tiny"] == pytest.approx(0.5 * 20 / 400)  # keeps its natural share of class 1
    assert share["b"] == pytest.approx(share["c"])  # 100 and 280 films, drawn equally often
    assert weights.sum() == pytest.approx(1.0)


def test_split_network_freezes_the_trunk_and_trains_the_tail():
    from model.finetune import split_network
    from model.network import build_model

    network = build_model("resnet18", num_classes=3, weights="none").eval()
    images = torch.randn(2, 3, 64, 64)
    trunk, tail = split_network(network, "layer3.1")
    logits, activations = tail(trunk(images))
    assert torch.allclose(logits, network(images), atol=1e-5)  # trunk + tail is the whole network
    assert activations.shape[1] == 512
    assert not any(parameter.requires_grad for parameter in trunk.parameters())
    assert all(parameter.requires_grad for parameter in tail.parameters())
    with pytest.raises(Exception, match="layer3.K"):
        split_network(network, "layer2.1")


def test_group_metrics_count_where_each_groups_misses_go():
    from model.metrics import format_group_table, group_metrics

    table = group_metrics([0, 0, 0, 1], [0, 2, 2, 1], CLASS_NAMES, ["x", "x", "x", "y"])
    assert table["COVID|x"] == {"class": "COVID", "group": "x", "n": 3, "correct": 1, "sensitivity": pytest.approx(1 / 3),
                                "predicted": {"COVID": 1, "NORMAL": 0, "PNEUMONIA": 2}}
    assert table["NORMAL|y"]["sensitivity"] == 1.0
    assert "COVID" in format_group_table(table, "source")


@pytest.mark.slow
def test_finetune_trains_calibrates_and_resumes(sourced_folder, tiny_checkpoint_path, tmp_path):
    from scripts.finetune import get_args_parser, main

    from model.checkpoint import build_model_from_checkpoint, load_checkpoint

    output = tmp_path / "run"
    argv = ["--checkpoint", str(tiny_checkpoint_path), "--data", str(sourced_folder), "--output-dir", str(output),
            "--train-from", "layer3.1", "--views", "1", "--epochs", "2", "--batch-size", "8", "--min-group", "2",
            "--workers", "0", "--no-progress"]
    main(get_args_parser().parse_args(argv))
    best = load_checkpoint(output / "best.pt")
    original = load_checkpoint(tiny_checkpoint_path)
    assert best["transform"] == original["transform"] and best["class_names"] == original["class_names"]
    assert best["temperature"] > 0 and "threshold" in best["ood"]
    assert best["warm_start"]["checkpoint"] == str(tiny_checkpoint_path)
    assert "per_group" in best["val_metrics"]
    # the trunk is untouched, the tail moved
    assert torch.equal(best["state_dict"]["layer1.0.conv1.weight"], original["state_dict"]["layer1.0.conv1.weight"])
    assert not torch.equal(best["state_dict"]["fc.weight"], original["state_dict"]["fc.weight"])
    build_model_from_checkpoint(best)  # loads into plain torchvision
    rows = (output / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "val_group_mean_sensitivity" in rows[0]
    assert json.loads((output / "calibration.json").read_text())["temperature"] == pytest.approx(best["temperature"])
    # a second run resumes: the cache and last.pt are reused, no epoch is trained again
    cache_state = json.loads(next((output / "cache").glob("train-*.json")).read_text())
    assert cache_state["done"] == 36 and cache_state["shape"][1] == 2
    main(get_args_parser().parse_args(argv))
    assert len((output / "metrics.csv").read_text().splitlines()) == 3


def test_finetune_refuses_data_without_manifest(tiny_checkpoint_path, tmp_path):
    from scripts.finetune import get_args_parser, main

    root = write_image_folder(tmp_path / "plain", per_class=(3, 3, 1), size=(40, 40))
    with pytest.raises(SystemExit, match="manifest not found"):
        main(get_args_parser().parse_args(["--checkpoint", str(tiny_checkpoint_path), "--data", str(root),
                                           "--output-dir", str(tmp_path / "run"), "--workers", "0"]))


def test_evaluate_reports_sensitivity_per_source_and_age_band(sourced_folder, tiny_checkpoint_path, tmp_path, capsys):
    from scripts.evaluate import get_args_parser, main

    main(get_args_parser().parse_args(["--checkpoint", str(tiny_checkpoint_path), "--data",
                                       str(sourced_folder / "test"), "--output-dir", str(tmp_path), "--workers", "0",
                                       "--no-progress"]))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    by_source = metrics["per_group"]["source"]
    assert set(by_source) == {f"{name}|{source}" for name in CLASS_NAMES for source in ("a", "b")}
    assert sum(row["n"] for row in by_source.values()) == metrics["n"] == 18
    for row in by_source.values():
        assert sum(row["predicted"].values()) == row["n"]
        assert row["sensitivity"] == pytest.approx(row["correct"] / row["n"])
    by_age = metrics["per_group"]["age_band"]
    assert sum(row["n"] for row in by_age.values()) == 9  # only source b knows the age
    assert {row["group"] for row in by_age.values()} <= {"18-39", "40-59", "60+"}
    assert "sensitivity per class x source" in capsys.readouterr().out


def test_evaluate_without_manifest_has_no_groups(image_folder, tiny_checkpoint_path, tmp_path):
    from scripts.evaluate import get_args_parser, main

    main(get_args_parser().parse_args(["--checkpoint", str(tiny_checkpoint_path), "--data", str(image_folder / "test"),
                                       "--output-dir", str(tmp_path), "--workers", "0", "--no-progress"]))
    assert "per_group" not in json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite(json.loads((tmp_path / "metrics.json").read_text())["accuracy"])


def test_selection_score_ignores_small_and_held_out_groups():
    from model.finetune import selection_score

    recalls = {"COVID|a": {"n": 30, "sensitivity": 1.0}, "COVID|b": {"n": 30, "sensitivity": 0.0},
               "NORMAL|a": {"n": 5, "sensitivity": 0.0}}
    assert selection_score(recalls) == pytest.approx(0.5)
    assert selection_score(recalls, held_out={"b"}) == pytest.approx(1.0)


def test_balance_blends_group_balanced_and_natural_draws():
    from model.data import group_balanced_weights

    targets, sources = [0] * 90 + [1] * 10, ["a"] * 90 + ["b"] * 10
    natural = group_balanced_weights(targets, sources, balance=0.0).numpy()
    half = group_balanced_weights(targets, sources, balance=0.5).numpy()
    assert natural == pytest.approx(np.full(100, 0.01))
    assert half[-10:].sum() == pytest.approx(0.5 * 0.5 + 0.5 * 0.1)
    assert half.sum() == pytest.approx(1.0)


def test_source_sampler_weights_draw_every_group_equally_within_its_class(tmp_path):
    from types import SimpleNamespace

    from model.data import source_balanced_weights

    paths = [str(tmp_path / f"{index}.png") for index in range(8)]
    dataset = SimpleNamespace(targets=[0, 0, 0, 1, 1, 1, 1, 1], samples=[(path, 0) for path in paths])
    sources = dict(zip(paths, ["a", "a", "b", "a", "b", "b", "b", "tiny"]))
    weights = source_balanced_weights(dataset, sources).numpy()
    assert weights[:2].sum() == pytest.approx(weights[2]) == pytest.approx(0.25)  # class 0: a and b a half each
    assert weights[3] == pytest.approx(weights[4:7].sum()) == pytest.approx(weights[7]) == pytest.approx(0.5 / 3)
