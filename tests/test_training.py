"""Training, evaluation and export on a synthetic ImageFolder: in-process where possible, the CLIs where it matters."""

import csv
import dataclasses
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from conftest import CLASS_NAMES, REPO_ROOT, load_script, parse_error, run_script
from model.checkpoint import load_checkpoint
from model.errors import CovidScanError
from model.presets import PRESETS, TUTORIAL

PYTHON = sys.executable
TRAIN_ARGS = ["--arch", "resnet18", "--weights", "none", "--image-size", "64", "--batch-size", "16",
              "--workers", "0", "--no-progress"]


def train_args(*arguments):
    """``scripts/train.py``'s parsed arguments, with the small test model's settings."""
    return load_script("train.py").get_args_parser().parse_args([*TRAIN_ARGS, *map(str, arguments)])  # later wins


def run_in_process(script, *arguments):
    """Parse ``arguments`` with ``scripts/<script>``'s parser and run its ``main`` here (no interpreter start-up)."""
    module = load_script(script)
    module.main(module.get_args_parser().parse_args(list(map(str, arguments))))


def train(*arguments, preset=None):
    """Train in this process (no interpreter start-up); return the output folder."""
    from model.training import train as run_training

    args = train_args(*arguments)
    run_training(args, preset=preset)
    return args.output_dir


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory):
    """One short real training run shared by the tests below."""
    output = tmp_path_factory.mktemp("run")
    train("--data", image_folder, "--output-dir", output, "--epochs", "4", "--preset", "tutorial")
    return output


def test_training_writes_a_plain_torchvision_checkpoint(trained):
    checkpoint = torch.load(trained / "best.pt", weights_only=True)
    assert checkpoint["class_names"] == CLASS_NAMES
    assert checkpoint["arch"] == "resnet18"
    assert checkpoint["transform"]["image_size"] == 64
    assert checkpoint["data"]["train_counts"] == {name: 24 for name in CLASS_NAMES}
    assert "optimizer" not in checkpoint and checkpoint["val_metrics"]["n"] == 24
    torchvision.models.resnet18(num_classes=3).load_state_dict(checkpoint["state_dict"])
    with open(trained / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]
    assert sum(int(row["is_best"]) for row in rows) >= 1


def test_the_preset_and_its_settings_travel_in_the_checkpoint(trained):
    checkpoint = load_checkpoint(trained / "best.pt")
    assert checkpoint["recipe"] == "tutorial"
    assert checkpoint["preset"] == {"name": "tutorial", **dataclasses.asdict(TUTORIAL)}
    assert checkpoint["args"]["lr"] is None  # not given: the preset's learning rate was used
    assert (checkpoint["transform"]["intensity"], checkpoint["transform"]["trim_borders"]) == ("none", False)


def test_evaluate_writes_metrics_well_above_chance(trained, image_folder, tmp_path):
    run_in_process("evaluate.py", "--checkpoint", trained / "best.pt", "--data", image_folder / "test",
                   "--output-dir", tmp_path, "--workers", "0", "--no-progress")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix", "ece", "n"} <= metrics.keys()
    assert set(metrics["per_class"]["COVID"]) >= {"sensitivity", "specificity", "ppv", "f1", "auc"}
    assert metrics["n"] == 24
    assert metrics["accuracy"] > 0.6  # chance is 1/3
    for plot in ("confusion_matrix.png", "roc.png", "reliability.png"):
        assert (tmp_path / plot).stat().st_size > 1000


def test_resume_continues_from_last(trained, image_folder, tmp_path, caplog):
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)
    with caplog.at_level(logging.INFO, logger="model.training"):
        train("--data", image_folder, "--output-dir", resumed, "--epochs", "5", "--preset", "tutorial",
              "--resume", resumed / "last.pt")
    assert "resumed from" in caplog.text
    with open(resumed / "metrics.csv") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [0, 1, 2, 3, 4]
    assert load_checkpoint(resumed / "last.pt")["epoch"] == 4


