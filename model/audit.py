"""Shortcut audit: per-source metrics, perturbation stability, a source probe on features, leave-one-source-out."""

import argparse
import dataclasses
import io
import json
import logging
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset

from model.checkpoint import build_model_from_checkpoint, load_checkpoint
from model.data import load_image, make_image_folder, read_manifest_sources
from model.engine import predict_logits
from model.errors import DataError
from model.metrics import _pyplot, compute_metrics, softmax
from model.transforms import build_eval_transform

logger = logging.getLogger(__name__)

UNKNOWN_SOURCE = "unknown"
MIN_PROBE_IMAGES = 10
PROBE_FOLDS = 5
PROBE_BOOTSTRAP = 2000
MIN_LOSO_TRAIN_IMAGES = 50
REPORT_NAME = "audit.md"
PER_SOURCE_PLOT = "per_source_accuracy.png"
FLIP_RATE_PLOT = "perturbation_flip_rates.png"
EXAMPLES_PLOT = "perturbation_examples.png"


# --------------------------------------------------------------------------------------------------
# Images and their sources


@dataclasses.dataclass
class AuditSplit:
    """The images of one ImageFolder split with class index and short source tag per image."""

    paths: list
    targets: np.ndarray
    sources: list
    class_names: list
    source_repos: dict  # short tag -> source_repo
    images: list = None  # decoded grayscale PIL images, filled by ``decode``

    def decode(self):
        """Decode every image once through the upload decoder (the perturbations start from these)."""
        logger.info("decoding %d images", len(self.paths))
        self.images = [load_image(path) for path in self.paths]
        return self


def default_manifest(data_dir):
    """The MANIFEST.csv of a dataset root, given one of its splits (``DIR/../MANIFEST.csv``)."""
    return Path(data_dir).resolve().parent / "MANIFEST.csv"


def source_tags(repos_by_path):
    """Short tag per source_repo: the shared file-name prefix (``cohen_x.jpg`` -> ``cohen``), else the repo name."""
    names_by_repo = {}
    for path, repo in repos_by_path.items():
        names_by_repo.setdefault(repo, []).append(Path(path).name)
    tags = {}
    for repo, names in names_by_repo.items():
        prefixes = {name.split("_", 1)[0] for name in names if "_" in name}
        if len(prefixes) == 1 and all("_" in name for name in names):
            tags[repo] = prefixes.pop()
        else:
            tags[repo] = repo.rstrip("/").rsplit("/", 1)[-1]
    counts = Counter(tags.values())
    return {repo: (tag if counts[tag] == 1 else repo) for repo, tag in tags.items()}


def image_sources(paths, manifest, data_root):
    """Short source tag per image path (``unknown`` when the manifest lacks it) and the tag -> repo map."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"manifest not found: {manifest} (pass --manifest; the audit needs source_repo per image)")
    repos_by_path = read_manifest_sources(manifest)
    repos = [repos_by_path.get(str(Path(path).resolve()), UNKNOWN_SOURCE) for path in paths]
    missing = repos.count(UNKNOWN_SOURCE)
    if missing:
        logger.warning("%d of %d images have no source in %s; they are grouped as %r",
                       missing, len(paths), manifest, UNKNOWN_SOURCE)
    tags_by_repo = source_tags(dict(zip(paths, repos)))
    return [tags_by_repo[repo] for repo in repos], {tag: repo for repo, tag in tags_by_repo.items()}


def stratified_subset(groups, limit, seed=0):
    """Indices of a seeded subset of ``limit`` items keeping each group's share (largest remainder)."""
    groups = list(groups)
    if limit is None or limit >= len(groups):
        return list(range(len(groups)))
    members = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    keys = sorted(members, key=str)
    shares = np.array([limit * len(members[key]) / len(groups) for key in keys])
    quotas = np.floor(shares).astype(int)
    for position in np.argsort(-(shares - quotas), kind="stable")[: limit - quotas.sum()]:
        quotas[position] += 1
    rng = np.random.default_rng(seed)
    chosen = []
    for key, quota in zip(keys, quotas):
        chosen.extend(rng.permutation(members[key])[:quota].tolist())
    return sorted(chosen)


def load_split(data_dir, class_names, manifest=None, *, limit=None, seed=0):
    """Read an ImageFolder split and its sources; ``limit`` keeps a class-and-source-stratified seeded subset."""
    dataset = make_image_folder(data_dir, class_names=class_names)
    paths = [path for path, _ in dataset.samples]
    targets = np.array([target for _, target in dataset.samples], dtype=np.int64)
    sources, source_repos = image_sources(paths, manifest or default_manifest(data_dir), data_dir)
    keep = stratified_subset(zip(targets.tolist(), sources), limit, seed)
    kept_sources = [sources[index] for index in keep]
    return AuditSplit(
        paths=[paths[index] for index in keep],
        targets=targets[keep],
        sources=kept_sources,
        class_names=list(class_names),
        source_repos={tag: repo for tag, repo in source_repos.items() if tag in set(kept_sources)},
    )


# --------------------------------------------------------------------------------------------------
# Acquisition-like perturbations (deterministic given the seed)


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """A named change of a grayscale PIL image; ``apply(image, rng)`` must not modify ``image``."""

    name: str
    description: str
    apply: object

    def __call__(self, image, rng):
        return self.apply(image, rng)


def _gamma(gamma):
    table = [round(255 * (value / 255) ** gamma) for value in range(256)]
    return lambda image, rng: image.point(table)


