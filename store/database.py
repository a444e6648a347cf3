"""Open the results store (SQLite or PostgreSQL), apply its Alembic migrations, and run the job queue on it.

Jobs are claimed with a compare-and-set UPDATE (``WHERE id = ? AND <still claimable>``), which is atomic in
SQLite (one writer at a time) and in PostgreSQL (the row lock makes a second UPDATE re-check its WHERE clause):
two workers never hold the same image. A claim is a lease: a worker that dies leaves its image to be claimed
again once the lease has expired. Every claim counts an attempt; an image whose third attempt fails (or whose
worker died three times) is marked failed with its reason.
"""

import contextlib
import datetime
import fcntl
import logging
import os
from pathlib import Path

from sqlalchemy import case, create_engine, event, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from store.models import (
    DONE, FAILED, FLAGGED, PENDING, PROCESSING, REVIEWED, STATUSES, FeedState, Image, ReviewEvent, SeenStudy,
    utc_now,
)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DEFAULT_DATABASE_NAME = "covidscan.sqlite3"
MAX_ATTEMPTS = 3
LEASE_SECONDS = 120.0
SQLITE_BUSY_TIMEOUT_MS = 30_000
# PostgreSQL: one advisory lock key for "a migration is running" (any 64-bit number unique to this app).
MIGRATION_LOCK_KEY = 32_0001


class StoreError(RuntimeError):
    """The results store cannot be opened or migrated."""


class NotFound(LookupError):
    """No image with that SOP Instance UID in the store."""


MEMORY_DATABASE_URL = "sqlite://"  # tests' apps that name no store: nothing written to the instance folder


def default_database_url(instance_path=None):
    """``sqlite:///<instance folder>/covidscan.sqlite3``: the app's instance folder, shared with the worker."""
    folder = Path(instance_path) if instance_path else REPO_ROOT / "instance"
    return f"sqlite:///{folder / DEFAULT_DATABASE_NAME}"


def open_store(url, *, migrate=True):
    """A ``Store`` on ``url`` with its schema brought up to date (Alembic ``upgrade head``) unless told not to."""
    store = Store(url)
    if migrate:
        store.migrate()
    return store


