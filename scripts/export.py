"""Turn a training checkpoint (best.pt / last.pt) into a serving checkpoint, optionally float16."""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.errors import CovidScanError  # noqa: E402


def get_args_parser():
    """Command-line options of the export script."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by scripts/train.py")
    parser.add_argument("--output", required=True, help="serving checkpoint to write, e.g. models/default.pt")
    parser.add_argument("--half", action="store_true", help="store weights as float16 (half the size; loads as float32)")
    parser.add_argument("--model-version", default=None, help="version string shown by the app (default: created_at)")
    parser.add_argument("--calibrate", metavar="DATA", default=None,
                        help="dataset root: fit the temperature on DATA/val and OOD statistics on DATA/train")
    parser.add_argument("--false-flag-rate", type=float, default=0.01,
                        help="share of real val X-rays the OOD threshold may flag (default 0.01)")
    parser.add_argument("--workers", type=int, default=2)
    return parser


def main(args):
    """Export and report the file's size and SHA-256."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from model.checkpoint import load_checkpoint, save_checkpoint, to_serving
    from model.inference import file_sha256

    try:
        checkpoint = load_checkpoint(args.checkpoint)
    except CovidScanError as error:
        sys.exit(f"error: {error}")
    if args.calibrate:
        from model.calibration import calibrate_checkpoint

        try:
            report = calibrate_checkpoint(
                checkpoint, args.calibrate, false_flag_rate=args.false_flag_rate, workers=args.workers
            )
        except CovidScanError as error:
            sys.exit(f"error: {error}")
        print(json.dumps(report, indent=2))
    serving = to_serving(checkpoint, half=args.half)
    if args.model_version:
        serving["model_version"] = args.model_version
    path = save_checkpoint(serving, args.output)
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({size_mb:.1f} MiB, sha256 {file_sha256(path)})")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
