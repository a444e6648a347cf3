"""The worklist page and API on a real SQLite store filled through the store's own queue: access control, the
audit trail's reader, filters and their errors, the viewer link, the JSON shape. No PACS needed (no heatmaps)."""

import datetime
import hashlib

import pytest

from store import open_store

TOKEN = "worklist-test-token"
TOKEN_HASH = hashlib.sha256(TOKEN.encode()).hexdigest()
ITEM_FIELDS = {"study_instance_uid", "series_instance_uid", "sop_instance_uid", "accession_number", "study_date",
               "received_at", "processed_at", "status", "label", "probabilities", "ood", "urgency", "model"}


def fill_store(url):
    """An SQLite store with two results (one urgent), one flagged image and one pending image."""
    store = open_store(url)
    store.enqueue([{"sop_instance_uid": f"1.2.9.{number}", "series_instance_uid": f"1.2.9.{number}.1",
                    "study_instance_uid": f"1.2.9.{number}.0", "accession_number": f"ACC{number}",
                    "study_date": datetime.date(2026, 12, number + 1), "modality": "DX"} for number in range(4)])
    for urgency, flagged in ((0.3, False), (0.8, False), (None, True)):
        claimed = store.claim("test")
        label = None if flagged else ("COVID" if urgency > 0.5 else "NORMAL")
        store.complete(claimed, "test", label=label,
                       probabilities={"COVID": 0.5, "NORMAL": 0.3, "PNEUMONIA": 0.2},
                       ood={"flagged": flagged, "score": 9.0, "threshold": 5.0, "reasons": []},
                       urgency=urgency, model_name="covidscan-test", model_version="test-1")
    store.dispose()
    return url


@pytest.fixture
def database_url(tmp_path):
    """A filled store of this test's own (for tests that review)."""
    return fill_store(f"sqlite:///{tmp_path / 'worklist.sqlite3'}")


@pytest.fixture(scope="module")
def read_only_client(tiny_checkpoint_path, tmp_path_factory):
    """One app on one filled store, for the tests that only read (an app start loads the model)."""
    url = fill_store(f"sqlite:///{tmp_path_factory.mktemp('worklist') / 'worklist.sqlite3'}")
    return make_app(tiny_checkpoint_path, url,
                    PACS_VIEWER_URL="https://viewer.example/study/{study_instance_uid}?acc={accession_number}"
                    ).test_client()


def make_app(tiny_checkpoint_path, database_url, **settings):
    """The app on that store."""
    from app import create_app

    return create_app({"TESTING": True, "SECRET_KEY": "test", "WTF_CSRF_ENABLED": False,
                       "MODEL_PATH": str(tiny_checkpoint_path), "DATABASE_URL": database_url, **settings})


def test_api_answers_the_documented_shape_most_urgent_first(read_only_client):
    answer = read_only_client.get("/api/v1/worklist")
    assert answer.status_code == 200
    data = answer.get_json()
    assert data["total"] == 4 and data["per_page"] >= 50 and data["page"] == 1
    assert all(ITEM_FIELDS <= set(item) for item in data["items"])
    assert [item["accession_number"] for item in data["items"]] == ["ACC1", "ACC0", "ACC3", "ACC2"]
    assert [item["status"] for item in data["items"]] == ["done", "done", "pending", "flagged"]
    assert data["items"][0]["model"] == {"name": "covidscan-test", "version": "test-1"}
    assert data["items"][-1]["label"] is None and data["items"][-1]["urgency"] is None
    assert data["counts"]["flagged"] == 1 and data["counts"]["pending"] == 1


@pytest.mark.parametrize(("query", "expected"), [
    ("status=flagged", ["ACC2"]),
    ("status=done,pending", ["ACC1", "ACC0", "ACC3"]),
    ("label=COVID", ["ACC1"]),
    ("date=2026-12-01", ["ACC0"]),
    ("date_from=2026-12-02&date_to=2026-12-03", ["ACC1", "ACC2"]),
    ("per_page=1&page=2", ["ACC0"]),
])
def test_api_filters_and_pages(read_only_client, query, expected):
    items = read_only_client.get(f"/api/v1/worklist?{query}").get_json()["items"]
    assert [item["accession_number"] for item in items] == expected