@pytest.mark.slow  # several short training runs end to end
def test_weight_average_is_selected_saved_and_resumed(image_folder, tmp_path, caplog):
    """A preset with a weight average: best.pt holds the average, last.pt holds both, a resume picks it up again."""
    output = tmp_path / "ema"
    preset = dataclasses.replace(TUTORIAL, model_ema=True, model_ema_half_life=0.5, model_ema_steps=1,
                                 warmup_epochs=0)
    common = ["--data", image_folder, "--output-dir", output]
    with caplog.at_level(logging.INFO, logger="model.training"):
        train("--epochs", "2", *common, preset=preset)
    assert "weight average: decay" in caplog.text
    last = load_checkpoint(output / "last.pt")
    average = {key[len("module."):]: value for key, value in last["ema_state_dict"].items() if key.startswith("module.")}
    assert int(last["ema_state_dict"]["n_averaged"]) == 2 * 4  # 72 images / batch 16, last partial batch dropped
    assert any(not torch.equal(average[key], last["state_dict"][key]) for key in last["state_dict"])
    best = torch.load(output / "best.pt", weights_only=True)
    assert "ema_state_dict" not in best
    if best["epoch"] == 1:  # the last epoch was the best: best.pt is the average, not the trained weights
        assert all(torch.equal(best["state_dict"][key], average[key]) for key in best["state_dict"])
    with open(output / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert all(0.0 <= float(row["val_accuracy_raw"]) <= 1.0 for row in rows)
    train("--epochs", "3", "--resume", "auto", *common, preset=preset)
    assert int(load_checkpoint(output / "last.pt")["ema_state_dict"]["n_averaged"]) == 3 * 4
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="model.training"):
        train("--epochs", "10", "--resume", "auto", "--time-limit", "0.001", *common, preset=preset)
    assert "another epoch would pass --time-limit" in caplog.text
    assert load_checkpoint(output / "last.pt")["epoch"] == 3  # one epoch ran, then the limit stopped the run
    run_in_process("export.py", "--checkpoint", output / "last.pt", "--output", tmp_path / "served.pt")
    assert "ema_state_dict" not in torch.load(tmp_path / "served.pt", weights_only=True)


def test_metrics_csv_from_an_older_version_gains_the_new_columns(tmp_path):
    from model.training import METRICS_FIELDS, _append_metrics

    path = tmp_path / "metrics.csv"
    path.write_text("epoch,lr,is_best\n0,0.1,1\n")
    _append_metrics(path, {"epoch": 1, "lr": 0.2, "val_accuracy_raw": 0.5, "is_best": 0})
    with open(path) as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == METRICS_FIELDS
    assert [(row["epoch"], row["val_accuracy_raw"]) for row in rows] == [("0", ""), ("1", "0.5")]


def test_time_limit_stops_before_an_epoch_that_would_not_fit():
    from model.training import out_of_time

    assert not out_of_time(0, 10_000, 1, True)  # no limit
    assert not out_of_time(10, 240, 2, True)  # 4 min done at 2 min per epoch: 6 min < 10
    assert out_of_time(10, 500, 2, True)  # 8.3 min done, one more reaches 12.5 min
    assert not out_of_time(10, 500, 2, False)  # nothing left to run anyway


def test_fit_time_limit_shortens_the_schedule_never_lengthens_it():
    from model.training import WarmupCosine, epochs_that_fit

    assert epochs_that_fit(10, 120, 60, 2, 60, 4) == 10  # 8 min left at 1 min per epoch: 2 done + 8
    assert epochs_that_fit(10, 120, 1, 2, 60, 4) == 60  # plenty of time: the schedule keeps its length
    assert epochs_that_fit(10, 590, 60, 2, 60, 4) == 4  # never inside the warm-up
    assert epochs_that_fit(10, 900, 60, 7, 60, 4) == 7  # already late: end now (the time limit stops the run)
    schedule = WarmupCosine(total_steps=100, warmup_steps=10)
    assert schedule(0) == pytest.approx(0.1) and schedule(10) == pytest.approx(1.0)
    schedule.total_steps = 50  # shortened mid-run: the decay now reaches zero at step 50
    assert schedule(30) == pytest.approx(0.5) and schedule(50) == pytest.approx(0.0)


