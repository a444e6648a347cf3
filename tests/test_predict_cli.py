"""scripts/predict.py: batch triage of files and folders into a CSV, most urgent first, bad files reported."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO_ROOT, make_xray_array

SCRIPT = REPO_ROOT / "scripts" / "predict.py"


@pytest.fixture
def triage_folder(tmp_path):
    """Synthetic PNGs and JPEGs (one nested), a truncated PNG, text in a .jpg, and files that are not inputs."""
    folder = tmp_path / "inbox"
    (folder / "ward-b").mkdir(parents=True)
    labels = ["COVID", "NORMAL", "PNEUMONIA", None]
    for seed, label in enumerate(labels):
        Image.fromarray(make_xray_array(seed, size=(96, 80), label=label), mode="L").save(folder / f"study{seed}.png")
    Image.fromarray(make_xray_array(7, size=(120, 100)), mode="L").save(folder / "ward-b" / "study7.JPG", quality=90)
    Image.fromarray(make_xray_array(8), mode="L").save(folder / "ward-b" / "study8.jpeg", quality=80)
    whole = (folder / "study0.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "not-an-image.jpg").write_text("patient notes, not pixels\n")
    (folder / "README.txt").write_text("skipped: not an image by name\n")
    (folder / "extensionless-notes").write_text("skipped: no DICOM preamble\n")
    (folder / "extensionless-dicom").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x001.2\0")
    (folder / ".hidden.png").write_bytes(whole)
    return folder


def run_cli(*arguments):
    """Run scripts/predict.py as a user would."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, arguments)], capture_output=True, text=True,
                          timeout=600, cwd=REPO_ROOT)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_triage_writes_a_sorted_row_for_every_input_and_exits_zero(tiny_checkpoint_path, triage_folder, tmp_path):
    explicit_text = tmp_path / "explicit.txt"
    explicit_text.write_text("named on the command line, so it gets a row\n")
    output = tmp_path / "out" / "results.csv"
    result = run_cli(triage_folder, explicit_text, "--checkpoint", tiny_checkpoint_path, "--output", output,
                     "--batch-size", 3, "--workers", 2, "--no-progress", "--backend", "eager")
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stdout and "6 predicted, 4 unreadable" in result.stdout
    assert "patient notes" not in result.stdout + result.stderr

    rows = read_rows(output)
    expected = {f"study{seed}.png" for seed in range(4)} | {"study7.JPG", "study8.jpeg", "truncated.png",
                                                              "not-an-image.jpg", "extensionless-dicom", "explicit.txt"}
    assert sorted(Path(row["path"]).name for row in rows) == sorted(expected)
    assert list(rows[0]) == ["rank", "path", "label", "urgency", "probability_COVID", "probability_NORMAL",
                             "probability_PNEUMONIA", "ood_flagged", "ood_score", "ood_reasons", "error"]
    # The tiny checkpoint has no OOD statistics, and these grayscale images pass the input checks.
    assert all(row["ood_flagged"] == row["ood_score"] == row["ood_reasons"] == "" for row in rows)

    good = [row for row in rows if not row["error"]]
    bad = [row for row in rows if row["error"]]
    assert rows == good + bad  # unreadable files come last
    assert [int(row["rank"]) for row in good] == list(range(1, 7))
    urgencies = [float(row["urgency"]) for row in good]
    assert urgencies == sorted(urgencies, reverse=True)
    for row in good:
        probabilities = {name: float(row[f"probability_{name}"]) for name in ("COVID", "NORMAL", "PNEUMONIA")}
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert row["label"] == max(probabilities, key=probabilities.get)
        assert float(row["urgency"]) == pytest.approx(max(probabilities["COVID"], probabilities["PNEUMONIA"]), abs=1e-6)
    reasons = {Path(row["path"]).name: row["error"] for row in bad}
    assert "damaged or truncated" in reasons["truncated.png"]
    assert "not a PNG, JPEG or DICOM" in reasons["not-an-image.jpg"]
    assert "not a PNG, JPEG or DICOM" in reasons["explicit.txt"]
    assert "DICOM" in reasons["extensionless-dicom"]
    assert all(row["rank"] == "" and row["label"] == "" for row in bad)


