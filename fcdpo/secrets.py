"""Keep secrets out of what fcdpo writes: MLflow params, reprs, logs and error messages.

A secret is the user:password part of a URL (``http://user:token@host/v1``), a URL query parameter or
a config option whose name looks like one (``api_key``, ``token``, ``secret``, ``password``, ...). Names
ending in ``_env`` hold the *name* of an environment variable, not its value, and are kept.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
SECRET_WORDS = {
    "key", "apikey", "token", "secret", "password", "passwd", "pwd", "auth", "authorization",
    "credential", "credentials", "cookie", "bearer", "signature",
}  # fmt: skip


def secret_name(name: str) -> bool:
    """``api_key``, ``access-token``, ``clientSecret`` are secret names; ``max_tokens``, ``api_key_env``
    are not (words are compared whole; ``_env`` names an environment variable)."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower().replace("-", "_").split("_")
    return words[-1] != "env" and any(w in SECRET_WORDS for w in words)


def split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """(the URL without ``user:password@``, (user, password) or None)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc)), (parts.username or "", parts.password or "")


def redact_url(url: str) -> str:
    """The URL with its user:password and secret-looking query values masked."""
    try:
        parts = urlsplit(url)
        if not parts.scheme or not parts.netloc:
            return url
        bare, auth = split_userinfo(url)
        parts = urlsplit(bare)
        if auth is not None:
            parts = parts._replace(netloc=f"{MASK}@{parts.netloc}")
        if parts.query:
            q = [
                (k, MASK if secret_name(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
            ]
            parts = parts._replace(query=urlencode(q, safe="*"))
        return urlunsplit(parts)
    except ValueError:  # not a URL after all
        return url


def redact(obj: Any) -> Any:
    """A copy of a JSON-like value with secret-named keys masked and URLs redacted."""
    if isinstance(obj, dict):
        return {
            k: (MASK if secret_name(str(k)) and obj[k] not in (None, "") else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, str) and "://" in obj:
        return redact_url(obj)
    return obj
