"""The eval transform (its parameters travel in the checkpoint) and the training augmentations; decoding is model.decode."""

import io
import logging
import random

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import v2

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RECIPES = ("tutorial", "robust")  # the families of random augmentations (``build_train_transform``)
# The robust recipe: share of training films that get 1-3 random acquisition changes
ACQUISITION_PROBABILITY = 0.8
# Largest rotation, in degrees either way, of its random affine moves; largest shift, as a share of the film's width
# and height; largest change of scale either way (0.1 scales by 0.9-1.1)
AFFINE_DEGREES = 10.0
AFFINE_TRANSLATE = 0.06
AFFINE_SCALE = 0.1
# Smallest share of the film's area that its random resized crop keeps
CROP_SCALE = 0.6
# Share of films, and area of each box, that its random erasing blanks
ERASING_PROBABILITY = 0.3
ERASING_SCALE = (0.01, 0.06)
# "equalize_foreground" and "autocontrast" serve checkpoints of earlier experiments; no preset uses them.
INTENSITY_MODES = ("none", "equalize", "equalize_foreground", "autocontrast")
# Modes that checkpoints of earlier experiments may name but that are no longer built, with the reason.
RETIRED_INTENSITY_MODES = {"clahe": "CLAHE left the source in the features and was dropped with OpenCV; "
                                    "retrain with a current preset"}
RESIZE_MODES = ("squash", "letterbox")
# Border trimming (``TrimBorders``): rows and columns are judged on a copy at most this many pixels a side, each
# smoothed along itself over BORDER_SMOOTHING pixels; a row or column is a flat border where its 2nd-98th
# percentile spread is at most BORDER_SPREAD grey levels; at most BORDER_MAX_SHARE of the film goes from any side;
# at most BORDER_PASSES passes, each inside the box of the last.
BORDER_PROBE_SIDE = 256
BORDER_SMOOTHING = 21
BORDER_PASSES = 4
BORDER_SPREAD = 10.0
BORDER_MAX_SHARE = 0.35

class IntensityNormalize:
    """Per-image intensity normalisation, removing the grey-level signature of each scanner and site.

    ``equalize``: histogram equalisation of the whole image; black padding and borders count in the histogram.
    ``equalize_foreground``: the same, with the histogram taken over non-black pixels only.
    ``autocontrast``: a 1 % percentile stretch.
    """

    def __init__(self, mode="none"):
        if mode in RETIRED_INTENSITY_MODES:
            raise ValueError(f"the intensity mode {mode!r} is no longer supported: {RETIRED_INTENSITY_MODES[mode]}")
        if mode not in INTENSITY_MODES:
            raise ValueError(f"unknown intensity mode {mode!r}; choose one of {INTENSITY_MODES}")
        self.mode = mode

    def __call__(self, image):
        if self.mode == "equalize":
            return ImageOps.equalize(image)
        if self.mode == "equalize_foreground":
            foreground = image.point(lambda value: 255 if value > 0 else 0)
            if foreground.getbbox() is None:
                return image
            return ImageOps.equalize(image, mask=foreground)
        if self.mode == "autocontrast":
            return ImageOps.autocontrast(image, cutoff=1)
        return image

    def __repr__(self):
        return f"{type(self).__name__}(mode={self.mode!r})"


