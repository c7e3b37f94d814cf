"""What a newcomer reads when something is refused or fails (issue 11, item 4): fault codes
named beside their numbers, a NAK for a sender with no role that says what to configure,
an unfinished reel's refusal that names the commands, a resumed reel's length kept
explicitly, and a recipe typo answered with the recipes there are (never a path)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import CONFIG_DIR, free_port
from harness import ClosedLoop
from test_control import idle_acc, idle_cnv, ready_rig

from linectl.commands import Command, CommandName, authorize, authorize_sender, bounded
from linectl.config import LoadedConfig, MqttConfig, Recipe, load_config
from linectl.core.control import CommandRefused, LineState, ReelPlan
from linectl.core.faults import (
    ACC_FAULT_NAMES,
    CNV_FAULT_NAMES,
    fault_name,
    fault_text,
    name_fault_codes,
)
from linectl.core.line import Audit, RaiseAlarm, ReelRequest
from linectl.report import build_report, write_text
from linectl.service import LineService, select_recipe
from linectl.store import RecordStore, ReelInfo
from linectl.telemetry import alarms_active_payload

SHARED_SPEC = Path("/work/shared/spec/plc-interface.md")
DOC = Path(__file__).resolve().parents[1] / "docs" / "plc-interface.md"


@pytest.fixture
def recipe(cfg: LoadedConfig) -> Recipe:
    return cfg.load_recipe("pv-1x6-en50618")


# ---------------------------------------------------------------------- 1. fault codes


def test_the_tables_are_the_interfaces_codes() -> None:
    doc = DOC.read_text()
    acc_row = re.search(r"^\| 11 \| `fault_code` \|.*$", doc, re.M)
    cnv_row = re.search(r"^\| 7 \| `fault_code` \|.*$", doc, re.M)
    assert acc_row
    assert cnv_row
    for names, row in ((ACC_FAULT_NAMES, acc_row.group(0)), (CNV_FAULT_NAMES, cnv_row.group(0))):
        codes = {int(c) for c in re.findall(r"(\d+) [a-z]", row.split("|")[-2])}
        assert set(names) == codes
    assert fault_text("accelerator", 7) == "accelerator fault 7 (watchdog)"
    assert fault_text("conveyor", 2) == "conveyor fault 2 (cable break)"
    assert fault_text("conveyor", 5) == "conveyor fault 5 (watchdog)"
    assert fault_name("accelerator", 42) == "not in the interface specification"


def test_alarms_and_permissives_name_the_fault() -> None:
    rig = ready_rig()
    rig.step(idle_acc(fault=True, fault_code=0), idle_cnv())
    # Code 0 with FAULT set blocks READY but is no alarm while idle.
    assert rig.ctl.state is LineState.IDLE
    assert "accelerator fault 0 (none)" in rig.ctl.why_not_ready()
    rig.step(idle_acc(fault=True, fault_code=7, watchdog_trip=True), idle_cnv())
    assert rig.ctl.state is LineState.FAULT
    assert rig.ctl.alarms["accelerator_fault"].message == "accelerator fault 7 (watchdog)"
    assert "accelerator fault 7 (watchdog)" in rig.transitions[-1].cause

    rig = ready_rig()
    rig.step(idle_acc(), idle_cnv(fault=True, fault_code=3))
    assert rig.ctl.alarms["conveyor_fault"].message == "conveyor fault 3 (tension)"


def test_status_and_mqtt_alarms_name_a_plc_fault(cfg: LoadedConfig, recipe: Recipe) -> None:
    cl = ClosedLoop(cfg, recipe)
    cl.settle()
    cl.plant.conveyor.fault(1)
    assert cl.run_until(lambda: cl.ctl.state is LineState.FAULT, 5.0)
    payload = alarms_active_payload(cl.line.active_alarms(), 0)
    messages = {a["kind"]: a["message"] for a in payload["alarms"]}
    assert messages["conveyor_fault"] == "conveyor fault 1 (drive)"
    assert "conveyor fault 1 (drive)" in cl.line.status().cause
    # The records are written from the same messages.
    raised = [e for e in cl.effects if isinstance(e, RaiseAlarm) and e.kind == "conveyor_fault"]
    assert [e.message for e in raised] == ["conveyor fault 1 (drive)"]
    causes = [e.detail.get("cause", "") for e in cl.effects if isinstance(e, Audit)]
    assert any("conveyor fault 1 (drive)" in c for c in causes)


def test_old_records_get_their_codes_named_in_the_report(tmp_path: Path) -> None:
    assert name_fault_codes("accelerator fault code 7") == "accelerator fault 7 (watchdog)"
    assert (
        name_fault_codes("conveyor fault code 4; accelerator fault 2")
        == "conveyor fault 4 (emergency stop); accelerator fault 2 (high voltage)"
    )
    named = "accelerator fault 7 (watchdog)"
    assert name_fault_codes(named) == named  # already named: unchanged
    t0 = "2025-01-10T08:00:00+00:00"
    with RecordStore(tmp_path / "r.sqlite") as store:
        store.open_reel(ReelInfo("R1", "line1", "PV", "3", "cd" * 32, "{}", "al", 10.0, t0))
        store.raise_alarm("accelerator_fault", "accelerator fault code 7", t0, reel_id="R1")
        store.audit(
            t0,
            "controller",
            "transition",
            {"from": "running", "to": "fault", "cause": "conveyor fault code 2"},
            True,
            reel_id="R1",
        )
        report = build_report(store, "R1")
    assert report["alarms"][0]["message"] == "accelerator fault 7 (watchdog)"
    causes = [e["detail"].get("cause") for e in report["events"]]
    assert "conveyor fault 2 (cable break)" in causes
    out = io.StringIO()
    write_text(report, out)
    text = out.getvalue()
    assert "accelerator fault 7 (watchdog)" in text
    assert "fault code" not in text


# ---------------------------------------------------------------------- 2. no role


def test_a_sender_with_no_role_is_told_what_to_add_where(cfg: LoadedConfig) -> None:
    shipped = cfg.line.mqtt  # the shipped configuration: no identity has a role
    assert not shipped.identities
    reason = authorize("root", CommandName.START_REEL, shipped)
    assert reason == (
        "identity 'root' has no role: "
        'add "root" = "operator" under [mqtt.identities] in line.toml'
    )
    assert authorize_sender("root", shipped) == reason
    # A role that may send the command is suggested, the one for everything otherwise.
    mqtt = MqttConfig(roles={"viewer": [], "resetter": ["reset"], "all": ["*"]})
    assert '"op-1" = "resetter"' in authorize("op-1", CommandName.RESET, mqtt)
    assert '"op-1" = "all"' in authorize("op-1", CommandName.STOP, mqtt)
    assert '"op-1" = "all"' in authorize_sender("op-1", mqtt)
    # No roles at all: both steps are named.
    assert "define a role under [mqtt.roles]" in authorize("x", CommandName.STOP, MqttConfig())
    # Quoted as a TOML key, and bounded.
    assert '"a\\"b" = "operator"' in authorize_sender('a"b', shipped)
    long = "x" * 10_000
    reason = authorize_sender(long, shipped)
    assert bounded(long) in reason
    assert len(reason) < 300
    assert "under [mqtt.identities] in line.toml" in reason


# ---------------------------------------------------------------------- 3. unfinished reel


def test_an_unfinished_reel_refusal_names_the_commands() -> None:
    rig = ready_rig()
    rig.ctl.restore_reel(ReelPlan("R1", 100.0), started=True)
    with pytest.raises(CommandRefused) as refused:
        rig.ctl.request_start(ReelPlan("R2", 50.0))
    why = str(refused.value)
    assert "reel R1 is not finished" in why
    assert "start_reel" in why
    assert "end_reel" in why
    assert "linectl reel start R1 --length 100" in why
    assert "linectl reel end R1 --reason TEXT" in why


# ---------------------------------------------------------------------- 4. resumed length


def stop_and_rest(cl: ClosedLoop) -> None:
    assert cl.line.command(Command(CommandName.STOP, "op")).ack
    assert cl.run_until(
        lambda: cl.ctl.state is LineState.READY and cl.plant.conveyor.speed_m_min == 0.0, 60.0
    )


def test_resuming_with_another_length_is_refused_naming_both(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    cl = ClosedLoop(cfg, recipe)
    cl.settle()
    cl.start("R1", length_m=40.0)
    assert cl.run_until(lambda: cl.ctl.state is LineState.RUNNING, 30.0)
    stop_and_rest(cl)
    # Refused wherever the line stands: nothing changes.
    answer = cl.line.command(Command(CommandName.START_REEL, "op", reel_id="R1", length_m=80.0))
    assert not answer.ack
    assert "planned length of 40 m, not 80 m" in answer.reason
    assert "linectl reel start R1 --length 40" in answer.reason
    assert "linectl reel end R1" in answer.reason
    assert cl.ctl.state is LineState.READY
    assert cl.ctl.reel is not None
    assert cl.ctl.reel.plan.planned_length_m == 40.0
    # The --reel path: the same rule.
    cl.line.request_reel(ReelRequest("R1", 80.0, "op"))
    cl.run_for(0.2)
    assert cl.ctl.state is LineState.READY
    assert cl.line.reel_refused is not None
    assert "planned length of 40 m, not 80 m" in cl.line.reel_refused
    # The same length resumes.
    cl.start("R1", length_m=40.0)
    assert cl.run_until(lambda: cl.ctl.state is LineState.RUNNING, 30.0)
    stop_and_rest(cl)
    cl.line.request_reel(ReelRequest("R1", 40.0, "op"))
    assert cl.run_until(lambda: cl.ctl.state is LineState.RUNNING, 30.0)


# ---------------------------------------------------------------------- 5. recipe typo


def offline_config(tmp_path: Path) -> LoadedConfig:
    """A copy of the shipped configuration with a second, broken recipe; PLCs that do
    not answer; one identity with a role."""
    conf = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, conf)
    (conf / "recipes" / "broken.toml").write_text("product = [\n")
    cfg = load_config(conf, environ={})
    cfg.line = cfg.line.model_copy(
        update={
            "mqtt": cfg.line.mqtt.model_copy(update={"identities": {"op-1": "operator"}}),
            "records": cfg.line.records.model_copy(update={"path": str(tmp_path / "r.sqlite")}),
            "accelerator": cfg.line.accelerator.model_copy(update={"port": free_port()}),
            "conveyor": cfg.line.conveyor.model_copy(update={"port": free_port()}),
        }
    )
    return cfg


@contextlib.asynccontextmanager
async def running(cfg: LoadedConfig) -> AsyncIterator[LineService]:
    recipe, path = select_recipe(cfg, "pv-1x6-en50618")
    svc = LineService(cfg, recipe, path)
    cycling = asyncio.Event()
    svc.observers.append(lambda s: cycling.set() if s.stats.cycles >= 2 else None)
    task = asyncio.create_task(svc.run())
    try:
        await asyncio.wait_for(cycling.wait(), 10.0)
        yield svc
    finally:
        svc.stop()
        await asyncio.wait_for(task, 20.0)


async def test_a_recipe_typo_lists_the_recipes_and_shows_no_path(tmp_path: Path) -> None:
    cfg = offline_config(tmp_path)
    async with running(cfg) as svc:
        typo = await svc.execute(Command(CommandName.SELECT_RECIPE, "op-1", recipe="pv-1x6"))
        broken = await svc.execute(Command(CommandName.SELECT_RECIPE, "op-1", recipe="broken"))
        start = await svc.execute(
            Command(CommandName.START_REEL, "op-1", reel_id="R1", length_m=10.0, recipe="pv-1x6")
        )
    assert not typo.ack
    assert typo.reason == ("no recipe 'pv-1x6' on this line (available: broken, pv-1x6-en50618)")
    assert start.reason == typo.reason
    assert not broken.ack
    assert broken.reason.startswith("recipe 'broken' cannot be used: broken.toml: not valid TOML")
    assert "available: broken, pv-1x6-en50618" in broken.reason
    for reason in (typo.reason, broken.reason):
        assert str(tmp_path) not in reason
        assert "/" not in reason
