"""Build the 3-class chest X-ray training set from public sources (images and DICOM), split by patient."""

from __future__ import annotations

import csv
import logging
import os
import random
import re
import shutil
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from model.errors import DataError, InvalidImageError
from model.decode import decode_image, looks_like_dicom

logger = logging.getLogger(__name__)

CLASS_NAMES = ("COVID", "NORMAL", "PNEUMONIA")
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "MANIFEST.csv"
MANIFEST_COLUMNS = (
    "split",
    "label",
    "path",
    "source",
    "source_path",
    "patient_id",
    "original_label",
    "license",
)

# Source tags, in order of preference when the same image appears in several sources:
# the collection copy carries per-image metadata, Kermany and RSNA carry patient ids, extras carry neither.
COLLECTION_SOURCE = "cohen"
KERMANY_SOURCE = "kermany"
RSNA_SOURCE = "rsna"
EXTRA_SOURCE = "extra"
SOURCE_PREFERENCE = (COLLECTION_SOURCE, KERMANY_SOURCE, RSNA_SOURCE, EXTRA_SOURCE)

KERMANY_LICENSE = "CC BY 4.0"
KERMANY_CLASS_FOLDERS = ("NORMAL", "PNEUMONIA")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".dcm")
# Suffixes copied byte for byte; anything else, DICOM included, is decoded and written as PNG.
IMAGE_FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png")

# RSNA Pneumonia Detection Challenge (stage 2): one DICOM per patientId, several CSV rows per patient.
RSNA_IMAGES_DIR = "stage_2_train_images"
RSNA_CLASS_INFO = "stage_2_detailed_class_info.csv"
RSNA_LABELS = {"Normal": "NORMAL", "Lung Opacity": "PNEUMONIA"}  # "No Lung Opacity / Not Normal" is left out
RSNA_LICENSE = "RSNA Pneumonia Detection Challenge terms"

FRONTAL_VIEWS = frozenset({"PA", "AP", "AP SUPINE", "AP SEMI ERECT", "AP ERECT"})
COVID_MARKERS = ("covid-19", "covid19", "sars-cov-2")
# Non-infectious or out-of-scope findings; checked before the pneumonia markers so that
# "Pneumonia/Lipoid" is left out rather than counted as PNEUMONIA.
EXCLUDED_FINDING_MARKERS = ("lipoid", "tuberculosis")
PNEUMONIA_MARKERS = (
    "pneumonia",
    "bacterial",
    "viral",
    "fungal",
    "streptococcus",
    "staphylococcus",
    "mrsa",
    "klebsiella",
    "legionella",
    "e.coli",
    "mycoplasma",
    "chlamydophila",
    "pneumocystis",
    "varicella",
    "influenza",
    "h1n1",
    "sars",
    "mers",
    "aspergillosis",
    "nocardia",
    "herpes",
)

HASH_SIZE = 16  # difference hash of HASH_SIZE x HASH_SIZE bits
DEFAULT_MAX_HAMMING = 10
JPEG_QUALITY = 95

_KERMANY_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_KERMANY_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_SAFE_FILE_STEM = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# InvalidImageError: a DICOM the upload decoder refuses (damaged, CT, multi-frame, no decoder plugin).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, InvalidImageError)


class DataPreparationError(DataError):
    """A source folder, option or output folder that the preparation cannot work with."""


@dataclass(frozen=True)
class Candidate:
    """One labelled image found in a source, before de-duplication."""

    source: str
    path: Path
    source_path: str
    label: str
    patient_id: str
    original_label: str
    license: str = ""


@dataclass
class SourceScan:
    """Images a source reader accepted, and how many it left out, by reason."""

    candidates: list[Candidate] = field(default_factory=list)
    exclusions: Counter = field(default_factory=Counter)


@dataclass
class DeduplicationResult:
    """Images kept after de-duplication, and the patient groups duplicates joined."""

    kept: list[Candidate]
    patient_groups: dict[str, str]
    duplicates_removed: int
    conflicting_clusters: int
    conflicting_images: int


@dataclass
class PreparationReport:
    """What a preparation run wrote and what it left out."""

    output_dir: Path
    counts: Counter = field(default_factory=Counter)
    source_counts: Counter = field(default_factory=Counter)
    patients_per_split: dict[str, int] = field(default_factory=dict)
    exclusions: Counter = field(default_factory=Counter)
    unreadable: list[tuple[str, str, str]] = field(default_factory=list)
    duplicates_removed: int = 0
    conflicting_clusters: int = 0
    conflicting_images: int = 0

    @property
    def total_images(self) -> int:
        """Number of images written."""
        return sum(self.counts.values())


