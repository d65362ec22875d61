"""The operator token: who may train, deploy, roll back, retire and scale through the page.

Recognising is open to whoever reaches the page; every action that changes what is served needs
the token. It is made once, kept in the page's runtime directory (readable by its owner only) and
printed at start. The page sends it as ``X-Operator-Token: TOKEN`` (``Authorization: Bearer TOKEN``
works too, for scripts). It is never a cookie, so another site cannot make a browser send it (no
cross-site request forgery to defend against).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

TOKEN_FILE_NAME = "operator_token"
TOKEN_HEADER = "X-Operator-Token"


def load_or_create_token(runtime_dir: Path) -> tuple[str, Path]:
    """(token, file): the token kept in ``runtime_dir``, made on first use (mode 0600)."""
    runtime_dir.mkdir(parents=True, exist_ok=True)
    path = runtime_dir / TOKEN_FILE_NAME
    try:
        token = path.read_text().strip()
        if len(token) >= 16:
            return token, path
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, path


def presented_token(headers) -> str | None:
    """The token a request carries, or None."""
    token = headers.get(TOKEN_HEADER)
    if token:
        return token.strip()
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def check_token(headers, expected: str) -> int | None:
    """None when the request carries the operator token; else the HTTP status to refuse it with
    (401: no token, 403: a wrong one). Compared in constant time."""
    presented = presented_token(headers)
    if presented is None:
        return 401
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        return 403
    return None
