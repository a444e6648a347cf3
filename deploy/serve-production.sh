#!/usr/bin/env bash
# CovidScan in production: nginx (TLS, request buffering, timeouts, rate limit; deploy/nginx.conf) in front of
# gunicorn (gunicorn.conf.py) on a unix socket, both in the foreground of this script. `make serve-production`
# runs it; stopping it (Ctrl-C, SIGTERM to it or to its process group) stops both and removes the run folder.
#
# Settings (environment): HTTPS_PORT (default 8443), COVIDSCAN_LISTEN_ADDRESS (default 0.0.0.0),
# COVIDSCAN_TLS_CERT + COVIDSCAN_TLS_KEY (PEM files; without them a self-signed pair is made for this run),
# COVIDSCAN_FRONT_RATE_PER_MINUTE (default 60) and COVIDSCAN_FRONT_RATE_BURST (default 10) per client address,
# COVIDSCAN_RUN_DIR (default: a new folder under /dev/shm, else under TMPDIR), NGINX (the nginx binary), and every
# COVIDSCAN_* setting of the app (COVIDSCAN_MODEL_PATH, COVIDSCAN_SECRET_KEY, ...; docs/app.md).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
VENV_BIN="${VENV_BIN:-$REPO_ROOT/.venv/bin}"
HTTPS_PORT="${HTTPS_PORT:-8443}"
LISTEN_ADDRESS="${COVIDSCAN_LISTEN_ADDRESS:-0.0.0.0}"
RATE_PER_MINUTE="${COVIDSCAN_FRONT_RATE_PER_MINUTE:-60}"
RATE_BURST="${COVIDSCAN_FRONT_RATE_BURST:-10}"
UPLOAD_LIMIT_MB="${COVIDSCAN_MAX_UPLOAD_MB:-64}"
NGINX="${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"

say() { printf 'serve-production: %s\n' "$*" >&2; }
fail() { say "error: $*"; exit 1; }

[[ -x "$NGINX" ]] || fail "nginx not found (run \`make nginx\`, or set NGINX to its path)"
[[ -x "$VENV_BIN/gunicorn" ]] || fail "no gunicorn in $VENV_BIN (run \`make serve-production\`, which installs it)"
[[ "$HTTPS_PORT" =~ ^[0-9]+$ ]] || fail "HTTPS_PORT must be a port number, not '$HTTPS_PORT'"
[[ "$RATE_PER_MINUTE" =~ ^[1-9][0-9]*$ ]] || fail "COVIDSCAN_FRONT_RATE_PER_MINUTE must be a whole number above 0"
[[ "$RATE_BURST" =~ ^[0-9]+$ ]] || fail "COVIDSCAN_FRONT_RATE_BURST must be a whole number"
[[ "$UPLOAD_LIMIT_MB" =~ ^[0-9]+$ && "$UPLOAD_LIMIT_MB" -gt 0 ]] \
    || fail "COVIDSCAN_MAX_UPLOAD_MB must be a whole number of megabytes for the front, not '$UPLOAD_LIMIT_MB'"

# The run folder: socket, pid files, nginx's temporary files, the rendered config (and a self-signed pair).
if [[ -n "${COVIDSCAN_RUN_DIR:-}" ]]; then
    RUN_DIR="$COVIDSCAN_RUN_DIR"
    mkdir -p "$RUN_DIR"
else
    parent=/dev/shm
    [[ -d "$parent" && -w "$parent" ]] || parent="${TMPDIR:-/tmp}"
    RUN_DIR="$(mktemp -d "$parent/covidscan-$HTTPS_PORT.XXXXXX")"
fi
chmod 0700 "$RUN_DIR"

GUNICORN_PID=""
NGINX_PID=""
stop_all() {
    trap - EXIT INT TERM
    [[ -n "$NGINX_PID" ]] && kill -QUIT "$NGINX_PID" 2>/dev/null || true
    [[ -n "$GUNICORN_PID" ]] && kill -TERM "$GUNICORN_PID" 2>/dev/null || true
    [[ -n "$NGINX_PID" ]] && wait "$NGINX_PID" 2>/dev/null || true
    [[ -n "$GUNICORN_PID" ]] && wait "$GUNICORN_PID" 2>/dev/null || true
    rm -rf "$RUN_DIR"
}
trap 'status=$?; stop_all; exit $status' EXIT
trap 'stop_all; exit 143' TERM
trap 'stop_all; exit 130' INT

# nginx's workers run unprivileged when started as root; they must be able to enter the run folder and the socket.
USER_DIRECTIVE=""
if [[ "$(id -u)" == 0 ]]; then
    worker_user=www-data
    id -u "$worker_user" >/dev/null 2>&1 || worker_user=nobody
    worker_group="$(id -gn "$worker_user")"
    USER_DIRECTIVE="user $worker_user $worker_group;"
    chgrp "$worker_group" "$RUN_DIR"
    chmod 0750 "$RUN_DIR"
