"""Tests of the shortcut audit (model/audit.py, scripts/audit.py, scripts/loso.py) on synthetic two-source data."""

import argparse
import json
import contextlib
import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASS_NAMES, load_script, make_xray_array, run_script, write_sourced_dataset
from model import audit
from model.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from model.errors import DataError
from model.transforms import build_eval_transform

# Per split, class and source: how many images (``write_sourced_dataset``: source A is darker, with a marker).
# Only COVID has two sources with the probe's minimum (5 here) each; the other classes exercise the skip.
AUDIT_COUNTS = {"test": {"COVID": {"srca": 5, "srcb": 5}, "NORMAL": {"srca": 2, "srcb": 2, "srcc": 1},
                         "PNEUMONIA": {"srca": 2, "srcb": 2}}}
MIN_PROBE_IMAGES = 5
LOSO_COUNTS = {
    "train": {"COVID": {"srca": 8}, "NORMAL": {"srca": 8, "srcb": 8}, "PNEUMONIA": {"srcb": 8, "srcc": 2}},
    "val": {"COVID": {"srca": 2}, "NORMAL": {"srca": 2, "srcb": 2}, "PNEUMONIA": {"srcb": 2, "srcc": 1}},
    "test": {"COVID": {"srca": 3}, "NORMAL": {"srca": 3, "srcb": 4}, "PNEUMONIA": {"srcb": 3, "srcc": 1}},
}


@pytest.fixture(scope="module")
def audit_root(tmp_path_factory):
    """A synthetic test split with two (NORMAL: three) sources per class and a manifest."""
    return write_sourced_dataset(tmp_path_factory.mktemp("sourced"), AUDIT_COUNTS, size=(48, 48))


@pytest.fixture(scope="module")
def audit_run(audit_root, tiny_checkpoint_path, tmp_path_factory):
    """One audit through the CLI with the tiny random checkpoint: (output folder, audit.json, stdout)."""
    output = tmp_path_factory.mktemp("audit")
    script, stdout = load_script("audit.py"), io.StringIO()
    with contextlib.redirect_stdout(stdout):
        script.main(script.get_args_parser().parse_args(list(map(str, [
            "--checkpoint", tiny_checkpoint_path, "--data", audit_root / "test", "--output-dir", output,
            "--workers", "0", "--seed", "3", "--min-probe-images", MIN_PROBE_IMAGES]))))
    return output, json.loads((output / "audit.json").read_text()), stdout.getvalue()


@pytest.fixture(scope="module")
def loso_run(tmp_path_factory):
    """One LOSO run through the CLI on a tiny dataset (resnet18, 32 px, one epoch): (output folder, loso.json)."""
    root = write_sourced_dataset(tmp_path_factory.mktemp("loso-data"), LOSO_COUNTS, size=(40, 40))
    output = tmp_path_factory.mktemp("loso")
    loso = load_script("loso.py")
    loso.main(loso.get_args_parser().parse_args(list(map(str, [
        "--data", root, "--output-dir", output, "--image-size", "32", "--epochs", "1", "--min-train-images", "6",
        "--batch-size", "8", "--workers", "0", "--preset", "tutorial", "--no-progress"]))))
    return root, output, json.loads((output / "loso.json").read_text())


def test_report_has_all_four_parts_and_plots(audit_run):
    output, result, stdout = audit_run
    report = (output / "audit.md").read_text()
    for heading in ("## 1. Per-source metrics", "## 2. Perturbation stability", "## 3. Source probe",
                    "## 4. Leave-one-source-out"):
        assert heading in report
    assert "not run: pass --loso-json" in report
    assert "`srca` = fake/source-a" in report
    for plot in (audit.PER_SOURCE_PLOT, audit.FLIP_RATE_PLOT):
        assert (output / plot).stat().st_size > 1000
        assert f"]({plot})" in report
    assert "per source:" in stdout and "mean flip rate" in stdout
    low, high = (f"{100 * value:.1f}%" for value in result["probe"]["COVID"]["ci95"])
    assert f"({low}-{high})" in report and "source probe COVID: balanced accuracy" in stdout and "95 % CI" in stdout


