"""The PLCs' fault codes by name (docs/plc-interface.md, "Status bits and fault codes").

One table per PLC, defined here once; every message that shows a fault code (alarms,
the READY permissives, logs, status and MQTT payloads, the reel report) names it with
`fault_text`, keeping the number: "accelerator fault 7 (watchdog)".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal

Plc = Literal["accelerator", "conveyor"]

ACC_FAULT_NAMES: Final[Mapping[int, str]] = MappingProxyType(
    {
        0: "none",
        1: "beam trip (arc)",
        2: "high voltage",
        3: "vacuum",
        4: "scan failure",
        5: "cooling",
        6: "safety chain open",
        7: "watchdog",
    }
)
"""The accelerator PLC's `fault_code` values."""

CNV_FAULT_NAMES: Final[Mapping[int, str]] = MappingProxyType(
    {
        0: "none",
        1: "drive",
        2: "cable break",
        3: "tension",
        4: "emergency stop",
        5: "watchdog",
    }
)
"""The conveyor PLC's `fault_code` values."""

FAULT_NAMES: Final[Mapping[Plc, Mapping[int, str]]] = MappingProxyType(
    {"accelerator": ACC_FAULT_NAMES, "conveyor": CNV_FAULT_NAMES}
)

UNKNOWN_FAULT = "not in the interface specification"


def fault_name(plc: Plc, code: int) -> str:
    """The name of `plc`'s fault `code` (UNKNOWN_FAULT for a code the interface lacks)."""
    return FAULT_NAMES[plc].get(code, UNKNOWN_FAULT)


def fault_text(plc: Plc, code: int) -> str:
    """'accelerator fault 7 (watchdog)': the PLC, the number and its name."""
    return f"{plc} fault {code} ({fault_name(plc, code)})"


_BARE_CODE_RE = re.compile(r"\b(accelerator|conveyor) fault(?: code)? (\d{1,5})\b(?! \()")


def name_fault_codes(message: str) -> str:
    """`message` with every bare fault code named ("accelerator fault code 7" ->
    "accelerator fault 7 (watchdog)"): for messages recorded before codes were named."""

    def sub(m: re.Match[str]) -> str:
        plc: Plc = "accelerator" if m.group(1) == "accelerator" else "conveyor"
        return fault_text(plc, int(m.group(2)))

    return _BARE_CODE_RE.sub(sub, message)


__all__ = [
    "ACC_FAULT_NAMES",
    "CNV_FAULT_NAMES",
    "FAULT_NAMES",
    "UNKNOWN_FAULT",
    "Plc",
    "fault_name",
    "fault_text",
    "name_fault_codes",
]
