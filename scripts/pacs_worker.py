"""PACS worker: triage every new chest X-ray of a DICOMweb PACS into the worklist, writing results back to the study.

Reads COVIDSCAN_MODEL_PATH and COVIDSCAN_DATABASE_URL like the app, and checks the model as the app does
(COVIDSCAN_MODEL_SHA256, COVIDSCAN_ALLOWED_CLASS_NAMES, the checkpoint's reference films) before it writes
anything; COVIDSCAN_PACS_WRITE_BACK=0 keeps the results out of the PACS. ``--once`` processes everything pending
and exits; otherwise the worker runs until SIGTERM (or Ctrl-C) and finishes the image in hand first. See
docs/pacs.md.
"""

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

ENV_PREFIX = "COVIDSCAN"
DEFAULT_MODEL_PATH = REPO_ROOT / "models" / "default.pt"  # as app/config.py (not imported: it pulls in Flask)
OFF_VALUES = ("0", "off", "false", "no")


def get_args_parser():
    """Command-line options of the PACS worker."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pacs-url", required=True,
                        help="the PACS's DICOMweb root, e.g. http://HOST:8042/dicom-web for Orthanc")
    parser.add_argument("--once", action="store_true", help="process everything pending, then exit")
    parser.add_argument("--feed", choices=("auto", "orthanc", "qido"), default="auto",
                        help="where new studies come from: Orthanc's /changes, QIDO polling, or auto (default: "
                             "Orthanc's feed when the PACS is Orthanc)")
    parser.add_argument("--from-now", action="store_true",
                        help="Orthanc feed, first run only: start at the latest change instead of the beginning")
    parser.add_argument("--lookback-days", type=int, default=2,
                        help="QIDO polling: look at studies dated this many days back (default 2)")
    parser.add_argument("--poll-seconds", type=float, default=5.0, help="pause between polls (default 5)")
    parser.add_argument("--lease-seconds", type=float, default=120.0,
                        help="how long a claimed image stays with this worker before another may retry it")
    parser.add_argument("--model", default=None,
                        help="checkpoint (default: COVIDSCAN_MODEL_PATH, else the shipped one)")
    parser.add_argument("--database-url", default=None,
                        help="results store (default: COVIDSCAN_DATABASE_URL, else SQLite in the instance folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the forward pass")
    parser.add_argument("--backend", default=None,
                        help="inference backend (default: COVIDSCAN_INFERENCE_BACKEND, else the int8 fast path beside "
                             "the model when this CPU runs it, else float32 ONNX)")
    parser.add_argument("--log-level", default=os.environ.get(f"{ENV_PREFIX}_LOG_LEVEL", "INFO"))
    return parser


def write_back_enabled():
    """COVIDSCAN_PACS_WRITE_BACK: on unless set to 0/off/false/no."""
    return os.environ.get(f"{ENV_PREFIX}_PACS_WRITE_BACK", "1").strip().lower() not in OFF_VALUES


def main(args):
    """Open the store (migrating it), load the model, then run the worker once or until SIGTERM."""
    logging.basicConfig(level=str(args.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pacs.worker import silence_dicom_libraries

    silence_dicom_libraries()  # before any DICOM is read: their warnings may quote patient data

    import torch

    from model.errors import CovidScanError
    from model.startup import PRODUCT_CLASS_NAMES, load_checked_predictor, parse_class_names, parse_model_digest
    from pacs.dicomweb import PacsClient, PacsUnavailable
    from pacs.worker import Worker
    from store import default_database_url, open_store
    from store.database import StoreError

    logger = logging.getLogger("pacs_worker")
    if args.threads:
        torch.set_num_threads(args.threads)
    database_url = args.database_url or os.environ.get(f"{ENV_PREFIX}_DATABASE_URL") or default_database_url()
    model_path = args.model or os.environ.get(f"{ENV_PREFIX}_MODEL_PATH") or str(DEFAULT_MODEL_PATH)
    try:
        store = open_store(database_url)
    except StoreError as error:
        sys.exit(f"error: {error}")
    try:
        predictor = load_checked_predictor(
            model_path, backend=args.backend,
            pinned_sha256=parse_model_digest(os.environ.get(f"{ENV_PREFIX}_MODEL_SHA256", "")),
            allowed_class_names=parse_class_names(os.environ.get(f"{ENV_PREFIX}_ALLOWED_CLASS_NAMES")
                                                  or ",".join(PRODUCT_CLASS_NAMES)))
    except (CovidScanError, RuntimeError, OSError) as error:
        sys.exit(f"error: cannot load the model {model_path}: {error}")
    info = predictor.model_info
    logger.info("model %s %s, inference backend %s; store %s; write-back %s", info["name"], info["version"],
                predictor.backend_description, store.describe(), "on" if write_back_enabled() else "off")

    worker = Worker(PacsClient(args.pacs_url), store, predictor, feed=args.feed, write_back=write_back_enabled(),
                    lease_seconds=args.lease_seconds, poll_seconds=args.poll_seconds,
                    lookback_days=args.lookback_days, from_now=args.from_now)
    if args.once:
        try:
            processed = worker.run_once()
        except PacsUnavailable as error:
            sys.exit(f"error: {error}; gave up")
        logger.info("done: %d image(s) processed; %s", processed, store.counts())
        return
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: worker.stop())
    worker.run_forever()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
