"""Where the class activation maps lie, per class and source: a coarse check of where the model looked.

No lung masks are available offline, so this measures fixed parts of the image frame, not anatomy:

- ``bottom``: the bottom quarter of the image. On most chest films that is below the diaphragm: the abdomen,
  and on paediatric films often the arms.
- ``band``: the outer 10 % on the other three sides: borders, burned-in labels, collimation, shoulders.
- ``centre``: the rest, where the lung fields lie on a frontal chest film.

Research, not product: ``python research/heatmap_audit.py --checkpoint C --data D/test --output-dir OUT``
(formerly ``scripts/audit.py --heatmaps``). The three shares of a heatmap's mass add up to one. The heatmap is the one the app shows: the CAM of the
predicted class mapped back onto the original image (``model.cam``). A class or source whose heat sits
mostly outside the centre is decided from something other than the lungs; a difference between two sources
of one class is a source shortcut the per-source accuracy may not show.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.audit import PerturbedImages, default_manifest, load_split, markdown_table, percent  # noqa: E402
from model.cam import ActivationRecorder, class_activation_maps, cam_to_image_space  # noqa: E402
from model.checkpoint import build_model_from_checkpoint, load_checkpoint  # noqa: E402
from model.transforms import build_eval_transform, seen_box  # noqa: E402

logger = logging.getLogger(__name__)

GRID = 32  # heatmaps are averaged on a GRID x GRID frame of the image (stretched to a square)
BOTTOM = 0.25
BAND = 0.10
REGIONS = ("centre", "band", "bottom")
REPORT_NAME = "heatmaps.md"
PLOT_NAME = "mean_heatmaps.png"


def region_masks(grid=GRID, bottom=BOTTOM, band=BAND):
    """Boolean masks of the three regions on a ``grid`` x ``grid`` frame; they partition the frame."""
    centres = (np.arange(grid) + 0.5) / grid
    rows, cols = np.meshgrid(centres, centres, indexing="ij")
    in_bottom = rows >= 1 - bottom
    in_band = ~in_bottom & ((rows < band) | (cols < band) | (cols >= 1 - band))
    return {"centre": ~(in_bottom | in_band), "band": in_band, "bottom": in_bottom}


def heat_shares(frame, masks):
    """Share of the frame's heat in each region (NaN for a frame without heat)."""
    total = float(frame.sum())
    if total <= 0:
        return {name: float("nan") for name in masks}
    return {name: float(frame[mask].sum()) / total for name, mask in masks.items()}


def heat_frame(cam, transform_params, image_size, grid=GRID, content_box=None):
    """A CAM (network input space) as heat over the original image, resampled onto a ``grid`` x ``grid`` frame
    (``content_box``: what the model saw of a border-trimmed image, ``model.transforms.seen_box``)."""
    width, height = image_size
    scale = 4 * grid / max(width, height)  # the letterbox geometry needs the aspect ratio, not the full size
    small = (max(1, round(width * scale)), max(1, round(height * scale)))
    heat = cam_to_image_space(cam, transform_params, small, content_box=content_box)
    return np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((grid, grid), Image.BILINEAR))


def predicted_class_frames(network, transform, transform_params, split, *, batch_size=32, workers=0, device="cpu"):
    """Predicted class and heat frame of every image of ``split`` (decoded), in order."""
    loader = DataLoader(PerturbedImages(split, transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers)
    recorder = ActivationRecorder(network)
    predictions, frames = [], []
    try:
        with torch.inference_mode():
            for images, _ in loader:
                predicted = network(images.to(device)).argmax(dim=1)
                cams = class_activation_maps(recorder.activations, network.fc.weight, predicted)
                for cam in cams:
                    index = len(frames)
                    image = split.images[index]
                    frames.append(heat_frame(cam, transform_params, image.size,
                                             content_box=seen_box(transform_params, image)))
                predictions.extend(predicted.cpu().tolist())
    finally:
        recorder.remove()
    return np.asarray(predictions), np.stack(frames)


def peak_region(frame, masks):
    """The region that holds the frame's hottest point (the spot the overlay shows most strongly)."""
    row, col = np.unravel_index(int(np.argmax(frame)), frame.shape)
    return next(name for name in REGIONS if masks[name][row, col])


def summarise_groups(frames, targets, predictions, sources, class_names, masks):
    """Mean region shares, where the peaks lie and the mean frame per (true class, source), plus one row per class."""
    shares = np.array([[heat_shares(frame, masks)[name] for name in REGIONS] for frame in frames])
    peaks = np.array([peak_region(frame, masks) for frame in frames])
    sources, predictions = np.asarray(sources), np.asarray(predictions)
    groups = []
    for class_index, class_name in enumerate(class_names):
        in_class = np.asarray(targets) == class_index
        for source in [*sorted(set(sources[in_class])), None]:  # each source, then the class as a whole
            selected = in_class & (sources == source) if source else in_class
            if not selected.any():
                continue
            mean = np.nanmean(shares[selected], axis=0)
            groups.append({
                "class": class_name, "source": str(source) if source else "all", "n": int(selected.sum()),
                "correct": float(np.mean(predictions[selected] == class_index)),
                **{f"share_{name}": float(value) for name, value in zip(REGIONS, mean)},
                **{f"peak_{name}": float(np.mean(peaks[selected] == name)) for name in REGIONS},
                "mean_frame": frames[selected].mean(axis=0).round(4).tolist(),
            })
    return groups


def run_heatmap_audit(checkpoint_path, data_dir, output_dir, *, manifest=None, limit=None, seed=0, batch_size=32,
                      workers=0, device="cpu"):
    """Measure where the heatmaps lie on one split; write heatmaps.md, heatmaps.json and a plot; return the dict."""
    started = time.perf_counter()
    checkpoint = load_checkpoint(checkpoint_path)
    class_names = checkpoint["class_names"]
    manifest = Path(manifest) if manifest else default_manifest(data_dir)
    split = load_split(data_dir, class_names, manifest, limit=limit, seed=seed).decode()
    network = build_model_from_checkpoint(checkpoint).to(device)
    logger.info("heatmaps of %d images", len(split.paths))
    predictions, frames = predicted_class_frames(
        network, build_eval_transform(checkpoint["transform"]), checkpoint["transform"], split,
        batch_size=batch_size, workers=workers, device=device,
    )
    masks = region_masks()
    result = {
        "checkpoint": {"path": str(checkpoint_path), "arch": checkpoint["arch"],
                       "model_version": checkpoint.get("model_version", checkpoint.get("created_at")),
                       "transform": checkpoint["transform"]},
        "data": str(data_dir), "limit": limit, "seed": seed, "n": len(split.paths),
        "regions": {"grid": GRID, "bottom": BOTTOM, "band": BAND,
                    "area": {name: float(mask.mean()) for name, mask in masks.items()}},
        "sources": split.source_repos,
        "groups": summarise_groups(frames, split.targets, predictions, split.sources, class_names, masks),
    }
    result["wall_seconds"] = time.perf_counter() - started
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "heatmaps.json").write_text(json.dumps(result, indent=2))
    (output_dir / REPORT_NAME).write_text(format_report(result))
    plot_mean_heatmaps(result, output_dir / PLOT_NAME)
    return result


