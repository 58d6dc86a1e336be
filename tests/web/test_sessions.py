"""Dashboard sessions live in the index: two node processes (two Authenticators on one database) share them.

A login made through one process must work on the other, a logout through either ends it for both, and
a restart (new engines, new Authenticator) keeps it. Run on SQLite (one host) and PostgreSQL (a cluster).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, select, update

from node.config import WebSection, WebUserSection
from node.index.db import make_engine, migrate
from node.index.models import WebSession, aware, utcnow
from node.web.auth import Authenticator, hash_password

_s = WebSession.__table__
TOKEN = "t" * 32


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        u = f"sqlite:///{tmp_path / 'index.sqlite'}"
    else:
        u = request.getfixturevalue("postgres_url")
    engine = make_engine(u)
    migrate(engine)
    engine.dispose()
    return u


class Process:
    """What one node process has: its own engines and its own Authenticator."""

    def __init__(self, url: str, web: WebSection) -> None:
        self.engine = make_engine(url)
        self.reader = make_engine(url, write=False)
        self.auth = Authenticator(web, TOKEN, self.engine, self.reader)

    def close(self) -> None:
        self.engine.dispose()
        self.reader.dispose()


@pytest.fixture
def web() -> WebSection:
    return WebSection(auth="users", users=[WebUserSection(name="ana", password_hash=hash_password("pw", 1000))])


@pytest.fixture
def two(url: str, web: WebSection) -> Iterator[tuple[Process, Process]]:
    a, b = Process(url, web), Process(url, web)
    yield a, b
    a.close()
    b.close()


def _rows(engine: Engine) -> dict[str, dt.datetime]:
    with engine.connect() as c:
        return {r.id_hash: aware(r.expires_at) for r in c.execute(select(_s.c.id_hash, _s.c.expires_at))}


def test_a_login_on_one_process_works_on_the_other_and_a_logout_on_either_ends_it(two):
    a, b = two
    sid = a.auth.new_session("ana")
    assert b.auth.session_user(sid) == "ana"
    assert a.auth.session_user(sid) == "ana"
    # Only the hash of the cookie's value is in the index.
    assert list(_rows(a.engine)) == [hashlib.sha256(sid.encode()).hexdigest()]
    assert b.auth.session_user(sid + "x") is None
    b.auth.end_session(sid)
    assert a.auth.session_user(sid) is None
    assert _rows(a.engine) == {}


def test_a_session_survives_a_restart(url, web):
    first = Process(url, web)
    sid = first.auth.new_session("token")
    first.close()
    again = Process(url, web)
    try:
        assert again.auth.session_user(sid) == "token"
    finally:
        again.close()


def test_expiry_slides_at_most_once_a_minute_and_an_expired_session_is_refused_and_deleted(two, web):
    a, b = two
    sid = a.auth.new_session("ana")
    (h,) = _rows(a.engine)
    lifetime = dt.timedelta(minutes=web.session_minutes)

    def set_expiry(value: dt.datetime) -> None:
        with a.engine.begin() as c:
            c.execute(update(_s).where(_s.c.id_hash == h).values(expires_at=value))

    # Used 30 s after the last write: not written again (a page load is a read).
    recent = utcnow() + lifetime - dt.timedelta(seconds=30)
    set_expiry(recent)
    assert b.auth.session_user(sid) == "ana"
    assert _rows(a.engine)[h] == recent
    # Used 5 minutes after the last write: the expiry moves on to a whole lifetime from now.
    set_expiry(utcnow() + lifetime - dt.timedelta(minutes=5))
    before = utcnow()
    assert b.auth.session_user(sid) == "ana"
    assert _rows(a.engine)[h] >= before + lifetime
    # Unused for longer than the lifetime: refused on every process, and the row is gone.
    set_expiry(utcnow() - dt.timedelta(seconds=1))
    assert a.auth.session_user(sid) is None
    assert b.auth.session_user(sid) is None
    assert _rows(a.engine) == {}


def test_a_session_ends_when_the_config_no_longer_lets_its_user_in(url, web):
    first = Process(url, web)
    sid = first.auth.new_session("ana")
    first.close()
    # Restarted with ana removed from [[web.users]] (and only the token allowed).
    later = Process(url, WebSection(auth="token"))
    try:
        assert later.auth.session_user(sid) is None
        assert _rows(later.engine) == {}
    finally:
        later.close()


def test_expired_sessions_nobody_came_back_with_are_pruned_at_a_login(two):
    a, _ = two
    now = utcnow()
    with a.engine.begin() as c:
        c.execute(
            insert(_s),
            [
                {"id_hash": "0" * 64, "user": "ana", "created_at": now, "expires_at": now - dt.timedelta(days=2)},
                {"id_hash": "1" * 64, "user": "ana", "created_at": now, "expires_at": now + dt.timedelta(hours=1)},
            ],
        )
    sid = a.auth.new_session("ana")
    assert set(_rows(a.engine)) == {"1" * 64, hashlib.sha256(sid.encode()).hexdigest()}
