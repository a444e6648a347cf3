"""The PACS worklist end to end: a real Orthanc, the real worker CLI, a real SQLite store and the app's worklist.

No mocks: studies are STOWed into Orthanc (Debian's package, started on a free port), the worker finds them through
Orthanc's /changes feed (or QIDO polling), classifies them with the tiny checkpoint, writes the SR and heatmap back,
and the app serves the result. Skipped only where Orthanc is not installed (``make test`` installs it).
"""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient

from conftest import REPO_ROOT, make_xray_array
from pacs.demo import radiograph_dataset
from pacs_servers import OrthancServer, orthanc_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed (make pacs-deps installs it)"),
]

WORKER = str(REPO_ROOT / "scripts" / "pacs_worker.py")
SECRET_NAME = "Zzsecretname^Yysecretgiven"
SECRET_ID = "ZZSECRET-4711"
SECRET_BIRTH_DATE = "19010203"
SECRETS = ("Zzsecretname", "Yysecretgiven", SECRET_ID, SECRET_BIRTH_DATE)
RUN_SECONDS = 240  # a worker run, start-up (torch, the model) included, on two cores shared with training


# ----------------------------------------------------------------------------------------------- helpers


def send(orthanc, count, *, seed=0, modality="DX", pixels=None, secret=False):
    """STOW ``count`` one-image studies; their datasets (the exact objects sent)."""
    client = DICOMwebClient(orthanc.dicomweb_url)
    datasets = []
    for index in range(count):
        image = pixels if pixels is not None else make_xray_array(seed + index, size=(192, 160))
        datasets.append(radiograph_dataset(
            image, patient_name=SECRET_NAME if secret else f"Test^Patient{seed + index}",
            patient_id=SECRET_ID if secret else f"P{seed + index}",
            birth_date=SECRET_BIRTH_DATE if secret else "19700101",
            accession_number=f"ACC{seed + index:05d}", modality=modality,
        ))
    client.store_instances(datasets)
    return datasets


def wait_until_stable(orthanc, datasets, timeout=30):
    """Wait until Orthanc calls every study of ``datasets`` stable (StableAge after its last instance)."""
    deadline = time.monotonic() + timeout
    for dataset in datasets:
        while True:
            import urllib.request

            request = urllib.request.Request(f"{orthanc.base_url}/tools/lookup",
                                             data=dataset.StudyInstanceUID.encode(), method="POST")
            with urllib.request.urlopen(request, timeout=10) as response:
                matches = [match for match in json.loads(response.read()) if match["Type"] == "Study"]
            if matches and orthanc.get_json(f"/studies/{matches[0]['ID']}").get("IsStable"):
                break
            assert time.monotonic() < deadline, "Orthanc did not call the study stable"
            time.sleep(0.2)


def worker_environment(tiny_checkpoint_path, database_url, **extra):
    """The worker's environment: the tiny model, the store, the eager backend (no ONNX export at start-up)."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("COVIDSCAN_")}
    environment.update(COVIDSCAN_MODEL_PATH=str(tiny_checkpoint_path), COVIDSCAN_DATABASE_URL=database_url,
                       COVIDSCAN_INFERENCE_BACKEND="eager", COVIDSCAN_TORCH_THREADS="1", PYTHONUNBUFFERED="1")
    environment.update(extra)
    return environment


def run_worker(orthanc, environment, *extra_args, timeout=RUN_SECONDS):
    """``pacs_worker.py --once`` as a user runs it; its completed process (stdout and stderr together)."""
    result = subprocess.run([sys.executable, WORKER, "--pacs-url", orthanc.dicomweb_url, "--once", *extra_args],
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout
    return result


def series_of(orthanc, study_instance_uid):
    """(Modality, SeriesDescription, SeriesInstanceUID) of every series in a study, by QIDO."""
    client = DICOMwebClient(orthanc.dicomweb_url)
    answers = client.search_for_series(study_instance_uid, fields=["SeriesDescription"])
    return [((answer.get("00080060", {}).get("Value") or [None])[0],
             (answer.get("0008103E", {}).get("Value") or [""])[0],
             answer["0020000E"]["Value"][0]) for answer in answers]


def store_bytes(database_path):
    """Every byte of an SQLite store (the file and its write-ahead log)."""
    data = b""
    for suffix in ("", "-wal", "-journal"):
        path = database_path.with_name(database_path.name + suffix)
        if path.exists():
            data += path.read_bytes()
    return data


def worklist_app(tiny_checkpoint_path, database_url, orthanc, monkeypatch, **settings):
    """The app around the tiny checkpoint, the worker's store and the PACS."""
    from app import create_app

    monkeypatch.setenv("COVIDSCAN_INFERENCE_BACKEND", "eager")  # the worker's backend: identical probabilities
    return create_app({"TESTING": True, "SECRET_KEY": "test", "WTF_CSRF_ENABLED": False,
                       "MODEL_PATH": str(tiny_checkpoint_path), "DATABASE_URL": database_url,
                       "PACS_URL": orthanc.dicomweb_url, **settings})


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real Orthanc with DICOMweb on a free port, StableAge 1 s."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), stable_age=1).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint_path):
    """The app's Predictor around the tiny checkpoint (eager backend), for in-process workers."""
    from model.inference import Predictor

    return Predictor.from_path(tiny_checkpoint_path, backend="eager")


