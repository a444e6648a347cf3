"""Shortcut audit of a checkpoint on one split: per-source metrics, perturbation stability, source probe, LOSO table."""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.errors import CovidScanError  # noqa: E402


def select_perturbations(text):
    """The perturbations named by ``--perturbations`` (all, none or a comma-separated list of names)."""
    from model.audit import perturbation_suite

    suite = perturbation_suite()
    if text == "all":
        return suite
    if text == "none":
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - {perturbation.name for perturbation in suite})
    if unknown:
        raise CovidScanError(f"--perturbations: unknown {', '.join(unknown)}; choose from "
                             f"{', '.join(perturbation.name for perturbation in suite)}")
    return [perturbation for perturbation in suite if perturbation.name in names]


def get_args_parser():
    """Command-line options of the audit script."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="an ImageFolder split, e.g. ../shared/data/cxr/test")
    parser.add_argument("--manifest", default=None,
                        help="MANIFEST.csv with source_repo (default: DATA/../MANIFEST.csv)")
    parser.add_argument("--output-dir", default="outputs/audit", help="where audit.md, audit.json and plots go")
    parser.add_argument("--limit", type=int, default=None,
                        help="audit a class-and-source-stratified subset of N images")
    parser.add_argument("--seed", type=int, default=0, help="seeds the subset, the noise and the probe's folds")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--min-probe-images", type=int, default=10,
                        help="a source takes part in the source probe with at least this many images of the class")
    parser.add_argument("--perturbations", default="all", metavar="all|none|NAME[,NAME...]",
                        help="the perturbation suite, none of it (per-source metrics and the probe only), or the "
                             "named perturbations (names as in audit.json)")
    parser.add_argument("--loso-json", default=None, help="loso.json from scripts/loso.py, shown as part 4")
    return parser


def main(args):
    """Run the audit and print its summary; domain errors end with a one-line message."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from model.audit import REPORT_NAME, format_summary, run_audit

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run_audit(args.checkpoint, args.data, args.output_dir, manifest=args.manifest, limit=args.limit,
                           seed=args.seed, batch_size=args.batch_size, workers=args.workers, device=args.device,
                           loso_json=args.loso_json, min_probe_images=args.min_probe_images,
                           perturbations=select_perturbations(args.perturbations))
    except CovidScanError as error:
        sys.exit(f"error: {error}")
    print(format_summary(result))
    print(f"wrote {Path(args.output_dir) / REPORT_NAME}, audit.json and plots")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