def _offset(delta):
    table = [min(255, max(0, value + delta)) for value in range(256)]
    return lambda image, rng: image.point(table)


def _contrast(factor):
    return lambda image, rng: ImageEnhance.Contrast(image).enhance(factor)


def _blur(relative_radius):
    return lambda image, rng: image.filter(ImageFilter.GaussianBlur(radius=relative_radius * max(image.size)))


def _sharpen(image, rng):
    return image.filter(ImageFilter.UnsharpMask(radius=2, percent=150, threshold=2))


def _noise(sigma):
    def apply(image, rng):
        pixels = np.asarray(image, dtype=np.float32)
        noisy = pixels + rng.normal(0.0, sigma, pixels.shape)
        return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), mode="L")

    return apply


def _jpeg(quality):
    def apply(image, rng):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("L")

    return apply


def _down_up(factor):
    def apply(image, rng):
        small = image.resize((max(8, round(image.width * factor)), max(8, round(image.height * factor))),
                             Image.BILINEAR)
        return small.resize(image.size, Image.BILINEAR)

    return apply


def _border_crop(fraction):
    def apply(image, rng):
        left, top = round(image.width * fraction), round(image.height * fraction)
        return image.crop((left, top, image.width - left, image.height - top))

    return apply


def _border_pad(fraction):
    def apply(image, rng):
        border = (round(image.width * fraction), round(image.height * fraction)) * 2
        return ImageOps.expand(image, border=border, fill=0)

    return apply


def _text(text, corner):
    def apply(image, rng):
        image = image.copy()
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=max(10, round(0.07 * image.height)))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        margin = round(0.04 * min(image.size))
        x = margin if corner == "left" else image.width - margin - (right - left)
        draw.text((x - left, margin - top), text, fill=255, font=font)
        return image

    return apply


def _arrow_marker(image, rng):
    """A bright arrow in the upper right field pointing down-left, like those drawn on published figures."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    width, height = image.size
    unit = 0.06 * min(width, height)
    tip = (0.68 * width, 0.42 * height)
    tail = (tip[0] + 2.2 * unit, tip[1] - 2.2 * unit)
    draw.line([tail, (tip[0] + 0.5 * unit, tip[1] - 0.5 * unit)], fill=255, width=max(2, round(0.25 * unit)))
    draw.polygon([tip, (tip[0] + 1.1 * unit, tip[1] - 0.2 * unit), (tip[0] + 0.2 * unit, tip[1] - 1.1 * unit)],
                 fill=255)
    return image


def _square_marker(image, rng):
    image = image.copy()
    side = max(3, round(0.05 * min(image.size)))
    left, top = round(0.85 * image.width) - side, round(0.85 * image.height) - side
    ImageDraw.Draw(image).rectangle([left, top, left + side, top + side], fill=255)
    return image


def _rotate(degrees):
    return lambda image, rng: image.rotate(degrees, resample=Image.BILINEAR, fillcolor=0)


def perturbation_suite():
    """The fixed audit suite of acquisition-like changes, applied before the checkpoint's eval transform."""
    return [
        Perturbation("gamma_0.6", "gamma 0.6 (brighter mid-tones)", _gamma(0.6)),
        Perturbation("gamma_1.6", "gamma 1.6 (darker mid-tones)", _gamma(1.6)),
        Perturbation("contrast_down", "contrast x0.7 around the mean", _contrast(0.7)),
        Perturbation("contrast_up", "contrast x1.4 around the mean", _contrast(1.4)),
        Perturbation("brightness_down", "brightness -25 grey levels", _offset(-25)),
        Perturbation("brightness_up", "brightness +25 grey levels", _offset(25)),
        Perturbation("blur", "Gaussian blur, radius 0.8% of the longer side", _blur(0.008)),
        Perturbation("sharpen", "unsharp mask, radius 2, 150%", _sharpen),
        Perturbation("noise", "Gaussian sensor noise, sigma 8 grey levels (seeded per image)", _noise(8.0)),
        Perturbation("jpeg_q30", "JPEG re-compression, quality 30", _jpeg(30)),
        Perturbation("jpeg_q60", "JPEG re-compression, quality 60", _jpeg(60)),
        Perturbation("resample_1/4", "down-sample to 1/4 then back up (bilinear)", _down_up(0.25)),
        Perturbation("resample_1/2", "down-sample to 1/2 then back up (bilinear)", _down_up(0.5)),
        Perturbation("border_crop_7", "crop 7% from every border", _border_crop(0.07)),
        Perturbation("border_pad_7", "pad 7% black border on every side", _border_pad(0.07)),
        Perturbation("text_L", "burned-in white 'L' in the top-left corner", _text("L", "left")),
        Perturbation("text_PORTABLE", "burned-in white 'PORTABLE' in the top-right corner", _text("PORTABLE", "right")),
        Perturbation("marker_arrow", "bright arrow pointing into the right-hand lung field", _arrow_marker),
        Perturbation("marker_square", "small bright square, lower right", _square_marker),
        Perturbation("rotate_+5", "rotation +5 degrees (black fill)", _rotate(5)),
        Perturbation("rotate_-5", "rotation -5 degrees (black fill)", _rotate(-5)),
    ]


