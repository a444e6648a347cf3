"""Where new images come from: Orthanc's ``/changes`` feed (a cursor in the store) or QIDO polling.

QIDO has no "received since" filter, so the poller asks for studies dated within a look-back window and keeps a
record of how many instances it last saw in each; only studies that are new or have grown are searched again.
Either way images are queued by SOP Instance UID, so a study seen twice (our own write-back makes Orthanc report
the study stable again) queues nothing new.
"""

import datetime
import logging

logger = logging.getLogger(__name__)

ORTHANC_CURSOR = "orthanc_changes_seq"
CHANGES_PAGE = 200
DEFAULT_LOOKBACK_DAYS = 2


class OrthancChangeFeed:
    """New studies from Orthanc's ``/changes`` (``StableStudy`` events), after the cursor kept in the store."""

    name = "orthanc-changes"

    def __init__(self, pacs, store, *, from_now=False):
        self.pacs = pacs
        self.store = store
        if from_now and self.store.get_state(self._cursor_key) is None:
            self.store.set_state(self._cursor_key, self.pacs.orthanc_last_change())

    @property
    def _cursor_key(self):
        return f"{ORTHANC_CURSOR}:{self.pacs.server_root}"

    def poll(self):
        """Queue the CR/DX images of every study that became stable since the cursor; the number queued."""
        added = 0
        cursor = int(self.store.get_state(self._cursor_key, 0))
        while True:
            page = self.pacs.orthanc_changes(cursor, CHANGES_PAGE)
            studies = {change["ID"] for change in page.get("Changes", [])
                       if change.get("ChangeType") == "StableStudy" and change.get("ResourceType") == "Study"}
            for orthanc_id in sorted(studies):
                study_uid = self.pacs.orthanc_study_uid(orthanc_id)
                if study_uid:
                    added += self.store.enqueue(self.pacs.find_images(study_uid))
            last = int(page.get("Last", cursor))
            if last > cursor:
                cursor = last
                self.store.set_state(self._cursor_key, cursor)  # after queueing: a crash re-reads, never skips
            if page.get("Done", True) or not page.get("Changes"):
                return added


class QidoPollingFeed:
    """New studies by QIDO-RS polling: studies dated within the look-back window, new or grown since last seen."""

    name = "qido-polling"

    def __init__(self, pacs, store, *, lookback_days=DEFAULT_LOOKBACK_DAYS):
        self.pacs = pacs
        self.store = store
        self.lookback_days = lookback_days

    def poll(self):
        """Queue the CR/DX images of new or grown studies; the number queued."""
        added = 0
        since = datetime.date.today() - datetime.timedelta(days=self.lookback_days)
        for study_uid, instance_count in self.pacs.find_studies(since):
            if self.store.seen_instance_count(study_uid) == instance_count:
                continue
            added += self.store.enqueue(self.pacs.find_images(study_uid))
            self.store.mark_study_seen(study_uid, instance_count)
        return added


def make_feed(pacs, store, kind="auto", *, lookback_days=DEFAULT_LOOKBACK_DAYS, from_now=False):
    """The feed for this PACS: ``orthanc`` (its /changes), ``qido`` (polling), or ``auto`` (Orthanc when it is one)."""
    if kind == "auto":
        kind = "orthanc" if pacs.is_orthanc() else "qido"
    if kind == "orthanc":
        return OrthancChangeFeed(pacs, store, from_now=from_now)
    if kind == "qido":
        return QidoPollingFeed(pacs, store, lookback_days=lookback_days)
    raise ValueError(f"unknown feed {kind!r}: auto, orthanc or qido")