def test_per_source_counts_match_the_manifest(audit_run):
    _, result, _ = audit_run
    assert result["n"] == 19
    assert {source: values["n"] for source, values in result["per_source"].items()} == {"srca": 9, "srcb": 9,
                                                                                          "srcc": 1}
    assert result["per_source"]["srca"]["per_class"]["COVID"]["n"] == 5
    assert result["per_source"]["srca"]["per_class"]["NORMAL"]["n"] == 2
    assert set(result["per_source"]["srcc"]["per_class"]) == {"NORMAL"}
    groups = {(group["class"], group["source"]): group for group in result["per_class_source"]}
    expected = {(label, source): count for label, sources in AUDIT_COUNTS["test"].items()
                for source, count in sources.items()}
    assert {key: group["n"] for key, group in groups.items()} == expected
    for group in groups.values():
        assert sum(group["predicted"].values()) == group["n"]
        assert group["sensitivity"] == group["predicted"][group["class"]] / group["n"]


def test_perturbation_suite_flip_rates(audit_run):
    _, result, _ = audit_run
    names = [perturbation.name for perturbation in audit.perturbation_suite()]
    assert list(result["perturbations"]) == names
    assert {"gamma_0.6", "gamma_1.6", "jpeg_q30", "jpeg_q60", "resample_1/4", "resample_1/2", "border_crop_7",
            "border_pad_7", "text_PORTABLE", "marker_arrow", "rotate_+5", "rotate_-5", "noise"} <= set(names)
    for values in result["perturbations"].values():
        assert 0.0 <= values["flip_rate"] <= 1.0
        assert 0.0 <= values["accuracy"] <= 1.0
        assert all(0.0 <= rate <= 1.0 for rate in values["flip_rate_by_source"].values())
    summary = result["perturbation_summary"]
    flip_rates = [values["flip_rate"] for values in result["perturbations"].values()]
    assert summary["mean_flip_rate"] == pytest.approx(np.mean(flip_rates))
    assert summary["worst_flip_rate"] == max(flip_rates)


def test_probe_runs_only_on_sources_with_enough_images(audit_run):
    _, result, _ = audit_run
    covid = result["probe"]["COVID"]
    assert covid["sources"] == {"srca": 5, "srcb": 5} and covid["excluded"] == {}
    assert covid["chance"] == 0.5 and covid["folds"] == 5 and 0.0 <= covid["balanced_accuracy"] <= 1.0
    normal = result["probe"]["NORMAL"]
    assert normal["sources"] == {} and normal["excluded"] == {"srca": 2, "srcb": 2, "srcc": 1}
    assert "skipped" in normal and "balanced_accuracy" not in normal


@pytest.fixture(scope="module")
def decisive_checkpoint_path(audit_root, tiny_checkpoint_path, tmp_path_factory):
    """The tiny checkpoint with its head centred and scaled on the audit images, so its predictions vary.

    Random-weight pooled features barely differ between images, so the untouched head predicts one class.
    """
    checkpoint = load_checkpoint(tiny_checkpoint_path)
    split = audit.load_split(audit_root / "test", CLASS_NAMES).decode()
    network = build_model_from_checkpoint(checkpoint)
    _, features = audit.predict_split(network, build_eval_transform(checkpoint["transform"]), split)
    weight = checkpoint["state_dict"]["fc.weight"].double().numpy()
    mean = features.mean(axis=0)
    scale = 3.0 / ((features - mean) @ weight.T).std()
    checkpoint["state_dict"]["fc.weight"] = torch.from_numpy(scale * weight).float()
    checkpoint["state_dict"]["fc.bias"] = torch.from_numpy(-scale * weight @ mean).float()
    return save_checkpoint(checkpoint, tmp_path_factory.mktemp("decisive") / "decisive.pt")