def perturbation_rng(seed, perturbation_name, path):
    """Per-image generator keyed by seed, perturbation and file name, so any subset sees the same noise."""
    return np.random.default_rng([seed, zlib.crc32(perturbation_name.encode()), zlib.crc32(Path(path).name.encode())])


# --------------------------------------------------------------------------------------------------
# Batched forward passes with pooled features


class PerturbedImages(Dataset):
    """Decoded images, optionally perturbed, through the eval transform; yields (tensor, target)."""

    def __init__(self, split, transform, perturbation=None, seed=0):
        self.split, self.transform, self.perturbation, self.seed = split, transform, perturbation, seed

    def __len__(self):
        return len(self.split.paths)

    def __getitem__(self, index):
        image = self.split.images[index]
        if self.perturbation is not None:
            rng = perturbation_rng(self.seed, self.perturbation.name, self.split.paths[index])
            image = self.perturbation(image, rng)
        return self.transform(image), int(self.split.targets[index])


def predict_split(network, transform, split, *, perturbation=None, seed=0, batch_size=32, workers=0, device="cpu"):
    """Logits and pooled penultimate features (global average of the last block = the input of ``fc``)."""
    loader = DataLoader(PerturbedImages(split, transform, perturbation, seed), batch_size=batch_size,
                        shuffle=False, num_workers=workers)
    logits, features, _ = predict_logits(network, loader, torch.device(device), with_features=True)
    return logits, features


# --------------------------------------------------------------------------------------------------
# Part 1: per-source metrics


def per_source_metrics(targets, probabilities, sources, class_names):
    """Accuracy and per-class sensitivity within each source, and sensitivity per (class, source) group."""
    targets, probabilities, sources = np.asarray(targets), np.asarray(probabilities), np.asarray(sources)
    predictions = probabilities.argmax(axis=1)
    by_source = {}
    for source in sorted(set(sources.tolist())):
        mask = sources == source
        metrics = compute_metrics(targets[mask], probabilities[mask], class_names)
        by_source[source] = {
            "n": metrics["n"],
            "accuracy": metrics["accuracy"],
            "per_class": {
                name: {"n": values["support"], "sensitivity": values["sensitivity"]}
                for name, values in metrics["per_class"].items() if values["support"]
            },
        }
    groups = []
    for index, name in enumerate(class_names):
        for source in sorted(set(sources[targets == index].tolist())):
            mask = (targets == index) & (sources == source)
            predicted = Counter(predictions[mask].tolist())
            groups.append({
                "class": name,
                "source": source,
                "n": int(mask.sum()),
                "sensitivity": float((predictions[mask] == index).mean()),
                "predicted": {other: int(predicted.get(k, 0)) for k, other in enumerate(class_names)},
            })
    return by_source, groups


# --------------------------------------------------------------------------------------------------
# Part 2: perturbation stability


def perturbation_stability(network, transform, split, clean_predictions, perturbations, *, seed=0, batch_size=32,
                           workers=0, device="cpu"):
    """Flip rate (prediction changed vs the clean one) and accuracy for each perturbation, overall and per source,
    and the sensitivity of each (class, source) group under it ("CLASS:SOURCE")."""
    sources = np.asarray(split.sources)
    groups = sorted({(int(target), source) for target, source in zip(split.targets, split.sources)})
    clean_accuracy = float((clean_predictions == split.targets).mean())
    results = {}
    for number, perturbation in enumerate(perturbations, start=1):
        logits, _ = predict_split(network, transform, split, perturbation=perturbation, seed=seed,
                                  batch_size=batch_size, workers=workers, device=device)
        predictions = logits.argmax(axis=1)
        flipped = predictions != clean_predictions
        accuracy = float((predictions == split.targets).mean())
        results[perturbation.name] = {
            "description": perturbation.description,
            "flip_rate": float(flipped.mean()),
            "accuracy": accuracy,
            "accuracy_change": accuracy - clean_accuracy,
            "flip_rate_by_source": {source: float(flipped[sources == source].mean())
                                    for source in sorted(set(split.sources))},
            "sensitivity_by_class_source": {
                f"{split.class_names[target]}:{source}":
                    float((predictions[(split.targets == target) & (sources == source)] == target).mean())
                for target, source in groups
            },
        }
        logger.info("perturbation %d/%d %s: flip rate %.3f, accuracy %.3f",
                    number, len(perturbations), perturbation.name, flipped.mean(), accuracy)
    return results


def summarise_stability(results):
    """Mean flip rate over the suite and the perturbation with the highest flip rate."""
    if not results:
        return {"mean_flip_rate": None, "worst": None, "worst_flip_rate": None}
    worst = max(results, key=lambda name: results[name]["flip_rate"])
    return {
        "mean_flip_rate": float(np.mean([values["flip_rate"] for values in results.values()])),
        "worst": worst,
        "worst_flip_rate": results[worst]["flip_rate"],
    }


# --------------------------------------------------------------------------------------------------
# Part 3: source probe


