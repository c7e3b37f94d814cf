"""Password hashes, sessions, CSRF and the login limit of the HMI (pure, fast)."""

from __future__ import annotations

import pytest
from conftest import CONFIG_DIR

from linectl.config import HttpConfig, HttpUser, LineConfig, load_config
from linectl.web.auth import (
    LoginLimiter,
    Sessions,
    csrf_ok,
    hash_password,
    verify_password,
)

FAST_N = 2**14


def test_a_hash_verifies_its_password_and_nothing_else() -> None:
    encoded = hash_password("night-shift-42", n=FAST_N)
    assert encoded.startswith("scrypt$16384$8$1$")
    assert "night-shift-42" not in encoded
    assert verify_password("night-shift-42", encoded)
    assert not verify_password("night-shift-43", encoded)
    assert not verify_password("", encoded)
    # Salted: the same password never hashes the same twice.
    assert hash_password("night-shift-42", n=FAST_N) != encoded


def test_an_unknown_user_is_refused_after_the_same_work() -> None:
    assert not verify_password("anything", None)
    assert not verify_password("anything", "scrypt$16384$8$1$bad$bad")


def test_config_takes_only_scrypt_hashes_and_known_roles() -> None:
    good = hash_password("night-shift-42", n=FAST_N)
    assert HttpUser(password_hash=good, role="operator").role == "operator"
    with pytest.raises(ValueError, match="never the password itself"):
        HttpUser(password_hash="night-shift-42", role="operator")
    with pytest.raises(ValueError, match="power of two >= 16384"):
        HttpUser(password_hash=good.replace("$16384$", "$1024$", 1), role="operator")
    with pytest.raises(ValueError, match="set both or neither"):
        HttpConfig(tls_cert_file="cert.pem")
    # A user's role must be one of [mqtt.roles] (the one table of roles).
    cfg = load_config(CONFIG_DIR, environ={})
    data = cfg.line.model_dump()
    data["http"] = {"users": {"alice": {"password_hash": good, "role": "supervisor"}}}
    with pytest.raises(ValueError, match=r"role 'supervisor' is not defined in \[mqtt\.roles\]"):
        LineConfig.model_validate(data)
    # The printed configuration never shows a hash.
    assert good not in repr(HttpUser(password_hash=good, role="operator"))


def test_the_shipped_line_toml_loads_with_its_http_section() -> None:
    cfg = load_config(CONFIG_DIR, environ={})
    assert cfg.line.http.host == "127.0.0.1"


def test_sessions_expire_and_close() -> None:
    sessions = Sessions(ttl_s=100.0, max_sessions=3)
    a = sessions.open("op", "operator", now_s=0.0)
    assert sessions.get(a.token, 50.0) == a
    assert sessions.get(a.token, 100.0) is None  # expired, and forgotten
    assert sessions.get(a.token, 0.0) is None
    b = sessions.open("op", "operator", 0.0)
    assert b.token != a.token
    assert b.csrf != b.token
    sessions.close(b.token)
    assert sessions.get(b.token, 1.0) is None
    assert sessions.get(None, 1.0) is None
    assert sessions.get("", 1.0) is None


def test_sessions_are_bounded_oldest_first() -> None:
    sessions = Sessions(ttl_s=100.0, max_sessions=2)
    first = sessions.open("a", "viewer", 0.0)
    sessions.open("b", "viewer", 0.0)
    sessions.open("c", "viewer", 0.0)
    assert len(sessions) == 2
    assert sessions.get(first.token, 1.0) is None
    assert sessions.close_user("b") == 1


def test_csrf_token_must_match_exactly() -> None:
    s = Sessions(ttl_s=10.0).open("op", "operator", 0.0)
    assert csrf_ok(s, s.csrf)
    assert not csrf_ok(s, None)
    assert not csrf_ok(s, "")
    assert not csrf_ok(s, s.csrf[:-1])
    assert not csrf_ok(s, s.token)


def test_login_limit_per_address_and_per_user() -> None:
    limit = LoginLimiter(max_failures=3, window_s=60.0)
    keys = ("addr:10.0.0.5", "user:op")
    for t in (0.0, 1.0, 2.0):
        assert limit.retry_after_s(keys, t) == 0.0
        limit.failed(keys, t)
    assert limit.retry_after_s(keys, 3.0) == pytest.approx(57.0)
    # Another address, same user: the user's key is locked too.
    assert limit.retry_after_s(("addr:10.0.0.6", "user:op"), 3.0) == pytest.approx(57.0)
    # Another user from the locked address: the address is locked.
    assert limit.retry_after_s(("addr:10.0.0.5", "user:view"), 3.0) > 0
    # Once the oldest failure leaves the window, one more try is allowed.
    assert limit.retry_after_s(keys, 60.0) == 0.0
    limit.failed(keys, 60.0)
    assert limit.retry_after_s(keys, 60.5) > 0


def test_a_good_login_clears_the_users_failures_not_the_addresses() -> None:
    limit = LoginLimiter(max_failures=2, window_s=60.0)
    limit.failed(("addr:a", "user:op"), 0.0)
    limit.succeeded("user:op")
    limit.failed(("addr:a", "user:op"), 1.0)
    assert limit.retry_after_s(("addr:b", "user:op"), 2.0) == 0.0
    assert limit.retry_after_s(("addr:a", "user:x"), 2.0) > 0


def test_login_limit_keys_are_bounded() -> None:
    limit = LoginLimiter(max_failures=1, window_s=60.0, max_keys=10)
    for i in range(100):
        limit.failed((f"user:u{i}",), 0.0)
    assert limit.retry_after_s(("user:u0",), 1.0) == 0.0  # evicted
    assert limit.retry_after_s(("user:u99",), 1.0) > 0
