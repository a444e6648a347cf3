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
from model.ood import energy_score, mahalanobis_score
from model.transforms import decode_image

logger = logging.getLogger(__name__)

SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "horse",
                  "brick", "grass", "gravel", "immunohistochemistry", "cell", "hubble_deep_field")
PYDICOM_SLICES = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm",
                  "MR_small_padded.dcm")


def _as_upload(image):
    """Round-trip a PIL image through PNG bytes and the upload decoder, as an uploaded file would go."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return decode_image(buffer.getvalue())


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
        return [image.rotate(90, expand=True) for image in images]
    return [ImageOps.invert(image) for image in images]


@torch.inference_mode()
def score_images(predictor, images, batch_size=32):
    """Mahalanobis and energy scores of decoded images through the predictor's own preprocessing."""
    mahalanobis, energy = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.cat([predictor.preprocess(image) for image in images[start:start + batch_size]])
        logits, activations = predictor.forward(batch)
        pooled = activations.float().mean(dim=(2, 3))
        mahalanobis.append(mahalanobis_score(predictor.ood_statistics, pooled))
        energy.append(energy_score(logits, predictor.temperature))
    return np.concatenate(mahalanobis), np.concatenate(energy)


def evaluate_ood(predictor, test_dir, *, limit=300, seed=0):
    """AUROC of each score for real test X-rays against each OOD set, and the false-flag rate on the real ones."""
    if not predictor.ood_statistics:
        raise InvalidImageError("this checkpoint has no OOD statistics; re-export it with --calibrate")
    rng = random.Random(seed)
    paths = sorted(p for p in Path(test_dir).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    paths = rng.sample(paths, min(limit, len(paths)))
    real_images = [decode_image(path.read_bytes()) for path in paths]
    sets = {
        "natural photos (scikit-image)": [_as_upload(image) for image in natural_photos(rng)],
        "CT/MR slices (pydicom)": [_as_upload(image) for image in ct_mr_slices(rng)],
        "text documents": [_as_upload(image) for image in text_documents(rng)],
        "noise and gradients": [_as_upload(image) for image in noise_and_gradients(rng)],
        "X-rays rotated 90°": transformed_xrays(paths[:60], "rotate90"),
        "X-rays inverted": transformed_xrays(paths[:60], "invert"),
    }
    threshold = float(predictor.ood_statistics["threshold"])
    real_mahalanobis, real_energy = score_images(predictor, real_images)
    report = {
        "threshold": threshold,
        "real": {"n": len(real_images), "false_flag_rate": float((real_mahalanobis > threshold).mean())},
        "sets": {},
    }
    for name, images in sets.items():
        mahalanobis, energy = score_images(predictor, images)
        labels = np.r_[np.zeros(len(real_images)), np.ones(len(images))]
        report["sets"][name] = {
            "n": len(images),
            "auroc_mahalanobis": float(roc_auc_score(labels, np.r_[real_mahalanobis, mahalanobis])),
            "auroc_energy": float(roc_auc_score(labels, np.r_[real_energy, energy])),
            "flag_rate": float((mahalanobis > threshold).mean()),
        }
    return report


def format_ood_report(report):
    """Markdown table of an ``evaluate_ood`` report."""
    lines = [
        f"Real test X-rays: n={report['real']['n']}, false-flag rate {report['real']['false_flag_rate']:.3f} "
        f"(threshold {report['threshold']:.2f})",
        "",
        "| OOD set | n | AUROC Mahalanobis | AUROC energy | flagged at threshold |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in report["sets"].items():
        lines.append(f"| {name} | {values['n']} | {values['auroc_mahalanobis']:.3f} | {values['auroc_energy']:.3f} "
                     f"| {values['flag_rate']:.2f} |")
    return "\n".join(lines)
