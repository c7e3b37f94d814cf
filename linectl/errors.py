"""One base error, split by whose fault it is (style: caproto).

`LocalError` means our input or our use is wrong (a bad config, a bad command);
`RemoteError` means the peer (a PLC, the broker) misbehaved or went away.
"""

from __future__ import annotations

# The command line's exit codes (docs/cli.md, "Exit codes"), for every command module.
EXIT_OK = 0
EXIT_FAILED = 1
"""Not implemented; for `demo`, its own check failed (the reel did not run to its end,
or a metre was recorded in spec whose true dose is outside the recipe's limits)."""
EXIT_BAD_INPUT = 2
EXIT_NAK = 3
"""The line refused the command (NAK); its reason is printed."""
EXIT_NO_ANSWER = 4
"""No answer from the line: no daemon, or not connected to the broker (or, for `status`
and `alarms`, the line's retained status says it is offline)."""
EXIT_BROKER = 5
"""The MQTT broker cannot be reached, or refused the connection or a subscription."""
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports


class LinectlError(Exception):
    """Base of every error linectl raises on purpose."""


class LocalError(LinectlError):
    """Our side is wrong: configuration, recipe, command or API misuse."""


class ConfigError(LocalError):
    """A configuration or recipe file is invalid; the message names file and field."""


class RemoteError(LinectlError):
    """A peer (PLC, broker) failed or answered wrongly."""


class PlcError(RemoteError):
    """A PLC request failed."""

    def __init__(self, plc: str, message: str) -> None:
        super().__init__(f"{plc}: {message}")
        self.plc = plc


class PlcUnavailableError(PlcError):
    """The PLC cannot be reached now (not connected, refused, dropped)."""


class PlcTimeoutError(PlcError, TimeoutError):
    """The PLC did not answer within the link's timeout."""


class PlcExceptionError(PlcError):
    """The PLC answered with a Modbus exception (e.g. 2 illegal address, 3 illegal value)."""

    def __init__(self, plc: str, message: str, exception_code: int) -> None:
        super().__init__(plc, message)
        self.exception_code = exception_code


class WriteVerifyError(PlcError):
    """A write was accepted but reading it back gave another value."""
