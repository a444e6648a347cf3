"""The CovidScan web application factory."""

import io
import logging
import uuid
from pathlib import Path

from flask import Flask, Request, current_app, g, request
from flask_wtf.csrf import CSRFProtect

from app.config import ENV_PREFIX, HSTS_HEADER, REPO_ROOT, SECURITY_HEADERS, load_config, model_missing_hint
from model.errors import CheckpointError
from model.log_guard import install_log_guard
from model.runtime import BackendError
from model.startup import load_checked_predictor

csrf = CSRFProtect()


def create_app(config=None):
    """Build the app: config, extensions, blueprints, error handlers, logging, then the predictor (once)."""
    app = Flask(__name__, template_folder=str(REPO_ROOT / "templates"), static_folder=str(REPO_ROOT / "static"))
    app.request_class = InMemoryRequest
    app.json.sort_keys = False  # keep the checkpoint's class order in API answers
    load_config(app, config)
    configure_logging(app)

    from app import api, errors, security, views

    security.init_proxy_fix(app)
    security.init_access_control(app)  # before CSRF: a stranger is told to sign in, not to reload the form
    csrf.init_app(app)

    app.register_blueprint(views.bp)
    app.register_blueprint(api.bp)
    csrf.exempt(api.bp)
    from app import worklist

    worklist.init_app(app, csrf)  # the PACS worklist: its store (migrated at start-up), page and API
    security.init_rate_limiting(app)

    errors.register_error_handlers(app)
    register_response_hooks(app)

    app.extensions["predictor"] = load_predictor(app)
    return app


class InMemoryRequest(Request):
    """Keeps uploaded files in memory, never spooled to a temporary file; MAX_CONTENT_LENGTH bounds them.

    ``multipart_unreadable`` is True for a multipart body that werkzeug could not parse (it then silently leaves
    the form empty), e.g. part headers that are not UTF-8, so that the answer can say so instead of "no file".
    """

    multipart_unreadable = False

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()

    def _load_form_data(self):
        super()._load_form_data()
        if self.mimetype == "multipart/form-data" and self.content_length and not self.form and not self.files:
            self.multipart_unreadable = True


def configure_logging(app):
    """Set the app's log level and keep values from the uploads out of library log lines and warnings.

    Handlers belong to the entry point (gunicorn, or Flask's default one).
    """
    app.logger.setLevel(str(app.config["LOG_LEVEL"]).upper())
    install_log_guard(logging.getLogger("app.library"))


def load_predictor(app):
    """Load the checkpoint named by MODEL_PATH, or stop start-up with a message that says what to do."""
    path = Path(app.config["MODEL_PATH"])
    try:
        is_file = path.is_file()
    except OSError as error:  # e.g. a folder on the way that this user may not enter
        raise RuntimeError(
            f"CovidScan cannot start: cannot read the model checkpoint {path} ({error.strerror}); "
            "the user running CovidScan needs read access to the file and its folders."
        ) from error
    if not is_file:
        raise RuntimeError(f"CovidScan cannot start: no model checkpoint at {path}. {model_missing_hint(path)}")
    try:
        predictor = load_checked_predictor(path, pinned_sha256=app.config["MODEL_SHA256"],
                                           allowed_class_names=app.config["ALLOWED_CLASS_NAMES"],
                                           device=app.config["DEVICE"])
    except CheckpointError as error:
        raise RuntimeError(
            f"CovidScan cannot start: {error}. Point {ENV_PREFIX}_MODEL_PATH (now {path}) at a checkpoint written "
            "by scripts/export.py (or scripts/train.py)."
        ) from error
    except BackendError as error:
        raise RuntimeError(
            f"CovidScan cannot start: {error}. Unset {ENV_PREFIX}_INFERENCE_BACKEND to let CovidScan choose, or set "
            "it to one that runs here (docs/model/fast-path.md)."
        ) from error
    info = predictor.model_info
    app.logger.info(
        "Loaded model %s version %s (%s; classes %s) from %s, sha256 %s",
        info["name"], info["version"], info["arch"], ", ".join(info["classes"]), path, predictor.sha256,
    )
    app.logger.info("Inference backend %s", predictor.backend_description)
    return predictor


def get_predictor():
    """The predictor built at start-up; views fetch it, never build it."""
    return current_app.extensions["predictor"]


def request_id():
    """A fresh id for the current request, sent as ``X-Request-ID``, shown on error pages and put in log lines."""
    if "request_id" not in g:
        g.request_id = uuid.uuid4().hex
    return g.request_id


def register_response_hooks(app):
    """Security headers and the request id on every response (and page); nothing but static files may be cached."""

    @app.after_request
    def add_headers(response):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.is_secure:
            response.headers.setdefault("Strict-Transport-Security", HSTS_HEADER)
        response.headers["X-Request-ID"] = request_id()
        if request.endpoint != "static" or response.status_code >= 400:
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.context_processor
    def inject_request_id():
        return {"request_id": request_id()}
