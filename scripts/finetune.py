"""Fine-tune a trained checkpoint's last stages on new data without a GPU (warm start, cached features).

Example (the v2 retrain of the shipped model on the 2-core CPU)::

    python scripts/finetune.py --checkpoint models/default.pt --data ../shared/data/cxr --output-dir runs/finetune

Writes OUTPUT_DIR/best.pt (selected on val, calibrated), last.pt (resume: run the same command again),
metrics.csv and calibration.json. Export it with scripts/export.py like any other checkpoint.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.errors import CovidScanError  # noqa: E402


def get_args_parser():
    """Command-line options of the fine-tuning script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="the trained checkpoint to start from")
    parser.add_argument("--data", required=True, help="dataset root holding train/, val/ and MANIFEST.csv")
    parser.add_argument("--output-dir", required=True, help="where the cache, best.pt, last.pt and metrics.csv go")
    parser.add_argument("--manifest", default=None, help="MANIFEST.csv with each film's source_repo "
                                                         "(default DATA/MANIFEST.csv)")
    parser.add_argument("--cache-dir", default=None, help="where the cached features go (default OUTPUT_DIR/cache); "
                                                          "runs on the same checkpoint, data and --train-from share it")
    parser.add_argument("--holdout-source", action="append", default=None, metavar="SOURCE",
                        help="leave this source out of training and of model selection, and report its val films "
                             "(leave-one-source-out; SOURCE is the file-name tag, e.g. nih; repeatable)")
    parser.add_argument("--train-from", default="layer4",
                        help="first trainable block: 'layer4' (layer4 + fc) or 'layer3.K' (also blocks K.. of layer3)")
    parser.add_argument("--recipe", default=None, choices=("tutorial", "robust"),
                        help="augmentation recipe of the cached views (default: the checkpoint's)")
    parser.add_argument("--views", type=int, default=2, help="augmented views cached per training film, beside the "
                                                             "clean one (default %(default)s)")
    parser.add_argument("--min-group", type=int, default=100,
                        help="(class, source) groups with at least this many training films are drawn equally often "
                             "within their class; smaller ones keep their natural share (default %(default)s)")
    parser.add_argument("--balance", type=float, default=1.0,
                        help="1: draw (class, source) groups as above; 0: draw every film equally often; in between "
                             "a blend of the two (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--false-flag-rate", type=float, default=0.01,
                        help="share of real val X-rays the OOD threshold may flag (default %(default)s); running the "
                             "same command again after training only recalibrates")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                        help="bf16 autocast (fast on CPUs with AVX-512 BF16 / AMX) or plain fp32")
    parser.add_argument("--time-limit", type=float, default=0, help="minutes of training after the cache (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="data-loading worker processes for the cache")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return parser


def main(args):
    """Configure logging and fine-tune; domain errors end with a one-line message."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from model.finetune import finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        best_path = finetune(args)
    except CovidScanError as error:
        sys.exit(f"error: {error}")
    logging.getLogger(__name__).info("best checkpoint: %s", best_path)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