@pytest.mark.parametrize(("query", "message"), [
    ("status=bogus", "Unknown status"),
    ("date=2026-13-01", "YYYY-MM-DD"),
    ("page=0", "at least 1"),
    ("per_page=many", "whole number"),
])
def test_bad_filters_get_a_clear_400(read_only_client, query, message):
    answer = read_only_client.get(f"/api/v1/worklist?{query}")
    assert answer.status_code == 400 and message in answer.get_json()["error"]


def test_api_needs_the_token_and_the_audit_trail_names_it(tiny_checkpoint_path, database_url):
    client = make_app(tiny_checkpoint_path, database_url, API_TOKEN_HASHES=TOKEN_HASH).test_client()
    assert client.get("/api/v1/worklist").status_code == 401
    assert client.get("/api/v1/worklist", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/api/v1/worklist/1.2.9.1/review").status_code == 401
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/v1/worklist", headers=headers).status_code == 200
    reviewed = client.post("/api/v1/worklist/1.2.9.1/review", headers=headers)
    assert reviewed.status_code == 200 and reviewed.get_json()["reviewed_by"] == f"token:{TOKEN_HASH[:8]}"
    events = client.get("/api/v1/worklist/1.2.9.1/reviews", headers=headers).get_json()["events"]
    assert [event["user"] for event in events] == [f"token:{TOKEN_HASH[:8]}"]


def test_page_needs_the_proxy_user_and_records_them(tiny_checkpoint_path, database_url):
    client = make_app(tiny_checkpoint_path, database_url, PROXY_USER_HEADER="X-Remote-User").test_client()
    assert client.get("/worklist").status_code == 403
    assert client.get("/worklist/data").status_code == 403
    assert client.post("/worklist/1.2.9.1/review").status_code == 403
    user = {"X-Remote-User": "dr.reader"}
    page = client.get("/worklist", headers=user)
    assert page.status_code == 200 and b"data-role=\"worklist\"" in page.data
    assert client.get("/worklist/data", headers=user).get_json()["total"] == 4
    assert client.post("/worklist/1.2.9.1/review", headers=user).get_json()["reviewed_by"] == "dr.reader"


def test_open_app_records_anonymous_and_refuses_unreviewable_items(tiny_checkpoint_path, database_url):
    client = make_app(tiny_checkpoint_path, database_url).test_client()
    assert client.post("/api/v1/worklist/1.2.9.2/review").get_json()["reviewed_by"] == "anonymous"  # flagged
    pending = client.post("/api/v1/worklist/1.2.9.3/review")
    assert pending.status_code == 409 and "no result" in pending.get_json()["error"]
    assert client.post("/api/v1/worklist/9.9.9/review").status_code == 404
    assert client.get("/api/v1/worklist/1.2.9.1/heatmap.png").status_code == 503  # no PACS_URL configured
    assert client.get("/api/v1/worklist").get_json()["items"][0]["viewer_url"] is None  # no viewer configured


def test_viewer_link_follows_the_configured_template(read_only_client):
    item = read_only_client.get("/api/v1/worklist").get_json()["items"][0]
    assert item["viewer_url"] == "https://viewer.example/study/1.2.9.1.0?acc=ACC1"


def test_a_fresh_sqlite_url_is_migrated_by_the_app_itself(tiny_checkpoint_path, tmp_path):
    url = f"sqlite:///{tmp_path / 'new' / 'fresh.sqlite3'}"
    client = make_app(tiny_checkpoint_path, url).test_client()
    assert client.get("/api/v1/worklist").get_json()["total"] == 0
    assert (tmp_path / "new" / "fresh.sqlite3").is_file()


def test_with_tokens_the_page_needs_sign_in_and_the_audit_names_the_token(tiny_checkpoint_path, database_url):
    client = make_app(tiny_checkpoint_path, database_url, API_TOKEN_HASHES=TOKEN_HASH).test_client()
    assert client.get("/worklist").status_code == 302  # to the sign-in form
    assert client.post("/worklist/1.2.9.1/review").status_code == 401
    assert client.post("/login", data={"token": TOKEN}).status_code == 302
    assert client.get("/worklist").status_code == 200
    assert client.post("/worklist/1.2.9.1/review").get_json()["reviewed_by"] == f"token:{TOKEN_HASH[:8]}"
