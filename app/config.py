"""Configuration: defaults in code, overridden by ``COVIDSCAN_*`` environment variables, then by a dict (tests)."""

import logging
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIX = "COVIDSCAN"
DEFAULT_MODEL_PATH = REPO_ROOT / "models" / "default.pt"

# Sent on every response; a later issue hardens these further.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class Defaults:
    """Built-in defaults; each one can be overridden by ``COVIDSCAN_<NAME>`` in the environment."""

    MODEL_PATH = str(DEFAULT_MODEL_PATH)
    DEVICE = "cpu"
    SECRET_KEY = None
    DEV = False
    MAX_UPLOAD_MB = 64
    TORCH_THREADS = 0  # read by gunicorn.conf.py; 0 means CPU cores divided by workers
    LOG_LEVEL = "INFO"
    SESSION_COOKIE_HTTPONLY = True
    SESSION_COOKIE_SAMESITE = "Lax"


def load_config(app, overrides=None):
    """Fill ``app.config``: defaults, then the environment, then ``overrides``; check what must be set."""
    overrides = dict(overrides or {})
    app.config.from_object(Defaults)
    app.config.from_prefixed_env(ENV_PREFIX)
    app.config.update(overrides)
    if "MAX_CONTENT_LENGTH" not in overrides:
        app.config["MAX_CONTENT_LENGTH"] = _upload_limit_bytes(app.config["MAX_UPLOAD_MB"])
    app.config["MODEL_PATH"] = str(app.config["MODEL_PATH"])
    _ensure_secret_key(app)


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


def model_missing_hint(path):
    """What to do when the checkpoint at ``path`` does not exist."""
    default = Path(path).resolve() == DEFAULT_MODEL_PATH.resolve()
    where = "The shipped default model has not been put there yet. " if default else ""
    return (
        f"{where}Train a checkpoint with `python scripts/train.py --data DATA_DIR --output-dir runs/NAME` "
        f"and point {ENV_PREFIX}_MODEL_PATH at runs/NAME/best.pt (or copy it to {DEFAULT_MODEL_PATH})."
    )
