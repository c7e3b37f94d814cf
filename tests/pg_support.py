"""PostgreSQL for tests: a fresh, uniquely named database per test module, dropped after.

The server is $TEST_PG_DSN (default: the development and CI server,
"host=127.0.0.1 port=5432 user=postgres dbname=postgres"; trust authentication). When no
server answers, the tests that need one are skipped with the reason, unless
CI_REQUIRE_PG=1, when they fail instead: CI must never pass by skipping them.

    from pg_support import pg_database_fixture
    pg_dsn = pg_database_fixture()          # a module-scoped fixture named pg_dsn

or, outside pytest, `with fresh_database("bench") as dsn: ...`.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

DSN_ENV = "TEST_PG_DSN"
REQUIRE_ENV = "CI_REQUIRE_PG"
DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
CONNECT_TIMEOUT_S = 5


def server_dsn() -> str:
    """The DSN of the server the tests use (its maintenance database)."""
    return os.environ.get(DSN_ENV) or DEFAULT_DSN


def required() -> bool:
    """Whether a missing server fails the tests instead of skipping them."""
    return os.environ.get(REQUIRE_ENV) == "1"


def _unavailable(reason: str) -> None:
    """Skip (or, with CI_REQUIRE_PG=1, fail) the calling test, saying why."""
    text = f"PostgreSQL not available at {server_dsn()!r} ({DSN_ENV}): {reason}"
    if required():
        pytest.fail(f"{text}; {REQUIRE_ENV}=1 requires it", pytrace=False)
    pytest.skip(text)


def database_name(label: str) -> str:
    """A database name of its own: linectl_test_<label>_<pid>_<random>, at most 63
    characters (PostgreSQL's limit), lower case."""
    clean = re.sub(r"[^a-z0-9_]", "_", label.lower())[:30]
    return f"linectl_test_{clean}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


@contextmanager
def fresh_database(label: str) -> Iterator[str]:
    """Create an empty database on the server and yield its DSN; drop it afterwards
    (connections still open to it are ended: WITH (FORCE)). Skips or fails the test
    (see the module docstring) when the server cannot be reached or psycopg is missing."""
    try:
        import psycopg
        from psycopg import sql
        from psycopg.conninfo import make_conninfo
    except ImportError as exc:
        _unavailable(f"psycopg is not installed (pip install 'linectl[historian]'): {exc}")
        raise  # not reached: _unavailable skips or fails
    base = server_dsn()
    name = database_name(label)
    try:
        admin = psycopg.connect(base, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as exc:
        _unavailable(str(exc).strip())
        raise
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(base, dbname=name)
    finally:
        with psycopg.connect(base, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def pg_database_fixture(name: str = "pg_dsn") -> Callable[..., Any]:
    """A module-scoped fixture (called `name`) giving the DSN of a fresh database for
    the test module; assign it to a module-level name of the same name."""

    @pytest.fixture(scope="module", name=name)
    def _fixture(request: pytest.FixtureRequest) -> Iterator[str]:
        with fresh_database(request.module.__name__.rsplit(".", 1)[-1]) as dsn:
            yield dsn

    return _fixture
