"""``make pacs-demo``: a throwaway Orthanc filled with made-up patients' X-rays, the worker, and the app's worklist.

Everything lives in a temporary folder (Orthanc's storage and config, the SQLite store) and is removed on Ctrl-C.
The films are test X-rays from ../shared/data/cxr/test when that folder exists, else synthetic ones; the patients'
names and IDs are made up.
"""

import argparse
import datetime
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TEST_IMAGES = REPO_ROOT.parent / "shared" / "data" / "cxr" / "test"
DIGITAL_XRAY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
COMPUTED_RADIOGRAPHY = "1.2.840.10008.5.1.4.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SOP_CLASS_BY_MODALITY = {"DX": DIGITAL_XRAY_FOR_PRESENTATION, "CR": COMPUTED_RADIOGRAPHY, "CT": CT_IMAGE}
DEMO_STUDIES = 12


def radiograph_dataset(pixels, *, patient_name, patient_id, accession_number, study_instance_uid=None,
                       modality="DX", study_date=None, birth_date="19700101"):
    """A single-frame 8-bit MONOCHROME2 image as a DICOM dataset (file meta included) of a made-up patient."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS_BY_MODALITY.get(modality, DIGITAL_XRAY_FOR_PRESENTATION)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.preamble = b"\0" * 128
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = study_instance_uid or generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.PatientName = patient_name
    dataset.PatientID = patient_id
    dataset.PatientBirthDate = birth_date
    dataset.PatientSex = "O"
    dataset.AccessionNumber = accession_number
    dataset.StudyDate = (study_date or datetime.date.today()).strftime("%Y%m%d")
    dataset.StudyTime = "120000"
    dataset.StudyID = "1"
    dataset.ReferringPhysicianName = ""
    dataset.SeriesNumber = 1
    dataset.InstanceNumber = 1
    dataset.Modality = modality
    dataset.BodyPartExamined = "CHEST"
    dataset.ViewPosition = "PA"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.tobytes()
    return dataset


def demo_images(count, size=512):
    """``count`` grayscale arrays: test X-rays from ../shared when present, else synthetic films."""
    from PIL import Image

    paths = sorted(SHARED_TEST_IMAGES.rglob("*.*")) if SHARED_TEST_IMAGES.is_dir() else []
    paths = [path for path in paths if path.suffix.lower() in (".png", ".jpg", ".jpeg")]
    if paths:
        random.Random(0).shuffle(paths)
        return [np.asarray(Image.open(path).convert("L").resize((size, size))) for path in paths[:count]]
    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[0:size, 0:size]
    films = []
    for index in range(count):
        body = 170 - 60 * (((columns - size / 2) / (size / 2)) ** 2)
        for centre in (0.3, 0.7):
            lung = ((columns - centre * size) / (0.16 * size)) ** 2 + ((rows - 0.5 * size) / (0.3 * size)) ** 2
            body = np.where(lung < 1, 60 + 20 * lung + 15 * (index % 3), body)
        films.append(np.clip(body + rng.normal(0, 8, body.shape), 0, 255).astype(np.uint8))
    return films


def send_demo_studies(pacs_url, count=DEMO_STUDIES):
    """STOW ``count`` one-image studies of made-up patients; their Study Instance UIDs."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(pacs_url)
    uids = []
    for index, pixels in enumerate(demo_images(count)):
        dataset = radiograph_dataset(pixels, patient_name=f"Demo^Patient{index:02d}", patient_id=f"DEMO{index:04d}",
                                     accession_number=f"DEMO{index:04d}")
        client.store_instances([dataset])
        uids.append(dataset.StudyInstanceUID)
    return uids


def get_args_parser():
    """Options of the demo."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000, help="the app's port (default 8000)")
    parser.add_argument("--studies", type=int, default=DEMO_STUDIES, help="how many made-up studies to send")
    return parser


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(args):
    """Start Orthanc, send studies, run the worker, then serve the app until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pacs.orthanc import OrthancServer

    signal.signal(signal.SIGTERM, _stop)  # `kill` cleans up like Ctrl-C (a background job ignores SIGINT)
    folder = Path(tempfile.mkdtemp(prefix="covidscan-pacs-demo-"))
    orthanc = OrthancServer(folder / "orthanc", stable_age=1).start()
    processes = []
    try:
        logger.info("Orthanc is up at %s (DICOMweb %s)", orthanc.base_url, orthanc.dicomweb_url)
        send_demo_studies(orthanc.dicomweb_url, args.studies)
        logger.info("sent %d made-up studies; waiting for Orthanc to call them stable", args.studies)
        time.sleep(orthanc.stable_age + 2)
        environment = {**os.environ, "COVIDSCAN_DATABASE_URL": f"sqlite:///{folder / 'worklist.sqlite3'}",
                       "COVIDSCAN_PACS_URL": orthanc.dicomweb_url, "COVIDSCAN_DEV": "1"}
        worker = [sys.executable, str(REPO_ROOT / "scripts" / "pacs_worker.py"), "--pacs-url", orthanc.dicomweb_url]
        subprocess.run([*worker, "--once"], env=environment, check=True)
        processes.append(subprocess.Popen(worker, env=environment))  # keeps watching: send more and see them
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(REPO_ROOT / "gunicorn.conf.py"), "wsgi:app",
             "--bind", f"127.0.0.1:{args.port}"], env=environment, cwd=REPO_ROOT))
        logger.info("the worklist: http://127.0.0.1:%d/worklist  (Ctrl-C stops everything)", args.port)
        processes[-1].wait()
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        orthanc.stop()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
