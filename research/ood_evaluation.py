"""How well the OOD score separates real chest X-rays from inputs the model was never meant to see."""

import io
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from sklearn.metrics import roc_auc_score

from model.errors import InvalidImageError
from model.data import make_image_folder
from model.ood import activation_score, energy_score, fit_ood_statistics, input_check_reasons, pooled_features
from model.decode import DecodedImage, decode_image, decode_upload

logger = logging.getLogger(__name__)

SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "horse",
                  "brick", "grass", "gravel", "immunohistochemistry", "cell", "hubble_deep_field")
PYDICOM_SLICES = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm",
                  "MR_small_padded.dcm")


def _as_upload(image):
    """Round-trip a PIL image through PNG bytes and the upload decoder, as an uploaded file would go."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return decode_upload(buffer.getvalue())


def _views(image, rng, count):
    """A few crops and scales of one image, so that a handful of sample images make a set."""
    views = [image]
    for _ in range(count - 1):
        width, height = image.size
        scale = rng.uniform(0.5, 0.9)
        crop_w, crop_h = int(width * scale), int(height * scale)
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        views.append(image.crop((left, top, left + crop_w, top + crop_h)).resize((crop_w * 2, crop_h * 2)))
    return views


def natural_photos(rng, per_image=4):
    """scikit-image's bundled sample photographs (and crops of them)."""
    import skimage.data

    images = []
    for name in SKIMAGE_PHOTOS:
        try:
            array = getattr(skimage.data, name)()
        except Exception as error:  # some samples need a download that is not possible here
            logger.info("skipping skimage sample %s: %s", name, type(error).__name__)
            continue
        if array.dtype != np.uint8:
            array = array.astype(np.float32)
            array = (255 * (array - array.min()) / max(1e-9, float(array.max() - array.min()))).astype(np.uint8)
        image = Image.fromarray(array[..., :3] if array.ndim == 3 else array)
        images.extend(_views(image, rng, per_image))
    return images


def ct_mr_slices(rng, per_image=6):
    """CT and MR slices shipped with pydicom's test data, windowed to 8 bits."""
    import pydicom
    from pydicom.data import get_testdata_file

    images = []
    for name in PYDICOM_SLICES:
        dataset = pydicom.dcmread(get_testdata_file(name))
        pixels = dataset.pixel_array.astype(np.float32)
        low, high = np.percentile(pixels, (0.5, 99.5))
        array = np.clip((pixels - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
        images.extend(_views(Image.fromarray(array).resize((256, 256)), rng, per_image))
    return images


def text_documents(rng, count=20):
    """Rendered pages of text."""
    words = "patient report findings impression the lungs are clear no acute process chest radiograph".split()
    images = []
    for _ in range(count):
        page = Image.new("L", (512, 640), 255)
        draw = ImageDraw.Draw(page)
        for line in range(rng.randint(15, 35)):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
            draw.text((30, 20 + line * 17), text, fill=rng.randint(0, 60))
        images.append(page)
    return images


def noise_and_gradients(rng, count=20):
    """Uniform and Gaussian noise, and linear and radial gradients."""
    images = []
    numpy_rng = np.random.default_rng(rng.randint(0, 2**31))
    rows, columns = np.mgrid[0:256, 0:256]
    for index in range(count):
        kind = index % 4
        if kind == 0:
            array = numpy_rng.integers(0, 256, (256, 256))
        elif kind == 1:
            array = numpy_rng.normal(128, rng.uniform(10, 60), (256, 256))
        elif kind == 2:
            angle = rng.uniform(0, np.pi)
            array = (np.cos(angle) * columns + np.sin(angle) * rows) / 362 * 255
        else:
            array = np.hypot(rows - 128, columns - 128) / 181 * 255
        images.append(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)))
    return images


def transformed_xrays(paths, operation):
    """Real test X-rays rotated by 90 degrees or inverted."""
    images = [decode_image(Path(path).read_bytes()) for path in paths]
    if operation == "rotate90":
        return [_decoded(image.rotate(90, expand=True)) for image in images]
    return [_decoded(ImageOps.invert(image)) for image in images]


