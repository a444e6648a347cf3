"""The PACS worker: find new chest films, classify each with the app's Predictor, store and write back the result.

One loop: poll the feed (queue new images), then claim images one at a time from the store and process them. The
PACS being away is not the image's fault: the image goes back to the queue uncounted and the worker backs off
(1, 2, 4 ... 30 s) until the PACS answers again. A stop request (SIGTERM) is honoured between images.
"""

import io
import logging
import os
import socket
import threading
import time
import uuid

from model.errors import CovidScanError
from model.log_guard import install_log_guard
from pacs.dicomweb import PacsError, PacsUnavailable
from pacs.feeds import make_feed
from pacs.results import build_heatmap, build_sr, result_uids

logger = logging.getLogger(__name__)

# Classes whose probability does not make a film urgent; urgency is the calibrated probability of the others.
NON_URGENT_CLASSES = ("NORMAL",)
BACKOFF_START_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
ONCE_MAX_OUTAGE_SECONDS = 60.0
# Loggers of DICOM libraries whose warnings may quote header values (a patient's name among them).


class WorkerStopped(Exception):
    """Raised inside a back-off wait when the worker was asked to stop."""


def urgency(probabilities):
    """The calibrated probability that the film is not NORMAL (the sum over the urgent classes)."""
    return float(sum(value for name, value in probabilities.items() if name not in NON_URGENT_CLASSES))


def silence_dicom_libraries():
    """Keep the DICOM libraries' warnings (which may quote patient data) out of every log: the app's log guard
    (``model.log_guard``), and pydicom's header validation off, since the worker reads whatever the PACS holds."""
    install_log_guard()
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE


def default_worker_id():
    """host:pid:random, unique per worker process (the lease owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """Polls one PACS, classifies its new chest films and keeps the results in one store."""

    def __init__(self, pacs, store, predictor, *, feed="auto", write_back=True, worker_id=None,
                 lease_seconds=120.0, poll_seconds=5.0, lookback_days=2, from_now=False):
        self.pacs = pacs
        self.store = store
        self.predictor = predictor
        self.feed_kind = feed
        self.feed = None
        self.write_back = write_back
        self.worker_id = worker_id or default_worker_id()
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.lookback_days = lookback_days
        self.from_now = from_now
        self.stop_event = threading.Event()
        self.processed = 0

    def stop(self):
        """Ask the worker to stop after the image in hand."""
        self.stop_event.set()

    def poll(self):
        """Queue what the feed has found since last time; the number of new images."""
        if self.feed is None:
            self.feed = make_feed(self.pacs, self.store, self.feed_kind, lookback_days=self.lookback_days,
                                  from_now=self.from_now)
            logger.info("watching %s with the %s feed", self.pacs.url, self.feed.name)
        added = self.feed.poll()
        if added:
            logger.info("queued %d new image(s)", added)
        return added

    def drain(self):
        """Process queued images until none is left or a stop is requested; the number processed."""
        count = 0
        while not self.stop_event.is_set():
            image = self.store.claim(self.worker_id, lease_seconds=self.lease_seconds)
            if image is None:
                break
            self.process(image)
            count += 1
        return count

    def process(self, image):
        """Retrieve, classify, write back and store one claimed image (PACS outages release it uncounted)."""
        try:
            dataset = self.pacs.retrieve(image)
            prediction = self.predictor.predict_bytes(to_part10(dataset), with_heatmap=self.write_back)
            written = self.write_results(dataset, prediction) if self.write_back else {}
        except PacsUnavailable:
            self.store.release(image, self.worker_id)
            raise
        except (CovidScanError, PacsError) as error:
            # Our own messages, written never to quote header values: they may go into the store and the log.
            logger.warning("image #%d could not be classified: %s", image.id, error)
            self.store.fail(image, self.worker_id, str(error))
            return
        except Exception as error:  # an odd image must not stop the worker; its message may quote the header
            logger.error("image #%d: unexpected %s while processing it", image.id, type(error).__name__)
            self.store.fail(image, self.worker_id, f"unexpected error while processing the image "
                                                   f"({type(error).__name__})")
            return
        info = self.predictor.model_info
        self.store.complete(
            image, self.worker_id, label=prediction.label, probabilities=prediction.probabilities,
            ood=prediction.ood, urgency=urgency(prediction.probabilities), model_name=info["name"],
            model_version=info["version"], **written,
        )
        self.processed += 1
        logger.info("image #%d: %s%s in %.0f ms", image.id, prediction.label,
                    " (flagged: out of distribution)" if prediction.ood and prediction.ood.get("flagged") else "",
                    prediction.elapsed_ms)

    def write_results(self, dataset, prediction):
        """STOW the SR and the heatmap into the image's study; their UIDs for the store."""
        info = self.predictor.model_info
        uids = result_uids(dataset.SOPInstanceUID, self.predictor.sha256)
        report = build_sr(dataset, prediction, info, uids)
        heatmap = build_heatmap(dataset, prediction.heatmap, info, uids)
        self.pacs.store([report, heatmap])
        return {"result_sr_uid": uids.sr_instance, "heatmap_series_uid": uids.heatmap_series,
                "heatmap_sop_uid": uids.heatmap_instance}

    def run_once(self, *, max_outage_seconds=ONCE_MAX_OUTAGE_SECONDS):
        """Process everything pending, then return (backing off through PACS outages up to a limit)."""
        def cycle():
            self.poll()
            self.drain()
            return True

        self._with_backoff(cycle, max_outage_seconds=max_outage_seconds)
        return self.processed

    def run_forever(self):
        """Poll and process until ``stop()`` (SIGTERM); back off while the PACS is away."""
        while not self.stop_event.is_set():
            try:
                self._with_backoff(lambda: (self.poll(), self.drain()))
            except WorkerStopped:
                break
            self.stop_event.wait(self.poll_seconds)
        logger.info("worker stopped after %d image(s)", self.processed)
        return self.processed

    def _with_backoff(self, action, *, max_outage_seconds=None):
        """Run ``action``; while the PACS is unavailable wait 1, 2, 4 ... 30 s and try again."""
        delay = BACKOFF_START_SECONDS
        outage_start = None
        while True:
            try:
                result = action()
                if outage_start is not None:
                    logger.info("the PACS answers again after %.0f s", time.monotonic() - outage_start)
                return result
            except PacsUnavailable as error:
                outage_start = outage_start or time.monotonic()
                if max_outage_seconds is not None and time.monotonic() - outage_start > max_outage_seconds:
                    raise
                logger.warning("%s; trying again in %.0f s", error, delay)
                if self.stop_event.wait(delay):
                    raise WorkerStopped() from error
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)


def to_part10(dataset):
    """A retrieved dataset as DICOM Part 10 bytes, the form the app's decoder reads."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