def map_covid_finding(finding: str) -> str | None:
    """Map a COVID-19 image data collection finding to a class name, or None to leave it out."""
    text = " ".join(finding.lower().split())
    if any(marker in text for marker in COVID_MARKERS):
        return "COVID"
    if text == "no finding":
        return "NORMAL"
    if any(marker in text for marker in EXCLUDED_FINDING_MARKERS):
        return None
    # Hierarchical findings ("Pneumonia/Bacterial/Streptococcus") and lists ("SARS, ARDS")
    # are matched term by term, so "ARDS" alone stays out.
    terms = [term.strip() for term in re.split(r"[/,;]", text) if term.strip()]
    if any(marker in term for term in terms for marker in PNEUMONIA_MARKERS):
        return "PNEUMONIA"
    return None


def normalise_view(view: str) -> str:
    """Return a radiograph view in canonical form: upper case, single spaces, no dashes."""
    return " ".join(view.upper().replace("-", " ").replace("_", " ").split())


def is_frontal_view(view: str) -> bool:
    """Tell whether a view (PA, AP, AP Supine, AP semi erect) is a frontal chest view."""
    return normalise_view(view) in FRONTAL_VIEWS


def kermany_patient_id(stem: str) -> str:
    """Return the patient id encoded in a Kermany file stem (personN, IM-NNNN, NORMAL2-IM-NNNN)."""
    person = _KERMANY_PERSON.match(stem)
    if person:
        return person.group(1).lower()
    series = _KERMANY_IM.match(stem)
    if series:
        return series.group(1).upper()
    return stem


def kermany_original_label(stem: str, folder: str) -> str:
    """Return Kermany's own label for an image: "normal", "bacteria", "virus" or "pneumonia"."""
    if folder.upper() == "NORMAL":
        return "normal"
    person = _KERMANY_PERSON.match(stem)
    return person.group(2).lower() if person else "pneumonia"


