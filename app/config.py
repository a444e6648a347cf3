"""Configuration: defaults in code, overridden by ``COVIDSCAN_*`` environment variables, then by a dict (tests)."""

import logging
import os
import secrets
from pathlib import Path

from limits import parse_many

from model.startup import PRODUCT_CLASS_NAMES, SHA256_HEX, parse_class_names, parse_model_digest

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIX = "COVIDSCAN"
DEFAULT_MODEL_PATH = REPO_ROOT / "models" / "default.pt"

# Sent on every response (docs/security.md).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# Added to responses over HTTPS only (directly, or behind trusted proxies that say so).
HSTS_HEADER = "max-age=31536000"


class Defaults:
    """Built-in defaults; each one can be overridden by ``COVIDSCAN_<NAME>`` in the environment."""

    MODEL_PATH = str(DEFAULT_MODEL_PATH)
    MODEL_SHA256 = ""  # pins the checkpoint file: start-up refuses any other content; empty: not pinned
    ALLOWED_CLASS_NAMES = ",".join(PRODUCT_CLASS_NAMES)  # the checkpoint's class_names must be exactly this list
    DEVICE = "cpu"
    SECRET_KEY = None
    DEV = False
    MAX_UPLOAD_MB = 64
    TORCH_THREADS = 0  # read by gunicorn.conf.py; 0 means CPU cores divided by workers
    LOG_LEVEL = "INFO"
    SESSION_COOKIE_HTTPONLY = True
    SESSION_COOKIE_SAMESITE = "Lax"
    SECURE_COOKIES = None  # session cookie only over HTTPS; None means on in production, off in development
    TRUSTED_PROXIES = 0  # reverse proxies in front whose X-Forwarded-For / -Proto headers are believed
    API_TOKEN_HASHES = ""  # comma-separated SHA-256 hex digests of the accepted API tokens; empty: API open
    PROXY_USER_HEADER = ""  # e.g. X-Remote-User, set by an authenticating proxy; empty: pages open
    RATE_LIMIT = "60 per minute"  # per client on the predict routes; "off" disables it
    RATE_LIMIT_STORAGE_URI = "memory://"  # per process; e.g. redis://host:6379 to share it between workers
    DATABASE_URL = ""  # worklist store (SQLAlchemy URL, SQLite or PostgreSQL); empty: SQLite in the instance folder
    PACS_URL = ""  # the PACS's DICOMweb root, from which the worklist fetches heatmaps
    PACS_VIEWER_URL = ""  # the site's viewer, a template such as https://viewer/study/{study_instance_uid}


# Settings read as the raw text of their environment variable: JSON parsing would turn a digest such as
# "1234e5..." into a number.
RAW_TEXT_SETTINGS = ("API_TOKEN_HASHES", "PROXY_USER_HEADER", "RATE_LIMIT", "RATE_LIMIT_STORAGE_URI", "MODEL_SHA256",
                     "ALLOWED_CLASS_NAMES")
RAW_TEXT_SETTINGS += ("DATABASE_URL", "PACS_URL", "PACS_VIEWER_URL")  # URLs, never JSON
OFF_VALUES = ("", "0", "off", "false", "no", "none")
ON_VALUES = ("1", "on", "true", "yes")


def load_config(app, overrides=None):
    """Fill ``app.config``: defaults, then the environment, then ``overrides``; check what must be set."""
    overrides = dict(overrides or {})
    app.config.from_object(Defaults)
    app.config.from_prefixed_env(ENV_PREFIX)
    for name in RAW_TEXT_SETTINGS:
        if f"{ENV_PREFIX}_{name}" in os.environ:
            app.config[name] = os.environ[f"{ENV_PREFIX}_{name}"]
    app.config.update(overrides)
    if "MAX_CONTENT_LENGTH" not in overrides:
        app.config["MAX_CONTENT_LENGTH"] = _upload_limit_bytes(app.config["MAX_UPLOAD_MB"])
    app.config["MODEL_PATH"] = str(app.config["MODEL_PATH"])
    _ensure_secret_key(app)
    _refuse_debug_in_production(app)
    _configure_cookies(app)
    app.config["TRUSTED_PROXIES"] = _proxy_count(app.config["TRUSTED_PROXIES"])
    app.config["API_TOKEN_HASHES"] = _token_hashes(app.config["API_TOKEN_HASHES"])
    app.config["PROXY_USER_HEADER"] = str(app.config["PROXY_USER_HEADER"] or "").strip()
    app.config["RATE_LIMIT"] = _rate_limit(app.config["RATE_LIMIT"])
    app.config["MODEL_SHA256"] = parse_model_digest(app.config["MODEL_SHA256"])
    app.config["ALLOWED_CLASS_NAMES"] = parse_class_names(app.config["ALLOWED_CLASS_NAMES"])


def is_production(app):
    """Neither development mode nor tests: the settings a real deployment must get right."""
    return not (app.config.get("DEV") or app.config.get("TESTING"))