def test_identity_perturbation_never_flips_and_loso_table_is_included(audit_root, decisive_checkpoint_path, tmp_path):
    loso_json = tmp_path / "loso.json"  # the shape scripts/loso.py writes (its own tests below train the folds)
    loso_json.write_text(json.dumps({"config": {"arch": "resnet18", "image_size": 32, "epochs": 1,
                                                "preset": "tutorial", "weights": "none", "seed": 0},
                                     "folds": [], "wall_seconds": 60}))
    identity = audit.Perturbation("identity", "unchanged", lambda image, rng: image)
    suite = {perturbation.name: perturbation for perturbation in audit.perturbation_suite()}
    result = audit.run_audit(decisive_checkpoint_path, audit_root / "test", tmp_path, workers=0, limit=15,
                             perturbations=[identity, suite["border_pad_7"], suite["gamma_0.6"]],
                             loso_json=loso_json)
    assert result["n"] == 15
    assert len({group["class"] for group in result["per_class_source"]}) == 3
    predicted = np.array([group["predicted"][name] for group in result["per_class_source"] for name in CLASS_NAMES])
    assert np.count_nonzero(predicted.reshape(-1, 3).sum(axis=0)) >= 2, "the head should not predict one class only"
    assert result["perturbations"]["identity"]["flip_rate"] == 0.0
    assert result["perturbations"]["identity"]["accuracy_change"] == 0.0
    # Unchanged images keep each (class, source) group's sensitivity exactly
    assert result["perturbations"]["identity"]["sensitivity_by_class_source"] == {
        f"{group['class']}:{group['source']}": group["sensitivity"] for group in result["per_class_source"]}
    assert max(result["perturbations"][name]["flip_rate"] for name in ("border_pad_7", "gamma_0.6")) > 0.0
    report = (tmp_path / "audit.md").read_text()
    assert "not run" not in report and "| NORMAL | `srca` |" in report


def test_probe_detects_features_that_encode_the_source():
    rng = np.random.default_rng(0)
    targets = np.repeat([0, 1], 40)
    sources = np.array(["a", "b"] * 40)
    encoding = rng.normal(size=(80, 64)) + 3.0 * (sources == "a")[:, None] * (np.arange(64) < 4)
    unrelated = rng.normal(size=(80, 64))
    names = ["COVID", "NORMAL"]
    encoded = audit.source_probe(encoding, targets, sources, names)
    assert encoded["COVID"]["balanced_accuracy"] > 0.95 and encoded["NORMAL"]["balanced_accuracy"] > 0.95
    chance = audit.source_probe(unrelated, targets, sources, names)
    assert chance["COVID"]["balanced_accuracy"] < 0.8 and chance["COVID"]["chance"] == 0.5
    single = audit.source_probe(encoding, targets, np.array(["a"] * 80), names)
    assert "skipped" in single["COVID"]
    for result in (encoded, chance):
        low, high = result["COVID"]["ci95"]
        assert low <= result["COVID"]["balanced_accuracy"] <= high


def test_probe_interval_is_a_stratified_bootstrap_of_the_images():
    # 3 of 4 images of source a and 1 of 2 of source b right: balanced accuracy (0.75 + 0.5) / 2
    labels = np.array(["a", "a", "a", "a", "b", "b"])
    predicted = np.array(["a", "a", "a", "b", "b", "a"])
    low, high = audit.bootstrap_balanced_accuracy(labels, predicted, seed=1)
    assert low < 0.625 < high and high - low > 0.3
    assert audit.bootstrap_balanced_accuracy(labels, predicted, seed=1) == [low, high]
    # the same recalls on 100 times the images: an interval about ten times narrower, around the same score
    big_low, big_high = audit.bootstrap_balanced_accuracy(np.repeat(labels, 100), np.repeat(predicted, 100))
    assert big_low < 0.625 < big_high and 5 < (high - low) / (big_high - big_low) < 20
    # a naive loop over resampled image indices agrees
    rng = np.random.default_rng(0)
    labels, predicted = np.repeat(labels, 10), np.repeat(predicted, 10)
    groups = [np.flatnonzero(labels == label) for label in ("a", "b")]
    naive = []
    for _ in range(2000):
        picked = np.concatenate([rng.choice(group, size=group.size) for group in groups])
        naive.append(audit.balanced_accuracy_score(labels[picked], predicted[picked]))
    expected = np.quantile(naive, [0.025, 0.975])
    assert np.allclose(audit.bootstrap_balanced_accuracy(labels, predicted), expected, atol=0.03)
    # all right: no spread
    assert audit.bootstrap_balanced_accuracy(labels, labels) == [1.0, 1.0]