fi

if [[ -n "${COVIDSCAN_TLS_CERT:-}" || -n "${COVIDSCAN_TLS_KEY:-}" ]]; then
    [[ -n "${COVIDSCAN_TLS_CERT:-}" && -n "${COVIDSCAN_TLS_KEY:-}" ]] \
        || fail "set both COVIDSCAN_TLS_CERT and COVIDSCAN_TLS_KEY (or neither, for a self-signed pair)"
    [[ -r "$COVIDSCAN_TLS_CERT" ]] || fail "cannot read the certificate COVIDSCAN_TLS_CERT=$COVIDSCAN_TLS_CERT"
    [[ -r "$COVIDSCAN_TLS_KEY" ]] || fail "cannot read the key COVIDSCAN_TLS_KEY=$COVIDSCAN_TLS_KEY"
    TLS_CERT="$(realpath "$COVIDSCAN_TLS_CERT")"
    TLS_KEY="$(realpath "$COVIDSCAN_TLS_KEY")"
else
    TLS_CERT="$RUN_DIR/self-signed.crt"
    TLS_KEY="$RUN_DIR/self-signed.key"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=localhost" \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$TLS_KEY" -out "$TLS_CERT" >/dev/null 2>&1 || fail "openssl could not make a self-signed certificate"
    say "WARNING: no COVIDSCAN_TLS_CERT / COVIDSCAN_TLS_KEY given: serving HTTPS with a SELF-SIGNED certificate"
    say "WARNING: made for this run only; browsers will warn and clients cannot verify the server."
    say "WARNING: give the organisation's certificate and key before anyone else connects."
fi

sed -e "s|@USER_DIRECTIVE@|$USER_DIRECTIVE|" \
    -e "s|@RUN_DIR@|$RUN_DIR|g" \
    -e "s|@HTTPS_PORT@|$HTTPS_PORT|g" \
    -e "s|@LISTEN_ADDRESS@|$LISTEN_ADDRESS|g" \
    -e "s|@TLS_CERT@|$TLS_CERT|g" \
    -e "s|@TLS_KEY@|$TLS_KEY|g" \
    -e "s|@UPLOAD_LIMIT_BYTES@|$((UPLOAD_LIMIT_MB * 1024 * 1024))|g" \
    -e "s|@UPLOAD_LIMIT_MB@|$UPLOAD_LIMIT_MB|g" \
    -e "s|@RATE_PER_MINUTE@|$RATE_PER_MINUTE|g" \
    -e "s|@RATE_BURST@|$RATE_BURST|g" \
    deploy/nginx.conf > "$RUN_DIR/nginx.conf"
"$NGINX" -t -q -e stderr -p "$RUN_DIR/" -c "$RUN_DIR/nginx.conf" || fail "nginx refused its configuration (above)"

# The app sits behind exactly one proxy (this nginx), which sets X-Forwarded-For/-Proto; nginx limits the rate
# across workers, so the app's per-process limit is off unless set explicitly.
export COVIDSCAN_TRUSTED_PROXIES="${COVIDSCAN_TRUSTED_PROXIES:-1}"
export COVIDSCAN_RATE_LIMIT="${COVIDSCAN_RATE_LIMIT:-off}"
export COVIDSCAN_MAX_UPLOAD_MB="$UPLOAD_LIMIT_MB"
export COVIDSCAN_CONTROL_SOCKET="$RUN_DIR/gunicorn.ctl"

say "starting gunicorn on unix:$RUN_DIR/gunicorn.sock (loading the model)"
# umask 007: the socket is for this user and the nginx workers' group only.
(umask 007 && exec "$VENV_BIN/gunicorn" -c gunicorn.conf.py wsgi:app --bind "unix:$RUN_DIR/gunicorn.sock" \
    --pid "$RUN_DIR/gunicorn.pid" --umask 007) &
GUNICORN_PID=$!
until [[ -S "$RUN_DIR/gunicorn.sock" ]]; do
    if ! kill -0 "$GUNICORN_PID" 2>/dev/null; then
        wait "$GUNICORN_PID" && status=0 || status=$?
        GUNICORN_PID=""
        fail "gunicorn stopped before it served (exit status $status; its reason is above)"
    fi
    sleep 0.2
done
if [[ -n "$USER_DIRECTIVE" ]]; then
    chgrp "$worker_group" "$RUN_DIR/gunicorn.sock"
fi

"$NGINX" -e stderr -p "$RUN_DIR/" -c "$RUN_DIR/nginx.conf" &
NGINX_PID=$!
say "serving https://$LISTEN_ADDRESS:$HTTPS_PORT/ (nginx $NGINX_PID, gunicorn $GUNICORN_PID, run folder $RUN_DIR)"

# Whichever stops first takes the other down with it.
wait -n "$GUNICORN_PID" "$NGINX_PID" && status=0 || status=$?
say "a server stopped (exit status $status); stopping the other"
exit "$status"
