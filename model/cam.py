"""Class activation maps (Zhou et al. 2016): last conv block weighted by the linear head, no backward pass."""

import io

import matplotlib
import numpy as np
import torch
from PIL import Image

from model.network import feature_layer
from model.transforms import box_in_pixels


class ActivationRecorder:
    """Keeps the output of the network's last convolutional block from the latest forward pass."""

    def __init__(self, network):
        self.activations = None
        self._handle = feature_layer(network).register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        self.activations = output.detach()

    def remove(self):
        """Detach the hook from the network."""
        self._handle.remove()


def class_activation_maps(activations, head_weight, class_indices):
    """CAM per image for the given classes: ReLU(sum_k w[class, k] * A_k), scaled to 0..1 per image."""
    with torch.inference_mode():
        weights = head_weight.detach()[class_indices].float()  # (N, C)
        maps = torch.relu(torch.einsum("nc,nchw->nhw", weights, activations.float()))
        peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)
        return (maps / peak[:, None, None]).cpu().numpy()


def cam_to_image_space(cam, transform_params, image_size, content_box=None):
    """Map a CAM from the network's input crop back onto the original image (``image_size`` = (w, h)).

    ``content_box``: the part of the image the model saw when the eval transform trims borders
    (``model.transforms.content_box`` of the image, fractions of its size); the trimmed borders get no heat.
    """
    if content_box is not None:
        left, top, right, bottom = box_in_pixels(content_box, image_size)
        inner = cam_to_image_space(cam, transform_params, (right - left, bottom - top))
        heat = np.zeros((image_size[1], image_size[0]), dtype=np.float32)
        heat[top:bottom, left:right] = inner
        return heat
    width, height = image_size
    side, crop = transform_params["image_size"], transform_params["crop_size"]
    heat = Image.fromarray(np.uint8(np.clip(cam, 0, 1) * 255), mode="L").resize((crop, crop), Image.BILINEAR)
    canvas = Image.new("L", (side, side), 0)
    offset = (side - crop) // 2
    canvas.paste(heat, (offset, offset))
    if transform_params["resize_mode"] == "letterbox":
        scale = side / max(width, height)
        inner_width, inner_height = round(width * scale), round(height * scale)
        left, top = (side - inner_width) // 2, (side - inner_height) // 2
        canvas = canvas.crop((left, top, left + inner_width, top + inner_height))
    return np.asarray(canvas.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0


def overlay_heatmap(image, heat, *, alpha=0.45, colormap="jet"):
    """Blend a 0..1 heat array (same size as ``image``) onto a grayscale image; return an RGB image."""
    colors = matplotlib.colormaps[colormap](heat)[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    weight = alpha * heat[..., None] ** 0.5  # cool regions stay mostly transparent
    blended = base * (1 - weight) + colors * weight
    return Image.fromarray(np.uint8(np.clip(blended, 0, 1) * 255), mode="RGB")


def to_png_bytes(image):
    """Encode a PIL image as PNG bytes (in memory)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