def find_kermany_root(directory: Path) -> Path:
    """Find the folder holding Kermany's train/val/test folders, or raise DataPreparationError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataPreparationError(f"Kermany folder {directory} does not exist")
    for root in (directory, directory / "chest_xray", directory / "chest_xray" / "chest_xray"):
        if any((root / split / folder).is_dir() for split in SPLITS for folder in KERMANY_CLASS_FOLDERS):
            return root
    raise DataPreparationError(
        f"Kermany folder {directory} does not have the expected layout "
        "{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg (directly or under chest_xray/)"
    )


def read_kermany(directory: Path) -> SourceScan:
    """Read Kermany et al. "Chest X-Ray Images (Pneumonia)", discarding its own split."""
    root = find_kermany_root(directory)
    scan = SourceScan()
    for split in SPLITS:
        for folder in KERMANY_CLASS_FOLDERS:
            class_dir = root / split / folder
            if not class_dir.is_dir():
                continue
            for path in _image_files(class_dir, recursive=False):
                stem = path.stem
                original_label = kermany_original_label(stem, folder)
                if folder == "NORMAL" and _KERMANY_PERSON.match(stem):
                    scan.exclusions["kermany: file name contradicts its NORMAL folder"] += 1
                    continue
                scan.candidates.append(
                    Candidate(
                        source=KERMANY_SOURCE,
                        path=path,
                        source_path=path.relative_to(root).as_posix(),
                        label="NORMAL" if folder == "NORMAL" else "PNEUMONIA",
                        patient_id=f"{KERMANY_SOURCE}:{kermany_patient_id(stem)}",
                        original_label=original_label,
                        license=KERMANY_LICENSE,
                    )
                )
    if not scan.candidates and not scan.exclusions:
        raise DataPreparationError(f"Kermany folder {directory} holds no images")
    logger.info("Kermany: %d images under %s", len(scan.candidates), root)
    return scan


def read_covid_collection(directory: Path) -> SourceScan:
    """Read the COVID-19 image data collection (Cohen et al.): frontal X-rays of the 3 classes."""
    directory = Path(directory)
    metadata_path = directory / "metadata.csv"
    if not metadata_path.is_file():
        raise DataPreparationError(f"COVID-19 collection folder {directory} has no metadata.csv")
    scan = SourceScan()
    with metadata_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {(name or "").strip() for name in reader.fieldnames or ()}
        missing = {"patientid", "finding", "view", "modality", "filename"} - columns
        if missing:
            raise DataPreparationError(
                f"{metadata_path} lacks the column(s) {', '.join(sorted(missing))}"
            )
        for raw_row in reader:
            # Cells beyond the header land under the key None; they carry nothing we use.
            row = {key.strip(): (value or "").strip() for key, value in raw_row.items() if key is not None}
            candidate, reason = _collection_candidate(directory, row)
            if candidate is None:
                scan.exclusions[f"{COLLECTION_SOURCE}: {reason}"] += 1
            else:
                scan.candidates.append(candidate)
    logger.info("COVID-19 collection: %d usable rows in %s", len(scan.candidates), metadata_path)
    return scan


def _collection_candidate(directory: Path, row: dict[str, str]) -> tuple[Candidate | None, str]:
    """Turn one metadata.csv row into a candidate, or give the reason it is left out."""
    modality = row.get("modality", "")
    if modality.lower().replace("-", "").replace(" ", "") != "xray":
        return None, f"modality {modality or '(empty)'}"
    view = row.get("view", "")
    if not is_frontal_view(view):
        return None, f"view {normalise_view(view) or '(empty)'}"
    finding = row.get("finding", "")
    label = map_covid_finding(finding)
    if label is None:
        return None, f"finding {finding or '(empty)'}"
    filename = row.get("filename", "")
    folder = row.get("folder") or "images"
    path = directory / folder / filename
    if not filename or not path.is_file():
        return None, "image file missing"
    patient = row.get("patientid") or f"file-{Path(filename).stem}"
    return (
        Candidate(
            source=COLLECTION_SOURCE,
            path=path,
            source_path=f"{folder}/{filename}",
            label=label,
            patient_id=f"{COLLECTION_SOURCE}:{patient}",
            original_label=finding,
            license=row.get("license") or "unknown",
        ),
        "",
    )


def parse_extra(spec: str) -> tuple[str, Path]:
    """Parse an ``--extra LABEL=DIR`` value into (class name, folder)."""
    label, separator, folder = spec.partition("=")
    label = label.strip().upper()
    if not separator or not folder:
        raise DataPreparationError(f"--extra expects LABEL=DIR, got {spec!r}")
    if label not in CLASS_NAMES:
        raise DataPreparationError(
            f"--extra label {label!r} is not one of {', '.join(CLASS_NAMES)}"
        )
    return label, Path(folder)


def read_extra(label: str, directory: Path) -> SourceScan:
    """Read a folder of images that all have one label; each image is its own patient."""
    directory = Path(directory)
    if label not in CLASS_NAMES:
        raise DataPreparationError(f"extra label {label!r} is not one of {', '.join(CLASS_NAMES)}")
    if not directory.is_dir():
        raise DataPreparationError(f"extra folder {directory} does not exist")
    scan = SourceScan()
    for path in _image_files(directory, recursive=True):
        source_path = f"{directory.name}/{path.relative_to(directory).as_posix()}"
        scan.candidates.append(
            Candidate(
                source=EXTRA_SOURCE,
                path=path,
                source_path=source_path,
                label=label,
                patient_id=f"{EXTRA_SOURCE}:{source_path.rsplit('.', 1)[0]}",
                original_label=label,
                license="unknown",
            )
        )
    if not scan.candidates:
        raise DataPreparationError(f"extra folder {directory} holds no images")
    logger.info("extra %s: %d images under %s", label, len(scan.candidates), directory)
    return scan


def read_rsna(directory: Path) -> SourceScan:
    """Read the RSNA Pneumonia Detection Challenge: stage 2 training DICOMs and their detailed class info."""
    directory = Path(directory)
    class_info = directory / RSNA_CLASS_INFO
    images = directory / RSNA_IMAGES_DIR
    if not class_info.is_file() or not images.is_dir():
        raise DataPreparationError(
            f"RSNA folder {directory} does not have the expected layout {RSNA_CLASS_INFO} and {RSNA_IMAGES_DIR}/*.dcm"
        )
    classes: dict[str, set[str]] = defaultdict(set)
    with class_info.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"patientId", "class"} - {(name or "").strip() for name in reader.fieldnames or ()}
        if missing:
            raise DataPreparationError(f"{class_info} lacks the column(s) {', '.join(sorted(missing))}")
        for raw_row in reader:
            row = {key.strip(): (value or "").strip() for key, value in raw_row.items() if key is not None}
            if row.get("patientId"):
                # One row per opacity box: a patient with three boxes has three identical rows.
                classes[row["patientId"]].add(row.get("class", ""))
    scan = SourceScan()
    for patient in sorted(classes):
        candidate, reason = _rsna_candidate(images, patient, classes[patient])
        if candidate is None:
            scan.exclusions[f"{RSNA_SOURCE}: {reason}"] += 1
        else:
            scan.candidates.append(candidate)
    logger.info("RSNA: %d usable patients in %s", len(scan.candidates), class_info)
    return scan


def _rsna_candidate(images: Path, patient: str, classes: set[str]) -> tuple[Candidate | None, str]:
    """Turn one RSNA patientId and its classes into a candidate, or give the reason it is left out."""
    if len(classes) > 1:
        return None, "conflicting classes for one patientId"
    (original_label,) = classes
    label = RSNA_LABELS.get(original_label)
    if label is None:
        return None, f"class {original_label or '(empty)'}"
    # The patientId names the file (and equals the DICOM's PatientID); refuse ids that would leave the folder.
    if not _SAFE_FILE_STEM.match(patient):
        return None, "patientId is not a plain file name"
    path = images / f"{patient}.dcm"
    if not path.is_file():
        return None, "image file missing"
    return (
        Candidate(
            source=RSNA_SOURCE,
            path=path,
            source_path=f"{RSNA_IMAGES_DIR}/{path.name}",
            label=label,
            patient_id=f"{RSNA_SOURCE}:{patient}",
            original_label=original_label,
            license=RSNA_LICENSE,
        ),
        "",
    )


def _image_files(directory: Path, recursive: bool) -> list[Path]:
    """List image files in a folder, sorted, skipping hidden files such as macOS ``._`` forks."""
    pattern = "**/*" if recursive else "*"
    return sorted(
        path
        for path in directory.glob(pattern)
        if path.is_file()
        and path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )


def to_grayscale(image: Image.Image) -> Image.Image:
    """Convert a decoded image to 8-bit grayscale, stretching 16-bit and float images linearly."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(np.round((pixels - low) * scale).astype(np.uint8), "L")
    return image.convert("L")


