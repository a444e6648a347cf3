"""The CovidScan web application factory."""

import io
from pathlib import Path

from flask import Flask, Request, current_app, request
from flask_wtf.csrf import CSRFProtect

from app.config import ENV_PREFIX, REPO_ROOT, SECURITY_HEADERS, load_config, model_missing_hint
from model.errors import CheckpointError
from model.inference import Predictor

csrf = CSRFProtect()


def create_app(config=None):
    """Build the app: config, extensions, blueprints, error handlers, logging, then the predictor (once)."""
    app = Flask(__name__, template_folder=str(REPO_ROOT / "templates"), static_folder=str(REPO_ROOT / "static"))
    app.request_class = InMemoryRequest
    app.json.sort_keys = False  # keep the checkpoint's class order in API answers
    load_config(app, config)

    csrf.init_app(app)

    from app import api, errors, views

    app.register_blueprint(views.bp)
    app.register_blueprint(api.bp)
    csrf.exempt(api.bp)

    errors.register_error_handlers(app)
    register_response_hooks(app)

    configure_logging(app)

    app.extensions["predictor"] = load_predictor(app)
    return app


class InMemoryRequest(Request):
    """Keeps uploaded files in memory, never spooled to a temporary file; MAX_CONTENT_LENGTH bounds them."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def configure_logging(app):
    """Set the app's log level; handlers belong to the entry point (gunicorn, or Flask's default one)."""
    app.logger.setLevel(str(app.config["LOG_LEVEL"]).upper())


def load_predictor(app):
    """Load the checkpoint named by MODEL_PATH, or stop start-up with a message that says what to do."""
    path = Path(app.config["MODEL_PATH"])
    if not path.is_file():
        raise RuntimeError(f"CovidScan cannot start: no model checkpoint at {path}. {model_missing_hint(path)}")
    try:
        predictor = Predictor.from_path(path, device=app.config["DEVICE"])
    except CheckpointError as error:
        raise RuntimeError(
            f"CovidScan cannot start: {error}. "
            f"Point {ENV_PREFIX}_MODEL_PATH at a checkpoint written by scripts/train.py."
        ) from error
    info = predictor.model_info
    app.logger.info(
        "Loaded model %s version %s (%s; classes %s) from %s, sha256 %s",
        info["name"], info["version"], info["arch"], ", ".join(info["classes"]), path, predictor.sha256,
    )
    return predictor


def get_predictor():
    """The predictor built at start-up; views fetch it, never build it."""
    return current_app.extensions["predictor"]


def register_response_hooks(app):
    """Security headers and the request id on every response; nothing but static files may be cached."""
    from app.errors import request_id

    @app.after_request
    def add_headers(response):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers["X-Request-ID"] = request_id()
        if request.endpoint != "static":
            response.headers["Cache-Control"] = "no-store"
        return response
