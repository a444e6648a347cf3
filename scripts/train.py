"""Train a ResNet on an ImageFolder (``DATA/{train,val}/<class>/``) with a named recipe; also runs under torchrun."""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.errors import CovidScanError  # noqa: E402
from model.network import ARCHITECTURES  # noqa: E402
from model.presets import DEFAULT_PRESET, PRESETS, describe  # noqa: E402


def get_args_parser(add_help=True):
    """Command-line options of the training script: data, model, schedule and hardware; the recipe is ``--preset``."""
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help)
    parser.add_argument("--data", required=True, help="dataset root holding train/ and val/ (test/ is never read)")
    parser.add_argument("--output-dir", required=True, help="where best.pt, last.pt and metrics.csv go")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                        help="the training recipe (model/presets.py; default %(default)s): "
                             + "; ".join(f"{name}: {describe(name)}" for name in PRESETS))
    parser.add_argument("--arch", default="resnet152", choices=ARCHITECTURES)
    parser.add_argument("--weights", default="none", help="'none' (from scratch), 'imagenet' or a state-dict path")
    parser.add_argument("--freeze-backbone", action="store_true", help="train only the head (feature extractor)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--opt", default="adamw", choices=("adamw", "sgd"))
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=int, default=None, help="linear warm-up (default: the preset's)")
    parser.add_argument("--sampler", default="shuffle", choices=("shuffle", "source"),
                        help="'source' draws each (class, source_repo) group equally (needs MANIFEST.csv)")
    parser.add_argument("--manifest", default=None, help="MANIFEST.csv for --sampler source (default DATA/MANIFEST.csv)")
    parser.add_argument("--patience", type=int, default=0, help="early stopping after N epochs without val gain (0: off)")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="minutes: stop after the epoch when another one would end past this (0: no limit)")
    parser.add_argument("--fit-time-limit", action="store_true",
                        help="with --time-limit: shorten the cosine schedule (from the pace of epochs 2+) so it ends "
                             "inside the limit, instead of stopping part-way with the learning rate still high")
    parser.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                        help="write last.pt every N epochs and at the end (it holds the optimiser: ~1 GB for "
                             "resnet152 with the weight average)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", default=None, help="a last.pt to continue from, or 'auto' (OUTPUT_DIR/last.pt if present)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on GPU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the per-epoch progress bar")
    return parser


def main(args):
    """Configure logging and run training; domain errors end with a one-line message."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from model.training import train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        best_path = train(args)
    except CovidScanError as error:
        sys.exit(f"error: {error}")
    logging.getLogger(__name__).info("best checkpoint: %s", best_path)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