def _decoded(image):
    """A grayscale PIL image as the upload decoder would return it."""
    return DecodedImage(image, {"rows": image.height, "columns": image.width}, [])


@torch.inference_mode()
def forward_images(predictor, images, batch_size=32):
    """Logits and last-block activations of decoded grayscale images through the predictor's preprocessing."""
    all_logits, all_activations = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.cat([predictor.preprocess(image) for image in images[start:start + batch_size]])
        logits, activations = predictor.forward(batch)
        all_logits.append(logits.float())
        all_activations.append(activations.float())
    return torch.cat(all_logits), torch.cat(all_activations)


def fit_grid_statistics(predictor, data_root, grids, sizes, *, train_limit=None, seed=0, false_flag_rate=0.01):
    """Refit Mahalanobis statistics on ``train`` (threshold on ``val``) for each pooling grid and PCA size, from
    one pass over the images: {(grid, size): statistics}."""
    rng = random.Random(seed)
    pooled = {}
    for split in ("train", "val"):
        samples = make_image_folder(Path(data_root) / split, class_names=predictor.class_names).samples
        if split == "train" and train_limit:
            samples = sorted(rng.sample(samples, min(train_limit, len(samples))))
        features = {grid: [] for grid in grids}
        for start in range(0, len(samples), 64):
            images = [decode_image(Path(path).read_bytes()) for path, _ in samples[start:start + 64]]
            _, activations = forward_images(predictor, images)
            for grid in grids:
                features[grid].append(pooled_features(activations, grid).numpy())
        targets = np.array([target for _, target in samples])
        pooled[split] = ({grid: np.concatenate(values) for grid, values in features.items()}, targets)
    return {
        (grid, size): fit_ood_statistics(pooled["train"][0][grid], pooled["train"][1], pooled["val"][0][grid],
                                         components=size, grid=grid, false_flag_rate=false_flag_rate)[0]
        for grid in grids for size in sizes
    }