def source_probe(features, targets, sources, class_names, *, min_images=MIN_PROBE_IMAGES, folds=PROBE_FOLDS, seed=0):
    """Per class, cross-validated balanced accuracy of a logistic regression predicting the source from features.

    Only sources with at least ``min_images`` images of the class take part; a class needs two such sources.
    """
    features, targets, sources = np.asarray(features), np.asarray(targets), np.asarray(sources)
    results = {}
    for index, name in enumerate(class_names):
        counts = Counter(sources[targets == index].tolist())
        eligible = sorted(source for source, count in counts.items() if count >= min_images)
        excluded = {source: count for source, count in sorted(counts.items()) if source not in eligible}
        entry = {"sources": {source: counts[source] for source in eligible}, "excluded": excluded}
        if len(eligible) < 2:
            entry["skipped"] = f"needs two sources with >= {min_images} images"
            results[name] = entry
            continue
        mask = (targets == index) & np.isin(sources, eligible)
        labels = sources[mask]
        splits = min(folds, min(counts[source] for source in eligible))
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            predicted = cross_val_predict(classifier, features[mask], labels,
                                          cv=StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed))
        if any(issubclass(warning.category, ConvergenceWarning) for warning in caught):
            logger.warning("source probe for %s: logistic regression did not fully converge", name)
        entry.update({
            "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
            "ci95": bootstrap_balanced_accuracy(labels, predicted, seed=seed),
            "chance": 1.0 / len(eligible),
            "folds": splits,
            "n": int(mask.sum()),
        })
        results[name] = entry
    return results


def bootstrap_balanced_accuracy(labels, predicted, *, resamples=PROBE_BOOTSTRAP, level=0.95, seed=0):
    """Percentile interval of the balanced accuracy under a bootstrap of the images, stratified by true label.

    Balanced accuracy is the mean of the per-label recalls, and resampling the n images of one label with
    replacement draws that label's number of hits from Binomial(n, recall): the bootstrap is drawn that way.
    It measures how much the score depends on which images the split happens to hold, with the classifier's
    out-of-fold predictions fixed; it does not include the spread between trained models (seeds).
    """
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    rng = np.random.default_rng(seed)
    recalls = []
    for label in np.unique(labels):
        mask = labels == label
        count = int(mask.sum())
        recalls.append(rng.binomial(count, float(np.mean(predicted[mask] == label)), size=resamples) / count)
    scores = np.mean(recalls, axis=0)
    tail = (1.0 - level) / 2.0
    return [float(np.quantile(scores, tail)), float(np.quantile(scores, 1.0 - tail))]


# --------------------------------------------------------------------------------------------------
# The audit run


def run_audit(checkpoint_path, data_dir, output_dir, *, manifest=None, limit=None, seed=0, batch_size=32, workers=2,
              device="cpu", perturbations=None, loso_json=None, min_probe_images=MIN_PROBE_IMAGES):
    """Run parts 1-3 on one split (and attach a LOSO result); write audit.md, audit.json and plots; return the dict.
    """
    started = time.perf_counter()
    checkpoint = load_checkpoint(checkpoint_path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    class_names = checkpoint["class_names"]
    manifest = Path(manifest) if manifest else default_manifest(data_dir)
    split = load_split(data_dir, class_names, manifest, limit=limit, seed=seed).decode()
    transform = build_eval_transform(checkpoint["transform"])
    network = build_model_from_checkpoint(checkpoint).to(device)
    options = {"batch_size": batch_size, "workers": workers, "device": device}

    logger.info("clean pass over %d images", len(split.paths))
    logits, features = predict_split(network, transform, split, **options)
    probabilities = softmax(logits, float(checkpoint.get("temperature", 1.0)))
    overall = compute_metrics(split.targets, probabilities, class_names)
    by_source, groups = per_source_metrics(split.targets, probabilities, split.sources, class_names)

    perturbations = perturbation_suite() if perturbations is None else perturbations
    stability = perturbation_stability(network, transform, split, probabilities.argmax(axis=1), perturbations,
                                       seed=seed, **options)
    logger.info("source probe on %d-dimensional pooled features", features.shape[1])
    probe = source_probe(features, split.targets, split.sources, class_names, min_images=min_probe_images, seed=seed)

    result = {
        "checkpoint": {
            "path": str(checkpoint_path),
            "arch": checkpoint["arch"],
            "model_name": checkpoint.get("model_name"),
            "model_version": checkpoint.get("model_version", checkpoint.get("created_at")),
            "recipe": checkpoint.get("recipe"),
            "transform": checkpoint["transform"],
        },
        "data": str(data_dir),
        "manifest": str(manifest),
        "limit": limit,
        "seed": seed,
        "n": len(split.paths),
        "class_names": class_names,
        "sources": split.source_repos,
        "overall": {key: overall[key] for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "n")},
        "per_source": by_source,
        "per_class_source": groups,
        "perturbations": stability,
        "perturbation_summary": summarise_stability(stability),
        "probe": probe,
        "loso": json.loads(Path(loso_json).read_text()) if loso_json else None,
        "wall_seconds": None,
    }
    result["wall_seconds"] = time.perf_counter() - started
    write_audit(result, output_dir)
    plot_perturbation_examples(split.images[0], split.paths[0], perturbations, output_dir / EXAMPLES_PLOT, seed=seed)
    return result


def write_audit(result, output_dir):
    """Write audit.json, audit.md and the two PNG plots into ``output_dir``."""
    output_dir = Path(output_dir)
    (output_dir / "audit.json").write_text(json.dumps(result, indent=2))
    plot_per_source(result, output_dir / PER_SOURCE_PLOT)
    plot_flip_rates(result, output_dir / FLIP_RATE_PLOT)
    (output_dir / REPORT_NAME).write_text(format_report(result))


# --------------------------------------------------------------------------------------------------
# Report


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)
    return "\n".join(lines)


