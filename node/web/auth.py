"""Who may use the dashboard and the API: a bearer token, local users, or (only when configured) anyone.

Scripts send ``Authorization: Bearer <token>`` (or HTTP Basic for a local user); a browser logs in once
and then carries a session cookie (HttpOnly, SameSite=Strict, so another site cannot post forms with it).
Passwords are stored only as PBKDF2-SHA256 hashes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.config import WebSection

log = logging.getLogger(__name__)

COOKIE = "dicom_node_session"
_ITERATIONS = 240_000


def hash_password(password: str, iterations: int = _ITERATIONS) -> str:
    """A ``pbkdf2_sha256$iterations$salt$hash`` string for ``[[web.users]] password_hash``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        _, iterations, salt, digest = stored.split("$")
        want = base64.b64decode(digest)
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, want)


def load_token(web: WebSection, data_dir: Path) -> tuple[str, str]:
    """The API token and where it came from: the config, or ``<data_dir>/web-token`` (made on first use)."""
    if web.token:
        return web.token, "the config ([web] token)"
    path = data_dir / "web-token"
    if path.exists():
        token = path.read_text().strip()
        if len(token) >= 16:
            return token, str(path)
        log.warning("%s holds no usable token (fewer than 16 characters); writing a new one", path)
    token = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, str(path)


@dataclass
class Authenticator:
    """Checks credentials and keeps the dashboard's login sessions (in memory: a restart logs everyone out)."""

    web: WebSection
    token: str
    _sessions: dict[str, tuple[str, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def open(self) -> bool:
        return self.web.auth == "none"

    def check_token(self, token: str) -> bool:
        return bool(token) and hmac.compare_digest(token.encode(), self.token.encode())

    def check_user(self, name: str, password: str) -> bool:
        if self.web.auth != "users":
            return False
        for u in self.web.users:
            if hmac.compare_digest(u.name.encode(), name.encode()):
                return check_password(password, u.password_hash)
        # The same work for an unknown name, so timing does not tell which names exist.
        check_password(password, self.web.users[0].password_hash)
        return False

    def from_header(self, header: str) -> str | None:
        """The user an ``Authorization`` header proves, or None."""
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self.check_token(value.strip()):
            return "token"
        if scheme.lower() == "basic":
            try:
                name, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, binascii.Error, UnicodeDecodeError):
                return None
            if self.check_user(name, password):
                return name
        return None

    def new_session(self, user: str) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[sid] = (user, time.monotonic() + self.web.session_minutes * 60)
        return sid

    def session_user(self, sid: str) -> str | None:
        now = time.monotonic()
        with self._lock:
            entry = self._sessions.get(sid)
            if entry is None:
                return None
            user, expires = entry
            if expires < now:
                del self._sessions[sid]
                return None
            self._sessions[sid] = (user, now + self.web.session_minutes * 60)
            return user

    def end_session(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)
