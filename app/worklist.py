"""The PACS worklist: the page (``/worklist``), its JSON API (``/api/v1/worklist``), heatmaps and reviews.

Both sit behind the app's access control (app/security.py, ``access_required`` on every route besides the app-wide
check): the page and its data like every page (the proxy's user header, or a signed-in session), the API like
``/api/v1/predict`` (a bearer token). The worker (scripts/pacs_worker.py)
fills the store; this module only reads it, and records reviews with who made them.
"""

import datetime
import hashlib
import io
import logging

from flask import Blueprint, current_app, jsonify, render_template, request, send_file, session, url_for
from werkzeug.exceptions import BadRequest, Conflict, NotFound, ServiceUnavailable

from app import get_predictor, request_id
from app.security import SESSION_TOKEN_KEY, access_required, bearer_token
from store import STATUSES, open_store
from store.database import NotFound as ImageNotFound
from store.database import MEMORY_DATABASE_URL, default_database_url

logger = logging.getLogger(__name__)

bp = Blueprint("worklist", __name__)
api_bp = Blueprint("worklist_api", __name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
ANONYMOUS = "anonymous"
VIEWER_FIELDS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "accession_number")


def init_app(app, csrf):
    """Open the store (applying its migrations) and register the page and API blueprints (the API without CSRF)."""
    url = app.config.get("DATABASE_URL")
    if not url:
        url = MEMORY_DATABASE_URL if app.config.get("TESTING") else default_database_url(app.instance_path)
    app.extensions["store"] = open_store(url)
    app.register_blueprint(bp)
    app.register_blueprint(api_bp)
    csrf.exempt(api_bp)


def get_store():
    """The results store opened at start-up."""
    return current_app.extensions["store"]


def current_reader():
    """Who is asking, for the audit trail: the proxy's user, the token's id, or ``anonymous`` when the app is open."""
    header = current_app.config.get("PROXY_USER_HEADER")
    if header and request.headers.get(header, "").strip():
        return request.headers[header].strip()[:128]
    token = bearer_token() if request.path.startswith("/api/") else None
    if token and current_app.config.get("API_TOKEN_HASHES"):
        return f"token:{hashlib.sha256(token.encode('utf-8', errors='surrogateescape')).hexdigest()[:8]}"
    signed_in = session.get(SESSION_TOKEN_KEY)
    if isinstance(signed_in, str) and signed_in:
        return f"token:{signed_in[:8]}"
    return ANONYMOUS


# ---------------------------------------------------------------------------------------------------- queries