def percent(value):
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_report(result):
    """The audit as a markdown document (all four parts; LOSO says how to add it when absent)."""
    checkpoint, class_names = result["checkpoint"], result["class_names"]
    transform = checkpoint["transform"]
    sources = sorted(result["per_source"])
    subset = f" (stratified subset, --limit {result['limit']}, seed {result['seed']})" if result["limit"] else ""
    lines = [
        "# Shortcut audit",
        "",
        f"- checkpoint: `{Path(checkpoint['path']).name}` ("
        + ", ".join(str(value) for value in (checkpoint["arch"], checkpoint.get("model_name"),
                                             checkpoint.get("recipe") and f"recipe {checkpoint['recipe']}",
                                             f"version {checkpoint.get('model_version')}") if value)
        + ")",
        f"- eval transform: {transform['image_size']} px, {transform['resize_mode']}, "
        f"intensity {transform['intensity']}",
        f"- data: `{result['data']}`, {result['n']} images{subset}",
        f"- sources: " + ", ".join(f"`{tag}` = {repo}" for tag, repo in sorted(result["sources"].items())),
        f"- overall accuracy {percent(result['overall']['accuracy'])}, macro-F1 {result['overall']['macro_f1']:.3f}",
        "",
        "## 1. Per-source metrics",
        "",
        "Sensitivity of one class that differs a lot between sources means the model reads the source, "
        "not the disease.",
        "",
        markdown_table(
            ["source", "n", "accuracy"] + [f"{name} sensitivity (n)" for name in class_names],
            [
                [f"`{source}`", result["per_source"][source]["n"], percent(result["per_source"][source]["accuracy"])]
                + [
                    f"{percent(values['sensitivity'])} ({values['n']})" if values else "-"
                    for values in (result["per_source"][source]["per_class"].get(name) for name in class_names)
                ]
                for source in sources
            ],
        ),
        "",
        markdown_table(
            ["class", "source", "n", "sensitivity"] + [f"predicted {name}" for name in class_names],
            [
                [group["class"], f"`{group['source']}`", group["n"], percent(group["sensitivity"])]
                + [group["predicted"][name] for name in class_names]
                for group in result["per_class_source"]
            ],
        ),
        "",
        f"![per-source accuracy]({PER_SOURCE_PLOT})",
        "",
        "## 2. Perturbation stability",
        "",
        "Each change is applied to the decoded grayscale image before the checkpoint's eval transform. "
        "Flip rate = share of images whose predicted class differs from the unperturbed prediction.",
        "",
    ]
    summary = result["perturbation_summary"]
    if result["perturbations"]:
        lines += [
            f"Mean flip rate **{percent(summary['mean_flip_rate'])}**; worst: **{summary['worst']}** "
            f"({percent(summary['worst_flip_rate'])}).",
            "",
            markdown_table(
                ["perturbation", "what", "flip rate", "accuracy", "change"] + [f"flips `{s}`" for s in sources],
                [
                    [name, values["description"], percent(values["flip_rate"]), percent(values["accuracy"]),
                     f"{100 * values['accuracy_change']:+.1f} pt"]
                    + [percent(values["flip_rate_by_source"].get(source)) for source in sources]
                    for name, values in result["perturbations"].items()
                ],
            ),
            "",
            f"![flip rate per perturbation]({FLIP_RATE_PLOT})",
            "",
            f"What the perturbations look like on one audited image: [{EXAMPLES_PLOT}]({EXAMPLES_PLOT})",
        ]
    else:
        lines.append("No perturbations were run.")
    lines += [
        "",
        "## 3. Source probe",
        "",
        "A logistic regression (standardised features, 5-fold stratified cross-validation) predicts the source "
        "from the pooled penultimate features, within one class. Balanced accuracy well above chance means the "
        "features encode where an image came from. The 95 % interval is a bootstrap of the images (stratified by "
        "source) over the out-of-fold predictions: how much the score depends on which films the split holds. It "
        "does not include the spread between training seeds, which compares recipes only over several runs.",
        "",
        markdown_table(
            ["class", "sources (n)", "balanced accuracy (95 % CI)", "chance", "folds", "left out (n)"],
            [
                [
                    name,
                    ", ".join(f"`{source}` ({count})" for source, count in entry["sources"].items()) or "-",
                    f"{percent(entry['balanced_accuracy'])} ({percent(entry['ci95'][0])}-{percent(entry['ci95'][1])})"
                    if "balanced_accuracy" in entry else f"skipped: {entry['skipped']}",
                    percent(entry.get("chance")),
                    entry.get("folds", "-"),
                    ", ".join(f"`{source}` ({count})" for source, count in entry["excluded"].items()) or "-",
                ]
                for name, entry in result["probe"].items()
            ],
        ),
        "",
        "## 4. Leave-one-source-out",
        "",
    ]
    if result.get("loso"):
        lines.append(format_loso_markdown(result["loso"], heading=False))
    else:
        lines.append("not run: pass --loso-json (the loso.json written by scripts/loso.py)")
    lines.append("")
    return "\n".join(lines)