def test_perturbations_are_deterministic_and_leave_the_input_alone():
    image = Image.fromarray(make_xray_array(5, size=(96, 80)), mode="L")
    before = np.asarray(image).copy()
    for perturbation in audit.perturbation_suite():
        first = perturbation(image, audit.perturbation_rng(0, perturbation.name, "x/cohen_1.jpg"))
        second = perturbation(image, audit.perturbation_rng(0, perturbation.name, "y/cohen_1.jpg"))
        assert first.mode == "L", perturbation.name
        assert np.array_equal(np.asarray(first), np.asarray(second)), perturbation.name
        if perturbation.name not in ("marker_square",):
            assert not np.array_equal(np.asarray(first), before) or first.size != image.size, perturbation.name
    assert np.array_equal(np.asarray(image), before)
    noise = {perturbation.name: perturbation for perturbation in audit.perturbation_suite()}["noise"]
    other_seed = noise(image, audit.perturbation_rng(1, "noise", "cohen_1.jpg"))
    assert not np.array_equal(np.asarray(other_seed), np.asarray(noise(image, audit.perturbation_rng(0, "noise",
                                                                                                     "cohen_1.jpg"))))


def test_stratified_subset_keeps_group_shares_and_is_seeded():
    groups = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    chosen = audit.stratified_subset(groups, 20, seed=0)
    assert len(chosen) == 20 and Counter(groups[index] for index in chosen) == {"a": 12, "b": 6, "c": 2}
    assert chosen == audit.stratified_subset(groups, 20, seed=0)
    assert chosen != audit.stratified_subset(groups, 20, seed=1)
    assert audit.stratified_subset(groups, None) == list(range(100))


def test_source_tags_use_the_file_prefix_or_the_repo_name():
    tags = audit.source_tags({"t/COVID/cohen_1.jpg": "s-mostafa-a/covid-chestxray-dataset",
                              "t/COVID/cohen_2.jpg": "s-mostafa-a/covid-chestxray-dataset",
                              "t/NORMAL/IM-1.jpeg": "owner/kermany-copy"})
    assert tags == {"s-mostafa-a/covid-chestxray-dataset": "cohen", "owner/kermany-copy": "kermany-copy"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda root, checkpoint, out: audit.run_audit(checkpoint, root / "test", out, manifest=root / "nope.csv"),
         "manifest not found"),
        (lambda root, checkpoint, out: audit.run_audit(checkpoint, root / "missing", out), "data folder not found"),
        (lambda root, checkpoint, out: audit.parse_holdout("NORMAL", [], {}), "expected CLASS:SOURCE"),
    ],
)
def test_clear_errors(call, message, audit_root, tiny_checkpoint_path, tmp_path):
    with pytest.raises(DataError, match=message):
        call(audit_root, tiny_checkpoint_path, tmp_path)


