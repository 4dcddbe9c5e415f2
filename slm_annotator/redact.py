"""Secrets never reach a log line: every log record is rendered and scrubbed of the configured secret values,
and its line breaks are escaped, so no request can write a line of its own (log injection).

Defence in depth: no code logs a secret on purpose, but libraries put URLs, headers or SQL parameters into
exception messages, and a traceback is logged as it is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

from slm_annotator.settings import Settings

MASK = "***"
MIN_SECRET_CHARS = 4  # shorter values would mask ordinary words
_secrets: set[str] = set()
_lock = threading.Lock()
_installed = False


def secrets_of(settings: Settings) -> list[str]:
    """Every secret the settings hold, including passwords inside database and Redis URLs."""
    found = [settings.basic_auth_pass, settings.webhook_secret, settings.label_studio_api_key, settings.judge_api_key]
    for url in (settings.database_url, settings.redis_url):
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            found += [password, unquote(password)]
    return [s for s in found if s and len(s) >= MIN_SECRET_CHARS]


def scrub(text: str, secrets: Iterable[str] | None = None) -> str:
    for secret in sorted(secrets if secrets is not None else _secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


_LINE_BREAKS = str.maketrans({"\n": "\\n", "\r": "\\r", "\x0b": "\\x0b", "\x0c": "\\x0c", "\x85": "\\x85",
                              "\u2028": "\\u2028", "\u2029": "\\u2029"})


def one_line(text: str) -> str:
    """Line breaks escaped: a URL path, a label-config name or a Basic-auth user must not forge a log line."""
    return text.translate(_LINE_BREAKS)


def _scrub_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a malformed record is the logging module's to report
        return
    clean = one_line(scrub(message))  # tracebacks (exc_text) keep their lines: they come from our code
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = scrub(record.exc_text)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(settings: Settings, *extra_secrets: str) -> None:
    """Every command's one logging setup: LOG_LEVEL, one format, and redaction of the settings' secrets (plus
    `extra_secrets`, e.g. judge-serve's own API key)."""
    logging.basicConfig(level=settings.log_level, format=LOG_FORMAT)
    install(settings, *extra_secrets)


def install(settings: Settings, *extra_secrets: str) -> None:
    """Adds the settings' secrets to the scrubbed set; the record factory is installed once per process."""
    global _installed
    with _lock:
        _secrets.update(secrets_of(settings), (s for s in extra_secrets if s and len(s) >= MIN_SECRET_CHARS))
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _scrub_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
