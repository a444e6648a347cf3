"""Batch triage: predict every X-ray in files and folders, write a CSV with the most urgent first."""

import argparse
import csv
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from model.errors import CovidScanError  # noqa: E402

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
DICOM_MAGIC_OFFSET, DICOM_MAGIC = 128, b"DICM"
# Classes whose probability does not make a study urgent; every other class does.
NON_URGENT_CLASSES = ("NORMAL",)


def get_args_parser():
    """Command-line options of batch triage."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files and folders (searched recursively for .png/.jpg/.jpeg/.dcm and DICOM files "
                             "without an extension)")
    parser.add_argument("--checkpoint", required=True, help="serving checkpoint, e.g. models/default.pt")
    parser.add_argument("--output", required=True, help="CSV to write, one row per input, most urgent first")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="decoding processes (0 decodes in the main process)")
    parser.add_argument("--backend", default=None,
                        help="inference backend (default: COVIDSCAN_INFERENCE_BACKEND, else the int8 fast path beside the "
                             "checkpoint when this CPU runs it, else float32 ONNX; 'onnx' forces float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the forward pass")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(args):
    """Find inputs, predict in batches, write the sorted CSV, report images per second."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from model.inference import Predictor
    from model.log_guard import install_log_guard

    install_log_guard()  # DICOM headers are patient data: library warnings lose the values they quote

    if args.batch_size < 1 or args.workers < 0:
        sys.exit("error: --batch-size must be at least 1 and --workers at least 0")
    try:
        paths, skipped = find_inputs(args.inputs)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    if not paths:
        sys.exit(f"error: no images found in {', '.join(args.inputs)} (looked for {', '.join(IMAGE_SUFFIXES)} and DICOM)")
    if skipped:
        logger.info("skipped %d file(s) in the input folders that are not images by name", skipped)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        predictor = Predictor.from_path(args.checkpoint, backend=args.backend)
    except CovidScanError as error:
        sys.exit(f"error: {error}")
    logger.info("model %s (%s backend); %d input(s)", predictor.model_info["name"], predictor.backend, len(paths))

    start = time.perf_counter()
    records = predict_paths(predictor, paths, batch_size=args.batch_size, workers=args.workers,
                            progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    ranked = rank_by_urgency(records)
    write_csv(ranked, args.output, predictor.class_names)

    failed = sum(1 for record in records if record["error"])
    print(f"{len(records)} input(s): {len(records) - failed} predicted, {failed} unreadable (reasons in the CSV); "
          f"{len(records) / elapsed:.1f} images/s over {elapsed:.1f} s; wrote {args.output}")


def find_inputs(inputs):
    """Files named on the command line, plus image files found recursively in named folders (sorted, unique).

    Returns (paths, number of folder entries skipped because they are not images by name or DICOM preamble).
    Raises ``FileNotFoundError`` for an input that does not exist.
    """
    found, seen, skipped = [], set(), 0
    for entry in map(Path, inputs):
        if entry.is_dir():
            candidates = sorted(path for path in entry.rglob("*") if path.is_file())
            for path in candidates:
                if any(part.startswith(".") for part in path.relative_to(entry).parts):
                    continue
                if is_image_file(path):
                    found.append(path)
                else:
                    skipped += 1
        elif entry.is_file():
            found.append(entry)  # named explicitly: predicted, or reported with a reason
        else:
            raise FileNotFoundError(f"no such file or folder: {entry}")
    unique = []
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, skipped


def is_image_file(path):
    """An image by its extension, or an extension-less file that starts with the DICOM preamble."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix:
        return False
    try:
        with path.open("rb") as handle:
            head = handle.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    except OSError:
        return True  # let the dataset report why it cannot be read
    return head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC


class TriageDataset(Dataset):
    """Decodes files with the upload decoder and applies the checkpoint's eval transform; bad files give a reason."""

    def __init__(self, paths, transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        """(index, tensor, error reason, failed input checks); tensor None and a reason for a bad file."""
        from model.ood import input_check_reasons
        from model.decode import decode_upload

        try:
            decoded = decode_upload(self.paths[index].read_bytes())
            return index, self.transform(decoded.image), None, input_check_reasons(decoded)
        except CovidScanError as error:
            return index, None, str(error), []
        except OSError as error:
            return index, None, f"cannot read the file ({error.strerror or type(error).__name__})", []
        except Exception as error:  # one odd file must not stop a triage run; logged, then reported in the CSV
            logger.exception("unexpected error while decoding input #%d", index)
            return index, None, f"unexpected error while decoding ({type(error).__name__})", []


def collate_good_and_bad(items):
    """Stack the decoded images of a batch; keep the failures aside as (index, reason)."""
    good = [(index, tensor, checks) for index, tensor, reason, checks in items if reason is None]
    bad = [(index, reason) for index, _, reason, _ in items if reason is not None]
    indices = [index for index, _, _ in good]
    batch = torch.stack([tensor for _, tensor, _ in good]) if good else None
    return indices, batch, bad, [checks for _, _, checks in good]


def predict_paths(predictor, paths, *, batch_size=16, workers=2, progress=True):
    """One record per path (in input order): label, probabilities, OOD verdict, or an error reason."""
    from tqdm import tqdm

    loader = DataLoader(
        TriageDataset(paths, predictor.transform),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_good_and_bad,
        prefetch_factor=4 if workers else None,
    )
    records = [None] * len(paths)
    with tqdm(total=len(paths), unit="image", disable=not progress, file=sys.stderr) as bar:
        for indices, batch, bad, input_reasons in loader:
            for index, reason in bad:
                records[index] = make_record(paths[index], error=reason)
            if batch is not None:
                logits, activations = predictor.forward(batch)
                probabilities = predictor.probabilities_from_logits(logits)
                ood = predictor.ood_check(activations, input_reasons)
                for position, index in enumerate(indices):
                    values = dict(zip(predictor.class_names, probabilities[position].tolist()))
                    records[index] = make_record(paths[index], probabilities=values, ood=ood[position])
            bar.update(len(indices) + len(bad))
    return records


def make_record(path, *, probabilities=None, ood=None, error=""):
    """One result row before ranking; a flagged image keeps its probabilities but gets no label and no urgency."""
    label, urgency = "", None
    if probabilities and not (ood and ood.get("flagged")):
        label = max(probabilities, key=probabilities.get)
        urgent = [value for name, value in probabilities.items() if name not in NON_URGENT_CLASSES]
        urgency = max(urgent) if urgent else 0.0
    return {"path": str(path), "label": label, "urgency": urgency, "probabilities": probabilities or {},
            "ood": ood, "error": error}


def rank_by_urgency(records):
    """Most urgent first (ties by path); then flagged images (no urgency), by path; unreadable files last, unranked."""
    predicted = sorted((r for r in records if not r["error"] and r["urgency"] is not None),
                       key=lambda r: (-r["urgency"], r["path"]))
    flagged = sorted((r for r in records if not r["error"] and r["urgency"] is None), key=lambda r: r["path"])
    failed = sorted((r for r in records if r["error"]), key=lambda r: r["path"])
    for rank, record in enumerate(predicted + flagged, start=1):
        record["rank"] = rank
    for record in failed:
        record["rank"] = ""
    return predicted + flagged + failed


def write_csv(records, output, class_names):
    """Write the ranked rows atomically (temporary file in the same folder, then rename)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    columns = ["rank", "path", "label", "urgency"] + [f"probability_{name}" for name in class_names]
    # The input checks run for every checkpoint; the score needs one exported with --calibrate.
    columns += ["ood_flagged", "ood_score", "ood_reasons"]
    columns += ["error"]
    descriptor, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(descriptor, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for record in records:
                row = {"rank": record["rank"], "path": record["path"], "label": record["label"],
                       "urgency": "" if record["urgency"] is None else f"{record['urgency']:.6f}",
                       "error": record["error"]}
                for name in class_names:
                    value = record["probabilities"].get(name)
                    row[f"probability_{name}"] = "" if value is None else f"{value:.6f}"
                ood = record["ood"]
                row["ood_flagged"] = "" if ood is None else str(ood["flagged"]).lower()
                row["ood_score"] = "" if ood is None or ood["score"] is None else f"{ood['score']:.3f}"
                row["ood_reasons"] = "" if ood is None else " ".join(ood.get("reasons", []))
                writer.writerow(row)
        os.chmod(temporary, 0o644)
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return output


if __name__ == "__main__":
    main(get_args_parser().parse_args())
