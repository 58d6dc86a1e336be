"""Who may use the dashboard and the API: a bearer token, local users, or (only when configured) anyone.

Scripts send ``Authorization: Bearer <token>`` (or HTTP Basic for a local user); a browser logs in once
and then carries a session cookie (HttpOnly, SameSite=Strict, so another site cannot post forms with it).
Passwords are stored only as PBKDF2-SHA256 hashes.

Sessions live in the index (table ``web_session``), so a login made through one node process works on
every other process sharing the index and survives a restart. Only the SHA-256 of the cookie's value is
stored: someone who reads the index (or a backup of it) cannot log in with what they read.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, delete, insert, select, update

from node.config import WebSection
from node.index.models import WebSession, aware, utcnow

log = logging.getLogger(__name__)

COOKIE = "dicom_node_session"
_ITERATIONS = 240_000
_s = WebSession.__table__
#: A session's sliding expiry is written at most this often: a page load is a read, not a write.
SLIDE_EVERY = dt.timedelta(minutes=1)
#: How often (seconds, per process) expired sessions that nobody came back with are deleted.
PRUNE_EVERY = 3600.0


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
    """Checks credentials and keeps the dashboard's login sessions (in the index, shared by every process)."""

    web: WebSection
    token: str
    #: The index's writing engine: sessions are written by the web request itself (a login, a logout).
    engine: Engine
    #: Looking a session up on each request is a read: on SQLite it must not take the write lock.
    reader: Engine
    _pruned_at: float = float("-inf")
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

    def _lifetime(self) -> dt.timedelta:
        return dt.timedelta(minutes=self.web.session_minutes)

    def _may_log_in(self, user: str) -> bool:
        """Whether the config still lets ``user`` in: a stored session outlives a config change and a restart."""
        if user == "token":
            return self.web.auth in ("token", "users")
        return self.web.auth == "users" and any(u.name == user for u in self.web.users)

    def new_session(self, user: str) -> str:
        """A new session for ``user``; returns the cookie's value (only its hash is stored)."""
        sid = secrets.token_urlsafe(32)
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(
                insert(_s).values(id_hash=_hash(sid), user=user, created_at=now, expires_at=now + self._lifetime())
            )
        self._prune(now)
        return sid

    def session_user(self, sid: str) -> str | None:
        """The user of a live session, or None; each use pushes its expiry on (written at most once a minute)."""
        h = _hash(sid)
        now = utcnow()
        with self.reader.connect() as conn:
            row = conn.execute(select(_s.c.user, _s.c.expires_at).where(_s.c.id_hash == h)).first()
        if row is None:
            return None
        user, expires = row.user, aware(row.expires_at)
        if expires < now:
            self._delete(h)
            return None
        if not self._may_log_in(user):
            log.info("a dashboard session of %r ended: [web] no longer lets that user in", user)
            self._delete(h)
            return None
        slid = now + self._lifetime()
        if slid - expires >= SLIDE_EVERY:
            with self.engine.begin() as conn:
                conn.execute(update(_s).where(_s.c.id_hash == h).values(expires_at=slid))
        return str(user)

    def end_session(self, sid: str) -> None:
        """Logout: the session is gone for every process at once."""
        self._delete(_hash(sid))

    def _delete(self, id_hash: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(_s).where(_s.c.id_hash == id_hash))

    def _prune(self, now: dt.datetime) -> None:
        """Now and then, delete the sessions that expired without their browser coming back."""
        with self._lock:
            if time.monotonic() - self._pruned_at < PRUNE_EVERY:
                return
            self._pruned_at = time.monotonic()
        with self.engine.begin() as conn:
            gone = conn.execute(delete(_s).where(_s.c.expires_at < now)).rowcount
        if gone:
            log.info("deleted %d expired dashboard session(s)", gone)


def _hash(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()
