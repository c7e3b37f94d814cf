"""Smoke run of bench/scale.py, so that it never rots (figures are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scale_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "scale.json", tmp_path / "scale.png"
    # --keep-going: a busy test machine must not make the run skip N=2.
    args = ["--smoke", "--keep-going", "--json", str(out), "--plot", str(png)]
    assert load_bench("scale").main([*args, "--workdir", str(tmp_path / "work")]) == 0
    res = json.loads(out.read_text())
    points = {(p["deployment"], p["lines"]): p for p in res["points"]}
    assert set(points) == {(d, n) for d in ("per-process", "in-process") for n in (1, 2)}
    for (dep, n), p in points.items():
        assert p["ok"], p["error"]
        # One controller process per line, or one for all of them.
        assert p["controller_processes"] == (n if dep == "per-process" else 1)
        # Every line reached RUNNING, cycled and recorded metres of its own reel.
        assert p["lines_running_at_end"] == n
        assert p["states_at_end"] == {"running": n}
        assert p["cycles"] > 0
        assert p["cycles_due"] > 0
        assert p["missed"] >= 0
        assert p["lines_with_metres"] == n
        assert p["ctl_cpu_pct"] > 0
        assert p["ctl_cpu_ms_per_cycle"] > 0
        assert p["ctl_pss_mb"] > 0
        assert p["ctl_rss_mb"] >= p["ctl_pss_mb"]
        assert p["sim_cpu_pct"] > 0
        assert p["lateness_p99_ms"] is not None
        # Every controller stopped the line safely and exited 0 on SIGTERM.
        assert len(p["exit_codes"]) == p["controller_processes"]
        assert set(p["exit_codes"].values()) == {0}
    for dep in ("per-process", "in-process"):
        assert set(res["fits"][dep]) == {"cpu_pct", "pss_mb"}
        assert res["fits"][dep]["cpu_pct"]["per_line"] == pytest.approx(
            points[dep, 2]["ctl_cpu_pct"] - points[dep, 1]["ctl_cpu_pct"], abs=0.01
        )
    assert res["skipped"] == {}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "in-process / per-process" in printed
    assert "fit a + b*N" in printed


def test_scale_bucket_quantile_and_fit() -> None:
    bench = load_bench("scale")
    inf = float("inf")

    def scr(counts: dict[float, float]) -> object:
        return bench.LineScrape(lateness_le=counts)

    before = [scr({0.001: 10, 0.01: 10, inf: 10}), scr({0.001: 0, 0.01: 0, inf: 0})]
    # Between the scrapes: 150 cycles under 1 ms, 48 more under 10 ms, 2 beyond.
    after = [scr({0.001: 110, 0.01: 150, inf: 150}), scr({0.001: 50, 0.01: 58, inf: 60})]
    assert bench.bucket_quantile(before, after, 0.5) == 0.001
    assert bench.bucket_quantile(before, after, 0.99) == 0.01
    assert bench.bucket_quantile(before, after, 1.0) == inf
    assert bench.bucket_quantile(before, before, 0.99) is None
    fit = bench.linear_fit([1.0, 5.0, 10.0], [3.0, 11.0, 21.0])
    assert fit == {"intercept": 1.0, "per_line": 2.0, "r2": 1.0}
    assert bench.linear_fit([5.0, 5.0], [1.0, 2.0]) is None
