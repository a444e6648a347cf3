"""Evaluate a checkpoint on one ImageFolder split; write metrics.json and plots, print a table."""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.errors import CovidScanError  # noqa: E402


def get_args_parser():
    """Command-line options of the evaluation script."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="an ImageFolder split, e.g. ../shared/data/cxr/test")
    parser.add_argument("--output-dir", default="outputs/evaluation")
    parser.add_argument("--manifest", default=None,
                        help="MANIFEST.csv for per-group sensitivity (class x source, class x age band); default: "
                             "the MANIFEST.csv beside the split folder when there is one; 'none' to skip")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def main(args):
    """Evaluate and print the metrics table; domain errors end with a one-line message."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from model.evaluation import default_manifest, evaluate_checkpoint
    from model.metrics import format_group_table, format_metrics_table

    manifest = None if args.manifest == "none" else (args.manifest or default_manifest(args.data))
    if manifest is not None and not Path(manifest).is_file():
        sys.exit(f"error: manifest not found: {manifest}")
    try:
        metrics = evaluate_checkpoint(
            args.checkpoint, args.data, args.output_dir,
            batch_size=args.batch_size, workers=args.workers, device=args.device, progress=args.progress,
            manifest=manifest,
        )
    except CovidScanError as error:
        sys.exit(f"error: {error}")
    print(format_metrics_table(metrics))
    print(f"ECE before calibration {metrics['ece_uncalibrated']:.4f}, after (T={metrics['temperature']:.3f}) "
          f"{metrics['ece']:.4f}")
    for kind, title in (("source", "source"), ("age_band", "age band")):
        if metrics.get("per_group", {}).get(kind):
            print(f"sensitivity per class x {title} ({manifest}):")
            print(format_group_table(metrics["per_group"][kind], title))
    print(f"wrote {Path(args.output_dir) / 'metrics.json'} and plots")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