def format_summary(result):
    """Short plain-text summary printed by the CLI."""
    lines = [f"n={result['n']}  accuracy={result['overall']['accuracy']:.4f}  "
             f"macro_f1={result['overall']['macro_f1']:.4f}", "per source:"]
    for source, values in sorted(result["per_source"].items()):
        sensitivities = "  ".join(f"{name} {item['sensitivity']:.3f} (n={item['n']})"
                                  for name, item in values["per_class"].items())
        lines.append(f"  {source:<12} n={values['n']:<5} accuracy={values['accuracy']:.3f}  {sensitivities}")
    summary = result["perturbation_summary"]
    if summary["worst"] is not None:
        lines.append(f"perturbations: mean flip rate {summary['mean_flip_rate']:.3f}, worst {summary['worst']} "
                     f"({summary['worst_flip_rate']:.3f})")
    for name, entry in result["probe"].items():
        if "balanced_accuracy" in entry:
            low, high = entry["ci95"]
            lines.append(f"source probe {name}: balanced accuracy {entry['balanced_accuracy']:.3f} "
                         f"(95 % CI {low:.3f}-{high:.3f}; chance {entry['chance']:.3f}, "
                         f"sources {', '.join(entry['sources'])})")
        else:
            lines.append(f"source probe {name}: skipped ({entry['skipped']})")
    return "\n".join(lines)


