"""One base error, split by whose fault it is (style: caproto).

`LocalError` means our input or our use is wrong (a bad config, a bad command);
`RemoteError` means the peer (a PLC, the broker) misbehaved or went away.
"""

from __future__ import annotations


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