@pytest.mark.slow  # several short training runs end to end
def test_fit_time_limit_ends_the_decay_inside_the_limit(image_folder, tmp_path, caplog):
    """--fit-time-limit: the run ends its (shortened) cosine schedule rather than stopping half-way."""
    output = tmp_path / "fit"
    with caplog.at_level(logging.INFO, logger="model.training"):
        train("--data", image_folder, "--output-dir", output, "--preset", "tutorial", "--epochs", "500",
              "--warmup-epochs", "0", "--time-limit", "0.25", "--fit-time-limit", "--checkpoint-every", "1000")
    assert "--fit-time-limit:" in caplog.text and "schedule now ends after" in caplog.text
    last = load_checkpoint(output / "last.pt")  # written at the end although --checkpoint-every is larger
    assert last["epoch"] == last["end_epoch"] - 1 < 499
    with open(output / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == last["end_epoch"]
    assert float(rows[-1]["lr"]) < 0.9 * float(rows[0]["lr"])  # decayed: the 500-epoch schedule would still be at 0.99
    assert "end_epoch" not in torch.load(output / "best.pt", weights_only=True)


def test_mixing_trains_on_soft_targets():
    from model.engine import train_one_epoch
    from model.transforms import batch_mixing

    seen = []

    def criterion(logits, targets):
        seen.append(targets)
        return torch.nn.functional.cross_entropy(logits, targets)

    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    loader = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))] * 2
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    plain = train_one_epoch(network, criterion, optimizer, scheduler, loader, torch.device("cpu"), 0, progress=False)
    assert all(targets.dtype == torch.int64 for targets in seen)
    seen.clear()
    stats = train_one_epoch(network, criterion, optimizer, scheduler, loader, torch.device("cpu"), 0, progress=False,
                            mixing=batch_mixing(3, mixup_alpha=0.4))
    assert all(targets.shape == (4, 3) and targets.dtype == torch.float32 for targets in seen)
    assert 0 <= stats["train_accuracy"] <= 1 and 0 <= plain["train_accuracy"] <= 1


def test_jensen_shannon_is_zero_for_equal_predictions_and_ln2_for_disjoint_ones():
    from model.engine import jensen_shannon

    sure = torch.tensor([[30.0, 0.0, 0.0], [0.0, 30.0, 0.0]])
    other = torch.tensor([[0.0, 30.0, 0.0], [0.0, 0.0, 30.0]])
    assert float(jensen_shannon(sure, sure)) == pytest.approx(0.0, abs=1e-6)
    assert float(jensen_shannon(sure, other)) == pytest.approx(np.log(2), abs=1e-4)
    unsure = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.0, 0.9]])
    assert float(jensen_shannon(sure, unsure)) == pytest.approx(float(jensen_shannon(unsure, sure)))


