"""Modbus TCP links to the line's PLCs: read planning (pure) and the async link.

`linectl.modbus.link` is the only controller module that imports pymodbus.
"""

from linectl.modbus.link import BlockRead, LinkStats, PlcLink, Snapshot, StallLog
from linectl.modbus.plan import Block, WriteRun, decode_block, plan_reads, plan_writes

__all__ = [
    "Block",
    "BlockRead",
    "LinkStats",
    "PlcLink",
    "Snapshot",
    "StallLog",
    "WriteRun",
    "decode_block",
    "plan_reads",
    "plan_writes",
]
