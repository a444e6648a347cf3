"""Turn a training checkpoint (best.pt / last.pt) into a serving checkpoint, optionally float16.

With ``--calibrate DATA`` (or ``--references DATA`` alone) it also stores reference inputs from DATA/val and the
probabilities the exported weights give them, which the server re-checks at start-up (model/references.py).
``--references DATA`` on an existing serving checkpoint adds them without refitting anything.
With ``--int8 DATA`` it also writes the int8 fast path beside the serving checkpoint (``models/default.pt`` ->
``models/default.int8.onnx``), calibrated on DATA/val (model/quantize.py); without ``--output`` it only does that,
for the serving checkpoint given as ``--checkpoint``, which is left as it is.
"""

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
    parser.add_argument("--output", default=None,
                        help="serving checkpoint to write, e.g. models/default.pt (may be left out with --int8 alone)")
    parser.add_argument("--half", action="store_true", help="store weights as float16 (half the size; loads as float32)")
    parser.add_argument("--model-version", default=None, help="version string shown by the app (default: created_at)")
    parser.add_argument("--calibrate", metavar="DATA", default=None,
                        help="dataset root: fit the temperature on DATA/val and OOD statistics on DATA/train")
    parser.add_argument("--false-flag-rate", type=float, default=0.01,
                        help="share of real val X-rays the OOD threshold may flag (default 0.01)")
    parser.add_argument("--ood-grid", type=int, default=None,
                        help="pool the last block onto this square grid for the OOD features (default 2; 1 = fc's input)")
    parser.add_argument("--ood-components", type=int, default=None, help="PCA components of the OOD features (default 128)")
    parser.add_argument("--references", metavar="DATA", default=None,
                        help="dataset root: store reference inputs from DATA/val (default: the --calibrate data); "
                             "also adds them to an existing serving checkpoint")
    parser.add_argument("--no-references", action="store_true",
                        help="store no reference inputs (the server then starts with a warning)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--onnx", metavar="PATH", default=None,
                        help="also write the network as ONNX (input 'images'; outputs 'logits' and the last block's "
                             "'features'), for runtimes without PyTorch")
    parser.add_argument("--int8", metavar="DATA", default=None,
                        help="dataset root: also write the int8 fast path (OUTPUT's name with .int8.onnx), its "
                             "activation ranges calibrated on DATA/val films")
    parser.add_argument("--int8-films", type=int, default=None,
                        help="val films to calibrate the int8 fast path on (default 300, the same number per class)")
    return parser


def main(args):
    """Export and report the file's size and SHA-256."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from model.checkpoint import load_checkpoint, save_checkpoint, to_serving
    from model.inference import file_sha256

    if args.output is None:
        if not args.int8:
            sys.exit("error: give --output (the serving checkpoint to write), or --int8 DATA alone to quantize "
                     "--checkpoint")
        write_int8(args.checkpoint, args.int8, films=args.int8_films)
        return

    try:
        checkpoint = load_checkpoint(args.checkpoint)
    except CovidScanError as error:
        sys.exit(f"error: {error}")
    if args.calibrate:
        from model.calibration import calibrate_checkpoint

        try:
            report = calibrate_checkpoint(
                checkpoint, args.calibrate, false_flag_rate=args.false_flag_rate, workers=args.workers,
                grid=args.ood_grid, components=args.ood_components,
            )
        except CovidScanError as error:
            sys.exit(f"error: {error}")
        print(json.dumps(report, indent=2))
    # A serving checkpoint that already stores float16 stays float16 (float16 -> float32 -> float16 is exact).
    serving = to_serving(checkpoint, half=args.half or checkpoint.get("storage_dtype") == "float16")
    if args.model_version:
        serving["model_version"] = args.model_version
    reference_data = None if args.no_references else (args.references or args.calibrate)
    if reference_data:
        from model.references import REFERENCES_KEY, build_references

        try:
            serving[REFERENCES_KEY] = build_references(serving, Path(reference_data) / "val", workers=args.workers)
        except CovidScanError as error:
            sys.exit(f"error: {error}")
        print(f"stored {len(serving[REFERENCES_KEY])} reference input(s) from {Path(reference_data) / 'val'}")
    elif args.no_references:
        serving.pop("references", None)
    path = save_checkpoint(serving, args.output)
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({size_mb:.1f} MiB, sha256 {file_sha256(path)})")
    if args.onnx:
        write_onnx(serving, args.onnx)
    if args.int8:
        write_int8(path, args.int8, films=args.int8_films)


def write_int8(checkpoint_path, data, *, films=None):
    """Quantize a serving checkpoint into its int8 fast-path file; refuse one whose answers drift from float32."""
    import model.quantize as quantize
    from model.inference import Predictor, file_sha256

    output = quantize.fast_path_path(checkpoint_path)
    try:
        predictor = Predictor.from_path(checkpoint_path, backend="eager")
        report = quantize.quantize_checkpoint(predictor, Path(data) / "val", output,
                                              limit=films or quantize.CALIBRATION_FILMS)
    except CovidScanError as error:
        sys.exit(f"error: {error}")
    print(json.dumps(report, indent=2))
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB, sha256 {file_sha256(output)})")


def write_onnx(checkpoint, path):
    """Export the checkpoint's network (batch dimension dynamic) to an ONNX file."""
    import torch

    from model.checkpoint import build_model_from_checkpoint
    from model.runtime import export_onnx

    transform = checkpoint["transform"]
    example_input = torch.zeros(1, transform["channels"], transform["crop_size"], transform["crop_size"])
    network = build_model_from_checkpoint(load_serving_weights(checkpoint))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(network, example_input, path)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def load_serving_weights(checkpoint):
    """The checkpoint with float32 weights (a --half export stores float16)."""
    state = {key: value.float() if value.is_floating_point() else value for key, value in checkpoint["state_dict"].items()}
    return {**checkpoint, "state_dict": state}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
