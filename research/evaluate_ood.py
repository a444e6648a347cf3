"""Research: OOD evaluation, AUROC of the OOD score for real test X-rays against photos, CT/MR, text, noise, rotated/inverted X-rays."""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.errors import CovidScanError  # noqa: E402


def get_args_parser():
    """Command-line options of the OOD evaluation."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint exported with --calibrate")
    parser.add_argument("--data", required=True, help="real test X-rays, e.g. ../shared/data/cxr/test")
    parser.add_argument("--output-dir", default="outputs/ood")
    parser.add_argument("--limit", type=int, default=300, help="real test X-rays to sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-grids", type=int, nargs="*", default=[],
                        help="also refit Mahalanobis statistics pooled on these grids (e.g. 1 2) and compare them")
    parser.add_argument("--fit-data", help="dataset root with train/ and val/ for --compare-grids")
    parser.add_argument("--fit-limit", type=int, default=None, help="train images to sample for --compare-grids")
    parser.add_argument("--components", type=int, nargs="+", default=None,
                        help="PCA components for --compare-grids; several sizes are compared on every grid")
    return parser


def main(args):
    """Score every set and write ood.json and ood.md."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from model.inference import Predictor
    from model.ood import DEFAULT_COMPONENTS
    from research.ood_evaluation import evaluate_ood, fit_grid_statistics, format_ood_report

    if args.compare_grids and not args.fit_data:
        sys.exit("error: --compare-grids needs --fit-data (the dataset root with train/ and val/)")
    try:
        predictor = Predictor.from_path(args.checkpoint, backend="eager")
        compare = {}
        if args.compare_grids:
            sizes = args.components or [DEFAULT_COMPONENTS]
            fitted = fit_grid_statistics(predictor, args.fit_data, args.compare_grids, sizes,
                                         train_limit=args.fit_limit, seed=args.seed)
            compare = {(f"{grid}x{grid} pool" if len(sizes) == 1 else f"{grid}x{grid} pool, {size} components"):
                       statistics for (grid, size), statistics in fitted.items()}
        report = evaluate_ood(predictor, args.data, limit=args.limit, seed=args.seed, compare=compare)
    except CovidScanError as error:
        sys.exit(f"error: {error}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "ood.json").write_text(json.dumps(report, indent=2))
    table = format_ood_report(report)
    (output_dir / "ood.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