def _upload_limit_bytes(megabytes):
    """``COVIDSCAN_MAX_UPLOAD_MB`` as a byte count, refusing nonsense at start-up rather than per request."""
    try:
        value = float(megabytes)
    except (TypeError, ValueError) as error:
        raise RuntimeError(f"{ENV_PREFIX}_MAX_UPLOAD_MB must be a number of megabytes, not {megabytes!r}") from error
    if value <= 0:
        raise RuntimeError(f"{ENV_PREFIX}_MAX_UPLOAD_MB must be positive, not {megabytes!r}")
    return int(value * 1024 * 1024)


def _ensure_secret_key(app):
    """Production refuses to start without a secret key; development and tests get a per-process one."""
    if app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = str(app.config["SECRET_KEY"])
        return
    if not (app.config.get("DEV") or app.config.get("TESTING")):
        raise RuntimeError(
            f"{ENV_PREFIX}_SECRET_KEY is not set; CovidScan refuses to start in production without a secret key. "
            f"Set it to a long random value, e.g. the output of "
            f"`python -c 'import secrets; print(secrets.token_hex(32))'`, or set {ENV_PREFIX}_DEV=1 on a "
            "development machine."
        )
    app.config["SECRET_KEY"] = secrets.token_hex(32)
    logger.warning(
        "%s_SECRET_KEY is not set: using a random key for this process only (development mode); "
        "forms and sessions will not survive a restart.",
        ENV_PREFIX,
    )


def _refuse_debug_in_production(app):
    """Flask's debug mode (FLASK_DEBUG, COVIDSCAN_DEBUG) is for a developer's machine, never for production."""
    if app.config.get("DEBUG") and is_production(app):
        raise RuntimeError(
            "Debug mode is on (FLASK_DEBUG or COVIDSCAN_DEBUG) but this is not a development machine; "
            f"CovidScan refuses to start. Unset it, or set {ENV_PREFIX}_DEV=1 on a development machine."
        )


def _configure_cookies(app):
    """The session cookie (it carries the CSRF token) is sent over HTTPS only, unless told otherwise."""
    secure = app.config.get("SECURE_COOKIES")
    secure = is_production(app) if secure is None else _switch(secure, "SECURE_COOKIES")
    app.config["SECURE_COOKIES"] = secure
    app.config["SESSION_COOKIE_SECURE"] = secure
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    if app.config.get("SESSION_COOKIE_SAMESITE") not in ("Lax", "Strict"):
        app.config["SESSION_COOKIE_SAMESITE"] = "Lax"


def _switch(value, name):
    """An on/off setting given as a boolean, 0/1 or a word."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ON_VALUES:
        return True
    if text in OFF_VALUES:
        return False
    raise RuntimeError(f"{ENV_PREFIX}_{name} must be on or off (1/0, true/false), not {value!r}")


def _proxy_count(value):
    """``COVIDSCAN_TRUSTED_PROXIES``: how many reverse proxies in front set X-Forwarded-* (0: none trusted)."""
    try:
        count = int(value or 0)
    except (TypeError, ValueError) as error:
        raise RuntimeError(f"{ENV_PREFIX}_TRUSTED_PROXIES must be a whole number of proxies, not {value!r}") from error
    if count < 0:
        raise RuntimeError(f"{ENV_PREFIX}_TRUSTED_PROXIES must not be negative, not {value!r}")
    return count


def _token_hashes(value):
    """``COVIDSCAN_API_TOKEN_HASHES``: a comma-separated list (or a list) of SHA-256 hex digests."""
    items = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    hashes = [str(item).strip().lower() for item in items if str(item).strip()]
    for digest in hashes:
        if not SHA256_HEX.match(digest):
            raise RuntimeError(
                f"{ENV_PREFIX}_API_TOKEN_HASHES must hold SHA-256 hex digests (64 hex digits each, separated by "
                f"commas); one entry has {len(digest)} characters. Make one with "
                "`printf %s \"$TOKEN\" | sha256sum`."
            )
    return tuple(hashes)


def _rate_limit(value):
    """``COVIDSCAN_RATE_LIMIT``: a limit such as "60 per minute" (or "10/second;100/hour"), or off (None)."""
    if value is None or value is False or str(value).strip().lower() in OFF_VALUES:
        return None
    text = str(value).strip()
    try:
        parse_many(text)
    except ValueError as error:
        raise RuntimeError(
            f"{ENV_PREFIX}_RATE_LIMIT must read like \"60 per minute\" or \"10/second;300/hour\", "
            f"or be off; not {value!r}"
        ) from error
    return text


def model_missing_hint(path):
    """What to do when the checkpoint at ``path`` does not exist."""
    default = Path(path).resolve() == DEFAULT_MODEL_PATH.resolve()
    where = "The shipped default model has not been put there yet. " if default else ""
    return (
        f"{where}Train a checkpoint with `python scripts/train.py --data DATA_DIR --output-dir runs/NAME` "
        f"and point {ENV_PREFIX}_MODEL_PATH at runs/NAME/best.pt (or copy it to {DEFAULT_MODEL_PATH})."
    )