def difference_hash(path: Path, hash_size: int = HASH_SIZE) -> np.ndarray:
    """Return the difference hash of an image file as packed bits (hash_size**2 bits)."""
    return _hash_and_size(path, hash_size)[0]


def _hash_and_size(path: Path, hash_size: int = HASH_SIZE) -> tuple[np.ndarray, int]:
    """Return an image file's difference hash and its full-resolution pixel count."""
    if is_dicom_file(path):
        # Hashed as the model will see it: windowed, MONOCHROME1 inverted, 8-bit.
        grayscale = decode_image(Path(path).read_bytes())
        width, height = grayscale.size
    else:
        with Image.open(path) as image:
            width, height = image.size
            # Decoding JPEGs at reduced scale is much faster and still reads the whole file,
            # so truncated files fail here as they would in training.
            image.draft("L", (hash_size * 8, hash_size * 8))
            image.load()
            grayscale = to_grayscale(image)
    thumbnail = np.asarray(
        grayscale.resize((hash_size + 1, hash_size), Image.Resampling.LANCZOS), dtype=np.int16
    )
    return np.packbits(thumbnail[:, 1:] > thumbnail[:, :-1]), width * height


def is_dicom_file(path: Path) -> bool:
    """Tell whether a file is DICOM Part 10 by its content (preamble and ``DICM``), not its name."""
    with Path(path).open("rb") as handle:
        return looks_like_dicom(handle.read(132))


