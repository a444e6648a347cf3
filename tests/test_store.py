"""The results store on a real SQLite file and a real PostgreSQL server: migrations, the queue, leases, the worklist.

PostgreSQL is Debian's (``make pacs-deps``), initialised in a temporary folder and started on a free port by
the fixture; its tests skip only where it is not installed.
"""

import datetime
import threading

import pytest
from sqlalchemy import inspect, text

from pacs_servers import PostgresServer, postgres_available
from store import open_store
from store.database import MAX_ATTEMPTS, NotFound
from store.models import utc_now

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server (skipped where PostgreSQL is not installed)."""
    if not postgres_available():
        pytest.skip("PostgreSQL is not installed (make pacs-deps installs it)")
    server = PostgresServer().start()
    yield server
    server.stop()


_database_counter = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A fresh, empty database of each kind: an SQLite file, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'worklist.sqlite3'}"
    server = request.getfixturevalue("postgres")
    name = f"worklist_{next(_database_counter)}"
    admin = open_store(server.url, migrate=False)
    with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return server.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def store(database_url):
    """The store on that database, migrated."""
    store = open_store(database_url)
    yield store
    store.dispose()


def image(number, **extra):
    """A queue entry as the feeds make them (UIDs, accession number, study date, modality)."""
    return {"sop_instance_uid": f"1.2.3.{number}", "series_instance_uid": f"1.2.3.{number}.1",
            "study_instance_uid": f"1.2.3.{number}.0", "accession_number": f"A{number}",
            "study_date": datetime.date(2026, 12, 6), "modality": "DX", **extra}


def finish(store, claimed, worker, urgency, *, flagged=False):
    """Complete a claimed image with a made-up result."""
    probabilities = {"COVID": urgency, "NORMAL": 1 - urgency, "PNEUMONIA": 0.0}
    return store.complete(claimed, worker, label="COVID", probabilities=probabilities,
                          ood={"flagged": flagged, "score": None, "threshold": None, "reasons": []},
                          urgency=urgency, model_name="m", model_version="1")


def test_migrations_create_the_schema_and_are_applied_once(database_url):
    first = open_store(database_url)
    tables = set(inspect(first.engine).get_table_names())
    assert {"images", "review_events", "feed_state", "seen_studies", "alembic_version"} <= tables
    open_store(database_url)  # a second start-up: nothing left to apply, no error
    with first.engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"


def test_enqueue_is_idempotent_by_sop_instance_uid(store):
    assert store.enqueue([image(1), image(2)]) == 2
    assert store.enqueue([image(1), image(2), image(3)]) == 1
    assert store.counts()["pending"] == 3


def test_claim_leases_one_image_to_one_worker(store):
    store.enqueue([image(1)])
    claimed = store.claim("worker-a")
    assert claimed.status == "processing" and claimed.lease_owner == "worker-a" and claimed.attempts == 1
    assert store.claim("worker-b") is None
    assert finish(store, claimed, "worker-a", 0.9)
    assert store.get("1.2.3.1").status == "done"


def test_an_expired_lease_is_claimed_again_and_the_late_worker_cannot_finish(store):
    store.enqueue([image(1)])
    first = store.claim("worker-a", lease_seconds=60)
    later = utc_now() + datetime.timedelta(seconds=61)
    second = store.claim("worker-b", now=later)
    assert second is not None and second.id == first.id and second.attempts == 2
    assert not finish(store, first, "worker-a", 0.5)  # worker-a's lease was lost
    assert finish(store, second, "worker-b", 0.5)


def test_three_failures_mark_an_image_failed_with_its_reason(store):
    store.enqueue([image(1)])
    for attempt in range(1, MAX_ATTEMPTS + 1):
        claimed = store.claim("worker-a")
        assert claimed is not None and claimed.attempts == attempt
        store.fail(claimed, "worker-a", "The DICOM file is damaged or truncated and cannot be read.")
    assert store.claim("worker-a") is None
    failed = store.get("1.2.3.1")
    assert failed.status == "failed" and "damaged" in failed.last_error


def test_a_worker_dying_three_times_marks_the_image_failed(store):
    store.enqueue([image(1)])
    now = utc_now()
    for attempt in range(MAX_ATTEMPTS):
        now += datetime.timedelta(seconds=10)
        assert store.claim(f"worker-{attempt}", lease_seconds=5, now=now) is not None
    assert store.claim("worker-last", now=now + datetime.timedelta(seconds=10)) is None
    failed = store.get("1.2.3.1")
    assert failed.status == "failed" and "stopped before finishing" in failed.last_error


def test_release_does_not_count_the_attempt(store):
    store.enqueue([image(1)])
    store.release(store.claim("worker-a"), "worker-a")  # e.g. the PACS went away
    again = store.get("1.2.3.1")
    assert again.status == "pending" and again.attempts == 0


def test_two_workers_claiming_from_one_queue_never_share_an_image(database_url):
    count = 40
    open_store(database_url).enqueue([image(number) for number in range(count)])
    taken = {"a": [], "b": []}

    def work(name):
        store = open_store(database_url, migrate=False)  # its own engine and connections, like another process
        while (claimed := store.claim(name)) is not None:
            taken[name].append(claimed.sop_instance_uid)
            assert finish(store, claimed, name, 0.5)
        store.dispose()

    threads = [threading.Thread(target=work, args=(name,)) for name in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not set(taken["a"]) & set(taken["b"])
    assert len(taken["a"]) + len(taken["b"]) == count
    assert open_store(database_url, migrate=False).counts()["done"] == count


def test_worklist_order_filters_and_paging(store):
    store.enqueue([image(number) for number in range(6)])
    results = {0: 0.2, 1: 0.9, 2: None, 3: 0.5}  # 2 is flagged; 4 and 5 stay pending
    for _ in range(4):
        claimed = store.claim("w")
        number = int(claimed.sop_instance_uid.rsplit(".", 1)[1])
        finish(store, claimed, "w", results[number] or 0.99, flagged=results[number] is None)
    images, total = store.worklist()
    order = [image.sop_instance_uid.rsplit(".", 1)[1] for image in images]
    assert total == 6 and order == ["1", "3", "0", "4", "5", "2"]  # urgency, then waiting; flagged last
    flagged = store.get("1.2.3.2")
    assert flagged.status == "flagged" and flagged.label is None and flagged.urgency is None
    assert [i.sop_instance_uid for i in store.worklist(statuses=["pending"])[0]] == ["1.2.3.4", "1.2.3.5"]
    assert store.worklist(label="COVID")[1] == 3
    page, total = store.worklist(limit=2, offset=2)
    assert total == 6 and [i.sop_instance_uid for i in page] == ["1.2.3.0", "1.2.3.4"]
    assert store.worklist(date_from=datetime.date(2026, 12, 7))[1] == 0


def test_review_is_recorded_in_the_audit_trail(store):
    store.enqueue([image(1), image(2)])
    finish(store, store.claim("w"), "w", 0.7)
    reviewed = store.mark_reviewed("1.2.3.1", "dr.reader")
    assert reviewed.status == "reviewed" and reviewed.reviewed_by == "dr.reader"
    events = store.review_events("1.2.3.1")
    assert [(event.user, event.action) for event in events] == [("dr.reader", "reviewed")]
    with pytest.raises(ValueError):
        store.mark_reviewed("1.2.3.2", "dr.reader")  # still pending: nothing to review
    with pytest.raises(NotFound):
        store.mark_reviewed("9.9.9", "dr.reader")


def test_feed_state_and_seen_studies(store):
    assert store.get_state("cursor", "0") == "0"
    store.set_state("cursor", 41)
    store.set_state("cursor", 42)
    assert store.get_state("cursor") == "42"
    assert store.seen_instance_count("1.2.3") is None
    store.mark_study_seen("1.2.3", 2)
    store.mark_study_seen("1.2.3", 3)
    assert store.seen_instance_count("1.2.3") == 3
