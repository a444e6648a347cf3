"""Write a compact copy of an ImageFolder's train and val splits (grayscale JPEG, longer side <= N px).

For training on a lent GPU machine, which receives only the repository's working tree (64 MiB): CXR-3's
train+val at 256 px and quality 90 take 50.8 MiB. Write it into a git-ignored folder (data/ is one).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.preparation import DataPreparationError, compact_copy  # noqa: E402


def get_args_parser():
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, type=Path, help="ImageFolder root, e.g. ../shared/data/cxr")
    parser.add_argument("--output", required=True, type=Path, help="where the copy goes, e.g. data/cxr256")
    parser.add_argument("--splits", nargs="+", default=["train", "val"],
                        help="train and val only: the test split never goes into a training copy "
                             "(the GPU audit, gpu_run.sh, carries test unchanged)")
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--workers", type=int, default=4)
    return parser


def main(args):
    """Write the copy and print its size."""
    start = time.perf_counter()
    try:
        counts = compact_copy(args.data, args.output, tuple(args.splits), args.max_side, args.quality, args.workers)
    except DataPreparationError as error:
        sys.exit(f"error: {error}")
    size = sum(path.stat().st_size for path in args.output.rglob("*") if path.is_file())
    print(f"wrote {sum(counts.values())} images {counts} to {args.output}: {size / 2**20:.1f} MiB "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
