"""Who may use the app: trusted reverse proxies, API tokens, sign-in for the pages, and per-client rate limits.

One access control for every route: ``enforce_access()`` runs before every request (deny by default), and
``access_required`` puts the same check on a view explicitly (e.g. a blueprint's routes).
"""

import functools
import hashlib
import hmac
import logging
from urllib.parse import urlsplit

from flask import Blueprint, current_app, redirect, render_template, request, session, url_for
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits.errors import ConfigurationError
from werkzeug.exceptions import Forbidden, Unauthorized
from werkzeug.middleware.proxy_fix import ProxyFix

from app.config import ENV_PREFIX
from app.forms import LoginForm

logger = logging.getLogger(__name__)

bp = Blueprint("auth", __name__)

# Paths that stay open whatever is configured: the load balancer's health check, the stylesheet and the sign-in.
OPEN_ENDPOINTS = ("api.healthz", "static", "auth.login", "auth.logout")
# The session key that holds the signed-in token's id (a prefix of its configured SHA-256 digest, never the token).
SESSION_TOKEN_KEY = "signed_in_token"
TOKEN_ID_LENGTH = 16
SIGN_IN_MESSAGE = "Please sign in with your CovidScan access token to use this page."
SIGN_IN_FAILED_MESSAGE = "That access token is not valid."
RATE_LIMITED_ENDPOINTS = ("views.predict", "api.predict")
BEARER_REALM = "CovidScan"
TOKEN_MISSING_MESSAGE = "This API needs a token: send it as 'Authorization: Bearer <token>'."
TOKEN_INVALID_MESSAGE = "The API token is not valid."
PROXY_USER_MISSING_MESSAGE = (
    "This page is only available through the organisation's sign-in proxy. "
    "Open CovidScan through its usual address and sign in."
)


class ApiTokenRequired(Unauthorized):
    """401 for an API request without a valid bearer token, with the ``WWW-Authenticate: Bearer`` challenge."""

    def __init__(self, description, *, token_error=None):
        super().__init__(description)
        self.challenge = f'Bearer realm="{BEARER_REALM}"'
        if token_error:
            self.challenge += f', error="{token_error}"'

    def get_headers(self, environ=None, scope=None):
        return [*super().get_headers(environ, scope), ("WWW-Authenticate", self.challenge)]


def init_proxy_fix(app):
    """Believe X-Forwarded-For and -Proto only from the number of proxies named by TRUSTED_PROXIES."""
    proxies = app.config["TRUSTED_PROXIES"]
    if proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)


class SignInRequired(Unauthorized):
    """401 for a page request without a signed-in session (or the proxy's user header) while tokens are set."""


def init_access_control(app):
    """API tokens for ``/api/``; sign-in or the proxy's user header for the pages; a warning for what is left open."""
    app.before_request(require_credentials)
    app.register_blueprint(bp)
    open_parts = []
    if not app.config["API_TOKEN_HASHES"]:
        open_parts.append(f"the JSON API (no {ENV_PREFIX}_API_TOKEN_HASHES)")
    if not (app.config["PROXY_USER_HEADER"] or app.config["API_TOKEN_HASHES"]):
        open_parts.append(f"the upload pages (no {ENV_PREFIX}_API_TOKEN_HASHES or {ENV_PREFIX}_PROXY_USER_HEADER)")
    if open_parts:
        logger.warning(
            "CovidScan is open to anyone who can reach it: %s. Configure access control before exposing it "
            "beyond a trusted network (see docs/security.md).",
            " and ".join(open_parts),
        )


def require_credentials():
    """Before every request: refuse one that lacks the credentials its part of the app requires.

    A browser's GET of a page is sent to the sign-in form instead of being refused.
    """
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    try:
        enforce_access()
    except SignInRequired:
        if request.method in ("GET", "HEAD") and not request.path.startswith("/api/"):
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        raise
    return None


def enforce_access():
    """Raise 401/403 unless the current request may use the app.

    ``/api/`` needs a bearer token when ``API_TOKEN_HASHES`` is set. Pages need the proxy's user header
    (``PROXY_USER_HEADER``) or, when tokens are set, a session signed in at ``/login``; with neither set they are open.
    """
    hashes = current_app.config["API_TOKEN_HASHES"]
    if request.path.startswith("/api/"):
        if hashes:
            check_api_token(hashes)
        return
    header = current_app.config["PROXY_USER_HEADER"]
    if header and request.headers.get(header, "").strip():
        return
    if hashes:
        if signed_in_token_id(hashes) is None:
            raise SignInRequired(SIGN_IN_MESSAGE)
        return
    if header:
        raise Forbidden(PROXY_USER_MISSING_MESSAGE)