@pytest.mark.slow  # trains the leave-one-source-out folds end to end
def test_loso_holds_out_each_large_source_and_tests_on_it(loso_run):
    root, output, result = loso_run
    assert [(fold["class"], fold["source"]) for fold in result["folds"]] == [("NORMAL", "srca"), ("NORMAL", "srcb")]
    assert result["config"]["arch"] == "resnet18" and result["config"]["image_size"] == 32
    assert result["config"]["epochs"] == 1 and result["config"]["preset"] == "tutorial"
    assert result["config"]["recipe"] == "tutorial" and result["config"]["lr"] == 1e-3  # the preset's
    by_source = {fold["source"]: fold for fold in result["folds"]}
    assert by_source["srca"]["heldout"]["n"] == 3 and by_source["srca"]["reference"]["n"] == 4
    assert by_source["srcb"]["heldout"]["n"] == 4 and by_source["srcb"]["train_counts"]["NORMAL"] == 8
    for fold in result["folds"]:
        assert sum(fold["heldout"]["predicted"].values()) == fold["heldout"]["n"]
        assert 0.0 <= fold["heldout"]["sensitivity"] <= 1.0 and fold["wall_seconds"] > 0
        fold_data = output / f"NORMAL-{fold['source']}" / "data"
        links = list((fold_data / "train").rglob("*.png")) + list((fold_data / "val").rglob("*.png"))
        assert links and all(link.is_symlink() for link in links)
        assert not any(link.name.startswith(fold["source"]) for link in (fold_data / "train" / "NORMAL").iterdir())
        assert (output / f"NORMAL-{fold['source']}" / "run" / "best.pt").is_file()
    assert "held-out sensitivity" in (output / "loso.md").read_text()


def test_loso_plan_needs_two_large_sources_per_class():
    entries = [audit.CatalogueEntry(f"{source}_{index}.png", "train", label, source)
               for label, sources in LOSO_COUNTS["train"].items() for source, count in sources.items()
               for index in range(count)]
    assert audit.plan_holdouts(entries, 6) == [("NORMAL", "srca"), ("NORMAL", "srcb")]
    assert audit.plan_holdouts(entries, 9) == []
    assert audit.plan_holdouts(entries, 2) == [("NORMAL", "srca"), ("NORMAL", "srcb"), ("PNEUMONIA", "srcb"),
                                               ("PNEUMONIA", "srcc")]


@pytest.mark.slow  # trains the leave-one-source-out folds end to end
def test_loso_rerun_reuses_finished_folds_and_refuses_another_configuration(loso_run):
    root, output, result = loso_run
    loso_script = load_script("loso.py")
    arguments = ["--data", str(root), "--output-dir", str(output), "--image-size", "32", "--epochs", "1",
                 "--batch-size", "8", "--workers", "0", "--preset", "tutorial", "--no-progress"]
    args = loso_script.get_args_parser().parse_args(arguments)
    train_args = argparse.Namespace(**{key: value for key, value in vars(args).items()
                                       if key not in loso_script.LOSO_ONLY_OPTIONS})
    again = audit.leave_one_source_out(root, output, train_args, min_train_images=6, workers=0)
    assert [fold["heldout"] for fold in again["folds"]] == [fold["heldout"] for fold in result["folds"]]
    with pytest.raises(DataError, match="another configuration"):
        audit.leave_one_source_out(root, output, argparse.Namespace(**{**vars(train_args), "epochs": 2}),
                                   min_train_images=6, workers=0)
    with pytest.raises(DataError, match="another configuration"):  # the preset is part of the configuration
        audit.leave_one_source_out(root, output, argparse.Namespace(**{**vars(train_args), "preset": "robust"}),
                                   min_train_images=6, workers=0)


def test_loso_report_names_the_preset_and_the_options_of_older_runs():
    config = {"arch": "resnet18", "image_size": 96, "epochs": 8, "recipe": "tutorial", "preset": "tutorial",
              "weights": "none", "seed": 1, "sampler": "shuffle"}
    assert "preset tutorial, weights none, seed 1;" in audit.format_loso_markdown(
        {"config": config, "wall_seconds": 60, "folds": []})
    # loso.json files written before the presets (docs/model/audit/loso.json) name a recipe and its options
    older = {key: value for key, value in config.items() if key != "preset"}
    changed = audit.format_loso_markdown({"config": {**older, "recipe": "robust", "intensity": "equalize_foreground",
                                                     "resize": "letterbox", "sampler": "source"},
                                          "wall_seconds": 60, "folds": []})
    assert ("recipe robust, intensity equalize_foreground, resize letterbox, sampler source, weights none, seed 1;"
            in changed)
    ablated = audit.format_loso_markdown({"config": {**older, "robust_without": ["crop", "erasing"],
                                                     "acquisition_probability": 0.0}, "wall_seconds": 60, "folds": []})
    assert "robust without crop + erasing, acquisition probability 0.0, weights none" in ablated