@pytest.fixture(scope="module")
def first_run(orthanc, tiny_checkpoint_path, tmp_path_factory):
    """Three chest films (one of a made-up patient with a secret name), a CT, and a noise 'film', then
    ``pacs_worker.py --once``."""
    database_path = tmp_path_factory.mktemp("store") / "worklist.sqlite3"
    database_url = f"sqlite:///{database_path}"
    films = send(orthanc, 2, seed=10) + send(orthanc, 1, seed=20, secret=True)
    ct = send(orthanc, 1, seed=30, modality="CT")
    noise = send(orthanc, 1, seed=40, pixels=np.random.default_rng(0).integers(0, 256, (192, 160), dtype=np.uint8))
    wait_until_stable(orthanc, films + ct + noise)
    result = run_worker(orthanc, worker_environment(tiny_checkpoint_path, database_url))
    from store import open_store

    return {"store": open_store(database_url), "database_path": database_path, "database_url": database_url,
            "films": films, "ct": ct, "noise": noise, "log": result.stdout}


# ----------------------------------------------------------------------------------------------- tests


def test_once_classifies_every_chest_film_and_skips_other_modalities(first_run):
    store = first_run["store"]
    images, total = store.worklist(limit=100)
    by_uid = {image.sop_instance_uid: image for image in images}
    assert total == 4, first_run["log"]
    assert set(by_uid) == {dataset.SOPInstanceUID for dataset in first_run["films"] + first_run["noise"]}
    assert first_run["ct"][0].SOPInstanceUID not in by_uid
    for dataset in first_run["films"]:
        image = by_uid[dataset.SOPInstanceUID]
        assert image.status == "done"
        assert image.accession_number == dataset.AccessionNumber
        assert image.study_instance_uid == dataset.StudyInstanceUID
        assert image.model_name == "covidscan-test" and image.model_version == "test-1"
        assert image.urgency == pytest.approx(1 - image.probabilities["NORMAL"])
    noise = by_uid[first_run["noise"][0].SOPInstanceUID]
    assert noise.status == "flagged" and noise.label is None and noise.urgency is None and noise.ood["flagged"]
    assert images[-1].sop_instance_uid == noise.sop_instance_uid  # flagged images rank last
    urgencies = [image.urgency for image in images[:-1]]
    assert urgencies == sorted(urgencies, reverse=True)


def test_worklist_labels_equal_the_predict_api_on_the_same_pixels(first_run, orthanc, tiny_checkpoint_path,
                                                                   monkeypatch):
    from pacs.worker import to_part10

    app = worklist_app(tiny_checkpoint_path, first_run["database_url"], orthanc, monkeypatch)
    client = app.test_client()
    answer = client.get("/api/v1/worklist")
    assert answer.status_code == 200
    items = {item["sop_instance_uid"]: item for item in answer.get_json()["items"]}
    assert len(items) == 4 and answer.get_json()["total"] == 4
    for dataset in first_run["films"]:
        upload = {"file": (io.BytesIO(to_part10(dataset)), "film.dcm", "application/dicom")}
        predicted = client.post("/api/v1/predict", data=upload, content_type="multipart/form-data").get_json()
        item = items[dataset.SOPInstanceUID]
        assert item["label"] == predicted["label"]
        assert item["probabilities"] == pytest.approx(predicted["probabilities"], abs=1e-5)
        assert item["model"] == {"name": "covidscan-test", "version": "test-1"}
        assert item["status"] == "done" and 0 <= item["urgency"] <= 1
    flagged = items[first_run["noise"][0].SOPInstanceUID]
    assert flagged["status"] == "flagged" and flagged["label"] is None and flagged["urgency"] is None
    assert list(items)[-1] == first_run["noise"][0].SOPInstanceUID


