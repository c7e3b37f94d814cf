"""Who may use the HMI: scrypt password hashes, sessions, CSRF tokens, the login limit.

Passwords are never stored: line.toml holds `scrypt$N$r$p$salt$key` (written by
`linectl http hash-password`). A session is a random token in an HttpOnly,
SameSite=Strict cookie; every command also carries the session's CSRF token in a header,
which a page of another origin cannot read. Times are arguments (monotonic seconds), so
the rules are tested without waiting.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from linectl.config import PASSWORD_HASH_RE

SCRYPT_N = 2**15
"""scrypt's cost for new hashes: about 50 ms and 32 MiB on a line computer, paid once
per login (and per failed one: the rate limit bounds those)."""
SCRYPT_R = 8
SCRYPT_P = 1
_MAXMEM = 256 * 1024 * 1024  # hashlib's default (32 MiB) refuses N=2**15 with r=8

MAX_SESSIONS = 1000
"""Sessions held at once; the oldest goes first (a login loop cannot fill memory)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """`scrypt$N$r$p$salt$key` for `password`, with a fresh random salt."""
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


# Checked against when the user name is unknown, so a wrong name costs as much time as
# a wrong password and the answer's timing does not tell which names exist.
_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "="


def verify_password(password: str, encoded: str | None) -> bool:
    """Whether `password` matches the hash `encoded` (None: no such user; the work is
    done all the same)."""
    m = PASSWORD_HASH_RE.fullmatch(encoded or _DUMMY_HASH)
    if m is None:
        return False
    try:
        salt = base64.b64decode(m["salt"], validate=True)
        want = base64.b64decode(m["hash"], validate=True)
        got = hashlib.scrypt(
            password.encode("utf-8", "surrogatepass"),
            salt=salt,
            n=int(m["n"]),
            r=int(m["r"]),
            p=int(m["p"]),
            maxmem=_MAXMEM,
            dklen=len(want) or 32,
        )
    except (ValueError, MemoryError):
        return False
    return encoded is not None and hmac.compare_digest(got, want)


@dataclass(frozen=True, slots=True)
class Session:
    """One logged-in user."""

    token: str
    user: str
    role: str
    csrf: str
    expires_s: float
    """Monotonic time it ends."""


class Sessions:
    """The sessions held now, by token (memory only: a restart of linectl logs every
    user out, which is what an operator expects of a restarted controller)."""

    def __init__(self, ttl_s: float, *, max_sessions: int = MAX_SESSIONS) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._by_token: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_token)

    def open(self, user: str, role: str, now_s: float) -> Session:
        """A new session for `user` (the token and the CSRF token are random)."""
        while len(self._by_token) >= self.max_sessions:
            self._by_token.popitem(last=False)
        session = Session(
            secrets.token_urlsafe(32), user, role, secrets.token_urlsafe(32), now_s + self.ttl_s
        )
        self._by_token[session.token] = session
        return session

    def get(self, token: str | None, now_s: float) -> Session | None:
        """The session of `token`, if it is open and has not expired."""
        if not token:
            return None
        session = self._by_token.get(token)
        if session is None:
            return None
        if now_s >= session.expires_s:
            del self._by_token[token]
            return None
        return session

    def close(self, token: str) -> None:
        """Log out."""
        self._by_token.pop(token, None)

    def close_user(self, user: str) -> int:
        """Close every session of `user` (its account was removed or changed)."""
        gone = [t for t, s in self._by_token.items() if s.user == user]
        for t in gone:
            del self._by_token[t]
        return len(gone)


def csrf_ok(session: Session, header: str | None) -> bool:
    """Whether a request's X-CSRF-Token header matches its session's token."""
    return header is not None and hmac.compare_digest(session.csrf, header)


@dataclass
class LoginLimiter:
    """At most `max_failures` failed logins per key (the peer address, and the user name
    tried) within `window_s`; after that the key is refused until its oldest failure
    leaves the window. Keys are bounded in number (the least recently failed go first)."""

    max_failures: int
    window_s: float
    max_keys: int = 10000
    _fails: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    def retry_after_s(self, keys: tuple[str, ...], now_s: float) -> float:
        """0 when a login may be tried for these keys now, else how long to wait."""
        wait = 0.0
        for key in keys:
            fails = self._fails.get(key)
            if fails is None:
                continue
            while fails and fails[0] <= now_s - self.window_s:
                fails.popleft()
            if len(fails) >= self.max_failures:
                wait = max(wait, fails[0] + self.window_s - now_s)
        return wait

    def failed(self, keys: tuple[str, ...], now_s: float) -> None:
        """Count a failed login against each key."""
        for key in keys:
            fails = self._fails.pop(key, None) or deque(maxlen=self.max_failures)
            fails.append(now_s)
            self._fails[key] = fails
        while len(self._fails) > self.max_keys:
            self._fails.popitem(last=False)

    def succeeded(self, user_key: str) -> None:
        """A good login clears the user name's failures (not the address's)."""
        self._fails.pop(user_key, None)
