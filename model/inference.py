"""The Predictor: decoded image -> eval transform -> network -> softmax -> class activation map."""

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import torch
from PIL import Image

from model.cam import (
    cam_to_image_space, class_activation_maps, heatmap_layer, overlay_heatmap, thorax_box_in_pixels, thorax_share,
)
from model.checkpoint import build_model_from_checkpoint, load_checkpoint
from model.ood import activation_score, input_check_reasons
from model.runtime import build_runtime_for_predictor
from model.decode import decode_upload
from model.transforms import box_in_pixels, build_eval_transform, seen_box

logger = logging.getLogger(__name__)

DISPLAY_MAX_SIDE = 768


@dataclasses.dataclass
class Prediction:
    """What one prediction returns to the app, the API and batch triage."""

    label: str
    probabilities: dict
    heatmap: Image.Image | None = None  # RGB overlay on the (downscaled) input image
    elapsed_ms: float = 0.0
    warnings: list = dataclasses.field(default_factory=list)
    metadata: dict = dataclasses.field(default_factory=dict)  # technical facts about the upload, never patient data
    ood: dict | None = None  # {"flagged", "score", "threshold"} when the checkpoint has OOD statistics
    film: Image.Image | None = None  # the (downscaled) input image in its own grey values, with the heatmap
    heatmap_layer: Image.Image | None = None  # RGBA: the strongest activations only, transparent elsewhere
    thorax_share: float | None = None  # share of the heatmap's mass inside model.cam.THORAX_BOX
    thorax_box: tuple | None = None  # that box on the film, fractions (left, top, right, bottom) of its size