class Letterbox:
    """Resize keeping the aspect ratio, then pad with black to a square of ``size``."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        return ImageOps.pad(image, (self.size, self.size), method=Image.BILINEAR, color=0)

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size})"


def content_box(image):
    """The film's content inside flat borders, as fractions ``(left, top, right, bottom)`` of its width and height.

    A flat border is a run of outer rows or columns of nearly one grey level, whatever that level: black or white
    frames, letterbox bars, the margin of a scanned figure. Judged on an at most 256-pixel copy, each row smoothed
    along itself (and each column along itself, so that no content leaks across the border's edge), so that sensor
    noise or JPEG ringing in a border does not hide it. Anatomy is never that flat; outer air can be, and is then
    trimmed too. Repeated inside the box found until it no longer shrinks (at most 4 passes), so that a film framed
    on some sides and the same film unframed come out alike. At most 35 % of the film goes from any one side; a film
    flat all over is kept whole.
    """
    probe = image.copy()
    probe.thumbnail((BORDER_PROBE_SIDE, BORDER_PROBE_SIDE), Image.BOX)
    pixels = np.asarray(probe, dtype=np.float32)
    height, width = pixels.shape
    box = [0, 0, width, height]  # left, top, right, bottom in probe pixels
    for _ in range(BORDER_PASSES):
        left, top, right, bottom = box
        region = pixels[top:bottom, left:right]
        found = []
        for axis, offset, length in ((0, left, width), (1, top, height)):  # columns, then rows
            lines = _running_mean(region, axis, BORDER_SMOOTHING)
            low, high = np.percentile(lines, (2, 98), axis=axis)
            content = np.flatnonzero(high - low > BORDER_SPREAD)
            if content.size == 0:
                break
            limit = BORDER_MAX_SHARE * length
            found.append((min(offset + int(content[0]), int(limit)),
                          max(offset + int(content[-1]) + 1, length - int(limit))))
        if len(found) < 2:
            break
        (new_left, new_right), (new_top, new_bottom) = found
        new_box = [max(new_left, left), max(new_top, top), min(new_right, right), min(new_bottom, bottom)]
        if new_box == box:
            break
        box = new_box
    left, top, right, bottom = box
    return left / width, top / height, right / width, bottom / height


def _running_mean(pixels, axis, width):
    """Means over every full window of ``width`` neighbours along ``axis`` (the whole line if shorter)."""
    length = pixels.shape[axis]
    width = min(width, length)
    sums = np.cumsum(pixels, axis=axis, dtype=np.float64)
    sums = np.concatenate([np.zeros_like(np.take(sums, [0], axis=axis)), sums], axis=axis)  # sums[i]: first i
    return (np.take(sums, np.arange(width, length + 1), axis=axis)
            - np.take(sums, np.arange(0, length - width + 1), axis=axis)) / width


def box_in_pixels(box, size):
    """A ``content_box`` in the pixels of an image of ``size`` = (width, height), at least one pixel each way."""
    width, height = size
    left, top = round(box[0] * width), round(box[1] * height)
    return left, top, max(round(box[2] * width), left + 1), max(round(box[3] * height), top + 1)


class TrimBorders:
    """Crop the film to its ``content_box``: flat frames and bars, which mark a source, never reach the model.

    Applied first, on the decoded film, in training and serving alike (``trim_borders`` in the stored eval
    transform), so that a black border added or taken away does not change what the model sees.
    """

    def __call__(self, image):
        return image.crop(box_in_pixels(content_box(image), image.size))

    def __repr__(self):
        return f"{type(self).__name__}()"


class RandomAcquisition:
    """Random acquisition-like changes (gamma, contrast, blur, sharpening, noise, JPEG, resolution)."""

    def __init__(self, probability=0.8):
        self.probability = probability

    def __call__(self, image):
        if random.random() > self.probability:
            return image
        operations = [self._gamma, self._contrast, self._blur, self._sharpen, self._noise, self._jpeg, self._resample]
        for operation in random.sample(operations, k=random.randint(1, 3)):
            image = operation(image)
        return image

    @staticmethod
    def _gamma(image):
        gamma = random.uniform(0.5, 1.8)
        table = [round(255 * (value / 255) ** gamma) for value in range(256)]
        return image.point(table)

    @staticmethod
    def _contrast(image):
        pixels = np.asarray(image, dtype=np.float32)
        scaled = (pixels - 128) * random.uniform(0.6, 1.5) + 128 + random.uniform(-40, 40)
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")

    @staticmethod
    def _blur(image):
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.3, 2.0)))

    @staticmethod
    def _sharpen(image):
        return image.filter(ImageFilter.UnsharpMask(radius=2, percent=random.randint(50, 200), threshold=2))

    @staticmethod
    def _noise(image):
        pixels = np.asarray(image, dtype=np.float32)
        noisy = pixels + np.random.normal(0, random.uniform(2, 12), pixels.shape)
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="L")

    @staticmethod
    def _jpeg(image):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=random.randint(20, 95))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("L")

    @staticmethod
    def _resample(image):
        factor = random.uniform(0.2, 0.6)
        small = image.resize((max(8, int(image.width * factor)), max(8, int(image.height * factor))), Image.BILINEAR)
        return small.resize(image.size, Image.BILINEAR)

    def __repr__(self):
        return f"{type(self).__name__}(probability={self.probability})"


def eval_transform_params(*, image_size=224, recipe="tutorial", intensity=None, resize_mode=None, trim_borders=False):
    """Return the plain-dict description of the eval transform that is stored in checkpoints.

    ``intensity`` overrides the recipe's intensity normalisation (one of ``INTENSITY_MODES``), ``resize_mode``
    its resize (one of ``RESIZE_MODES``). Both recipes squash to a square by default: letterboxing keeps the
    aspect ratio but draws black bars on non-square films only, and on CXR-3 that marks the source (Cohen's films
    are not square, the Radiography DB's all are). The shipped model 2026.11.27-4 was trained before that was
    found and letterboxes (the ``robust`` preset).
    ``trim_borders``: crop each film to its ``content_box`` before anything else (``TrimBorders``); checkpoints
    written before the option existed lack the key and do not trim.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")
    if intensity is not None and intensity not in INTENSITY_MODES:
        raise ValueError(f"unknown intensity mode {intensity!r}; choose one of {INTENSITY_MODES}")
    if resize_mode is not None and resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize_mode!r}; choose one of {RESIZE_MODES}")
    robust = recipe == "robust"
    return {
        "image_size": image_size,
        "resize_mode": resize_mode or "squash",
        "crop_size": image_size,
        "intensity": intensity or ("equalize" if robust else "none"),
        "channels": 3,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "trim_borders": bool(trim_borders),
    }


def _trim(params):
    return [TrimBorders()] if params.get("trim_borders", False) else []


def seen_box(params, image):
    """The part of ``image`` that the eval transform of ``params`` shows the model (a ``content_box``), or None
    for the whole image."""
    return content_box(image) if params.get("trim_borders", False) else None


def _resize(params):
    if params["resize_mode"] == "letterbox":
        return Letterbox(params["image_size"])
    return T.Resize((params["image_size"], params["image_size"]))


def build_eval_transform(params):
    """Build the deterministic eval transform (PIL "L" image -> normalised tensor) from stored params."""
    return T.Compose(
        _trim(params)
        + [
            _resize(params),
            T.CenterCrop(params["crop_size"]),
            IntensityNormalize(params["intensity"]),
            T.Grayscale(num_output_channels=params["channels"]),
            T.ToTensor(),
            T.Normalize(params["mean"], params["std"]),
        ]
    )


def build_train_transform(params, *, recipe="tutorial"):
    """Build the augmenting train transform of ``recipe`` matching ``params`` (the eval transform's description).

    ``tutorial``: resize, random rotation up to 20 degrees, horizontal flips. ``robust``: acquisition-like changes,
    random resized crops, small affine moves and random erasing, and no flips: a mirrored film puts the heart and the
    laterality marker on the wrong side, and flips showed no gain in transfer to unseen sources.
    """
    size = params["crop_size"]
    tail = [
        T.Grayscale(num_output_channels=params["channels"]),
        T.ToTensor(),
        T.Normalize(params["mean"], params["std"]),
    ]
    if recipe == "tutorial":
        return T.Compose(
            _trim(params)
            + [_resize(params), T.RandomRotation(20), T.RandomHorizontalFlip(), IntensityNormalize(params["intensity"])]
            + tail
        )
    if recipe == "robust":
        return T.Compose(
            _trim(params)  # on the film as decoded, as in serving: before any augmentation
            + [
                RandomAcquisition(probability=ACQUISITION_PROBABILITY),
                _resize(params),
                T.RandomResizedCrop(size, scale=(CROP_SCALE, 1.0), ratio=(0.8, 1.25)),
                T.RandomAffine(degrees=AFFINE_DEGREES, translate=(AFFINE_TRANSLATE, AFFINE_TRANSLATE),
                               scale=(1.0 - AFFINE_SCALE, 1.0 + AFFINE_SCALE)),
                IntensityNormalize(params["intensity"]),
            ]
            + tail
            + [T.RandomErasing(p=ERASING_PROBABILITY, scale=ERASING_SCALE, value=0)]
        )
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")


class TwoViews:
    """Two independently augmented views of one film, ``(first(image), second(image))``: the recipe's view, which
    the class loss sees, and the view a consistency loss compares it with (a preset's ``consistency_weight``)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, image):
        return self.first(image), self.second(image)

    def __repr__(self):
        return f"{type(self).__name__}(first={self.first!r}, second={self.second!r})"


def batch_mixing(num_classes, *, mixup_alpha=0.0, cutmix_alpha=0.0):
    """Mixup and/or CutMix on whole batches, as in torchvision's reference scripts, or None when both are off.

    The returned callable takes ``(images, class_indices)`` and gives mixed images and soft targets (one row of class
    weights per image). Mixup averages each film with its neighbour in the batch, weight drawn from
    Beta(``mixup_alpha``, ``mixup_alpha``); CutMix pastes a box of the neighbour, its share of the area drawn from
    Beta(``cutmix_alpha``, ``cutmix_alpha``). With both on, each batch gets one of the two at random.
    """
    for name, alpha in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)):
        if not alpha >= 0:  # also refuses NaN
            raise ValueError(f"the {name} alpha must be 0 (off) or positive, not {alpha}")
    mixes = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []) + (
        [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else [])
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def mix_views(mixing, views, targets):
    """Mix every view of one batch alike (``batch_mixing``): the same partner, weight and box for each view.

    Each film's views then stay two views of one mixed film, which a consistency loss can compare. MixUp, CutMix
    and the choice between them draw from torch's CPU generator, so each view replays the same draws.
    Returns the mixed views and the batch's soft targets.
    """
    state = torch.get_rng_state()
    mixed = []
    for view in views:
        torch.set_rng_state(state)
        view, soft_targets = mixing(view, targets)
        mixed.append(view)
    return mixed, soft_targets
