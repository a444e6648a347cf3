"""Error handlers, registered once: JSON for the API (or clients that prefer it), HTML pages otherwise."""

import logging

from flask import current_app, jsonify, render_template, request
from flask_limiter import RateLimitExceeded
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from app import request_id
from app.forms import UNREADABLE_FORM_MESSAGE, UploadRefused, human_size
from app.security import SignInRequired, render_login_page
from app.views import render_upload_page
from model.errors import InvalidImageError

logger = logging.getLogger(__name__)

CSRF_MESSAGE = "The form's security token is missing or has expired; please reload the page and try again."
SERVER_ERROR_MESSAGE = "Something went wrong on our side; the error has been logged."
# werkzeug answers 413 for these too, within the size limit (max_form_parts, max_form_memory_size).
TOO_MANY_PARTS_MESSAGE = (
    "The request has too many form fields or an oversized text field; "
    "send one image as a file in the multipart field 'file'."
)
# Headers of werkzeug's own error responses worth keeping (e.g. Allow on 405).
KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


def wants_json():
    """True for API paths and endpoints and for clients that prefer JSON to HTML."""
    if request.path.startswith("/api/") or request.blueprint == "api":
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def register_error_handlers(app):
    """Map domain errors and HTTP errors to status codes and pages, once for the whole app."""
    app.register_error_handler(InvalidImageError, handle_invalid_image)
    app.register_error_handler(UploadRefused, handle_upload_refused)
    app.register_error_handler(CSRFError, handle_csrf_error)
    app.register_error_handler(RequestEntityTooLarge, handle_too_large)
    app.register_error_handler(RateLimitExceeded, handle_rate_limited)
    app.register_error_handler(SignInRequired, handle_sign_in_required)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(Exception, handle_unexpected_error)


def handle_invalid_image(error):
    """400 for a damaged or absurd image, 415 for a wrong type; the form comes back with the reason."""
    return upload_refused(str(error), error.status_code)


def handle_upload_refused(error):
    """400: no file, or several, in the field ``file``."""
    return upload_refused(error.description, 400)


def handle_csrf_error(error):
    """400: a form post without a valid CSRF token (or whose multipart body could not be parsed at all)."""
    if getattr(request, "multipart_unreadable", False):
        return upload_refused(UNREADABLE_FORM_MESSAGE, 400)
    if request.blueprint == "auth":
        logger.info("sign-in refused with 400: CSRF token missing or expired (request %s)", request_id())
        return render_login_page(error=CSRF_MESSAGE), 400
    return upload_refused(CSRF_MESSAGE, 400)


def handle_sign_in_required(error):
    """401: a page or form post without a signed-in session while API tokens are configured."""
    logger.info("HTTP 401 sign-in required on %s %s (request %s)", request.method, request.path, request_id())
    if wants_json():
        return jsonify({"error": error.description}), 401
    return render_login_page(error=error.description), 401


def handle_too_large(error):
    """413: the request is larger than MAX_CONTENT_LENGTH (werkzeug stops reading it), or has too many parts."""
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    length = request.content_length
    if limit and length is not None and length <= limit:
        message = TOO_MANY_PARTS_MESSAGE
    elif limit:
        message = f"The upload is larger than the {human_size(limit)} limit."
    else:
        message = "The upload is too large."
    return upload_refused(message, 413)


def handle_rate_limited(error):
    """429: this client sent more predictions than RATE_LIMIT allows (Retry-After says when to come back)."""
    return upload_refused(error.description, 429)


def handle_http_error(error):
    """Any other HTTP error (404, 405, ...) with its own code and description."""
    if error.code is not None and error.code >= 500:
        logger.error("HTTP %s on %s %s (request %s)", error.code, request.method, request.path, request_id())
    headers = [(name, value) for name, value in error.get_headers() if name in KEPT_HEADERS]
    if wants_json():
        response = jsonify({"error": error.description})
    else:
        response = render_template(
            "error.html", title=error.name, message=error.description, request_id=request_id()
        )
    return response, error.code or 500, headers


def handle_unexpected_error(error):
    """Log the exception with the request id; answer a clean 500 (never a stack trace)."""
    logger.exception(
        "Unhandled %s on %s %s (request %s)", type(error).__name__, request.method, request.path, request_id()
    )
    if wants_json():
        return jsonify({"error": SERVER_ERROR_MESSAGE, "request_id": request_id()}), 500
    page = render_template(
        "error.html", title="Internal Server Error", message=SERVER_ERROR_MESSAGE, request_id=request_id()
    )
    return page, 500


def upload_refused(message, status):
    """Refused upload: JSON ``{"error": ...}`` for the API, the upload form with the reason otherwise."""
    # The status and the request id only: a reason may one day quote the file, whose content is private.
    logger.info("upload refused with %s (request %s)", status, request_id())
    if wants_json():
        return jsonify({"error": message}), status
    return render_upload_page(error=message), status
