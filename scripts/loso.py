"""Leave-one-source-out: retrain without each (class, source) in turn and test on the held-out source.

Takes every option of scripts/train.py (passed through to the project's trainer), with cheaper defaults.
"""

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.errors import CovidScanError  # noqa: E402

LOSO_ONLY_OPTIONS = ("holdout", "min_train_images", "eval_batch_size", "merge")


def _train_script():
    """scripts/train.py as a module, for its option parser (the single definition of the training options)."""
    spec = importlib.util.spec_from_file_location("covidscan_train_script", Path(__file__).with_name("train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_args_parser():
    """scripts/train.py's options (LOSO defaults: resnet18, 64 px, 3 epochs) plus the held-out sources."""
    parser = argparse.ArgumentParser(description=__doc__, parents=[_train_script().get_args_parser(add_help=False)],
                                     conflict_handler="resolve")
    parser.set_defaults(arch="resnet18", image_size=64, epochs=3)
    parser.add_argument("--data", required=True, help="dataset root holding train/, val/ and test/")
    parser.add_argument("--output-dir", required=True,
                        help="fold folders (symlinked data, runs), loso.json and loso.md go here; "
                             "keep it outside the repo")
    parser.add_argument("--manifest", default=None, help="MANIFEST.csv with source_repo (default DATA/MANIFEST.csv)")
    parser.add_argument("--holdout", action="append", default=None, metavar="CLASS:SOURCE",
                        help="fold to run, e.g. NORMAL:kermany (repeatable); default: every source of each class "
                             "that has two or more sources with --min-train-images train images")
    parser.add_argument("--min-train-images", type=int, default=50)
    parser.add_argument("--eval-batch-size", type=int, default=32, help="batch size on the held-out test images")
    parser.add_argument("--merge", nargs="+", metavar="LOSO_JSON", default=None,
                        help="instead of training, merge loso.json files of the same configuration into "
                             "OUTPUT_DIR/loso.json (e.g. folds run separately); --data is then not read")
    return parser


def main(args):
    """Run the folds and print the table; domain errors end with a one-line message."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from model.audit import format_loso_markdown, leave_one_source_out, merge_loso_results

    if args.merge:
        try:
            result = merge_loso_results([json.loads(Path(path).read_text()) for path in args.merge])
        except (OSError, ValueError) as error:
            sys.exit(f"error: cannot read the --merge files: {error}")
        except CovidScanError as error:
            sys.exit(f"error: {error}")
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "loso.json").write_text(json.dumps(result, indent=2))
        (output_dir / "loso.md").write_text(format_loso_markdown(result) + "\n")
        print(format_loso_markdown(result))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    train_args = argparse.Namespace(**{key: value for key, value in vars(args).items() if key not in LOSO_ONLY_OPTIONS})
    try:
        result = leave_one_source_out(
            args.data, args.output_dir, train_args, manifest=args.manifest, holdouts=args.holdout,
            min_train_images=args.min_train_images, batch_size=args.eval_batch_size, workers=args.workers,
            device=args.device,
        )
    except CovidScanError as error:
        sys.exit(f"error: {error}")
    print(format_loso_markdown(result))
    print(f"wrote {Path(args.output_dir) / 'loso.json'} and loso.md")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