def test_each_study_holds_the_sr_and_the_heatmap_series(first_run, orthanc):
    from pacs.dicomweb import PacsClient

    pacs = PacsClient(orthanc.dicomweb_url)
    for dataset in first_run["films"]:
        series = series_of(orthanc, dataset.StudyInstanceUID)
        modalities = sorted(modality for modality, _, _ in series)
        assert modalities == ["DX", "OT", "SR"], series
        assert all("research use only" in description for modality, description, _ in series if modality != "DX")
        image = first_run["store"].get(dataset.SOPInstanceUID)
        report = pacs.retrieve_uids(dataset.StudyInstanceUID, [uid for modality, _, uid in series
                                                                if modality == "SR"][0], image.result_sr_uid)
        assert report.VerificationFlag == "UNVERIFIED"
        assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        text = str(report)
        for name, probability in image.probabilities.items():
            assert f"Probability of {name}" in text
        assert f"'{image.label}'" in text or image.label in text  # the most likely class, coded
        capture = pacs.retrieve_uids(dataset.StudyInstanceUID, image.heatmap_series_uid, image.heatmap_sop_uid)
        assert capture.Modality == "OT" and capture.PhotometricInterpretation == "RGB"


def test_heatmap_and_review_through_the_api(first_run, orthanc, tiny_checkpoint_path, monkeypatch):
    app = worklist_app(tiny_checkpoint_path, first_run["database_url"], orthanc, monkeypatch,
                       PROXY_USER_HEADER="X-Remote-User")
    client = app.test_client()
    uid = first_run["films"][0].SOPInstanceUID
    heatmap = client.get(f"/api/v1/worklist/{uid}/heatmap.png")
    assert heatmap.status_code == 200 and heatmap.data.startswith(b"\x89PNG")
    page = client.get("/worklist", headers={"X-Remote-User": "dr.reader"})
    assert page.status_code == 200 and b"worklist.js" in page.data
    reviewed = client.post(f"/worklist/{uid}/review", headers={"X-Remote-User": "dr.reader"})
    assert reviewed.status_code == 200 and reviewed.get_json()["status"] == "reviewed"
    events = client.get(f"/api/v1/worklist/{uid}/reviews").get_json()["events"]
    assert [(event["user"], event["action"]) for event in events] == [("dr.reader", "reviewed")]
    done = client.get("/api/v1/worklist?status=reviewed").get_json()
    assert [item["sop_instance_uid"] for item in done["items"]] == [uid]


def test_a_second_once_adds_nothing_and_writes_nothing_back(first_run, orthanc, predictor):
    from pacs.dicomweb import PacsClient
    from pacs.worker import Worker

    before = first_run["store"].counts()
    series_before = {d.StudyInstanceUID: series_of(orthanc, d.StudyInstanceUID) for d in first_run["films"]}
    worker = Worker(PacsClient(orthanc.dicomweb_url), first_run["store"], predictor)
    assert worker.run_once() == 0
    assert first_run["store"].counts() == before
    assert {uid: series_of(orthanc, uid) for uid in series_before} == series_before


def test_a_study_sent_after_the_first_run_is_picked_up(first_run, orthanc, predictor):
    from pacs.dicomweb import PacsClient
    from pacs.worker import Worker

    later = send(orthanc, 1, seed=50)
    wait_until_stable(orthanc, later)
    worker = Worker(PacsClient(orthanc.dicomweb_url), first_run["store"], predictor)
    assert worker.run_once() == 1
    assert first_run["store"].get(later[0].SOPInstanceUID).status == "done"


def test_no_patient_data_in_any_table_log_or_answer(first_run, orthanc, tiny_checkpoint_path, monkeypatch, caplog):
    app = worklist_app(tiny_checkpoint_path, first_run["database_url"], orthanc, monkeypatch)
    client = app.test_client()
    answers = [client.get("/api/v1/worklist").data, client.get("/worklist/data").data, client.get("/worklist").data]
    secret_uid = first_run["films"][-1].SOPInstanceUID
    answers.append(client.get(f"/api/v1/worklist/{secret_uid}/reviews").data)
    stored = store_bytes(first_run["database_path"])
    assert first_run["films"][-1].AccessionNumber.encode() in stored  # the store is readable as bytes
    for secret in SECRETS:
        assert secret.encode() not in stored, f"{secret} is in the store"
        assert secret not in first_run["log"], f"{secret} is in the worker's log"
        assert secret not in caplog.text, f"{secret} is in the app's log"
        for answer in answers:
            assert secret.encode() not in answer, f"{secret} is in an answer"