class Store:
    """The worklist database: migrations, the job queue with leases, results, reviews and feed state."""

    def __init__(self, url):
        self.url = make_url(str(url))
        if self.url.get_backend_name() not in ("sqlite", "postgresql"):
            raise StoreError(f"the results store must be SQLite or PostgreSQL, not {self.url.get_backend_name()}")
        if self.url.get_backend_name() == "postgresql" and self.url.drivername == "postgresql":
            self.url = self.url.set(drivername="postgresql+psycopg")  # psycopg 3 (requirements.txt)
        self._engine = None
        self._engine_pid = None

    @property
    def is_sqlite(self):
        """Whether the store is an SQLite file (or memory) rather than a PostgreSQL server."""
        return self.url.get_backend_name() == "sqlite"

    @property
    def engine(self):
        """The SQLAlchemy engine of this process (rebuilt after a fork: connections must not cross processes)."""
        if self._engine is None or self._engine_pid != os.getpid():
            if self._engine is not None:
                self._engine.dispose(close=False)
            self._engine = self._make_engine()
            self._engine_pid = os.getpid()
        return self._engine

    def _make_engine(self):
        if not self.is_sqlite:
            return create_engine(self.url, pool_pre_ping=True)
        database = self.url.database
        if not database or database == ":memory:":
            # One shared connection: every new connection to an in-memory SQLite would see an empty database.
            engine = create_engine(self.url, poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(self.url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):
            # WAL: the app reads while a worker writes; busy_timeout: writers wait for each other.
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine

    def describe(self):
        """The URL without its password, for log lines."""
        return self.url.render_as_string(hide_password=True)

    def dispose(self):
        """Close this process's connections."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # ------------------------------------------------------------------ migrations

    def migrate(self):
        """Apply every Alembic migration not yet applied, one process at a time."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines repeat at every start-up
        try:
            with self._migration_lock(), self.engine.begin() as connection:
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        except OSError as error:
            raise StoreError(f"cannot open the results store {self.describe()}: {error}") from error
        except Exception as error:  # SQLAlchemy's OperationalError and friends: say which database failed
            if type(error).__module__.startswith("sqlalchemy"):
                raise StoreError(f"cannot migrate the results store {self.describe()}: {error}") from error
            raise

    @contextlib.contextmanager
    def _migration_lock(self):
        """A file lock beside an SQLite file, an advisory lock in PostgreSQL: concurrent start-ups migrate once."""
        if self.is_sqlite:
            database = self.url.database
            if not database or database == ":memory:":
                yield
                return
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            with open(f"{database}.migrate-lock", "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
            return
        with self.engine.connect() as connection:
            connection.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
            try:
                yield
            finally:
                connection.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")
                connection.commit()

    def session(self):
        """A new ORM session (use as a context manager)."""
        return Session(self.engine, expire_on_commit=False)

    # ------------------------------------------------------------------ queue

    def enqueue(self, images):
        """Add images (dicts of Image columns, ``sop_instance_uid`` required) as pending; known UIDs are skipped.

        Returns how many were new. Idempotent: a SOP Instance UID is queued once, whatever the feed repeats.
        """
        rows = [{**image, "status": PENDING, "attempts": 0, "ood_flagged": False, "received_at": utc_now()}
                for image in images]
        if not rows:
            return 0
        insert = sqlite_insert if self.is_sqlite else postgresql_insert
        added = 0
        with self.engine.begin() as connection:
            for row in rows:
                statement = (insert(Image).values(**row).on_conflict_do_nothing(index_elements=["sop_instance_uid"])
                             .returning(Image.id))  # rowcount is not reliable here across drivers
                added += len(connection.execute(statement).all())
        return added

    def known_sop_uids(self, sop_uids):
        """The subset of ``sop_uids`` already in the store."""
        sop_uids = list(sop_uids)
        if not sop_uids:
            return set()
        with self.session() as session:
            return set(session.scalars(select(Image.sop_instance_uid).where(Image.sop_instance_uid.in_(sop_uids))))

    def claim(self, worker, *, lease_seconds=LEASE_SECONDS, now=None):
        """Claim the next image for ``worker`` (oldest first) with a lease; None when nothing is claimable.

        An image whose lease ran out after ``MAX_ATTEMPTS`` claims is marked failed here instead of retried.
        """
        while True:
            now = now or utc_now()
            with self.session() as session:
                candidate = session.execute(
                    select(Image.id, Image.attempts).where(_claimable(now)).order_by(Image.received_at, Image.id)
                    .limit(1)
                ).first()
            if candidate is None:
                return None
            image_id, attempts = candidate
            with self.engine.begin() as connection:
                if attempts >= MAX_ATTEMPTS:
                    result = connection.execute(
                        update(Image).where(Image.id == image_id, _claimable(now)).values(
                            status=FAILED, lease_owner=None, lease_expires_at=None, processed_at=now,
                            last_error=f"gave up after {attempts} attempts: the worker stopped before finishing")
                    )
                    continue
                result = connection.execute(
                    update(Image).where(Image.id == image_id, _claimable(now)).values(
                        status=PROCESSING, lease_owner=worker, attempts=Image.attempts + 1,
                        lease_expires_at=now + datetime.timedelta(seconds=lease_seconds))
                )
            if result.rowcount == 1:
                with self.session() as session:
                    return session.get(Image, image_id)
            now = None  # another worker won this one: look again

    def _finish(self, image, worker, **values):
        """Set ``values`` on an image this worker still holds; False when the lease was lost to another."""
        with self.engine.begin() as connection:
            result = connection.execute(
                update(Image).where(Image.id == image.id, Image.status == PROCESSING, Image.lease_owner == worker)
                .values(lease_owner=None, lease_expires_at=None, **values)
            )
        if result.rowcount != 1:
            logger.warning("image #%d was taken over by another worker before %s finished it", image.id, worker)
        return result.rowcount == 1

    def complete(self, image, worker, *, label, probabilities, ood, urgency, model_name, model_version,
                 result_sr_uid=None, heatmap_series_uid=None, heatmap_sop_uid=None):
        """Store a result: status ``flagged`` (label and urgency null) for an OOD image, else ``done``."""
        flagged = bool(ood and ood.get("flagged"))
        return self._finish(
            image, worker, status=FLAGGED if flagged else DONE, processed_at=utc_now(), last_error=None,
            label=None if flagged else label, probabilities=probabilities, ood=ood, ood_flagged=flagged,
            urgency=None if flagged else urgency, model_name=model_name, model_version=model_version,
            result_sr_uid=result_sr_uid, heatmap_series_uid=heatmap_series_uid, heatmap_sop_uid=heatmap_sop_uid,
        )

    def fail(self, image, worker, reason):
        """Record a failed attempt: back to pending, or ``failed`` with the reason after ``MAX_ATTEMPTS``."""
        with self.session() as session:
            attempts = session.scalar(select(Image.attempts).where(Image.id == image.id)) or 0
        final = attempts >= MAX_ATTEMPTS
        return self._finish(image, worker, status=FAILED if final else PENDING, last_error=reason,
                            processed_at=utc_now() if final else None)

    def release(self, image, worker):
        """Give an image back without counting the attempt (the PACS was unreachable, or the worker stops)."""
        return self._finish(image, worker, status=PENDING, attempts=Image.attempts - 1)

    # ------------------------------------------------------------------ worklist

    def get(self, sop_instance_uid):
        """The image with this SOP Instance UID; ``NotFound`` otherwise."""
        with self.session() as session:
            image = session.scalar(select(Image).where(Image.sop_instance_uid == sop_instance_uid))
        if image is None:
            raise NotFound(sop_instance_uid)
        return image

    def worklist(self, *, statuses=None, label=None, date_from=None, date_to=None, limit=50, offset=0):
        """(images on this page, total matching): most urgent first, then longest waiting; flagged images last."""
        filters = []
        if statuses:
            filters.append(Image.status.in_(list(statuses)))
        if label:
            filters.append(Image.label == label)
        if date_from:
            filters.append(Image.study_date >= date_from)
        if date_to:
            filters.append(Image.study_date <= date_to)
        rank = case((Image.ood_flagged.is_(True), 2), (Image.urgency.is_(None), 1), else_=0)
        query = (select(Image).where(*filters)
                 .order_by(rank, Image.urgency.desc(), Image.received_at, Image.id).limit(limit).offset(offset))
        with self.session() as session:
            total = session.scalar(select(func.count(Image.id)).where(*filters))
            return list(session.scalars(query)), total

    def counts(self):
        """Number of images per status."""
        with self.session() as session:
            rows = session.execute(select(Image.status, func.count(Image.id)).group_by(Image.status)).all()
        return {status: 0 for status in STATUSES} | dict(rows)

    def mark_reviewed(self, sop_instance_uid, user):
        """Mark a done or flagged image reviewed by ``user`` and record it in the audit trail; the updated image."""
        now = utc_now()
        with self.session() as session, session.begin():
            image = session.scalar(select(Image).where(Image.sop_instance_uid == sop_instance_uid).with_for_update())
            if image is None:
                raise NotFound(sop_instance_uid)
            if image.status not in (DONE, FLAGGED, REVIEWED):
                raise ValueError(f"an image in status {image.status!r} has no result to review yet")
            image.status, image.reviewed_by, image.reviewed_at = REVIEWED, user, now
            session.add(ReviewEvent(image_id=image.id, sop_instance_uid=image.sop_instance_uid, action="reviewed",
                                    user=user, at=now))
        return image

    def review_events(self, sop_instance_uid=None):
        """The audit trail, oldest first (of one image when a UID is given)."""
        query = select(ReviewEvent).order_by(ReviewEvent.at, ReviewEvent.id)
        if sop_instance_uid:
            query = query.where(ReviewEvent.sop_instance_uid == sop_instance_uid)
        with self.session() as session:
            return list(session.scalars(query))

    # ------------------------------------------------------------------ feed state

    def get_state(self, name, default=None):
        """A feed's saved value (e.g. Orthanc's /changes cursor), or ``default``."""
        with self.session() as session:
            row = session.get(FeedState, name)
        return default if row is None else row.value

    def set_state(self, name, value):
        """Save a feed's value."""
        with self.session() as session, session.begin():
            session.merge(FeedState(name=name, value=str(value), updated_at=utc_now()))

    def seen_instance_count(self, study_instance_uid):
        """How many instances QIDO polling last saw in a study (None: never seen)."""
        with self.session() as session:
            row = session.get(SeenStudy, study_instance_uid)
        return None if row is None else row.instance_count

    def mark_study_seen(self, study_instance_uid, instance_count):
        """Remember that QIDO polling has handled a study at this instance count."""
        with self.session() as session, session.begin():
            session.merge(SeenStudy(study_instance_uid=study_instance_uid, instance_count=int(instance_count),
                                    seen_at=utc_now()))


def _claimable(now):
    """Pending, or processing under a lease that has run out."""
    return or_(Image.status == PENDING, (Image.status == PROCESSING) & (Image.lease_expires_at < now))
