"""Turn a training checkpoint (best.pt / last.pt) into a serving checkpoint, optionally float16."""

import argparse
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
    serving = to_serving(checkpoint, half=args.half)
    if args.model_version:
        serving["model_version"] = args.model_version
    path = save_checkpoint(serving, args.output)
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({size_mb:.1f} MiB, sha256 {file_sha256(path)})")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
