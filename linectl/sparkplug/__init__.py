"""Sparkplug B edge node (docs/sparkplug.md).

- `linectl.sparkplug.node`: pure: topics, payloads, session rules (bdSeq, seq, aliases,
  births before data, report by exception, quality), commands in, STATE.
- `linectl.sparkplug.adapter`: the asyncio shell: its own aiomqtt connection whose will
  is the NDEATH, births on every connect, rebirth on request, commands to the line,
  metre records with is_historical after an outage.
- `sparkplug_b.proto` / `sparkplug_b_pb2.py(i)`: the payload schema, written from the
  Sparkplug 3.0 specification, and the module generated from it by
  scripts/gen_sparkplug.sh (never edited by hand).

Importing this package loads neither the adapter nor aiomqtt.
"""
