"""Who may use the app: trusted reverse proxies, API tokens, the proxy's user header and per-client rate limits."""

import hashlib
import hmac
import logging

from flask import current_app, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits.errors import ConfigurationError
from werkzeug.exceptions import Forbidden, Unauthorized
from werkzeug.middleware.proxy_fix import ProxyFix

from app.config import ENV_PREFIX

logger = logging.getLogger(__name__)

# Paths that stay open whatever is configured: the load balancer's health check and the stylesheet.
OPEN_ENDPOINTS = ("api.healthz", "static")
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


def init_access_control(app):
    """API tokens for ``/api/``, the proxy's user header for the pages; a warning when either is left open."""
    app.before_request(require_credentials)
    open_parts = []
    if not app.config["API_TOKEN_HASHES"]:
        open_parts.append(f"the JSON API (no {ENV_PREFIX}_API_TOKEN_HASHES)")
    if not app.config["PROXY_USER_HEADER"]:
        open_parts.append(f"the upload pages (no {ENV_PREFIX}_PROXY_USER_HEADER)")
    if open_parts:
        logger.warning(
            "CovidScan is open to anyone who can reach it: %s. Configure access control before exposing it "
            "beyond a trusted network (see docs/security.md).",
            " and ".join(open_parts),
        )


def require_credentials():
    """Refuse a request that lacks the credentials its part of the app requires (before any other work)."""
    if request.endpoint in OPEN_ENDPOINTS:
        return
    if request.path.startswith("/api/"):
        hashes = current_app.config["API_TOKEN_HASHES"]
        if hashes:
            check_api_token(hashes)
        return
    header = current_app.config["PROXY_USER_HEADER"]
    if header and not request.headers.get(header, "").strip():
        raise Forbidden(PROXY_USER_MISSING_MESSAGE)


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
    digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
    matched = False
    for expected in hashes:
        matched |= hmac.compare_digest(digest, expected)
    return matched


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
