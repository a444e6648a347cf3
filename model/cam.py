"""Class activation maps (Zhou et al. 2016): last conv block weighted by the linear head, no backward pass."""

import functools
import io

import matplotlib
import numpy as np
import torch
from PIL import Image

from model.network import feature_layer
from model.transforms import box_in_pixels

# Perceptually uniform (lightness rises steadily from threshold to peak), readable with colour-vision deficiency,
# unlike jet, whose bright yellow and cyan bands invent edges that are not in the map.
HEATMAP_COLORMAP = "inferno"
# Only the strongest activations are drawn: at least this share of the map's peak. Below it the film shows through.
HEATMAP_THRESHOLD = 0.5
# Width of the soft edge above the threshold (share of the peak) over which the drawn colour fades in.
HEATMAP_EDGE = 0.05
# A central thorax box on the part of the film the model saw, as fractions (left, top, right, bottom): the middle
# 70 % of its width and rows 10-85 % of its height. No lung segmentation model is available offline; the box is a
# coarse stand-in for "where the lungs and heart usually are" on a frontal film.
THORAX_BOX = (0.15, 0.10, 0.85, 0.85)


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


def heatmap_layer(heat, *, threshold=HEATMAP_THRESHOLD, colormap=HEATMAP_COLORMAP):
    """A 0..1 heat array as an RGBA image: colour-mapped where heat >= ``threshold``, transparent elsewhere.

    The colour of a pixel is the colour map at its heat (so the legend's scale is the map's own 0..1), and the
    opacity rises from 0 to 1 over ``HEATMAP_EDGE`` above the threshold, so the drawn regions have soft edges.
    """
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    table = _colour_table(colormap)
    # matplotlib's own lookup of a 0..1 value, min(int(value * N), N - 1), by index into the uint8 table: the same
    # colours as calling the colour map, without its float64 RGBA array of the whole film.
    index = np.minimum((heat * len(table)).astype(np.intp), len(table) - 1)
    opacity = np.clip((heat - threshold) / HEATMAP_EDGE, 0.0, 1.0)
    rgba = np.empty(heat.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = table[index]
    rgba[..., 3] = np.round(opacity.astype(np.float64) * 255)
    return Image.fromarray(rgba, mode="RGBA")


@functools.cache
def _colour_table(colormap):
    """A matplotlib colour map's N colours as uint8 RGB, rounded as ``np.round(colour * 255)``."""
    cmap = matplotlib.colormaps[colormap]
    return np.uint8(np.round(cmap(np.arange(cmap.N))[:, :3] * 255))


def overlay_heatmap(image, heat, *, alpha=0.6, threshold=HEATMAP_THRESHOLD, colormap=HEATMAP_COLORMAP, layer=None):
    """The ``heatmap_layer`` of a 0..1 heat array laid over a grayscale image at ``alpha``; return an RGB image.

    ``layer``: that layer when the caller has it already.
    """
    if layer is None:
        layer = heatmap_layer(heat, threshold=threshold, colormap=colormap)
    layer = np.asarray(layer, dtype=np.float32) / 255.0
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    weight = alpha * layer[..., 3:]
    blended = base * (1 - weight) + layer[..., :3] * weight
    return Image.fromarray(np.uint8(np.round(np.clip(blended, 0, 1) * 255)), mode="RGB")


def legend_image(*, width=256, height=16, threshold=HEATMAP_THRESHOLD, colormap=HEATMAP_COLORMAP):
    """The drawn part of the colour scale, from ``threshold`` (left) to the map's peak (right), as an RGB image."""
    values = np.linspace(threshold, 1.0, width, dtype=np.float32)
    colors = matplotlib.colormaps[colormap](values)[..., :3]
    strip = np.repeat(colors[None, :, :], height, axis=0)
    return Image.fromarray(np.uint8(np.round(strip * 255)), mode="RGB")


def thorax_box_in_pixels(size, content_box=None):
    """``THORAX_BOX`` in the pixels of an image of ``size`` = (w, h), inside the part the model saw
    (``content_box``, fractions; None for the whole image): (left, top, right, bottom)."""
    seen_left, seen_top, seen_right, seen_bottom = box_in_pixels(content_box or (0.0, 0.0, 1.0, 1.0), size)
    seen_width, seen_height = seen_right - seen_left, seen_bottom - seen_top
    left, top, right, bottom = THORAX_BOX
    return (
        seen_left + round(left * seen_width),
        seen_top + round(top * seen_height),
        seen_left + round(right * seen_width),
        seen_top + round(bottom * seen_height),
    )


def thorax_share(heat, content_box=None):
    """Share (0..1) of the heat map's total mass inside the central thorax box, or None for an empty map.

    The whole map counts, not only what is drawn above the threshold, as in the energy-based pointing game of
    Score-CAM (Wang et al. 2020): a map whose mass lies mostly outside the box points at something other than
    the chest (labels, borders, the abdomen) and deserves suspicion.
    """
    heat = np.clip(np.asarray(heat, dtype=np.float64), 0.0, None)
    total = heat.sum()
    if total <= 0:
        return None
    left, top, right, bottom = thorax_box_in_pixels((heat.shape[1], heat.shape[0]), content_box)
    return float(heat[top:bottom, left:right].sum() / total)


def to_png_bytes(image):
    """Encode a PIL image as PNG bytes (in memory)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
