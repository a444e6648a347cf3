"""Build the 3-class (COVID/NORMAL/PNEUMONIA) ImageFolder and MANIFEST.csv from public sources."""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.preparation import (  # noqa: E402  (imported after the repository root is on sys.path)
    DEFAULT_MAX_HAMMING,
    DataPreparationError,
    format_summary,
    parse_extra,
    prepare_dataset,
)


def get_args_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--kermany", type=Path, help="Kermany et al. folder ({train,val,test}/{NORMAL,PNEUMONIA}/, or its parent)"
    )
    parser.add_argument(
        "--covid-collection", type=Path, help="COVID-19 image data collection folder (metadata.csv, images/)"
    )
    parser.add_argument(
        "--rsna",
        type=Path,
        help="RSNA Pneumonia Detection Challenge folder (stage_2_detailed_class_info.csv, stage_2_train_images/)",
    )
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="a folder of images that all have LABEL (COVID, NORMAL or PNEUMONIA); may be repeated",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="folder to write {train,val,test}/<class>/ and MANIFEST.csv"
    )
    parser.add_argument("--val", type=float, default=0.15, help="fraction of images for validation (by patient)")
    parser.add_argument("--test", type=float, default=0.15, help="fraction of images for test (by patient)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the patient-level split")
    parser.add_argument(
        "--max-side",
        type=int,
        default=None,
        metavar="N",
        help="re-encode as grayscale with the longer side at most N px (default: copy the originals)",
    )
    parser.add_argument(
        "--max-hamming",
        type=int,
        default=DEFAULT_MAX_HAMMING,
        help="images whose 256-bit difference hashes differ in at most this many bits are duplicates",
    )
    parser.add_argument("--workers", type=int, default=4, help="threads used to decode and hash images")
    parser.add_argument(
        "--force", action="store_true", help="replace the output of an earlier run in a non-empty --output"
    )
    return parser


def main(args: argparse.Namespace) -> None:
    """Run the preparation and print its summary; exit 2 with a one-line message on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = prepare_dataset(
            output_dir=args.output,
            kermany_dir=args.kermany,
            covid_collection_dir=args.covid_collection,
            extras=[parse_extra(spec) for spec in args.extra],
            val_fraction=args.val,
            test_fraction=args.test,
            seed=args.seed,
            max_side=args.max_side,
            force=args.force,
            max_hamming=args.max_hamming,
            workers=args.workers,
            rsna_dir=args.rsna,
        )
    except DataPreparationError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_summary(report))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