def ood_sets(test_dir, *, limit=300, seed=0):
    """``(real, sets)``: up to ``limit`` decoded real test X-rays, and each OOD set's decoded images by name."""
    rng = random.Random(seed)
    paths = sorted(p for p in Path(test_dir).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    paths = rng.sample(paths, min(limit, len(paths)))
    real = [decode_upload(path.read_bytes()) for path in paths]
    sets = {
        "natural photos (scikit-image)": [_as_upload(image) for image in natural_photos(rng)],
        "CT/MR slices (pydicom)": [_as_upload(image) for image in ct_mr_slices(rng)],
        "text documents": [_as_upload(image) for image in text_documents(rng)],
        "noise and gradients": [_as_upload(image) for image in noise_and_gradients(rng)],
        "X-rays rotated 90°": transformed_xrays(paths[:60], "rotate90"),
        "X-rays inverted": transformed_xrays(paths[:60], "invert"),
    }
    return real, sets


def compare_ood_verdicts(reference, candidate, test_dir, *, limit=300, seed=0):
    """Per set (the real X-rays included): how many images each predictor flags, and on how many they disagree.

    For checking that a faster backend (``candidate``) keeps the OOD verdicts of float32 (``reference``).
    """
    real, sets = ood_sets(test_dir, limit=limit, seed=seed)
    report = {}
    for name, decoded_images in {"real test X-rays": real, **sets}.items():
        input_reasons = [input_check_reasons(decoded) for decoded in decoded_images]
        verdicts = {}
        for label, predictor in (("reference", reference), ("candidate", candidate)):
            _, activations = forward_images(predictor, [decoded.image for decoded in decoded_images])
            verdicts[label] = [verdict["flagged"] for verdict in predictor.ood_check(activations, input_reasons)]
        report[name] = {
            "n": len(decoded_images),
            "flagged_reference": int(sum(verdicts["reference"])),
            "flagged_candidate": int(sum(verdicts["candidate"])),
            "differ": int(sum(a != b for a, b in zip(verdicts["reference"], verdicts["candidate"]))),
        }
    return report


def evaluate_ood(predictor, test_dir, *, limit=300, seed=0, compare=None):
    """AUROC of each score for real test X-rays against each OOD set, and the flag rates at the threshold.

    ``compare`` maps a label to other fitted Mahalanobis statistics (e.g. ``fit_grid_statistics``) to report
    their AUROC and flag rate beside the checkpoint's own.
    """
    if not predictor.ood_statistics:
        raise InvalidImageError("this checkpoint has no OOD statistics; re-export it with --calibrate")
    real, sets = ood_sets(test_dir, limit=limit, seed=seed)
    compare = compare or {}
    threshold = float(predictor.ood_statistics["threshold"])

    def scores(decoded_images):
        logits, activations = forward_images(predictor, [decoded.image for decoded in decoded_images])
        input_reasons = [input_check_reasons(decoded) for decoded in decoded_images]
        verdicts = predictor.ood_check(activations, input_reasons)
        return {
            "mahalanobis": np.array([verdict["score"] for verdict in verdicts]),
            "energy": energy_score(logits, predictor.temperature),
            "flagged": np.array([verdict["flagged"] for verdict in verdicts]),
            "input_check": np.array([bool(reasons) for reasons in input_reasons]),
            **{label: activation_score(statistics, activations) for label, statistics in compare.items()},
        }

    real_scores = scores(real)
    report = {
        "threshold": threshold,
        "grid": int(predictor.ood_statistics.get("grid", 1)),
        "real": {"n": len(real), "false_flag_rate": float(real_scores["flagged"].mean())},
        "compare": {label: {"grid": int(statistics.get("grid", 1)), "threshold": float(statistics["threshold"]),
                            "false_flag_rate": float((real_scores[label] > statistics["threshold"]).mean())}
                    for label, statistics in compare.items()},
        "sets": {},
    }
    for name, decoded_images in sets.items():
        set_scores = scores(decoded_images)
        labels = np.r_[np.zeros(len(real)), np.ones(len(decoded_images))]

        def auroc(key):
            return float(roc_auc_score(labels, np.r_[real_scores[key], set_scores[key]]))

        # Inputs refused by an input check rank above every score: an AUROC for the whole detector.
        both = np.r_[real_scores["mahalanobis"], set_scores["mahalanobis"]]
        combined = np.where(np.r_[real_scores["input_check"], set_scores["input_check"]], both.max() + 1.0, both)
        report["sets"][name] = {
            "n": len(decoded_images),
            "auroc_mahalanobis": auroc("mahalanobis"),
            "auroc_with_input_checks": float(roc_auc_score(labels, combined)),
            "auroc_energy": auroc("energy"),
            "flag_rate": float(set_scores["flagged"].mean()),
            "input_check_rate": float(set_scores["input_check"].mean()),
            "compare": {label: {"auroc": auroc(label),
                                "flag_rate": float((set_scores[label] > compare[label]["threshold"]).mean())}
                        for label in compare},
        }
    return report


def format_ood_report(report):
    """Markdown tables of an ``evaluate_ood`` report."""
    lines = [
        f"Real test X-rays: n={report['real']['n']}, false-flag rate {report['real']['false_flag_rate']:.3f} "
        f"(Mahalanobis on a {report['grid']}x{report['grid']} pool, threshold {report['threshold']:.2f}, "
        "plus the input checks)",
        "",
        "| OOD set | n | AUROC Mahalanobis | AUROC with input checks | AUROC energy | flagged | by input check |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, values in report["sets"].items():
        lines.append(f"| {name} | {values['n']} | {values['auroc_mahalanobis']:.3f} "
                     f"| {values['auroc_with_input_checks']:.3f} | {values['auroc_energy']:.3f} "
                     f"| {values['flag_rate']:.2f} | {values['input_check_rate']:.2f} |")
    if report.get("compare"):
        labels = list(report["compare"])
        lines += ["", "Refitted Mahalanobis statistics for comparison (AUROC / flagged at their own 1 % val threshold):",
                  "", "| OOD set | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        lines.append("| real test X-rays, false flags | " + " | ".join(
            f"{report['compare'][label]['false_flag_rate']:.3f}" for label in labels) + " |")
        for name, values in report["sets"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{values['compare'][label]['auroc']:.3f} / {values['compare'][label]['flag_rate']:.2f}"
                for label in labels) + " |")
    return "\n".join(lines)
