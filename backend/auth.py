"""Who may call what: the auth posture, checked at start, and credential checks that never raise.

The model: on loopback with no WEBHOOK_SECRET nothing is authenticated (`make run` on a laptop). Once the backend
is exposed (WEBHOOK_SECRET set, or bound to a non-loopback address) BASIC_AUTH_USER/BASIC_AUTH_PASS are required,
or it refuses to start: a secret on /webhook alone left /setup, /predict and /report open to anyone (issue 17).
Label Studio's event webhooks carry the secret header and never Basic auth; its ML API calls (/setup, /predict,
START_TRAINING) carry Basic auth and never the secret. Credentials are compared as bytes, so non-ASCII passwords
work and a client's non-ASCII credentials are a 401, not a 500.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress

from slm_annotator.settings import Settings

SECRET_HEADER = "X-Webhook-Secret"
OPEN_PATHS = frozenset({"/health", "/"})  # Label Studio's liveness check; answers nothing sensitive unauthenticated


class AuthConfigError(ValueError):
    """The backend would be exposed without credentials; the message names the settings that fix it."""


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host in {"localhost", "localhost.localdomain"}:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, 0.0.0.0, "" (all interfaces): exposed


def exposed(settings: Settings) -> bool:
    return bool(settings.webhook_secret) or not is_loopback(settings.bind_host)


def basic_auth_on(settings: Settings) -> bool:
    return bool(settings.basic_auth_user or settings.basic_auth_pass)


def check_posture(settings: Settings) -> None:
    """Raises AuthConfigError when the settings would serve project state unauthenticated to others."""
    if basic_auth_on(settings) and not (settings.basic_auth_user and settings.basic_auth_pass):
        raise AuthConfigError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS (only one of them is set)")
    if exposed(settings) and not basic_auth_on(settings):
        why = "WEBHOOK_SECRET is set" if settings.webhook_secret else f"it binds {settings.bind_host!r} (not loopback)"
        raise AuthConfigError(
            f"refusing to start: {why}, so the backend is reachable by others, but BASIC_AUTH_USER and "
            "BASIC_AUTH_PASS are not set; anyone could then re-point projects, train and read reports. Set both "
            "(and the same user/password on the model in Label Studio: Connect Model -> Use basic auth)"
        )


def _as_bytes(header_value: str) -> bytes:
    """The header's raw bytes: WSGI servers hand headers over as latin-1 decoded text."""
    try:
        return header_value.encode("latin-1")
    except UnicodeEncodeError:
        return header_value.encode("utf-8", "surrogateescape")


def basic_ok(header: str, settings: Settings) -> bool:
    """True for `Basic base64(user:pass)` matching the settings; any malformed header is simply False."""
    if not basic_auth_on(settings) or not header.startswith("Basic "):
        return False
    try:
        raw = base64.b64decode(_as_bytes(header[6:].strip()), validate=False)
    except (binascii.Error, ValueError):
        return False
    user, sep, password = raw.partition(b":")
    user_ok = hmac.compare_digest(user, settings.basic_auth_user.encode("utf-8"))
    pass_ok = hmac.compare_digest(password, settings.basic_auth_pass.encode("utf-8"))
    return bool(sep) and user_ok and pass_ok


def secret_ok(header: str, settings: Settings) -> bool:
    """The secret's UTF-8 bytes on the wire (what curl and Label Studio send), or its characters in latin-1."""
    if not settings.webhook_secret:
        return False
    want = settings.webhook_secret.encode("utf-8")
    wire = hmac.compare_digest(_as_bytes(header), want)
    return hmac.compare_digest(header.encode("utf-8", "surrogateescape"), want) or wire