def format_report(result):
    """The markdown report: what the regions are, then one row per (class, source)."""
    area = result["regions"]["area"]
    lines = [
        "# Where the heatmaps lie",
        "",
        f"- checkpoint: `{Path(result['checkpoint']['path']).name}` ({result['checkpoint']['arch']}, "
        f"version {result['checkpoint']['model_version']})",
        f"- data: `{result['data']}`, {result['n']} images"
        + (f" (stratified subset, seed {result['seed']})" if result["limit"] else ""),
        "- heatmap: class activation map of the **predicted** class over the original image (what the app shows)",
        f"- regions of the image frame (share of its area): centre {percent(area['centre'])}, outer band "
        f"{percent(area['band'])} (10 % at the top and sides), bottom quarter {percent(area['bottom'])}. "
        "These are parts of the frame, not anatomy: no lung masks are available here.",
        "",
        "Share of the heat in each region (mean over images; heat spread evenly would give the area shares above),",
        "and share of images whose hottest point, the spot the overlay shows most strongly, lies in each region.",
        "",
    ]
    rows = [[group["class"], f"`{group['source']}`" if group["source"] != "all" else "**all**", str(group["n"]),
             percent(group["correct"]), *(percent(group[f"share_{name}"]) for name in REGIONS),
             *(percent(group[f"peak_{name}"]) for name in REGIONS)]
            for group in result["groups"]]
    lines.append(markdown_table(["class", "source", "n", "predicted correctly", "heat: centre", "outer band",
                                  "bottom quarter", "peak: centre", "outer band", "bottom quarter"], rows))
    lines += ["", f"![mean heatmaps]({PLOT_NAME})", "", f"Wall time {result['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def format_summary(result):
    """A few lines for the terminal: per (class, source), the heat shares and how often the peak lies low."""
    return "\n".join(
        f"heatmaps {group['class']:10s} {group['source']:8s} n={group['n']:4d}  centre {group['share_centre']:.2f}  "
        f"band {group['share_band']:.2f}  bottom {group['share_bottom']:.2f} | peak in the bottom quarter "
        f"{group['peak_bottom']:.2f}"
        for group in result["groups"]
    )


def plot_mean_heatmaps(result, path):
    """One panel per (class, source): the mean heat frame, with the region borders drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [group for group in result["groups"] if group["source"] != "all"]
    figure, axes = plt.subplots(1, max(1, len(groups)), figsize=(2.2 * max(1, len(groups)), 2.6), squeeze=False)
    grid = result["regions"]["grid"]
    for axis, group in zip(axes[0], groups):
        axis.imshow(np.asarray(group["mean_frame"]), cmap="jet", vmin=0, extent=(0, 1, 1, 0))
        bottom, band = 1 - result["regions"]["bottom"], result["regions"]["band"]
        axis.plot([0, 1], [bottom, bottom], color="white", linewidth=1)
        axis.plot([band, band, 1 - band, 1 - band], [bottom, band, band, bottom], color="white", linewidth=0.8,
                  linestyle="--")
        axis.set_title(f"{group['class']}\n{group['source']} (n={group['n']})", fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"Mean heatmap of the predicted class per true class and source ({grid}x{grid} frame of the "
                    "image; each panel scaled to its own maximum; lines: bottom quarter, outer band)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def get_args_parser():
    """Command-line options of the heatmap-location audit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="an ImageFolder split, e.g. ../shared/data/cxr/test")
    parser.add_argument("--manifest", default=None, help="MANIFEST.csv with source_repo (default: DATA/../MANIFEST.csv)")
    parser.add_argument("--output-dir", required=True, help="where heatmaps.md, heatmaps.json and the plot go")
    parser.add_argument("--limit", type=int, default=None, help="a class-and-source-stratified subset of N images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    return parser


def main(args):
    """Run the heatmap audit and print its summary; domain errors end with a one-line message."""
    from model.errors import CovidScanError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run_heatmap_audit(args.checkpoint, args.data, args.output_dir, manifest=args.manifest,
                                   limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                                   workers=args.workers, device=args.device)
    except CovidScanError as error:
        sys.exit(f"error: {error}")
    print(format_summary(result))
    print(f"wrote {Path(args.output_dir) / REPORT_NAME}, heatmaps.json and the plot")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
