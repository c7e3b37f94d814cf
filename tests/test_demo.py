"""`linectl demo` end to end on a compact line: simulators, embedded broker, controller,
MQTT bridge, metrics endpoint, the report and its plot."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_scenarios import compact_config

from linectl.cli import build_parser
from linectl.demo import _demo

pytestmark = pytest.mark.slow


async def test_demo_runs_a_reel_with_telemetry_and_report(tmp_path: Path) -> None:
    cfg_dir = compact_config(tmp_path)
    out_dir = tmp_path / "demo-out"
    argv = ["demo", "--config", str(cfg_dir), "--length", "4", "--arc-rate", "0"]
    args = build_parser().parse_args([*argv, "--out", str(out_dir)])
    out = io.StringIO()
    assert await _demo(args, out) == 0, out.getvalue()[-3000:]
    text = out.getvalue()
    assert "embedded MQTT broker" in text
    assert "Prometheus metrics at http://127.0.0.1:" in text
    assert "metres   4 recorded, 4 in spec, 0 out of spec" in text
    assert "false accepts 0" in text
    # A plain subscriber saw every metre record, and the bridge's online -> offline.
    assert "; 4 metre records; status online -> offline" in text
    assert list(out_dir.glob("DEMO-*.png"))
    assert (out_dir / "truth.json").exists()


def test_an_interrupted_demo_stops_safely_and_exits_130(tmp_path: Path) -> None:
    cfg_dir = compact_config(tmp_path)
    out_dir = tmp_path / "demo-out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINECTL_")}
    cmd = [sys.executable, "-m", "linectl", "demo", "--config", str(cfg_dir), "--length",
           "500", "--no-mqtt", "--out", str(out_dir), "--metrics-port", "0"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:  # the live view, one line per 5 s off a terminal
            lines.append(line)
            if line.startswith("running"):
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines) + rest
    assert proc.returncode == 130, text[-2000:]
    assert "the reel did not finish (stopped early); its records are kept" in text
    assert "recorded," in text  # the partial reel's report
