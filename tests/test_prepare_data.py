"""Tests for building the 3-class training set from miniature fake Kermany and COVID-19 collection folders."""

import csv
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.preparation import (
    MANIFEST_COLUMNS,
    RSNA_LICENSE,
    Candidate,
    DataPreparationError,
    deduplicate,
    difference_hash,
    is_frontal_view,
    kermany_patient_id,
    map_covid_finding,
    parse_extra,
    prepare_dataset,
    read_covid_collection,
    read_kermany,
    read_rsna,
    split_patient_groups,
)
from model.decode import decode_image
from conftest import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "prepare_data.py"
CORRUPT_BYTES = b"\xff\xd8\xff\xe0 this is not really a JPEG"


def smooth_image(seed: int, size=(160, 144)) -> Image.Image:
    """A grayscale image of smooth random blobs: distinct per seed, stable under resizing."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((6, 6)) * 255).astype(np.uint8)
    return Image.fromarray(coarse, "L").resize(size, Image.Resampling.BICUBIC)


def save_image(path: Path, seed: int, size=(160, 144)) -> Path:
    """Write a smooth random image to path (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    smooth_image(seed, size).save(path)
    return path


def near_copy(source: Path, destination: Path, size=(150, 135)) -> Path:
    """Write a slightly resized, re-encoded copy of an image."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        image.convert("RGB").resize(size, Image.Resampling.BILINEAR).save(destination, quality=85)
    return destination


@pytest.fixture
def covid_dir(tmp_path) -> Path:
    """A miniature COVID-19 image data collection: metadata.csv and images/."""
    root = tmp_path / "covid-chestxray-dataset"
    images = root / "images"
    rows = [
        # patientid, finding, view, modality, filename, license
        ("1", "COVID-19", "PA", "X-ray", "covid-a.png", "CC BY"),
        ("1", "Pneumonia/Viral/COVID-19", "AP Supine", "X-ray", "covid-b.jpg", "CC BY-NC-SA"),
        ("2", "Pneumonia/Bacterial/Streptococcus", " ap  semi erect ", "X-ray", "strep.jpg", "Apache 2.0"),
        ("3", "No Finding", "PA", "X-ray", "normal.png", ""),
        ("4", "COVID-19", "Axial", "CT", "ct-slice.png", "CC BY"),
        ("5", "COVID-19", "L", "X-ray", "lateral.jpg", "CC BY"),
        ("6", "Tuberculosis", "PA", "X-ray", "tb.png", "CC BY"),
        ("7", "SARS", "AP", "X-Ray", "sars.png", "CC BY"),
        ("8", "COVID-19", "PA", "X-ray", "covid-a-again.jpg", "CC BY"),  # duplicate of covid-a.png
        ("9", "COVID-19", "PA", "X-ray", "corrupt.jpg", "CC BY"),
        ("10", "Pneumonia", "PA", "X-ray", "missing.png", "CC BY"),
        ("11", "Pneumonia/Lipoid", "PA", "X-ray", "lipoid.png", "CC BY"),
        ("12", "No Finding", "PA", "X-ray", "conflict.png", "CC BY"),  # also in Kermany as PNEUMONIA
        ("13", "Pneumonia/Bacterial/Klebsiella", "PA", "X-ray", "shared.png", "CC BY"),  # also in Kermany
    ]
    seeds = {name: 100 + index for index, (*_, name, _) in enumerate(rows)}
    for *_, filename, _ in rows:
        if filename in ("covid-a-again.jpg", "missing.png"):
            continue
        if filename == "corrupt.jpg":
            images.mkdir(parents=True, exist_ok=True)
            (images / filename).write_bytes(CORRUPT_BYTES)
            continue
        save_image(images / filename, seeds[filename])
    near_copy(images / "covid-a.png", images / "covid-a-again.jpg")
    with (root / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientid", "offset", "finding", "view", "modality", "folder", "filename", "license"])
        for patient, finding, view, modality, filename, license_name in rows:
            writer.writerow([patient, "", finding, view, modality, "images", filename, license_name])
    return root


@pytest.fixture
def kermany_dir(tmp_path, covid_dir) -> Path:
    """A miniature Kermany download: chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/ under a parent."""
    root = tmp_path / "kermany" / "chest_xray"
    files = {
        "train/PNEUMONIA/person1_bacteria_1.jpeg": 1,
        "test/PNEUMONIA/person1_bacteria_2.jpeg": 2,  # same patient as above, in Kermany's test split
        "train/PNEUMONIA/person2_virus_3.jpeg": 3,
        "val/PNEUMONIA/person3_bacteria_4.jpeg": 4,
        "train/PNEUMONIA/person4_virus_5.jpeg": 5,
        "train/PNEUMONIA/person6_bacteria_7.jpeg": 6,  # patient whose other film is a copy of cohen "13"
        "train/NORMAL/IM-0115-0001.jpeg": 7,
        "test/NORMAL/IM-0115-0002.jpeg": 8,
        "train/NORMAL/IM-0117-0001.jpeg": 9,
        "train/NORMAL/NORMAL2-IM-1427-0001.jpeg": 10,
        "val/NORMAL/NORMAL2-IM-1430-0001.jpeg": 11,
    }
    for relative, seed in files.items():
        save_image(root / relative, seed)
    (root / "train/PNEUMONIA/person9_bacteria_9.jpeg").write_bytes(CORRUPT_BYTES)
    (root / "train/NORMAL/._IM-0115-0001.jpeg").write_bytes(b"macOS resource fork")
    near_copy(covid_dir / "images" / "conflict.png", root / "train/PNEUMONIA/person5_bacteria_6.jpeg")
    near_copy(covid_dir / "images" / "shared.png", root / "test/PNEUMONIA/person6_bacteria_8.jpeg")
    return root.parent


def read_manifest(output: Path) -> list[dict]:
    """Rows of OUT/MANIFEST.csv."""
    with (output / "MANIFEST.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_no_patient_crosses_splits(rows: list[dict]) -> None:
    """Fail if any patient id appears in more than one split."""
    splits_by_patient = defaultdict(set)
    for row in rows:
        splits_by_patient[row["patient_id"]].add(row["split"])
    crossing = {patient: splits for patient, splits in splits_by_patient.items() if len(splits) > 1}
    assert not crossing


@pytest.mark.parametrize(
    ("finding", "label"),
    [
        ("COVID-19", "COVID"),
        ("COVID-19, ARDS", "COVID"),
        ("Pneumonia/Viral/COVID-19", "COVID"),
        ("No Finding", "NORMAL"),
        ("Pneumonia/Bacterial/Streptococcus", "PNEUMONIA"),
        ("Streptococcus", "PNEUMONIA"),
        ("Klebsiella", "PNEUMONIA"),
        ("E.Coli", "PNEUMONIA"),
        ("Pneumocystis", "PNEUMONIA"),
        ("Pneumonia/Fungal/Aspergillosis", "PNEUMONIA"),
        ("Pneumonia/Viral/Influenza/H1N1", "PNEUMONIA"),
        ("SARS", "PNEUMONIA"),
        ("Pneumonia", "PNEUMONIA"),
        ("Tuberculosis", None),
        ("Unknown", None),
        ("todo", None),
        ("ARDS", None),
        ("Lipoid", None),
        ("Pneumonia/Lipoid", None),
        ("", None),
    ],
)
def test_map_covid_finding(finding, label):
    assert map_covid_finding(finding) == label


@pytest.mark.parametrize(
    ("view", "frontal"),
    [("PA", True), ("AP", True), ("AP Supine", True), (" ap  semi erect ", True), ("AP semi-erect", True),
     ("L", False), ("Axial", False), ("Coronal", False), ("", False)],
)
def test_is_frontal_view(view, frontal):
    assert is_frontal_view(view) is frontal


@pytest.mark.parametrize(
    ("stem", "patient"),
    [
        ("person1_bacteria_1", "person1"),
        ("person1_virus_6", "person1"),
        ("person1000_bacteria_2931", "person1000"),
        ("IM-0115-0001", "IM-0115"),
        ("NORMAL2-IM-1427-0001", "NORMAL2-IM-1427"),
        ("something-else", "something-else"),
    ],
)
def test_kermany_patient_id(stem, patient):
    assert kermany_patient_id(stem) == patient


def test_read_kermany_labels_and_patients(kermany_dir):
    scan = read_kermany(kermany_dir)  # the parent of chest_xray/
    by_name = {Path(candidate.source_path).name: candidate for candidate in scan.candidates}
    assert "._IM-0115-0001.jpeg" not in by_name
    assert by_name["person1_bacteria_1.jpeg"].label == "PNEUMONIA"
    assert by_name["person1_bacteria_1.jpeg"].original_label == "bacteria"
    assert by_name["person2_virus_3.jpeg"].original_label == "virus"
    assert by_name["IM-0115-0002.jpeg"].label == "NORMAL"
    assert by_name["IM-0115-0002.jpeg"].original_label == "normal"
    assert by_name["person1_bacteria_2.jpeg"].patient_id == by_name["person1_bacteria_1.jpeg"].patient_id
    assert by_name["NORMAL2-IM-1430-0001.jpeg"].patient_id == "kermany:NORMAL2-IM-1430"
    assert read_kermany(kermany_dir / "chest_xray").candidates == scan.candidates


@pytest.mark.parametrize("layout", ["missing", "empty", "wrong-folders"])
def test_read_kermany_rejects_bad_layout(tmp_path, layout):
    folder = tmp_path / "kermany"
    if layout == "wrong-folders":
        save_image(folder / "images" / "person1_bacteria_1.jpeg", 1)
    elif layout == "empty":
        folder.mkdir()
    with pytest.raises(DataPreparationError, match="Kermany folder"):
        read_kermany(folder)


def test_read_covid_collection_labels_and_exclusions(covid_dir):
    scan = read_covid_collection(covid_dir)
    labels = {Path(candidate.source_path).name: candidate.label for candidate in scan.candidates}
    assert labels == {
        "covid-a.png": "COVID",
        "covid-b.jpg": "COVID",
        "strep.jpg": "PNEUMONIA",
        "normal.png": "NORMAL",
        "sars.png": "PNEUMONIA",
        "covid-a-again.jpg": "COVID",
        "corrupt.jpg": "COVID",
        "conflict.png": "NORMAL",
        "shared.png": "PNEUMONIA",
    }
    assert dict(scan.exclusions) == {
        "cohen: modality CT": 1,
        "cohen: view L": 1,
        "cohen: finding Tuberculosis": 1,
        "cohen: finding Pneumonia/Lipoid": 1,
        "cohen: image file missing": 1,
    }
    first = next(candidate for candidate in scan.candidates if candidate.source_path == "images/covid-a.png")
    assert (first.patient_id, first.license, first.original_label) == ("cohen:1", "CC BY", "COVID-19")


def test_read_covid_collection_requires_metadata(tmp_path):
    with pytest.raises(DataPreparationError, match="metadata.csv"):
        read_covid_collection(tmp_path)


def test_read_covid_collection_tolerates_ragged_rows_and_reports_missing_columns(tmp_path):
    save_image(tmp_path / "images" / "a.png", 1)
    (tmp_path / "metadata.csv").write_text(
        "patientid,finding,view,modality,filename\n7,COVID-19,PA,X-ray,a.png,stray cell\n"
    )
    [candidate] = read_covid_collection(tmp_path).candidates
    assert (candidate.label, candidate.patient_id, candidate.license) == ("COVID", "cohen:7", "unknown")
    (tmp_path / "metadata.csv").write_text("patientid,finding,filename\n7,COVID-19,a.png\n")
    with pytest.raises(DataPreparationError, match="modality, view"):
        read_covid_collection(tmp_path)


def test_difference_hash_survives_resize_and_reencoding(tmp_path):
    original = save_image(tmp_path / "a.png", 1)
    copy = near_copy(original, tmp_path / "b.jpg")
    other = save_image(tmp_path / "c.png", 2)
    same = np.unpackbits(difference_hash(original) ^ difference_hash(copy)).sum()
    different = np.unpackbits(difference_hash(original) ^ difference_hash(other)).sum()
    assert same <= 10 < 60 < different


def test_deduplicate_prefers_collection_and_drops_conflicts():
    def candidate(source, name, label, patient):
        return Candidate(source, Path(name), name, label, patient, label)

    candidates = [
        candidate("kermany", "k1", "PNEUMONIA", "kermany:person1"),
        candidate("cohen", "c1", "PNEUMONIA", "cohen:7"),
        candidate("extra", "e1", "NORMAL", "extra:e1"),
        candidate("cohen", "c2", "NORMAL", "cohen:8"),
        candidate("kermany", "k2", "PNEUMONIA", "kermany:person2"),
    ]
    hashes = np.zeros((5, 32), dtype=np.uint8)
    hashes[0:2, 0] = 0b1  # k1 and c1: same image, same label
    hashes[2:4, 1] = 0b11  # e1 and c2: same image, same label
    hashes[4, :] = 0xFF  # k2: unrelated
    result = deduplicate(candidates, hashes, max_distance=2)
    assert [item.source_path for item in result.kept] == ["c1", "c2", "k2"]
    assert result.duplicates_removed == 2
    assert result.patient_groups["kermany:person1"] == result.patient_groups["cohen:7"]

    conflicting = list(candidates)
    conflicting[3] = candidate("cohen", "c2", "COVID", "cohen:8")
    result = deduplicate(conflicting, hashes, max_distance=2)
    assert (result.conflicting_clusters, result.conflicting_images) == (1, 2)
    assert [item.source_path for item in result.kept] == ["c1", "k2"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_split_keeps_patient_groups_whole_and_near_fractions(seed):
    rng = np.random.default_rng(1000 + seed)
    items = []
    for index in range(600):
        patient = f"kermany:person{rng.integers(0, 300)}"
        label = ("COVID", "NORMAL", "PNEUMONIA")[index % 3]
        items.append(Candidate("kermany", Path(f"{index}.jpeg"), f"{index}.jpeg", label, patient, label))
    groups = {item.patient_id: item.patient_id for item in items}
    groups["kermany:person1"] = groups["kermany:person2"] = "kermany:person1"
    assignment = split_patient_groups(items, groups, 0.15, 0.15, seed)
    assert assignment == split_patient_groups(items, groups, 0.15, 0.15, seed)
    splits = [assignment[groups[item.patient_id]] for item in items]
    for split, expected in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        assert splits.count(split) / len(items) == pytest.approx(expected, abs=0.04)


def test_prepare_dataset_end_to_end(tmp_path, kermany_dir, covid_dir):
    output = tmp_path / "out"
    report = prepare_dataset(output, kermany_dir=kermany_dir, covid_collection_dir=covid_dir, seed=0)
    rows = read_manifest(output)

    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    for split in ("train", "val", "test"):
        for label in ("COVID", "NORMAL", "PNEUMONIA"):
            assert (output / split / label).is_dir()
    for row in rows:
        written = output / row["path"]
        assert written.is_file()
        assert written.parent.name == row["label"] and written.parent.parent.name == row["split"]
        assert written.name.startswith(f"{row['source']}_")
    assert len({row["path"] for row in rows}) == len(rows)
    assert report.total_images == len(rows)

    by_source_path = {(row["source"], row["source_path"]): row for row in rows}
    # Cohen duplicate pair (patients 1 and 8): one copy kept, the larger original.
    assert ("cohen", "images/covid-a.png") in by_source_path
    assert ("cohen", "images/covid-a-again.jpg") not in by_source_path
    # Cohen/Kermany duplicate with the same label: the collection copy wins, patients join one split.
    assert ("cohen", "images/shared.png") in by_source_path
    assert ("kermany", "test/PNEUMONIA/person6_bacteria_8.jpeg") not in by_source_path
    assert by_source_path[("kermany", "train/PNEUMONIA/person6_bacteria_7.jpeg")]["split"] == by_source_path[
        ("cohen", "images/shared.png")
    ]["split"]
    # Conflicting labels (Cohen "No Finding" vs Kermany PNEUMONIA): both copies dropped.
    assert ("cohen", "images/conflict.png") not in by_source_path
    assert ("kermany", "train/PNEUMONIA/person5_bacteria_6.jpeg") not in by_source_path
    assert (report.duplicates_removed, report.conflicting_clusters, report.conflicting_images) == (2, 1, 2)
    assert sorted(path for _, path, _ in report.unreadable) == [
        "images/corrupt.jpg",
        "train/PNEUMONIA/person9_bacteria_9.jpeg",
    ]
    assert report.exclusions["cohen: view L"] == 1 and report.exclusions["cohen: modality CT"] == 1

    labels = {(row["source"], Path(row["source_path"]).name): row["label"] for row in rows}
    assert labels[("cohen", "covid-b.jpg")] == "COVID"
    assert labels[("cohen", "strep.jpg")] == "PNEUMONIA"
    assert labels[("cohen", "normal.png")] == "NORMAL"
    assert labels[("kermany", "IM-0117-0001.jpeg")] == "NORMAL"
    assert labels[("kermany", "person2_virus_3.jpeg")] == "PNEUMONIA"
    assert by_source_path[("cohen", "images/covid-b.jpg")]["license"] == "CC BY-NC-SA"
    # Copies are byte for byte.
    assert (output / by_source_path[("cohen", "images/strep.jpg")]["path"]).read_bytes() == (
        covid_dir / "images" / "strep.jpg"
    ).read_bytes()
    assert len(rows) == 6 + 11  # cohen covid-a, covid-b, strep, normal, sars, shared; kermany originals
    assert_no_patient_crosses_splits(rows)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_prepare_dataset_no_patient_crosses_splits(tmp_path, kermany_dir, covid_dir, seed):
    extra = tmp_path / "extra-covid"
    for index in range(3):
        save_image(extra / f"case{index}.png", 500 + index)
    save_image(extra / "nested" / "case3.bmp", 503)
    output = tmp_path / f"out-{seed}"
    prepare_dataset(
        output,
        kermany_dir=kermany_dir,
        covid_collection_dir=covid_dir,
        extras=[("COVID", extra)],
        seed=seed,
        val_fraction=0.3,
        test_fraction=0.3,
    )
    rows = read_manifest(output)
    assert_no_patient_crosses_splits(rows)
    extra_rows = [row for row in rows if row["source"] == "extra"]
    assert len(extra_rows) == 4 and {row["label"] for row in extra_rows} == {"COVID"}
    assert len({row["patient_id"] for row in extra_rows}) == 4
    # A format the training loader does not read is re-encoded even without --max-side.
    assert {Path(row["path"]).suffix for row in extra_rows} == {".png"}
    again = tmp_path / f"again-{seed}"
    prepare_dataset(
        again,
        kermany_dir=kermany_dir,
        covid_collection_dir=covid_dir,
        extras=[("COVID", extra)],
        seed=seed,
        val_fraction=0.3,
        test_fraction=0.3,
    )
    assert read_manifest(again) == rows


def test_prepare_dataset_max_side_reencodes_grayscale(tmp_path, kermany_dir, covid_dir):
    output = tmp_path / "small"
    prepare_dataset(output, kermany_dir=kermany_dir, covid_collection_dir=covid_dir, max_side=100)
    rows = read_manifest(output)
    assert rows
    for row in rows:
        png_source = row["source_path"].endswith(".png")
        assert Path(row["path"]).suffix == (".png" if png_source else ".jpg")
        with Image.open(output / row["path"]) as image:
            assert image.mode == "L"
            assert max(image.size) == 100
            assert image.size[0] / image.size[1] == pytest.approx(160 / 144, abs=0.02)

    never_upscaled = tmp_path / "large"
    prepare_dataset(never_upscaled, kermany_dir=kermany_dir, max_side=1000)
    with Image.open(never_upscaled / read_manifest(never_upscaled)[0]["path"]) as image:
        assert image.size == (160, 144)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("COVID", "LABEL=DIR"), ("TB=/tmp/x", "not one of"), ("=/tmp/x", "not one of")],
)
def test_parse_extra_rejects_bad_values(spec, message):
    with pytest.raises(DataPreparationError, match=message):
        parse_extra(spec)


def test_prepare_dataset_requires_a_source(tmp_path):
    with pytest.raises(DataPreparationError, match="at least one source"):
        prepare_dataset(tmp_path / "out")


def run_cli(*arguments) -> subprocess.CompletedProcess:
    """Run scripts/prepare_data.py from the repository root."""
    return subprocess.run(
        [sys.executable, str(SCRIPT.relative_to(REPO_ROOT)), *map(str, arguments)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_writes_dataset_and_summary(tmp_path, kermany_dir, covid_dir):
    output = tmp_path / "cli-out"
    result = run_cli("--kermany", kermany_dir, "--covid-collection", covid_dir, "--output", output, "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "Duplicate clusters dropped for conflicting labels: 1" in result.stdout
    assert "Unreadable files skipped: 2" in result.stdout
    assert "cohen: view L" in result.stdout
    assert list(read_manifest(output)[0]) == list(MANIFEST_COLUMNS)

    refused = run_cli("--kermany", kermany_dir, "--output", output)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: output folder")
    assert "--force" in refused.stderr

    forced = run_cli("--kermany", kermany_dir, "--output", output, "--force")
    assert forced.returncode == 0, forced.stderr
    assert {row["source"] for row in read_manifest(output)} == {"kermany"}
    assert not list((output / "train" / "COVID").iterdir())


@pytest.mark.parametrize(
    "arguments",
    [
        ("--kermany", "{bad}"),
        ("--covid-collection", "{bad}"),
        ("--extra", "TB={bad}"),
        ("--rsna", "{bad}"),
        (),
    ],
)
def test_cli_rejects_bad_input_with_one_line(tmp_path, arguments, capsys):
    # in-process (a fresh interpreter costs seconds); test_cli_writes_dataset_and_summary checks the real exit code
    script = load_script("prepare_data.py")
    bad = tmp_path / "not-kermany"
    save_image(bad / "random" / "x.jpeg", 1)
    argv = [*(argument.format(bad=bad) for argument in arguments), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        script.main(script.get_args_parser().parse_args(argv))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not (tmp_path / "out").exists()


def write_dicom(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", modality="CR") -> Path:
    """Write a single-frame grayscale DICOM file (8- or 16-bit), as the RSNA challenge ships its images."""
    from test_dicom import make_dataset, to_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_bytes(make_dataset(pixels, photometric=photometric, Modality=modality, PatientID=path.stem)))
    return path


@pytest.fixture
def rsna_dir(tmp_path, covid_dir) -> Path:
    """A miniature RSNA Pneumonia Detection Challenge download (stage 2 training set)."""
    root = tmp_path / "rsna-pneumonia-detection-challenge"
    images = root / "stage_2_train_images"
    rows = [
        ("normal-1", "Normal"),
        ("opacity-1", "Lung Opacity"),
        ("opacity-1", "Lung Opacity"),  # one row per opacity box
        ("opacity-2", "Lung Opacity"),
        ("other-1", "No Lung Opacity / Not Normal"),
        ("other-2", "No Lung Opacity / Not Normal"),
        ("missing-1", "Normal"),
        ("copy-of-normal-1", "Normal"),
        ("ct-1", "Normal"),
        ("conflict-1", "Normal"),
        ("conflict-1", "Lung Opacity"),
        ("../escape", "Normal"),
        ("cohen-normal", "Normal"),
    ]
    for seed, stem in enumerate(("normal-1", "opacity-1", "other-1", "other-2", "conflict-1"), start=700):
        write_dicom(images / f"{stem}.dcm", np.asarray(smooth_image(seed)))
    write_dicom(images / "copy-of-normal-1.dcm", np.asarray(smooth_image(700)))
    # 16-bit MONOCHROME1 without a window: decoded with a percentile window, then inverted.
    write_dicom(images / "opacity-2.dcm", (65535 - np.asarray(smooth_image(705), np.uint16) * 200), "MONOCHROME1")
    write_dicom(images / "ct-1.dcm", np.asarray(smooth_image(706)), modality="CT")
    # The film of the collection's normal.png, stored inverted: only a hash of the decoded image matches it.
    with Image.open(covid_dir / "images" / "normal.png") as image:
        write_dicom(images / "cohen-normal.dcm", 255 - np.asarray(image.convert("L")), "MONOCHROME1")
    write_dicom(root / "escape.dcm", np.asarray(smooth_image(707)))
    with (root / "stage_2_detailed_class_info.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientId", "class"])
        writer.writerows(rows)
    return root


def test_read_rsna_labels_patients_and_exclusions(rsna_dir):
    scan = read_rsna(rsna_dir)
    by_patient = {candidate.patient_id: candidate for candidate in scan.candidates}
    assert {patient: candidate.label for patient, candidate in by_patient.items()} == {
        "rsna:cohen-normal": "NORMAL",
        "rsna:copy-of-normal-1": "NORMAL",
        "rsna:ct-1": "NORMAL",
        "rsna:normal-1": "NORMAL",
        "rsna:opacity-1": "PNEUMONIA",
        "rsna:opacity-2": "PNEUMONIA",
    }
    assert dict(scan.exclusions) == {
        "rsna: class No Lung Opacity / Not Normal": 2,
        "rsna: image file missing": 1,
        "rsna: conflicting classes for one patientId": 1,
        "rsna: patientId is not a plain file name": 1,
    }
    opacity = by_patient["rsna:opacity-1"]
    assert (opacity.source_path, opacity.original_label, opacity.license) == (
        "stage_2_train_images/opacity-1.dcm",
        "Lung Opacity",
        RSNA_LICENSE,
    )


@pytest.mark.parametrize("layout", ["missing", "no-csv", "no-images", "wrong-columns"])
def test_read_rsna_rejects_bad_layout(tmp_path, layout):
    root = tmp_path / "rsna"
    if layout != "missing":
        root.mkdir()
    if layout in ("no-images", "wrong-columns"):
        (root / "stage_2_detailed_class_info.csv").write_text("patientId,Target\nabc,1\n")
    if layout in ("no-csv", "wrong-columns"):
        (root / "stage_2_train_images").mkdir()
    with pytest.raises(DataPreparationError, match="lacks the column" if layout == "wrong-columns" else "RSNA folder"):
        read_rsna(root)


def test_prepare_dataset_decodes_rsna_dicoms_into_pngs(tmp_path, rsna_dir, covid_dir):
    output = tmp_path / "out"
    report = prepare_dataset(output, covid_collection_dir=covid_dir, rsna_dir=rsna_dir, seed=0)
    rows = read_manifest(output)
    rsna_rows = {row["patient_id"]: row for row in rows if row["source"] == "rsna"}
    # Written as PNG, pixel for pixel what the upload decoder makes of the DICOM.
    for row in rsna_rows.values():
        assert row["path"].endswith(".png") and row["license"] == RSNA_LICENSE
        with Image.open(output / row["path"]) as written:
            decoded = decode_image((rsna_dir / row["source_path"]).read_bytes())
            np.testing.assert_array_equal(np.asarray(written), np.asarray(decoded))
    assert rsna_rows["rsna:opacity-2"]["label"] == "PNEUMONIA"
    assert rsna_rows["rsna:opacity-2"]["original_label"] == "Lung Opacity"
    # Exact copies inside RSNA: one kept. The inverted DICOM copy of the collection's film: the collection wins.
    assert len({"rsna:normal-1", "rsna:copy-of-normal-1"} & set(rsna_rows)) == 1
    assert "rsna:cohen-normal" not in rsna_rows
    assert any(row["source_path"] == "images/normal.png" for row in rows)
    assert report.duplicates_removed == 3  # the two pairs above and the collection's own re-encoded copy
    [(source, path, reason)] = [entry for entry in report.unreadable if entry[0] == "rsna"]
    assert path == "stage_2_train_images/ct-1.dcm" and "This DICOM is a CT image" in reason
    assert report.exclusions["rsna: class No Lung Opacity / Not Normal"] == 2
    assert_no_patient_crosses_splits(rows)


def test_prepare_dataset_max_side_applies_to_dicoms(tmp_path, rsna_dir):
    output = tmp_path / "small"
    prepare_dataset(output, rsna_dir=rsna_dir, max_side=100)
    rows = read_manifest(output)
    assert {row["source"] for row in rows} == {"rsna"}
    for row in rows:
        with Image.open(output / row["path"]) as image:
            assert (image.format, image.mode, max(image.size)) == ("PNG", "L", 100)


def test_extra_folders_may_hold_dicom_files(tmp_path):
    extra = tmp_path / "extra-normal"
    write_dicom(extra / "a.dcm", np.asarray(smooth_image(800)))
    save_image(extra / "b.png", 801)
    output = tmp_path / "out"
    prepare_dataset(output, extras=[("NORMAL", extra)], val_fraction=0.0, test_fraction=0.0)
    assert sorted(Path(row["path"]).name for row in read_manifest(output)) == ["extra_a.png", "extra_b.png"]


def test_cli_reads_rsna(tmp_path, rsna_dir):
    output = tmp_path / "cli-rsna"
    result = run_cli("--rsna", rsna_dir, "--output", output)
    assert result.returncode == 0, result.stderr
    assert "rsna: class No Lung Opacity / Not Normal" in result.stdout
    assert "  rsna    " in result.stdout  # the By source table
    assert {row["source"] for row in read_manifest(output)} == {"rsna"}


def test_compact_copy_keeps_folders_stems_and_manifest_rows_of_the_copied_splits(tmp_path):
    from conftest import write_image_folder

    from model.data import make_image_folder, read_manifest_sources

    source = write_image_folder(tmp_path / "cxr", per_class=(3, 2, 2), size=(300, 200))
    rows = [{"split": split, "label": label, "path": path.relative_to(source).as_posix(), "source_repo": f"repo-{i % 2}"}
            for i, path in enumerate(sorted(source.rglob("*.png")))
            for split, label in [path.relative_to(source).parts[:2]]]
    with open(source / "MANIFEST.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["split", "label", "path", "source_repo"])
        writer.writeheader()
        writer.writerows(rows)
    completed = subprocess.run(
        [sys.executable, "scripts/compact_data.py", "--data", source, "--output", tmp_path / "compact",
         "--max-side", "128", "--workers", "2"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    compact = tmp_path / "compact"
    assert not (compact / "test").exists()  # test never travels to a training machine
    copied = sorted(compact.rglob("*.jpg"))
    assert len(copied) == 3 * 3 + 2 * 3
    with Image.open(copied[0]) as image:
        assert image.mode == "L" and max(image.size) == 128 and image.size == (85, 128)  # 200 x 300 px, aspect kept
    assert make_image_folder(compact / "train").classes == ["COVID", "NORMAL", "PNEUMONIA"]
    sources = read_manifest_sources(compact / "MANIFEST.csv")
    expected = {row["path"].replace(".png", ".jpg"): row["source_repo"] for row in rows if row["split"] != "test"}
    assert {Path(path).relative_to(compact.resolve()).as_posix(): repo for path, repo in sources.items()} == expected