class Predictor:
    """Owns one loaded checkpoint: preprocessing, forward pass, softmax and heatmap."""

    def __init__(self, checkpoint, *, device="cpu", checkpoint_path=None, sha256=None, backend=None):
        self.checkpoint = checkpoint
        self.class_names = list(checkpoint["class_names"])
        self.transform_params = checkpoint["transform"]
        self.transform = build_eval_transform(self.transform_params)
        # The same transform after its border trim, for a film whose trimming box is already known
        self._transform_after_trim = build_eval_transform({**self.transform_params, "trim_borders": False})
        self.temperature = float(checkpoint.get("temperature", 1.0))
        self.ood_statistics = checkpoint.get("ood")
        self.device = torch.device(device)
        self.network = build_model_from_checkpoint(checkpoint).to(self.device)
        self.checkpoint_path = checkpoint_path
        self.sha256 = sha256
        # backend: model.runtime.BACKENDS, or None for COVIDSCAN_INFERENCE_BACKEND / the int8 fast path beside the
        # checkpoint when there is one (model/quantize.py) / float32 ONNX.
        self.runtime = build_runtime_for_predictor(self, backend, cache_key=sha256)
        self.backend = self.runtime.name
        self.backend_description = self.runtime.description or self.backend  # which one runs and why, for logs

    @classmethod
    def from_path(cls, path, *, device="cpu", backend=None):
        """Load a checkpoint file (raises ``CheckpointError``) and build a Predictor around it."""
        path = Path(path)
        checkpoint = load_checkpoint(path)
        return cls(checkpoint, device=device, checkpoint_path=str(path), sha256=file_sha256(path), backend=backend)

    @property
    def model_info(self):
        """Model identity shown on pages and returned by the API."""
        return {
            "name": self.checkpoint.get("model_name", f"covidscan-{self.checkpoint['arch']}"),
            "version": self.checkpoint.get("model_version", self.checkpoint.get("created_at", "unknown")),
            "arch": self.checkpoint["arch"],
            "classes": self.class_names,
            "sha256": self.sha256,
        }

    def preprocess(self, image, *, box=None):
        """Eval transform of one grayscale PIL image into a batch of one.

        ``box``: the image's ``seen_box`` when already found; a border-trimming checkpoint then crops to it instead
        of finding it a second time (the same crop ``TrimBorders`` makes).
        """
        if box is None:
            return self.transform(image).unsqueeze(0)
        return self._transform_after_trim(image.crop(box_in_pixels(box, image.size))).unsqueeze(0)

    @torch.inference_mode()
    def forward(self, batch):
        """Logits and last-block activations for a preprocessed batch."""
        return self.runtime(batch.to(self.device))

    def probabilities_from_logits(self, logits):
        """Temperature-scaled softmax."""
        return torch.softmax(logits.float() / self.temperature, dim=1)

    def predict_bytes(self, data, *, with_heatmap=True):
        """Decode uploaded bytes (``InvalidImageError`` on bad input) and predict, keeping the decoder's notes."""
        start = time.perf_counter()
        decoded = decode_upload(data)
        prediction = self.predict_image(decoded.image, with_heatmap=with_heatmap, start=start,
                                        input_reasons=input_check_reasons(decoded))
        prediction.warnings.extend(decoded.warnings)
        prediction.metadata = dict(decoded.metadata)
        return prediction

    def predict_image(self, image, *, with_heatmap=True, start=None, input_reasons=()):
        """Predict one decoded grayscale image; ``input_reasons`` are failed input checks (they flag it as OOD)."""
        start = time.perf_counter() if start is None else start
        box = seen_box(self.transform_params, image) if with_heatmap else None  # found once, for input and heatmap
        logits, activations = self.forward(self.preprocess(image, box=box))
        probabilities = self.probabilities_from_logits(logits)[0]
        index = int(probabilities.argmax())
        heatmap = display = layer = share = thorax = None
        if with_heatmap:
            cam = class_activation_maps(activations, self.network.fc.weight, torch.tensor([index]))[0]
            display = _display_copy(image)
            heat = cam_to_image_space(cam, self.transform_params, display.size, content_box=box)
            layer = heatmap_layer(heat)
            heatmap = overlay_heatmap(display, heat, layer=layer)
            share = thorax_share(heat, content_box=box)
            left, top, right, bottom = thorax_box_in_pixels(display.size, box)
            thorax = (left / display.width, top / display.height, right / display.width, bottom / display.height)
        return Prediction(
            label=self.class_names[index],
            probabilities={name: float(p) for name, p in zip(self.class_names, probabilities.tolist())},
            heatmap=heatmap,
            film=display,
            heatmap_layer=layer,
            thorax_share=share,
            thorax_box=thorax,
            elapsed_ms=(time.perf_counter() - start) * 1000.0,
            ood=self.ood_check(activations, [list(input_reasons)])[0],
        )

    def ood_check(self, activations, input_reasons=None):
        """OOD verdicts for a batch of last-block activations (N x C x H x W), one per image.

        A verdict is ``{"flagged", "score", "threshold", "reasons"}``: flagged when the Mahalanobis score is
        above the checkpoint's threshold or an input check failed (``input_reasons``, one list per image).
        None for an image that passed its input checks when the checkpoint has no OOD statistics.
        """
        input_reasons = input_reasons or [[] for _ in range(len(activations))]
        if not self.ood_statistics:
            return [{"flagged": True, "score": None, "threshold": None, "reasons": list(reasons)} if reasons else None
                    for reasons in input_reasons]
        threshold = float(self.ood_statistics["threshold"])
        verdicts = []
        for score, reasons in zip(activation_score(self.ood_statistics, activations), input_reasons):
            reasons = list(reasons)
            if score > threshold:
                reasons.insert(0, f"Its features are unlike those of the training X-rays "
                                  f"(out-of-distribution score {score:.1f}, threshold {threshold:.1f}).")
            verdicts.append({"flagged": bool(reasons), "score": float(score), "threshold": threshold,
                             "reasons": reasons})
        return verdicts


def _display_copy(image):
    """A copy small enough to show in a page."""
    scale = DISPLAY_MAX_SIDE / max(image.size)
    if scale >= 1:
        return image.copy()
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


def file_sha256(path):
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