def access_required(view):
    """Decorator: the view runs only for a request that ``enforce_access`` lets through (the app-wide rule)."""

    @functools.wraps(view)
    def guarded(*args, **kwargs):
        enforce_access()
        return view(*args, **kwargs)

    return guarded


def signed_in_token_id(hashes):
    """The id of the token this session signed in with, while that token is still configured; else None."""
    token_id = session.get(SESSION_TOKEN_KEY)
    if not isinstance(token_id, str) or len(token_id) != TOKEN_ID_LENGTH:
        return None
    matched = False
    for expected in hashes:
        matched |= hmac.compare_digest(token_id, expected[:TOKEN_ID_LENGTH])
    return token_id if matched else None


@bp.route("/login", methods=["GET", "POST"])
def login():
    """GET: the sign-in form. POST: exchange a valid API token (form field ``token``, CSRF-checked) for a session."""
    hashes = current_app.config["API_TOKEN_HASHES"]
    if not hashes:
        return redirect(url_for("views.index"))
    form = LoginForm()
    if not form.validate_on_submit():
        if request.method == "POST":
            return render_login_page(form, error=first_form_error(form)), 400
        return render_login_page(form), 200
    digest = matching_hash(form.token.data.strip(), hashes)
    if digest is None:
        logger.info("sign-in refused (invalid token)")
        return render_login_page(form, error=SIGN_IN_FAILED_MESSAGE), 401
    session.clear()
    session[SESSION_TOKEN_KEY] = digest[:TOKEN_ID_LENGTH]
    session.permanent = True
    logger.info("signed in with token %s", digest[:8])
    return redirect(safe_next_url(request.args.get("next")))


@bp.post("/logout")
def logout():
    """End the session (CSRF-checked like every form)."""
    session.clear()
    return redirect(url_for("auth.login") if current_app.config["API_TOKEN_HASHES"] else url_for("views.index"))


def render_login_page(form=None, error=None):
    """The sign-in page; ``error`` says why the last attempt failed."""
    return render_template("login.html", form=form if form is not None else LoginForm(formdata=None), error=error)


def first_form_error(form):
    """The first validation message of a form that did not validate."""
    messages = [message for field_messages in form.errors.values() for message in field_messages]
    return messages[0] if messages else "The sign-in could not be read; please try again."


def safe_next_url(target):
    """Where to go after signing in: a path on this site only (never another host), else the upload page."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return url_for("views.index")


def check_api_token(hashes):
    """Raise ``ApiTokenRequired`` unless the bearer token's SHA-256 matches one of ``hashes``."""
    token = bearer_token()
    if token is None:
        raise ApiTokenRequired(TOKEN_MISSING_MESSAGE)
    if not token_matches(token, hashes):
        raise ApiTokenRequired(TOKEN_INVALID_MESSAGE, token_error="invalid_token")


def bearer_token():
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def token_matches(token, hashes):
    """Compare the token's digest with every configured digest in constant time (no early exit)."""
    return matching_hash(token, hashes) is not None


def matching_hash(token, hashes):
    """The configured digest that ``token`` hashes to, or None; every digest is compared, in constant time."""
    digest = hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).hexdigest()
    found = None
    for expected in hashes:
        if hmac.compare_digest(digest, expected):
            found = expected
    return found


def init_rate_limiting(app):
    """Limit predictions per client (``RATE_LIMIT``); counters live in ``RATE_LIMIT_STORAGE_URI``."""
    rate = app.config["RATE_LIMIT"]
    if rate is None:
        return None
    storage_uri = str(app.config["RATE_LIMIT_STORAGE_URI"])
    try:
        limiter = Limiter(
            get_remote_address,  # the client's address; behind proxies, after ProxyFix has set it
            storage_uri=storage_uri,
            headers_enabled=True,  # Retry-After and X-RateLimit-* tell clients when to come back
            swallow_errors=True,  # an unreachable shared store must not take predictions down with it
            in_memory_fallback_enabled=True,
        )
        limiter.init_app(app)
    except ConfigurationError as error:
        raise RuntimeError(
            f"CovidScan cannot start: the rate-limit storage {ENV_PREFIX}_RATE_LIMIT_STORAGE_URI "
            f"cannot be used: {error}"
        ) from error
    message = f"Too many requests: at most {rate} from one client. Please wait a moment and try again."
    for endpoint in RATE_LIMITED_ENDPOINTS:
        # flask-limiter checks a route's own limit in a wrapper around its view; this app's views get one.
        app.view_functions[endpoint] = limiter.limit(rate, error_message=message)(app.view_functions[endpoint])
    app.logger.info("Rate limit on predictions: %s per client (storage %s)", rate, storage_uri.split("://")[0])
    return limiter