def plot_per_source(result, path):
    """Bars: accuracy per source, and sensitivity per (class, source) group annotated with n."""
    pyplot = _pyplot()
    sources = sorted(result["per_source"])
    class_names = result["class_names"]
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1, 2]})
    accuracies = [result["per_source"][source]["accuracy"] for source in sources]
    bars = left.bar(range(len(sources)), accuracies, color="tab:blue")
    for bar, source in zip(bars, sources):
        left.annotate(f"n={result['per_source'][source]['n']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=8)
    left.set(xticks=range(len(sources)), ylim=(0, 1.1), ylabel="accuracy", title="accuracy per source")
    left.set_xticklabels(sources, rotation=20)
    width = 0.8 / max(1, len(sources))
    for offset, source in enumerate(sources):
        positions, heights, counts = [], [], []
        for index, name in enumerate(class_names):
            values = result["per_source"][source]["per_class"].get(name)
            if values:
                positions.append(index - 0.4 + width * (offset + 0.5))
                heights.append(values["sensitivity"])
                counts.append(values["n"])
        bars = right.bar(positions, heights, width=width, label=source)
        for bar, count in zip(bars, counts):
            right.annotate(str(count), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                           va="bottom", fontsize=7)
    right.set(xticks=range(len(class_names)), ylim=(0, 1.1), ylabel="sensitivity",
              title="sensitivity per class and source (n above bars)")
    right.set_xticklabels(class_names)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def plot_flip_rates(result, path):
    """Horizontal bars of the flip rate per perturbation, sorted."""
    pyplot = _pyplot()
    items = sorted(result["perturbations"].items(), key=lambda item: item[1]["flip_rate"])
    figure, axes = pyplot.subplots(figsize=(6, 0.3 * len(items) + 1.2))
    axes.barh([name for name, _ in items], [values["flip_rate"] for _, values in items], color="tab:orange")
    mean = result["perturbation_summary"]["mean_flip_rate"]
    if mean is not None:
        axes.axvline(mean, color="grey", linestyle=":", label=f"mean {mean:.3f}")
        axes.legend(fontsize=8, loc="lower right")
    axes.set(xlabel="flip rate (prediction changed)", xlim=(0, 1), title="perturbation stability")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def plot_perturbation_examples(image, path, perturbations, output_path, *, seed=0):
    """Grid of one image under every perturbation, to check by eye what the suite does."""
    pyplot = _pyplot()
    panels = [("original", image)] + [
        (perturbation.name, perturbation(image, perturbation_rng(seed, perturbation.name, path)))
        for perturbation in perturbations
    ]
    columns = 6
    rows = -(-len(panels) // columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(2 * columns, 2.2 * rows))
    for axis in np.ravel(axes):
        axis.axis("off")
    for axis, (name, panel) in zip(np.ravel(axes), panels):
        axis.imshow(panel, cmap="gray", vmin=0, vmax=255)
        axis.set_title(name, fontsize=8)
    figure.tight_layout()
    figure.savefig(output_path, dpi=100)
    pyplot.close(figure)


# --------------------------------------------------------------------------------------------------
# Part 4: leave-one-source-out


@dataclasses.dataclass(frozen=True)
class CatalogueEntry:
    """One image of the dataset root with its split, class and short source tag."""

    path: str
    split: str
    class_name: str
    source: str


def catalogue_dataset(data_root, manifest=None, splits=("train", "val", "test")):
    """Every image of the dataset root's splits with its source tag (tags shared across splits); plus tag -> repo."""
    data_root = Path(data_root)
    manifest = Path(manifest) if manifest else data_root / "MANIFEST.csv"
    samples = []
    for split in splits:
        dataset = make_image_folder(data_root / split)
        samples.extend((path, split, dataset.classes[target]) for path, target in dataset.samples)
    tags, source_repos = image_sources([path for path, _, _ in samples], manifest, data_root)
    entries = [CatalogueEntry(path, split, class_name, tag) for (path, split, class_name), tag in zip(samples, tags)]
    return entries, source_repos


def plan_holdouts(entries, min_train_images=MIN_LOSO_TRAIN_IMAGES):
    """(class, source) pairs to hold out: every source of a class that has >= 2 sources with enough train images."""
    counts = Counter((entry.class_name, entry.source) for entry in entries if entry.split == "train")
    plan = []
    for class_name in sorted({class_name for class_name, _ in counts}):
        large = sorted(source for (name, source), count in counts.items()
                       if name == class_name and count >= min_train_images and source != UNKNOWN_SOURCE)
        if len(large) >= 2:
            plan.extend((class_name, source) for source in large)
    return plan


def parse_holdout(text, entries, source_repos):
    """Parse ``CLASS:SOURCE`` (a short tag or a full source_repo) against the catalogue."""
    class_name, separator, source = text.partition(":")
    if not separator:
        raise DataError(f"--holdout {text!r}: expected CLASS:SOURCE, e.g. NORMAL:kermany")
    tags_by_repo = {repo: tag for tag, repo in source_repos.items()}
    source = tags_by_repo.get(source, source)
    present = {(entry.class_name, entry.source) for entry in entries if entry.split == "test"}
    if (class_name, source) not in present:
        available = ", ".join(f"{name}:{tag}" for name, tag in sorted(present))
        raise DataError(f"--holdout {text!r}: no test images of that class and source (available: {available})")
    return class_name, source


def build_holdout_folder(entries, class_name, source, folder):
    """ImageFolder of symlinks to train+val without (class, source); return per-split class counts."""
    folder = Path(folder)
    counts = {}
    for entry in entries:
        if entry.split not in ("train", "val") or (entry.class_name, entry.source) == (class_name, source):
            continue
        link = folder / entry.split / entry.class_name / Path(entry.path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(Path(entry.path).resolve())
        counts.setdefault(entry.split, Counter())[entry.class_name] += 1
    return {split: dict(sorted(counter.items())) for split, counter in counts.items()}


# Options of LOSO runs made before the recipes became presets (model/presets.py), named in the report when set away
# from their default (the value here), so that older loso.json files still read as they were run
_LEGACY_OPTIONS = {"intensity": None, "resize": None, "trim_borders": False, "random_frame": 0.0, "hflip": 0.0,
                   "robust_without": None, "source_adversary": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
                   "label_smoothing": 0.0, "consistency_weight": 0.0, "acquisition_probability": 0.8,
                   "affine_degrees": 10.0, "affine_translate": 0.06, "affine_scale": 0.1, "crop_scale": 0.6}


def _option_set(key, value):
    return value not in (None, [], ()) and value != _LEGACY_OPTIONS[key]


def _loso_config(train_args, min_train_images):
    """What makes two LOSO runs comparable: model, preset and schedule (worker and thread counts left out)."""
    from model.presets import get_preset

    preset = get_preset(train_args.preset)
    keys = ("arch", "weights", "preset", "image_size", "epochs", "batch_size", "opt", "weight_decay", "sampler",
            "seed")
    config = {key: getattr(train_args, key) for key in keys if hasattr(train_args, key)}
    config.update(recipe=preset.recipe, lr=preset.lr if train_args.lr is None else train_args.lr,
                  min_train_images=min_train_images)
    return config


def leave_one_source_out(data_root, output_dir, train_args, *, manifest=None, holdouts=None,
                         min_train_images=MIN_LOSO_TRAIN_IMAGES, batch_size=32, workers=2, device="cpu"):
    """Train without each (class, source) in turn and test on that source's test images of the class.

    ``train_args`` is a ``scripts/train.py`` Namespace; ``data`` and ``output_dir`` are set per fold.
    Folds already finished in ``output_dir`` are reused and an interrupted fold resumes from its last.pt
    (a fold folder started with another configuration is an error). Writes loso.json and loso.md;
    returns the result dict.
    """
    from model.training import train  # the project's trainer; imported here to keep the audit import light

    started = time.perf_counter()
    data_root, output_dir = Path(data_root), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries, source_repos = catalogue_dataset(data_root, manifest)
    if holdouts:
        plan = [parse_holdout(text, entries, source_repos) for text in holdouts]
    else:
        plan = plan_holdouts(entries, min_train_images)
    if not plan:
        raise DataError(f"no class has two sources with >= {min_train_images} train images; nothing to hold out")
    config = _loso_config(train_args, min_train_images)
    logger.info("LOSO folds: %s", ", ".join(f"{name}:{source}" for name, source in plan))
    folds = []
    for number, (class_name, source) in enumerate(plan, start=1):
        fold_dir = output_dir / f"{class_name}-{source}"
        result_path, config_path = fold_dir / "result.json", fold_dir / "config.json"
        if config_path.is_file() and json.loads(config_path.read_text()) != config:
            raise DataError(f"{fold_dir} holds a fold started with another configuration; use a new --output-dir")
        if result_path.is_file():
            logger.info("fold %d/%d %s:%s already done; reusing %s", number, len(plan), class_name, source, result_path)
            folds.append(json.loads(result_path.read_text()))
            continue
        logger.info("fold %d/%d: hold out %s images of %s", number, len(plan), source, class_name)
        fold_started = time.perf_counter()
        counts = build_holdout_folder(entries, class_name, source, fold_dir / "data")
        config_path.write_text(json.dumps(config, indent=2))
        # "auto" continues an interrupted fold from its last.pt and starts afresh otherwise.
        fold_args = argparse.Namespace(**{**vars(train_args), "data": str(fold_dir / "data"),
                                          "output_dir": str(fold_dir / "run"), "resume": "auto",
                                          "manifest": str(manifest or data_root / "MANIFEST.csv")})
        best_path = train(fold_args)
        fold = {
            "class": class_name,
            "source": source,
            "source_repo": source_repos.get(source),
            "train_counts": counts.get("train", {}),
            "val_counts": counts.get("val", {}),
            "checkpoint": str(best_path),
            **_evaluate_holdout(best_path, entries, class_name, source, batch_size=batch_size, workers=workers,
                                device=device),
            "wall_seconds": time.perf_counter() - fold_started,
            "config": config,
        }
        result_path.write_text(json.dumps(fold, indent=2))
        logger.info("fold %s:%s: held-out sensitivity %.3f (n=%d), kept-source sensitivity %s, %.0f s",
                    class_name, source, fold["heldout"]["sensitivity"], fold["heldout"]["n"],
                    f"{fold['reference']['sensitivity']:.3f}" if fold["reference"]["n"] else "n/a",
                    fold["wall_seconds"])
        folds.append(fold)
    result = {
        "data": str(data_root),
        "config": config,
        "sources": source_repos,
        "folds": folds,
        "wall_seconds": time.perf_counter() - started,
    }
    (output_dir / "loso.json").write_text(json.dumps(result, indent=2))
    (output_dir / "loso.md").write_text(format_loso_markdown(result) + "\n")
    return result


def merge_loso_results(results):
    """One LOSO result from several runs of the same configuration (e.g. folds run on different machines).

    Folds are kept in order, a later run's fold replacing an earlier one for the same class and source; the
    configurations must agree (worker and thread counts aside, which ``_loso_config`` leaves out).
    """
    if not results:
        raise DataError("nothing to merge")
    config = results[0]["config"]
    for other in results[1:]:
        if other["config"] != config:
            changed = sorted(key for key in set(config) | set(other["config"])
                             if config.get(key) != other["config"].get(key))
            raise DataError(f"cannot merge LOSO runs with different configurations (they differ in {', '.join(changed)})")
    folds = {}
    for result in results:
        for fold in result["folds"]:
            folds[(fold["class"], fold["source"])] = fold
    return {
        "data": results[0]["data"],
        "config": config,
        "sources": {key: value for result in results for key, value in result["sources"].items()},
        "folds": list(folds.values()),
        "wall_seconds": sum(result["wall_seconds"] for result in results),
    }


def _evaluate_holdout(checkpoint_path, entries, class_name, source, *, batch_size, workers, device):
    """Sensitivity of a fold's model on the held-out source's test images of the class, and on the kept sources."""
    checkpoint = load_checkpoint(checkpoint_path)
    class_names = checkpoint["class_names"]
    target = class_names.index(class_name)
    tests = [entry for entry in entries if entry.split == "test" and entry.class_name == class_name]
    split = AuditSplit(
        paths=[entry.path for entry in tests],
        targets=np.full(len(tests), target, dtype=np.int64),
        sources=[entry.source for entry in tests],
        class_names=class_names,
        source_repos={},
    ).decode()
    network = build_model_from_checkpoint(checkpoint).to(device)
    logits, _ = predict_split(network, build_eval_transform(checkpoint["transform"]), split,
                              batch_size=batch_size, workers=workers, device=device)
    predictions = logits.argmax(axis=1)
    held_out = np.asarray(split.sources) == source

    def summary(mask):
        predicted = Counter(predictions[mask].tolist())
        return {
            "n": int(mask.sum()),
            "sensitivity": float((predictions[mask] == target).mean()) if mask.any() else None,
            "predicted": {name: int(predicted.get(index, 0)) for index, name in enumerate(class_names)},
        }

    return {"heldout": summary(held_out), "reference": summary(~held_out),
            "reference_sources": sorted(set(np.asarray(split.sources)[~held_out].tolist()))}


def _option_text(value):
    return " + ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def format_loso_markdown(loso, *, heading=True):
    """Markdown table of a LOSO result (held-out sensitivity next to the kept sources' sensitivity)."""
    config = loso["config"]
    options = "".join(f", {key.replace('_', ' ')} {_option_text(config[key])}" for key in _LEGACY_OPTIONS
                      if _option_set(key, config.get(key)))
    if config.get("sampler", "shuffle") != "shuffle":
        options += f", sampler {config['sampler']}"
    lines = ["# Leave-one-source-out", ""] if heading else []
    lines += [
        f"Configuration: {config.get('arch')}, {config.get('image_size')} px, {config.get('epochs')} epochs, "
        f"{'preset ' + config['preset'] if config.get('preset') else 'recipe ' + str(config.get('recipe'))}"
        f"{options}, weights {config.get('weights')}, seed {config.get('seed')}; "
        f"wall time {loso['wall_seconds'] / 60:.1f} min. Each fold trains without one source's images of one "
        "class (train and val) and is tested on that source's images of the class in the original test split. "
        "A held-out sensitivity far below the kept sources' means the class was learned through its source.",
        "",
        markdown_table(
            ["held-out class", "held-out source", "train images of class left", "test n", "held-out sensitivity",
             "predicted as", "kept sources' sensitivity (n)", "fold time"],
            [
                [
                    fold["class"], f"`{fold['source']}`", fold["train_counts"].get(fold["class"], 0),
                    fold["heldout"]["n"], percent(fold["heldout"]["sensitivity"]),
                    ", ".join(f"{name} {count}" for name, count in fold["heldout"]["predicted"].items()),
                    f"{percent(fold['reference']['sensitivity'])} ({fold['reference']['n']})",
                    f"{fold['wall_seconds'] / 60:.1f} min",
                ]
                for fold in loso["folds"]
            ],
        ),
    ]
    return "\n".join(lines)
