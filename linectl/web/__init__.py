"""The daemon's HTTP server: the operator HMI, its JSON command API, the WebSocket live
feed, /healthz and /metrics (docs/hmi.md).

`auth`: password hashes, sessions, CSRF tokens and the login rate limit; `feed`: the
live state as JSON and the deltas between two states (pure); `server`: the aiohttp
application that serves them and hands commands to the one command path
(`LineService.execute`).
"""