def test_triage_with_ood_statistics_adds_ood_columns(tiny_checkpoint_path, triage_folder, tmp_path):
    import numpy as np
    import torch

    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.ood import fit_mahalanobis
    from scripts.predict import get_args_parser, main

    checkpoint = load_checkpoint(tiny_checkpoint_path)
    checkpoint["ood"] = fit_mahalanobis(np.random.default_rng(0).normal(size=(60, 512)), np.arange(60) % 3,
                                        components=8)
    checkpoint["ood"]["threshold"] = 0.0  # everything is flagged
    calibrated = save_checkpoint(checkpoint, tmp_path / "calibrated.pt")
    output = tmp_path / "results.csv"
    threads = torch.get_num_threads()
    try:
        main(get_args_parser().parse_args([str(triage_folder / "study1.png"), str(triage_folder / "ward-b"),
                                           "--checkpoint", str(calibrated), "--output", str(output),
                                           "--workers", "0", "--no-progress", "--backend", "eager"]))
    finally:
        torch.set_num_threads(threads)
    rows = read_rows(output)
    assert len(rows) == 3
    assert all(row["ood_flagged"] == "true" and float(row["ood_score"]) > 0 for row in rows)
    assert all("unlike those of the training X-rays" in row["ood_reasons"] for row in rows)
    assert all(row["label"] == row["urgency"] == "" and row["probability_COVID"] != "" for row in rows)


def test_triage_flags_a_colour_photo_without_ood_statistics(tiny_checkpoint_path, tmp_path):
    import numpy as np
    from PIL import Image

    rows_of_colour = np.zeros((96, 96, 3), dtype=np.uint8)
    for index, colour in enumerate([(200, 40, 40), (40, 160, 60), (40, 60, 200), (230, 200, 40)]):
        rows_of_colour[:, index * 24:(index + 1) * 24] = colour
    Image.fromarray(rows_of_colour).save(tmp_path / "photo.jpg")
    Image.fromarray(rows_of_colour.mean(axis=2).astype(np.uint8)).save(tmp_path / "gray.png")
    import torch

    from scripts.predict import get_args_parser, main

    output = tmp_path / "results.csv"
    threads = torch.get_num_threads()
    try:  # in-process: the first test of this file runs the script as a user would
        main(get_args_parser().parse_args([str(tmp_path / "photo.jpg"), str(tmp_path / "gray.png"), "--checkpoint",
                                           str(tiny_checkpoint_path), "--output", str(output), "--workers", "0",
                                           "--no-progress", "--backend", "eager"]))
    finally:
        torch.set_num_threads(threads)
    rows = {Path(row["path"]).name: row for row in read_rows(output)}
    assert rows["photo.jpg"]["ood_flagged"] == "true" and "in colour" in rows["photo.jpg"]["ood_reasons"]
    assert rows["photo.jpg"]["ood_score"] == ""  # no statistics, so no score
    assert rows["gray.png"]["ood_flagged"] == ""
    assert rows["photo.jpg"]["label"] == rows["photo.jpg"]["urgency"] == "", "a flagged image gets no class"
    assert rows["photo.jpg"]["probability_COVID"] != ""
    assert (rows["gray.png"]["rank"], rows["photo.jpg"]["rank"]) == ("1", "2"), "flagged rows rank after all others"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing checkpoint", "error: checkpoint not found"),
        ("damaged checkpoint", "is not a readable CovidScan checkpoint"),
        ("missing input", "error: no such file or folder"),
        ("no images", "error: no images found"),
    ],
)
def test_usage_errors_exit_non_zero_with_one_line(tiny_checkpoint_path, tmp_path, case, message):
    from scripts.predict import get_args_parser, main

    image = tmp_path / "one.png"
    Image.fromarray(make_xray_array(3), mode="L").save(image)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here\n")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    checkpoint, inputs = tiny_checkpoint_path, [image]
    if case == "missing checkpoint":
        checkpoint = tmp_path / "absent.pt"
    elif case == "damaged checkpoint":
        checkpoint = damaged
    elif case == "missing input":
        inputs = [tmp_path / "absent-folder"]
    elif case == "no images":
        inputs = [empty]
    arguments = [*map(str, inputs), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "r.csv")]
    with pytest.raises(SystemExit) as raised:
        main(get_args_parser().parse_args(arguments))
    assert raised.value.code not in (0, None)
    assert message in str(raised.value.code) and "\n" not in str(raised.value.code)
    assert not (tmp_path / "r.csv").exists()


def test_missing_checkpoint_from_the_command_line(tmp_path):
    image = tmp_path / "one.png"
    Image.fromarray(make_xray_array(3), mode="L").save(image)
    result = run_cli(image, "--checkpoint", tmp_path / "absent.pt", "--output", tmp_path / "r.csv")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"error: checkpoint not found: {tmp_path / 'absent.pt'}"


def test_collate_keeps_good_images_and_failures_apart():
    import torch

    from scripts.predict import collate_good_and_bad

    colour = ["The image is in colour; chest X-rays are grayscale."]
    items = [(0, torch.zeros(3, 4, 4), None, []), (1, None, "damaged", []), (2, torch.ones(3, 4, 4), None, colour)]
    indices, batch, bad, checks = collate_good_and_bad(items)
    assert indices == [0, 2] and batch.shape == (2, 3, 4, 4) and bad == [(1, "damaged")]
    assert checks == [[], colour]
    assert collate_good_and_bad([(5, None, "empty", [])]) == ([], None, [(5, "empty")], [])