def _two_view_step(views, weight, mixing=None):
    """One training step of a tiny linear model on two views of 4 films; the weights it ends with."""
    from model.engine import train_one_epoch

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    seen = []

    def criterion(logits, targets):
        seen.append((tuple(logits.shape), tuple(targets.shape)))
        return torch.nn.functional.cross_entropy(logits, targets)

    optimizer = torch.optim.SGD(network.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_one_epoch(network, criterion, optimizer, scheduler, [(views, torch.tensor([0, 1, 2, 0]))],
                    torch.device("cpu"), 0, progress=False, consistency_weight=weight, mixing=mixing)
    # the class loss sees the first view only, with soft targets when mixed
    assert seen == [((4, 3), (4, 3) if mixing else (4,))]
    return network[1].weight.detach().clone()


def test_consistency_loss_compares_two_views_and_the_class_loss_sees_the_first(image_folder, tmp_path):
    step = _two_view_step
    torch.manual_seed(1)
    first, second = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    alone = step([first, first], 0.0)
    assert torch.allclose(step([first, first], 12.0), alone)  # equal views: nothing to make consistent
    assert not torch.allclose(step([first, second], 12.0), step([first, second], 0.0))
    train("--data", image_folder, "--output-dir", tmp_path, "--epochs", "1", "--preset", "tutorial",
          preset=dataclasses.replace(TUTORIAL, consistency_weight=12.0))
    checkpoint = load_checkpoint(tmp_path / "best.pt")
    assert checkpoint["preset"]["consistency_weight"] == 12.0
    assert checkpoint["transform"]["intensity"] == "none"  # the tutorial's eval transform, not the robust one


def test_consistency_with_mixing_mixes_both_views_of_a_film_alike(image_folder, tmp_path):
    from model.transforms import batch_mixing

    def step(views, weight):
        return _two_view_step(views, weight, mixing=batch_mixing(3, mixup_alpha=0.4, cutmix_alpha=1.0))

    torch.manual_seed(1)
    first, second = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    # equal views stay equal after mixing, so the consistency term has nothing to pull on
    assert torch.allclose(step([first, first.clone()], 12.0), step([first, first.clone()], 0.0))
    assert not torch.allclose(step([first, second], 12.0), step([first, second], 0.0))
    # the preset that combines the two, with its learning rate given on the command line
    train("--data", image_folder, "--output-dir", tmp_path, "--epochs", "1", "--preset", "consistency_mixup",
          "--lr", "0.002")
    checkpoint = load_checkpoint(tmp_path / "best.pt")
    assert checkpoint["args"]["preset"] == "consistency_mixup" and checkpoint["recipe"] == "tutorial"
    assert (checkpoint["preset"]["consistency_weight"], checkpoint["preset"]["mixup_alpha"]) == (1.5, 0.2)
    with open(tmp_path / "metrics.csv") as handle:
        assert float(next(csv.DictReader(handle))["lr"]) <= 0.002
    # the preset's eval transform travels in the checkpoint, so serving equalises and trims too
    assert (checkpoint["transform"]["intensity"], checkpoint["transform"]["trim_borders"]) == ("equalize", True)


def test_presets_are_named_recipes_with_the_shipped_and_proposed_settings():
    from model.presets import CONSISTENCY_MIXUP, ROBUST

    assert set(PRESETS) == {"tutorial", "robust", "consistency_mixup"}
    # the shipped 2026.11.27-4 (MODEL_CARD.md): letterbox, equalisation, zero-init residuals, weight average
    assert (ROBUST.recipe, ROBUST.resize_mode, ROBUST.intensity) == ("robust", "letterbox", "equalize")
    assert ROBUST.zero_init_residual and ROBUST.model_ema and ROBUST.model_ema_half_life == 2.0
    assert (CONSISTENCY_MIXUP.recipe, CONSISTENCY_MIXUP.trim_borders) == ("tutorial", True)
    assert (CONSISTENCY_MIXUP.consistency_weight, CONSISTENCY_MIXUP.mixup_alpha) == (1.5, 0.2)
    assert (TUTORIAL.consistency_weight, TUTORIAL.model_ema, TUTORIAL.intensity) == (0.0, False, "none")


@pytest.mark.parametrize("script", ["train.py", "loso.py"])
def test_train_options_are_few_and_the_recipe_is_a_preset(script, capsys):
    parser = load_script(script).get_args_parser()
    args = parser.parse_args(["--data", "d", "--output-dir", "o", "--preset", "robust"])
    assert (args.preset, args.lr, args.warmup_epochs) == ("robust", None, None)  # None: the preset's
    assert parser.parse_args(["--data", "d", "--output-dir", "o"]).preset == "consistency_mixup"
    assert "invalid choice: 'no_such_preset'" in parse_error(parser, ["--data", "d", "--output-dir", "o", "--preset",
                                                                       "no_such_preset"], capsys)
    for retired in (["--recipe", "robust"], ["--hflip", "0.5"], ["--source-adversary", "1"], ["--crop-scale", "0.7"]):
        assert "unrecognized arguments" in parse_error(parser, ["--data", "d", "--output-dir", "o", *retired], capsys)
    if script == "train.py":
        options = [action for action in parser._actions if action.option_strings and action.dest != "help"]
        assert len(options) <= 32
        names = {name for action in options for name in action.option_strings}
        assert {"--data", "--arch", "--weights", "--epochs", "--image-size", "--batch-size", "--output-dir",
                "--preset", "--resume", "--device", "--time-limit", "--sampler", "--manifest"} <= names


def test_ema_decay_halves_after_the_half_life():
    from model.training import ema_decay

    decay = ema_decay(half_life_epochs=2.0, steps_per_epoch=100, update_every=10)
    assert decay ** (2 * 100 / 10) == pytest.approx(0.5)


def test_weight_average_is_an_exponential_average_of_weights_and_buffers():
    """The fused update keeps the arithmetic: first update copies, then decay * average + (1 - decay) * current."""
    import torch

    from model.training import ExponentialMovingAverage

    network = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = ExponentialMovingAverage(network, decay=0.75)
    average.update_parameters(network)  # the first update copies
    before = {name: value.clone() for name, value in average.module.state_dict().items()}
    with torch.no_grad():
        network[0].weight.add_(1.0)
        network[1].running_mean.add_(2.0)
    network[1].num_batches_tracked += 4
    average.update_parameters(network)
    state = average.module.state_dict()
    current = network.state_dict()
    for name in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        expected = 0.75 * before[name] + 0.25 * current[name]
        assert torch.allclose(state[name], expected), name
    assert not torch.equal(state["0.weight"], current["0.weight"])  # averaged, not copied
    assert state["1.num_batches_tracked"].dtype == torch.int64  # integer buffers keep their type
    assert int(average.n_averaged) == 2


def test_export_half_preserves_metadata(trained, tmp_path, capsys):
    run_in_process("export.py", "--checkpoint", trained / "last.pt", "--output", tmp_path / "served.pt",
                   "--half", "--model-version", "1.2.3")
    assert "sha256" in capsys.readouterr().out
    exported = torch.load(tmp_path / "served.pt", weights_only=True)
    original = torch.load(trained / "last.pt", weights_only=True)
    assert "optimizer" not in exported and exported["model_version"] == "1.2.3"
    assert exported["class_names"] == original["class_names"] and exported["transform"] == original["transform"]
    assert (tmp_path / "served.pt").stat().st_size < 0.6 * (trained / "best.pt").stat().st_size


def test_export_calibrate_stores_temperature_and_grid_ood_statistics(trained, image_folder, tmp_path, capsys):
    from model.inference import Predictor

    run_in_process("export.py", "--checkpoint", trained / "best.pt", "--output", tmp_path / "served.pt",
                   "--calibrate", image_folder, "--ood-grid", "2", "--ood-components", "6", "--workers", "0")
    assert '"ood_val_flag_rate"' in capsys.readouterr().out
    exported = torch.load(tmp_path / "served.pt", weights_only=True)
    assert exported["temperature"] > 0
    ood = exported["ood"]
    assert ood["grid"] == 2 and ood["projection"].shape == (512 * 4, 6) and ood["class_means"].shape == (3, 6)
    # The threshold sits at the 99th percentile of val scores: 8 val images per class, so at most one flagged.
    predictor = Predictor.from_path(tmp_path / "served.pt", backend="eager")
    val_images = sorted((image_folder / "val").rglob("*.png"))
    flagged = [predictor.predict_bytes(path.read_bytes(), with_heatmap=False).ood["flagged"] for path in val_images]
    assert sum(flagged) <= 1


def test_metrics_match_a_hand_computed_confusion_matrix():
    from model.metrics import compute_metrics

    targets = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0])
    probabilities = np.full((9, 3), 0.1)
    probabilities[np.arange(9), predicted] = 0.8
    metrics = compute_metrics(targets, probabilities, CLASS_NAMES)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert metrics["accuracy"] == pytest.approx(6 / 9)
    covid = metrics["per_class"]["COVID"]
    assert covid["sensitivity"] == pytest.approx(2 / 3)
    assert covid["specificity"] == pytest.approx(5 / 6)
    assert covid["ppv"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["PNEUMONIA"]["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert metrics["ece"] == pytest.approx(abs(6 / 9 - 0.8))


@pytest.mark.slow
def test_torchrun_two_process_gloo(image_folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(REPO_ROOT / "scripts" / "train.py"), "--data", str(image_folder), "--output-dir", str(tmp_path),
         "--epochs", "2", *TRAIN_ARGS],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "rank 1 of 2" in completed.stderr
    with open(tmp_path / "metrics.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2  # written once, by rank 0
    assert load_checkpoint(tmp_path / "best.pt")["arch"] == "resnet18"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_data", "data folder not found"),
        ("missing_class", "expected ['COVID', 'NORMAL', 'PNEUMONIA']"),
        ("bad_weights", "no such file"),
        ("bad_resume", "not a readable CovidScan checkpoint"),
        ("missing_resume", "no such file"),
        ("source_sampler_without_manifest", "--sampler source needs a MANIFEST.csv"),
    ],
)
def test_training_errors_are_clear(case, message, image_folder, tmp_path):
    import shutil

    data, extra = image_folder, []
    if case == "missing_data":
        data = tmp_path / "nowhere"
    elif case == "missing_class":
        data = tmp_path / "data"
        shutil.copytree(image_folder, data)
        shutil.rmtree(data / "val" / "PNEUMONIA")
    elif case == "bad_weights":
        extra = ["--weights", tmp_path / "missing.pth"]
    elif case == "bad_resume":
        (tmp_path / "last.pt").write_text("garbage")
        extra = ["--resume", tmp_path / "last.pt"]
    elif case == "missing_resume":
        extra = ["--resume", tmp_path / "nothing.pt"]
    elif case == "source_sampler_without_manifest":
        extra = ["--sampler", "source"]
    with pytest.raises(CovidScanError) as error:
        train("--data", data, "--output-dir", tmp_path / "out", "--epochs", "1", "--preset", "tutorial", *extra)
    assert message in str(error.value)


def test_the_training_cli_ends_a_domain_error_with_one_line():
    completed = run_script("train.py", "--data", REPO_ROOT / "no-such-folder", "--output-dir", "unused",
                           "--preset", "tutorial", *TRAIN_ARGS, check=False)
    assert completed.returncode != 0 and "error: data folder not found" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_evaluate_reports_bad_checkpoint(image_folder, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit) as failed:
        run_in_process("evaluate.py", "--checkpoint", tmp_path / "bad.pt", "--data", image_folder / "test")
    assert str(failed.value.code).startswith("error: ") and "not a readable CovidScan checkpoint" in str(
        failed.value.code)
