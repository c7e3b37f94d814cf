"""historian.toml: which lines, which broker, which database (docs/historian.md).

Validated as strictly as line.toml: an unknown key, a bad line id or a missing database
name is refused with the file and the key named, and nothing starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError

from linectl.config import HISTORIAN_ID_RE, LINE_ID_RE, MqttTls, _Strict, read_toml
from linectl.config import _format_validation as format_validation_error
from linectl.errors import ConfigError

_ID = HISTORIAN_ID_RE.pattern
"""A historian id: the rule a line's `[records] historians` follows."""
_LINE_ID = LINE_ID_RE.pattern
"""A line id: the rule line.toml's `line_id` follows."""


class HistorianSection(_Strict):
    """Who this historian is and which lines it keeps."""

    id: Annotated[str, Field(pattern=_ID)] = "plant"
    """The historian's id: its MQTT client id is `linectl-historian-<id>` (fixed, so its
    persistent session survives its restarts), and lines name it in `[records]
    historians` to keep their records until it confirmed them."""
    lines: Annotated[list[Annotated[str, Field(pattern=_LINE_ID)]], Field(min_length=1)]
    """The line ids to keep (each line's `line_id`)."""
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_/-]{1,64}$")] = "linectl"
    """The lines' `[mqtt] topic_prefix`."""
    batch_max: Annotated[int, Field(ge=1, le=100_000)] = 5000
    """The most records written to PostgreSQL in one transaction."""
    batch_wait_s: Annotated[float, Field(gt=0, le=5)] = 0.05
    """How long a batch waits for more records before it is written."""
    confirm_every_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    """How often a line is told (retained) what the historian has committed."""


class HistorianMqtt(_Strict):
    """The plant broker (the one the lines publish to)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    """Prefer HISTORIAN_MQTT_PASSWORD in the environment."""
    tls: MqttTls | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 15
    reconnect_max_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    session_expiry_s: Annotated[int, Field(ge=60, le=2_592_000)] = 604_800
    """MQTT 5: how long the broker keeps the historian's session (its subscriptions and
    queued records) while it is away: a week by default."""
    max_inflight: Annotated[int, Field(ge=1, le=1000)] = 100
    """QoS 1 messages in flight at once (replay requests and confirmations)."""


class PostgresSection(_Strict):
    """The historian's database."""

    dsn: str = ""
    """A libpq connection string (`host=db1 dbname=linectl user=historian`) or URI; what
    it leaves out comes from libpq's environment (PGHOST, PGDATABASE, PGUSER, ...). A
    password belongs in ~/.pgpass or PGPASSWORD, not here."""


class HistorianConfig(_Strict):
    """historian.toml."""

    historian: HistorianSection
    mqtt: HistorianMqtt = HistorianMqtt()
    postgres: PostgresSection = PostgresSection()


def load_historian_config(
    path: Path | str, environ: Mapping[str, str] | None = None
) -> HistorianConfig:
    """Read and validate historian.toml; ConfigError naming the file and key on any fault.
    HISTORIAN_MQTT_PASSWORD in the environment gives the broker password. (Not a LINECTL_
    name: those are line.toml overrides, and a line's `linectl run` would refuse it.)"""
    path = Path(path)
    env = os.environ if environ is None else environ
    if not path.is_file():
        raise ConfigError(f"{path}: no such historian configuration file")
    data = read_toml(path)
    if "HISTORIAN_MQTT_PASSWORD" in env:
        data.setdefault("mqtt", {})["password"] = env["HISTORIAN_MQTT_PASSWORD"]
    try:
        cfg = HistorianConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None
    if len(set(cfg.historian.lines)) != len(cfg.historian.lines):
        raise ConfigError(f"{path}: [historian] lines names a line twice")
    return cfg