def decode_grayscale(path: Path) -> tuple[Image.Image, str]:
    """Decode a source file to 8-bit grayscale and name its format; DICOM goes through the upload decoder."""
    if is_dicom_file(path):
        return decode_image(Path(path).read_bytes()), "DICOM"
    with Image.open(path) as image:
        image_format = image.format
        image.load()
        return to_grayscale(image), image_format


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int]]:
    """Return the index pairs i < j whose packed hashes differ in at most max_distance bits."""
    words = _as_words(hashes)
    # Compare a block of rows against all hashes at a time, keeping each block near 128 MB.
    block_rows = max(1, min(1024, (1 << 27) // max(1, words.nbytes)))
    pairs = []
    for start in range(0, len(words), block_rows):
        block = words[start : start + block_rows]
        distances = np.bitwise_count(block[:, None, :] ^ words[None, :, :]).sum(axis=2)
        rows, columns = np.nonzero(distances <= max_distance)
        rows = rows + start
        keep = columns > rows
        pairs.extend(zip(rows[keep].tolist(), columns[keep].tolist()))
    return pairs


def _as_words(hashes: np.ndarray) -> np.ndarray:
    """View packed hash bytes as 64-bit words (padding with zero bytes) for fast popcounts."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint8).reshape(len(hashes), -1)
    padding = (-hashes.shape[1]) % 8
    if padding:
        hashes = np.pad(hashes, ((0, 0), (0, padding)))
    return hashes.view(np.uint64)


class _UnionFind:
    """Disjoint sets over hashable keys, with deterministic representatives."""

    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, key):
        """Return the representative of key's set, adding key if it is new."""
        self.parent.setdefault(key, key)
        root = key
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[key] != root:
            self.parent[key], key = root, self.parent[key]
        return root

    def union(self, first, second) -> None:
        """Join the sets of first and second; the smaller representative wins."""
        first_root, second_root = self.find(first), self.find(second)
        if first_root != second_root:
            low, high = sorted((first_root, second_root))
            self.parent[high] = low


def _preference_key(candidate: Candidate) -> tuple[int, str]:
    """Sort key by source preference, then source path."""
    return SOURCE_PREFERENCE.index(candidate.source), candidate.source_path


def deduplicate(
    candidates: list[Candidate],
    hashes: np.ndarray,
    max_distance: int = DEFAULT_MAX_HAMMING,
    pixel_counts: list[int] | None = None,
) -> DeduplicationResult:
    """Keep one copy of each (near-)duplicate cluster; drop clusters whose labels disagree.

    The copy kept comes from the preferred source (collection, then Kermany, then extra),
    then has the most pixels, then the first source path.
    """
    pixel_counts = pixel_counts or [0] * len(candidates)
    pairs = near_duplicate_pairs(hashes, max_distance) if len(candidates) > 1 else []
    image_sets = _UnionFind()
    patients = _UnionFind()
    for index, candidate in enumerate(candidates):
        image_sets.find(index)
        patients.find(candidate.patient_id)
    for first, second in pairs:
        image_sets.union(first, second)
        # A duplicate pair is one patient as far as the split is concerned, even if the
        # two sources name that patient differently.
        patients.union(candidates[first].patient_id, candidates[second].patient_id)

    clusters: dict[int, list[int]] = defaultdict(list)
    for index in range(len(candidates)):
        clusters[image_sets.find(index)].append(index)

    kept: list[Candidate] = []
    duplicates_removed = conflicting_clusters = conflicting_images = 0
    for members in clusters.values():
        labels = {candidates[index].label for index in members}
        if len(labels) > 1:
            conflicting_clusters += 1
            conflicting_images += len(members)
            logger.warning(
                "dropping %d copies of one image with conflicting labels: %s",
                len(members),
                ", ".join(f"{candidates[i].source}:{candidates[i].source_path}={candidates[i].label}" for i in members),
            )
            continue
        best = min(
            members,
            key=lambda index: (
                SOURCE_PREFERENCE.index(candidates[index].source),
                -pixel_counts[index],
                candidates[index].source_path,
            ),
        )
        kept.append(candidates[best])
        duplicates_removed += len(members) - 1
    kept.sort(key=_preference_key)
    patient_groups = {candidate.patient_id: patients.find(candidate.patient_id) for candidate in candidates}
    return DeduplicationResult(kept, patient_groups, duplicates_removed, conflicting_clusters, conflicting_images)


def split_patient_groups(
    items: list[Candidate],
    patient_groups: dict[str, str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, str]:
    """Assign each patient group to train/val/test, stratified by class and source; deterministic."""
    _check_fractions(val_fraction, test_fraction)
    members: dict[str, list[Candidate]] = defaultdict(list)
    for item in items:
        members[patient_groups.get(item.patient_id, item.patient_id)].append(item)

    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for group, group_items in members.items():
        label = _majority(item.label for item in group_items)
        source = _majority(item.source for item in group_items)
        strata[(label, source)].append(group)

    targets = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    for stratum in sorted(strata):
        groups = sorted(strata[stratum])
        rng.shuffle(groups)
        assigned = dict.fromkeys(SPLITS, 0)
        for group in groups:
            size = len(members[group])
            total = sum(assigned.values()) + size
            # Give the group to the split furthest below its share; ties go to train first.
            split = max(SPLITS, key=lambda name: targets[name] * total - assigned[name])
            assignment[group] = split
            assigned[split] += size
    return assignment


def _majority(values) -> str:
    """Most common value; ties broken alphabetically so the choice is deterministic."""
    counts = Counter(values)
    return min(counts, key=lambda value: (-counts[value], value))


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise DataPreparationError unless the validation and test fractions leave a training set."""
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0):
        raise DataPreparationError("--val and --test must each be in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise DataPreparationError("--val plus --test must be below 1 so that train is not empty")


def check_output_dir(output_dir: Path, force: bool, source_dirs: list[Path]) -> None:
    """Refuse a non-empty output folder without force, and one that overlaps a source folder."""
    output = Path(output_dir).resolve()
    for source in source_dirs:
        source = Path(source).resolve()
        if output == source or source in output.parents or output in source.parents:
            raise DataPreparationError(f"output folder {output_dir} overlaps the source folder {source}")
    if output.exists() and not output.is_dir():
        raise DataPreparationError(f"output {output_dir} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise DataPreparationError(f"output folder {output_dir} is not empty (use --force to replace it)")


def _clear_previous_output(output_dir: Path) -> None:
    """Remove what an earlier run wrote (split folders and manifest), leaving other files alone."""
    for split in SPLITS:
        if (output_dir / split).is_dir():
            shutil.rmtree(output_dir / split)
    (output_dir / MANIFEST_NAME).unlink(missing_ok=True)


def _output_name(candidate: Candidate, suffix: str, used: set[str]) -> str:
    """Return a unique, traceable file name ``<source>_<original-stem><suffix>``."""
    stem = _UNSAFE_NAME_CHARS.sub("-", Path(candidate.source_path).stem).strip("-.") or "image"
    base = f"{candidate.source}_{stem}"
    name, counter = f"{base}{suffix}", 2
    while name.lower() in used:
        name, counter = f"{base}_{counter}{suffix}", counter + 1
    used.add(name.lower())
    return name


def _write_image(candidate: Candidate, destination_dir: Path, max_side: int | None, used: set[str]) -> Path | None:
    """Copy or re-encode one image into destination_dir; return the written path, or None if undecodable."""
    suffix = candidate.path.suffix.lower()
    if max_side is None and suffix in IMAGE_FOLDER_SUFFIXES and not is_dicom_file(candidate.path):
        destination = destination_dir / _output_name(candidate, suffix, used)
        shutil.copyfile(candidate.path, destination)
        return destination
    try:
        grayscale, image_format = decode_grayscale(candidate.path)
    except _IMAGE_ERRORS as error:
        logger.warning("skipping unreadable %s image %s (%s)", candidate.source, candidate.path, error)
        return None
    if max_side is not None and max(grayscale.size) > max_side:
        scale = max_side / max(grayscale.size)
        size = tuple(max(1, round(side * scale)) for side in grayscale.size)
        grayscale = grayscale.resize(size, Image.Resampling.LANCZOS)
    if image_format == "JPEG":
        destination = destination_dir / _output_name(candidate, ".jpg", used)
        grayscale.save(destination, "JPEG", quality=JPEG_QUALITY)
    else:
        destination = destination_dir / _output_name(candidate, ".png", used)
        grayscale.save(destination, "PNG", optimize=True)
    return destination


def _fingerprint(candidate: Candidate) -> tuple[np.ndarray, int] | str:
    """Hash one image and count its pixels, or return why it cannot be read."""
    try:
        return _hash_and_size(candidate.path)
    except _IMAGE_ERRORS as error:
        return f"{type(error).__name__}: {error}"


def prepare_dataset(
    output_dir: Path,
    kermany_dir: Path | None = None,
    covid_collection_dir: Path | None = None,
    extras: list[tuple[str, Path]] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    max_side: int | None = None,
    force: bool = False,
    max_hamming: int = DEFAULT_MAX_HAMMING,
    workers: int = 4,
    rsna_dir: Path | None = None,
) -> PreparationReport:
    """Read the sources, de-duplicate, split by patient and write the ImageFolder and MANIFEST.csv."""
    extras = list(extras or [])
    if kermany_dir is None and covid_collection_dir is None and rsna_dir is None and not extras:
        raise DataPreparationError("give at least one source: --kermany, --covid-collection, --rsna or --extra")
    _check_fractions(val_fraction, test_fraction)
    if max_side is not None and max_side < 1:
        raise DataPreparationError("--max-side must be a positive number of pixels")
    if max_hamming < 0:
        raise DataPreparationError("--max-hamming must not be negative")
    output_dir = Path(output_dir)
    source_dirs = [path for path in (kermany_dir, covid_collection_dir, rsna_dir) if path is not None]
    source_dirs += [folder for _, folder in extras]
    check_output_dir(output_dir, force, source_dirs)

    scans = []
    if covid_collection_dir is not None:
        scans.append(read_covid_collection(covid_collection_dir))
    if kermany_dir is not None:
        scans.append(read_kermany(kermany_dir))
    if rsna_dir is not None:
        scans.append(read_rsna(rsna_dir))
    scans.extend(read_extra(label, folder) for label, folder in extras)

    report = PreparationReport(output_dir=output_dir)
    candidates: list[Candidate] = []
    for scan in scans:
        candidates.extend(scan.candidates)
        report.exclusions.update(scan.exclusions)

    logger.info("hashing %d images", len(candidates))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        fingerprints = list(pool.map(_fingerprint, candidates))
    readable, hashes, pixel_counts = [], [], []
    for candidate, fingerprint in zip(candidates, fingerprints):
        if isinstance(fingerprint, str):
            logger.warning("skipping unreadable %s image %s (%s)", candidate.source, candidate.path, fingerprint)
            report.unreadable.append((candidate.source, candidate.source_path, fingerprint))
        else:
            readable.append(candidate)
            hashes.append(fingerprint[0])
            pixel_counts.append(fingerprint[1])
    if not readable:
        raise DataPreparationError("no readable images were found in the given sources")

    dedup = deduplicate(readable, np.stack(hashes), max_hamming, pixel_counts)
    report.duplicates_removed = dedup.duplicates_removed
    report.conflicting_clusters = dedup.conflicting_clusters
    report.conflicting_images = dedup.conflicting_images
    assignment = split_patient_groups(dedup.kept, dedup.patient_groups, val_fraction, test_fraction, seed)

    _write_output(output_dir, dedup, assignment, max_side, force, report)
    return report


def _write_output(
    output_dir: Path,
    dedup: DeduplicationResult,
    assignment: dict[str, str],
    max_side: int | None,
    force: bool,
    report: PreparationReport,
) -> None:
    """Write the ImageFolder tree and MANIFEST.csv, filling in the report's counts."""
    if force:
        _clear_previous_output(output_dir)
    for split in SPLITS:
        for label in CLASS_NAMES:
            (output_dir / split / label).mkdir(parents=True, exist_ok=True)

    rows = []
    used_names: set[str] = set()
    patients: dict[str, set[str]] = {split: set() for split in SPLITS}
    for candidate in dedup.kept:
        split = assignment[dedup.patient_groups[candidate.patient_id]]
        written = _write_image(candidate, output_dir / split / candidate.label, max_side, used_names)
        if written is None:
            # It was hashed at reduced scale; a full decode for re-encoding can still fail.
            report.unreadable.append((candidate.source, candidate.source_path, "cannot be decoded in full"))
            continue
        rows.append(
            {
                "split": split,
                "label": candidate.label,
                "path": written.relative_to(output_dir).as_posix(),
                "source": candidate.source,
                "source_path": candidate.source_path,
                "patient_id": candidate.patient_id,
                "original_label": candidate.original_label,
                "license": candidate.license,
            }
        )
        report.counts[(split, candidate.label)] += 1
        report.source_counts[(candidate.source, candidate.label)] += 1
        patients[split].add(candidate.patient_id)
    report.patients_per_split = {split: len(ids) for split, ids in patients.items()}

    rows.sort(key=lambda row: (SPLITS.index(row["split"]), row["label"], row["path"]))
    temporary = output_dir / f".{MANIFEST_NAME}.tmp"
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, output_dir / MANIFEST_NAME)
    logger.info("wrote %d images and %s to %s", len(rows), MANIFEST_NAME, output_dir)


def format_summary(report: PreparationReport) -> str:
    """Render a report as plain-text tables for the terminal."""
    lines = [f"Prepared {report.total_images} images in {report.output_dir}", ""]
    header = f"{'split':<8}" + "".join(f"{label:>11}" for label in CLASS_NAMES) + f"{'total':>9}{'patients':>10}"
    lines += [header, "-" * len(header)]
    for split in SPLITS:
        counts = [report.counts[(split, label)] for label in CLASS_NAMES]
        lines.append(
            f"{split:<8}"
            + "".join(f"{count:>11}" for count in counts)
            + f"{sum(counts):>9}{report.patients_per_split.get(split, 0):>10}"
        )
    totals = [sum(report.counts[(split, label)] for split in SPLITS) for label in CLASS_NAMES]
    lines.append(f"{'total':<8}" + "".join(f"{count:>11}" for count in totals) + f"{sum(totals):>9}")
    if sum(totals):
        shares = ", ".join(f"{label} {count / sum(totals):.0%}" for label, count in zip(CLASS_NAMES, totals))
        lines.append(f"class balance (not adjusted): {shares}")

    empty = [f"{split}/{label}" for split in SPLITS for label in CLASS_NAMES if not report.counts[(split, label)]]
    if empty:
        lines.append(f"warning: empty class folders: {', '.join(empty)}")

    lines += ["", "By source:"]
    for source in SOURCE_PREFERENCE:
        counts = [report.source_counts[(source, label)] for label in CLASS_NAMES]
        if sum(counts):
            lines.append(f"  {source:<8}" + ", ".join(f"{label} {count}" for label, count in zip(CLASS_NAMES, counts)))

    lines += ["", "Excluded, by reason:"]
    if report.exclusions:
        for reason, count in sorted(report.exclusions.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  {count:>6}  {reason}")
    else:
        lines.append("  none")
    lines += [
        "",
        f"Duplicate copies removed (one copy kept): {report.duplicates_removed}",
        f"Duplicate clusters dropped for conflicting labels: {report.conflicting_clusters}"
        f" ({report.conflicting_images} images)",
        f"Unreadable files skipped: {len(report.unreadable)}",
    ]
    lines += [f"  {source}: {path} ({reason})" for source, path, reason in report.unreadable]
    return "\n".join(lines)


def compact_copy(
    data_root: Path,
    output_dir: Path,
    splits: tuple[str, ...] = ("train", "val"),
    max_side: int = 256,
    quality: int = 90,
    workers: int = 4,
) -> dict[str, int]:
    """Re-encode ``splits`` of an ImageFolder as grayscale JPEGs with the longer side at most ``max_side`` px.

    For a machine that cannot read the original (a lent GPU gets only the working tree): the class folders
    and the file stems stay, and MANIFEST.csv keeps the copied images' rows with their new paths, so
    ``--sampler source`` and the audit still find each image's source. Returns images written per split.
    """
    data_root, output_dir = Path(data_root), Path(output_dir)
    if output_dir.resolve() == data_root.resolve():
        raise DataPreparationError("--output must differ from --data")
    jobs = []
    for split in splits:
        split_dir = data_root / split
        if not split_dir.is_dir():
            raise DataPreparationError(f"no {split}/ folder in {data_root}")
        for path in sorted(split_dir.glob("*/*")):
            if path.suffix.lower() in IMAGE_FOLDER_SUFFIXES:
                relative = path.relative_to(data_root)
                jobs.append((path, output_dir / relative.with_suffix(".jpg")))
    if not jobs:
        raise DataPreparationError(f"no images under {', '.join(splits)} in {data_root}")

    def write(job):
        source, destination = job
        with Image.open(source) as image:
            grayscale = to_grayscale(image)
        if max(grayscale.size) > max_side:
            grayscale.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        destination.parent.mkdir(parents=True, exist_ok=True)
        grayscale.save(destination, "JPEG", quality=quality)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(write, jobs))

    renamed = {source.relative_to(data_root).as_posix(): destination.relative_to(output_dir).as_posix()
               for source, destination in jobs}
    manifest = data_root / "MANIFEST.csv"
    if manifest.is_file():
        with manifest.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [{**row, "path": renamed[row["path"]]} for row in reader if row.get("path") in renamed]
            fieldnames = reader.fieldnames or []
        with (output_dir / "MANIFEST.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
    return dict(Counter(source.relative_to(data_root).parts[0] for source, _ in jobs))
