"""Label Studio's base URL, the address that sync's requests (with the API key) go to."""

from __future__ import annotations

from urllib.parse import urlsplit

from slm_annotator.labelstudio.annotations import clean_text


class UrlError(ValueError):
    """Not a usable Label Studio base URL; the message quotes it and says why."""


def base_url(raw: str) -> str:
    """A Label Studio base URL: http(s), a host, maybe a path prefix; no credentials, query or fragment, which
    would let the sender choose the path that sync's requests (with the API key) go to."""
    text = clean_text(raw).strip().rstrip("/")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise UrlError(f"'hostname' {raw[:80]!r} is not a URL") from None
    if len(text) > 512 or parts.scheme not in {"http", "https"} or not parts.hostname:
        raise UrlError(f"'hostname' {raw[:80]!r} must be an http(s) URL of Label Studio (at most 512 characters)")
    if parts.username or parts.password or parts.query or parts.fragment or "?" in text or "#" in text \
            or any(c in text for c in "\r\n\t "):
        raise UrlError(f"'hostname' {raw[:80]!r} must be Label Studio's base URL, without credentials, "
                       "query or fragment")
    return text