def test_write_back_can_be_switched_off(orthanc, predictor, tmp_path):
    from pacs.dicomweb import PacsClient
    from pacs.worker import Worker
    from store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'worklist.sqlite3'}")
    films = send(orthanc, 1, seed=60)
    wait_until_stable(orthanc, films)
    worker = Worker(PacsClient(orthanc.dicomweb_url), store, predictor, write_back=False)
    worker.run_once()
    image = store.get(films[0].SOPInstanceUID)
    assert image.status == "done" and image.result_sr_uid is None
    assert [modality for modality, _, _ in series_of(orthanc, films[0].StudyInstanceUID)] == ["DX"]


def test_qido_polling_finds_new_and_grown_studies_once(orthanc, predictor, tmp_path):
    from pacs.dicomweb import PacsClient
    from pacs.feeds import QidoPollingFeed
    from store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'worklist.sqlite3'}")
    feed = QidoPollingFeed(PacsClient(orthanc.dicomweb_url), store, lookback_days=1)
    earlier = send(orthanc, 1, seed=69)[0]
    assert feed.poll() >= 1  # everything dated within the look-back window, CR/DX only
    assert earlier.SOPInstanceUID in store.known_sop_uids([earlier.SOPInstanceUID])
    assert feed.poll() == 0  # nothing new: studies whose instance count is unchanged are not searched again
    study = send(orthanc, 1, seed=70)[0]
    assert feed.poll() == 1
    grown = radiograph_dataset(make_xray_array(71, size=(192, 160)), patient_name="Test^Patient70", patient_id="P70",
                               accession_number=study.AccessionNumber, study_instance_uid=study.StudyInstanceUID)
    DICOMwebClient(orthanc.dicomweb_url).store_instances([grown])
    assert feed.poll() == 1
    assert store.known_sop_uids([study.SOPInstanceUID, grown.SOPInstanceUID]) == {study.SOPInstanceUID,
                                                                                  grown.SOPInstanceUID}


def test_sigkill_mid_run_loses_nothing(tmp_path, tiny_checkpoint_path, predictor):
    from pacs.dicomweb import PacsClient
    from pacs.worker import Worker
    from store import open_store

    orthanc = OrthancServer(tmp_path / "orthanc", stable_age=1).start()
    try:
        films = send(orthanc, 8, seed=100)
        wait_until_stable(orthanc, films)
        database_url = f"sqlite:///{tmp_path / 'worklist.sqlite3'}"
        environment = worker_environment(tiny_checkpoint_path, database_url)
        log_path = tmp_path / "worker.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, WORKER, "--pacs-url", orthanc.dicomweb_url, "--once", "--lease-seconds", "2"],
                env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        store = open_store(database_url)
        deadline = time.monotonic() + RUN_SECONDS
        while store.counts()["done"] < 1:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        counts = store.counts()
        assert counts["done"] < len(films), "the worker finished before it was killed; the test proves nothing"
        time.sleep(2.5)  # the dead worker's lease runs out
        Worker(PacsClient(orthanc.dicomweb_url), store, predictor).run_once()
        images, total = store.worklist(limit=100)
        assert total == len(films) and {image.status for image in images} == {"done"}
        for dataset in films:  # the result objects are written once, however often a write was repeated
            assert sorted(m for m, _, _ in series_of(orthanc, dataset.StudyInstanceUID)) == ["DX", "OT", "SR"]
    finally:
        orthanc.stop()


def test_worker_backs_off_while_the_pacs_is_down_and_catches_up(tmp_path, tiny_checkpoint_path):
    from store import open_store

    orthanc = OrthancServer(tmp_path / "orthanc", stable_age=1).start()
    films = send(orthanc, 2, seed=200)
    wait_until_stable(orthanc, films)
    orthanc.stop()
    database_url = f"sqlite:///{tmp_path / 'worklist.sqlite3'}"
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, WORKER, "--pacs-url", orthanc.dicomweb_url, "--poll-seconds", "0.5"],
            env=worker_environment(tiny_checkpoint_path, database_url), stdout=log, stderr=subprocess.STDOUT,
            cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + RUN_SECONDS
        while "trying again in" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        orthanc.start()  # same port, same storage: the PACS is back
        store = open_store(database_url)
        while store.counts()["done"] < len(films):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()
        assert "the PACS answers again" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
        orthanc.stop()
