"""ImageFolder datasets read through the same decoder as the app, with layout checks and class weights."""

import csv
import logging
import re
from collections import Counter
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder

from model.errors import DataError
from model.decode import decode_image

logger = logging.getLogger(__name__)

# DICOM files are recognised by content in decode_image; the suffix only lets ImageFolder list them.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm")


def load_image(path):
    """Read an image file through the upload decoder, so training sees what serving sees."""
    return decode_image(Path(path).read_bytes())


def make_image_folder(root, transform=None, *, class_names=None):
    """Return an ``ImageFolder`` over ``root`` (class sub-folders), checking the layout first.

    When ``class_names`` is given (e.g. from the checkpoint) the folder must hold exactly those classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    found = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not found:
        raise DataError(f"{root} has no class sub-folders (expected ImageFolder layout: {root}/<class>/<image>)")
    if class_names is not None and found != list(class_names):
        raise DataError(f"{root} has classes {found}, expected {list(class_names)}")
    empty = [name for name in found if not any(_is_image(path) for path in (root / name).rglob("*"))]
    if empty:
        raise DataError(f"{root}: class folder(s) without images: {', '.join(empty)}")
    return ImageFolder(str(root), transform=transform, loader=load_image, is_valid_file=_is_image)


def _is_image(path):
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS and not Path(path).name.startswith(".")


def class_counts(dataset):
    """Images per class name."""
    counts = Counter(dataset.targets)
    return {name: counts.get(index, 0) for index, name in enumerate(dataset.classes)}


def inverse_frequency_weights(dataset):
    """Per-class loss weights proportional to 1 / frequency, averaging 1."""
    counts = torch.tensor([max(count, 1) for count in class_counts(dataset).values()], dtype=torch.float32)
    weights = counts.sum() / (len(counts) * counts)
    return weights


def read_manifest_sources(manifest_path):
    """Map each image of a MANIFEST.csv (by resolved path, so symlinked copies match) to its ``source_repo``."""
    manifest_path = Path(manifest_path)
    manifest_root = manifest_path.resolve().parent
    with manifest_path.open(newline="") as handle:
        return {
            str((manifest_root / row["path"]).resolve()): row.get("source_repo") or row.get("source") or "unknown"
            for row in csv.DictReader(handle)
        }


def sample_sources(dataset, sources):
    """The source of each image of ``dataset`` (``sources`` from ``read_manifest_sources``; "unknown" if absent)."""
    return [sources.get(str(Path(path).resolve()), "unknown") for path, _ in dataset.samples]


def source_balanced_weights(dataset, sources):
    """Per-sample weights so that each (class, source) group is drawn equally often within its class."""
    return group_balanced_weights(dataset.targets, sample_sources(dataset, sources), min_group=1)


# Groups with fewer training films than this keep their natural share of their class instead of an equal one:
# drawing 11 films a quarter of the time would learn those films, not their source.
MIN_BALANCED_GROUP = 100


def group_balanced_weights(targets, sources, *, min_group=MIN_BALANCED_GROUP, balance=1.0):
    """Per-film sampling weights (summing to 1): each class an equal share; inside a class, each source group of at
    least ``min_group`` films an equal share of what smaller groups leave (smaller groups keep their natural share).

    ``balance`` blends this with drawing every film equally often: 1 is fully group-balanced, 0 the natural mix.
    """
    groups = list(zip(targets, sources))
    sizes = Counter(groups)
    class_sizes = Counter(targets)
    share = {}
    for target in class_sizes:
        members = {group: size for group, size in sizes.items() if group[0] == target}
        small = {group: size / class_sizes[target] for group, size in members.items() if size < min_group}
        large = [group for group in members if group not in small]
        share.update(small)
        left = 1.0 - sum(small.values())
        share.update({group: left / len(large) for group in large} if large else {})
    weights = torch.tensor([share[group] / sizes[group] / len(class_sizes) for group in groups], dtype=torch.double)
    return balance * weights + (1.0 - balance) / len(groups)


AGE_PATTERN = re.compile(r"\bage (\d{1,3})\b")
# Age bands for subgroup reports: adults split where chest findings and film technique change most.
AGE_BANDS = ((0, 18, "<18"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 200, "60+"))


def read_manifest_groups(manifest_path):
    """Map each image of a MANIFEST.csv (by resolved path) to its subgroups: ``{"source": tag, "age_band": band}``.

    The source is the file name's tag before the first underscore (``nih_...`` -> ``nih``), else ``source_repo``;
    the age band comes from an ``age N`` in ``original_label`` (NIH rows carry it) and is None where unknown.
    """
    manifest_path = Path(manifest_path)
    manifest_root = manifest_path.resolve().parent
    groups = {}
    with manifest_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            name = Path(row["path"]).name
            source = name.split("_", 1)[0] if "_" in name else (row.get("source_repo") or "unknown")
            match = AGE_PATTERN.search(row.get("original_label") or "")
            band = None
            if match:
                age = int(match.group(1))
                band = next(label for low, high, label in AGE_BANDS if low <= age < high)
            groups[str((manifest_root / row["path"]).resolve())] = {"source": source, "age_band": band}
    return groups