def test_loso_config_records_the_preset_and_its_effective_learning_rate():
    base = {"arch": "resnet18", "preset": "robust", "seed": 0, "epochs": 3, "lr": None, "workers": 4, "threads": 2}
    config = audit._loso_config(argparse.Namespace(**base), 6)
    assert config == {"arch": "resnet18", "preset": "robust", "seed": 0, "epochs": 3, "recipe": "robust",
                      "lr": 1.5e-3, "min_train_images": 6}  # worker and thread counts do not make a configuration
    assert audit._loso_config(argparse.Namespace(**{**base, "lr": 0.01}), 6)["lr"] == 0.01


@pytest.mark.slow  # trains the leave-one-source-out folds end to end
def test_loso_merge_joins_folds_run_separately_and_refuses_mixed_configurations(loso_run, tmp_path, capsys):
    _, _, result = loso_run
    loso = load_script("loso.py")

    def merge(*paths):
        loso.main(loso.get_args_parser().parse_args(list(map(str, ["--data", "unused", "--output-dir", merged_dir,
                                                                   "--merge", *paths]))))

    first, second = ({**result, "folds": [fold]} for fold in result["folds"])
    paths = []
    for index, part in enumerate((first, second, first)):  # the repeated fold replaces the earlier copy
        paths.append(tmp_path / f"part{index}.json")
        paths[-1].write_text(json.dumps(part))
    merged_dir = tmp_path / "merged"
    merge(*paths)
    merged = json.loads((merged_dir / "loso.json").read_text())
    assert [(fold["class"], fold["source"]) for fold in merged["folds"]] == [("NORMAL", "srca"), ("NORMAL", "srcb")]
    assert merged["config"] == result["config"] and "held-out sensitivity" in capsys.readouterr().out

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**second, "config": {**result["config"], "recipe": "robust"}}))
    with pytest.raises(SystemExit) as failed:
        merge(paths[0], other)
    assert str(failed.value.code) == (
        "error: cannot merge LOSO runs with different configurations (they differ in recipe)")


def test_audit_cli_runs_a_chosen_part_of_the_suite(audit_root, tiny_checkpoint_path, tmp_path, capsys):
    script = load_script("audit.py")
    common = ["--checkpoint", tiny_checkpoint_path, "--data", audit_root / "test", "--workers", "0",
              "--min-probe-images", MIN_PROBE_IMAGES]

    def run(*arguments):
        script.main(script.get_args_parser().parse_args(list(map(str, [*common, *arguments]))))

    run("--output-dir", tmp_path / "none", "--perturbations", "none")
    result = json.loads((tmp_path / "none" / "audit.json").read_text())
    assert result["perturbations"] == {} and result["perturbation_summary"]["mean_flip_rate"] is None
    run("--output-dir", tmp_path / "two", "--perturbations", "border_pad_7,gamma_0.6")
    result = json.loads((tmp_path / "two" / "audit.json").read_text())
    assert sorted(result["perturbations"]) == ["border_pad_7", "gamma_0.6"]
    with pytest.raises(SystemExit, match="--perturbations: unknown gamma_9; choose from"):
        run("--output-dir", tmp_path / "bad", "--perturbations", "gamma_9")


def test_audit_cli_ends_a_domain_error_with_one_line(tiny_checkpoint_path, tmp_path):
    completed = run_script("audit.py", "--checkpoint", tiny_checkpoint_path, "--data", tmp_path / "nowhere",
                           "--output-dir", tmp_path / "out", check=False)
    assert completed.returncode != 0 and "error: data folder not found" in completed.stderr
    assert "Traceback" not in completed.stderr

