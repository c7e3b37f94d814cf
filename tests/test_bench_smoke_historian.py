"""Smoke run of bench/historian_lag.py, so that it never rots: two lines (record stores
and their MQTT bridges, in a child process), the historian, mosquitto and PostgreSQL.
What is asserted is behaviour (every record of every line held, the lag measured and
printed), never a timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from broker import mosquitto_binary
from conftest import load_bench


@pytest.mark.slow
def test_historian_lag_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if mosquitto_binary() is None:
        pytest.skip("the historian's bench needs mosquitto")
    out = tmp_path / "lag.json"
    assert load_bench("historian_lag").main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["lines"] == 2
    assert res["complete"] == {"line-01": True, "line-02": True}
    assert res["lag_ms"]["n"] > 0
    assert res["lag_ms"]["p50"] > 0  # a commit never precedes the record it holds
    assert res["metres_held"] > 0
    printed = capsys.readouterr().out
    assert "lag p50" in printed
    assert "every record held: True" in printed
