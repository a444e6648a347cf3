"""PACS worker benchmark: images per second against batch triage (scripts/predict.py) on the same images, as a
ratio, and the time from STOW to a worklist entry. A throwaway Orthanc (Debian's) on a free port; nothing mocked."""

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "default.pt"
DEFAULT_OUTPUT_DIR = REPO_ROOT / "artifacts" / "benchmarks"
TARGET_RATIO = 0.9


def get_args_parser():
    """Command-line options of the PACS benchmark."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="serving checkpoint (default shipped)")
    parser.add_argument("--images", type=int, default=24, help="studies of one image each (default 24)")
    parser.add_argument("--size", type=int, default=1024, help="film side in pixels (default 1024)")
    parser.add_argument("--latency-studies", type=int, default=5, help="studies timed from STOW to worklist")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    parser.add_argument("--backend", default=None, help="inference backend (default the Predictor's)")
    parser.add_argument("--output", default=None, help="JSON file (default artifacts/benchmarks/pacs-<time>.json)")
    return parser


def main(args):
    """Orthanc up, studies in, then time predict.py, the worker (write-back on and off) and STOW->worklist."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    import predict as batch_triage
    from model.inference import Predictor
    from pacs.demo import radiograph_dataset
    from pacs.dicomweb import PacsClient
    from pacs.orthanc import OrthancServer
    from pacs.worker import Worker, silence_dicom_libraries, to_part10
    from store import open_store

    silence_dicom_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    predictor = Predictor.from_path(args.checkpoint, backend=args.backend)
    folder = Path(tempfile.mkdtemp(prefix="covidscan-bench-pacs-"))
    orthanc = OrthancServer(folder / "orthanc", stable_age=1).start()
    results = {}
    try:
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(orthanc.dicomweb_url)
        films, datasets = stored_studies(orthanc, args.images, size=args.size)
        dicom_folder = folder / "dicom"
        dicom_folder.mkdir()
        for index, dataset in enumerate(datasets):
            (dicom_folder / f"{index:04d}.dcm").write_bytes(to_part10(dataset))

        start = time.perf_counter()
        batch_triage.predict_paths(predictor, sorted(dicom_folder.glob("*.dcm")), batch_size=16, workers=2,
                                   progress=False)
        results["predict.py (batch 16, 2 decoders)"] = args.images / (time.perf_counter() - start)

        for name, write_back in (("worker, write-back on", True), ("worker, write-back off", False)):
            processed, elapsed = time_worker(orthanc, predictor, folder / (name.replace(" ", "_") + ".sqlite3"),
                                             write_back=write_back)
            assert processed == args.images, f"{name}: processed {processed} of {args.images}"
            results[name] = args.images / elapsed

        latencies = stow_to_worklist(orthanc, client, predictor, folder, films, args.latency_studies,
                                     radiograph_dataset, PacsClient, Worker, open_store)
    finally:
        orthanc.stop()
        shutil.rmtree(folder, ignore_errors=True)
    baseline = results["predict.py (batch 16, 2 decoders)"]
    print(f"\nPACS worker vs batch triage, {args.images} films of {args.size}x{args.size} px, "
          f"model {predictor.model_info['name']} ({predictor.backend} backend), {torch.get_num_threads()} threads")
    print(f"{'pipeline':40s} {'images/s':>9s} {'ratio':>7s}")
    for name, rate in results.items():
        print(f"{name:40s} {rate:9.2f} {rate / baseline:7.2f}x")
    print(f"(target: the worker at >= {TARGET_RATIO}x batch triage)")
    print(f"\nSTOW -> worklist entry over {len(latencies)} studies (Orthanc StableAge {orthanc.stable_age} s, "
          f"poll every 0.5 s): median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s")
    print("  (the StableAge wait dominates; Orthanc's default is 60 s: set it to what the site accepts)")
    output = Path(args.output or DEFAULT_OUTPUT_DIR / f"pacs-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "images_per_second": results, "ratios": {name: rate / baseline for name, rate in results.items()},
        "stow_to_worklist_seconds": latencies, "images": args.images, "size": args.size,
        "model": predictor.model_info, "backend": predictor.backend, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "load_before": load_before, "load_after": os.getloadavg(),
    }, indent=2))
    print(f"wrote {output}")


def stored_studies(orthanc, count, *, size):
    """``count`` made-up studies of one film each, STOWed into ``orthanc`` and left until stable: (films, datasets)."""
    from dicomweb_client.api import DICOMwebClient

    from pacs.demo import demo_images, radiograph_dataset

    films = demo_images(count, size=size)
    datasets = [radiograph_dataset(pixels, patient_name=f"Bench^{index}", patient_id=f"B{index}",
                                   accession_number=f"B{index:05d}") for index, pixels in enumerate(films)]
    DICOMwebClient(orthanc.dicomweb_url).store_instances(datasets)
    time.sleep(orthanc.stable_age + 1.5)
    return films, datasets


def time_worker(orthanc, predictor, database_path, *, write_back):
    """(images processed, seconds) of one ``Worker.run_once`` over everything pending, with a fresh SQLite store."""
    from pacs.dicomweb import PacsClient
    from pacs.worker import Worker
    from store import open_store

    worker = Worker(PacsClient(orthanc.dicomweb_url), open_store(f"sqlite:///{database_path}"), predictor,
                    write_back=write_back)
    start = time.perf_counter()
    processed = worker.run_once()
    return processed, time.perf_counter() - start


def stow_to_worklist(orthanc, client, predictor, folder, films, count, radiograph_dataset, PacsClient, Worker,
                     open_store):
    """Seconds from each study's STOW to its worklist entry, with a worker running beside (0.5 s polls)."""
    store = open_store(f"sqlite:///{folder / 'latency.sqlite3'}")
    worker = Worker(PacsClient(orthanc.dicomweb_url), store, predictor, poll_seconds=0.5, from_now=True)
    worker.poll()  # start the feed at the latest change: only the new studies count
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    latencies = []
    try:
        for index in range(count):
            dataset = radiograph_dataset(films[index % len(films)], patient_name=f"Latency^{index}",
                                         patient_id=f"L{index}", accession_number=f"L{index:05d}")
            start = time.perf_counter()
            client.store_instances([dataset])
            while True:
                try:
                    if store.get(dataset.SOPInstanceUID).status == "done":
                        break
                except LookupError:
                    pass
                if time.perf_counter() - start > 120:
                    raise RuntimeError("no worklist entry within 120 s")
                time.sleep(0.05)
            latencies.append(time.perf_counter() - start)
    finally:
        worker.stop()
        thread.join(timeout=60)
    return latencies


if __name__ == "__main__":
    main(get_args_parser().parse_args())