def parse_query(args):
    """Filters and paging from the query string: ``status`` (comma-separated), ``label``, ``date`` or ``date_from``
    / ``date_to`` (YYYY-MM-DD, the study date), ``page`` (from 1) and ``per_page`` (default 50)."""
    statuses = [part.strip() for part in args.get("status", "").split(",") if part.strip()]
    unknown = [status for status in statuses if status not in STATUSES]
    if unknown:
        raise BadRequest(f"Unknown status {unknown[0]!r}: use one or more of {', '.join(STATUSES)}.")
    date_from = _date(args, "date_from") or _date(args, "date")
    date_to = _date(args, "date_to") or _date(args, "date")
    page = _positive_int(args, "page", 1)
    per_page = min(_positive_int(args, "per_page", DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE)
    label = args.get("label", "").strip() or None
    return {"statuses": statuses, "label": label, "date_from": date_from, "date_to": date_to}, page, per_page


def _date(args, name):
    text = args.get(name, "").strip()
    if not text:
        return None
    try:
        return datetime.date.fromisoformat(text)
    except ValueError as error:
        raise BadRequest(f"The {name} filter must be a date as YYYY-MM-DD, not {text!r}.") from error


def _positive_int(args, name, default):
    text = args.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise BadRequest(f"{name} must be a whole number of at least 1, not {text!r}.")
    return int(text)


def _timestamp(value):
    """An ISO 8601 UTC timestamp (SQLite hands timestamps back without their zone; they are stored in UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.isoformat().replace("+00:00", "Z")


def viewer_url(image):
    """The study in the site's viewer (``PACS_VIEWER_URL`` with ``{study_instance_uid}`` etc.), or None."""
    template = current_app.config.get("PACS_VIEWER_URL")
    if not template:
        return None
    try:
        return template.format(**{field: getattr(image, field) or "" for field in VIEWER_FIELDS})
    except (KeyError, IndexError, ValueError):
        logger.warning("PACS_VIEWER_URL is not a valid template; use {study_instance_uid} and the like")
        return None


PAGE_ENDPOINTS = {"heatmap": "worklist.heatmap", "review": "worklist.review_from_page"}
API_ENDPOINTS = {"heatmap": "worklist_api.api_heatmap", "review": "worklist_api.api_review"}


def item_json(image, endpoints):
    """One worklist item as the API returns it (UIDs, accession number and study date; no other patient data)."""
    has_heatmap = image.status in ("done", "flagged", "reviewed")
    return {
        "study_instance_uid": image.study_instance_uid,
        "series_instance_uid": image.series_instance_uid,
        "sop_instance_uid": image.sop_instance_uid,
        "accession_number": image.accession_number,
        "study_date": image.study_date.isoformat() if image.study_date else None,
        "modality": image.modality,
        "received_at": _timestamp(image.received_at),
        "processed_at": _timestamp(image.processed_at),
        "status": image.status,
        "label": image.label,
        "probabilities": image.probabilities,
        "ood": image.ood,
        "urgency": image.urgency,
        "model": {"name": image.model_name, "version": image.model_version} if image.model_name else None,
        "error": image.last_error if image.status == "failed" else None,
        "reviewed_by": image.reviewed_by,
        "reviewed_at": _timestamp(image.reviewed_at),
        "viewer_url": viewer_url(image),
        "heatmap_url": _url(endpoints["heatmap"], image) if has_heatmap else None,
        "review_url": _url(endpoints["review"], image) if has_heatmap else None,
    }


def _url(endpoint, image):
    return url_for(endpoint, sop_instance_uid=image.sop_instance_uid)


def worklist_json(endpoints):
    """The filtered, ranked page of the worklist with paging and the count per status."""
    filters, page, per_page = parse_query(request.args)
    images, total = get_store().worklist(**filters, limit=per_page, offset=(page - 1) * per_page)
    return {
        "items": [item_json(image, endpoints) for image in images],
        "page": page,
        "per_page": per_page,
        "total": total,
        "pages": max(1, -(-total // per_page)),
        "counts": get_store().counts(),
        "order": "urgency descending, then waiting time; flagged (out-of-distribution) images last",
    }


def review(sop_instance_uid):
    """Mark an image reviewed by the current reader (audit trail); its new item."""
    reader = current_reader()
    try:
        image = get_store().mark_reviewed(sop_instance_uid, reader)
    except ImageNotFound as error:
        raise NotFound("No image with that SOP Instance UID in the worklist.") from error
    except ValueError as error:
        raise Conflict(str(error)) from error
    logger.info("image #%d marked reviewed by %s (request %s)", image.id, reader, request_id())
    return image


def heatmap_png(sop_instance_uid):
    """The heatmap of one image as PNG: the Secondary Capture written back, or computed again from the image."""
    try:
        image = get_store().get(sop_instance_uid)
    except ImageNotFound as error:
        raise NotFound("No image with that SOP Instance UID in the worklist.") from error
    if image.status not in ("done", "flagged", "reviewed"):
        raise Conflict(f"The image is {image.status}; it has no heatmap yet.")
    pacs_url = current_app.config.get("PACS_URL")
    if not pacs_url:
        raise ServiceUnavailable("Heatmaps are fetched from the PACS: set COVIDSCAN_PACS_URL to its DICOMweb root.")
    from pacs.dicomweb import PacsClient, PacsError, PacsUnavailable
    from pacs.worker import to_part10

    pacs = PacsClient(pacs_url)
    try:
        if image.heatmap_sop_uid:
            capture = pacs.retrieve_uids(image.study_instance_uid, image.heatmap_series_uid, image.heatmap_sop_uid)
            from PIL import Image as PILImage

            picture = PILImage.fromarray(capture.pixel_array)
        else:
            source = pacs.retrieve(image)
            picture = get_predictor().predict_bytes(to_part10(source), with_heatmap=True).heatmap
    except PacsUnavailable as error:
        raise ServiceUnavailable("The PACS does not answer; try again in a moment.") from error
    except PacsError as error:
        raise NotFound("The PACS no longer holds this image or its heatmap.") from error
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    buffer.seek(0)
    return send_file(buffer, mimetype="image/png", max_age=0)


# ---------------------------------------------------------------------------------------------------- routes


@bp.get("/worklist")
@access_required
def page():
    """The worklist page; static/worklist.js fills and refreshes it from ``/worklist/data``."""
    return render_template("worklist.html", statuses=STATUSES, model_info=get_predictor().model_info,
                           page_size=DEFAULT_PAGE_SIZE)


@bp.get("/worklist/data")
@access_required
def page_data():
    """The worklist JSON for the page (the page's own access control: no API token in a browser)."""
    return jsonify(worklist_json(PAGE_ENDPOINTS))


@bp.get("/worklist/<sop_instance_uid>/heatmap.png")
@access_required
def heatmap(sop_instance_uid):
    """The heatmap PNG for the page."""
    return heatmap_png(sop_instance_uid)


@bp.post("/worklist/<sop_instance_uid>/review")
@access_required
def review_from_page(sop_instance_uid):
    """Mark reviewed from the page (CSRF token in the X-CSRFToken header)."""
    return jsonify(item_json(review(sop_instance_uid), PAGE_ENDPOINTS))


@api_bp.get("/api/v1/worklist")
@access_required
def api_worklist():
    """The worklist as JSON: ``items`` most urgent first, with paging (``page``, ``per_page``) and filters."""
    return jsonify(worklist_json(API_ENDPOINTS))


@api_bp.get("/api/v1/worklist/<sop_instance_uid>/heatmap.png")
@access_required
def api_heatmap(sop_instance_uid):
    """The heatmap PNG of one image."""
    return heatmap_png(sop_instance_uid)


@api_bp.post("/api/v1/worklist/<sop_instance_uid>/review")
@access_required
def api_review(sop_instance_uid):
    """Mark an image reviewed; the audit trail records the token's id as the reader."""
    return jsonify(item_json(review(sop_instance_uid), API_ENDPOINTS))


@api_bp.get("/api/v1/worklist/<sop_instance_uid>/reviews")
@access_required
def api_reviews(sop_instance_uid):
    """The audit trail of one image: who reviewed it and when."""
    events = get_store().review_events(sop_instance_uid)
    return jsonify({"events": [{"sop_instance_uid": event.sop_instance_uid, "action": event.action,
                                "user": event.user, "at": _timestamp(event.at)} for event in events]})
