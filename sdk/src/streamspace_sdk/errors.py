"""Every public exception of the SDK, under one root, :class:`StreamSpaceError`."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DriverError",
    "DriverLoadError",
    "DriverNotFound",
    "LeaseError",
    "LeaseLost",
    "NotSupported",
    "PlatformError",
    "ProtocolError",
    "SessionNotFound",
    "SessionVetoed",
    "StaleGeneration",
    "StreamRefused",
    "StreamSpaceError",
]


class StreamSpaceError(Exception):
    """Root of every exception StreamSpace raises on purpose."""


class ConfigError(StreamSpaceError, ValueError):
    """A setting is missing or has a bad value; the message names the variable."""


class ProtocolError(StreamSpaceError):
    """A frame could not be parsed or is not allowed here.

    Attributes:
        code: short machine-readable reason, sent back in the ``error`` frame.
        reason: the sentence a person reads.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class DriverError(StreamSpaceError):
    """A driver plugin could not be found or loaded."""


class DriverNotFound(DriverError, LookupError):
    """No driver of that name is installed in the group.

    ``package`` is the distribution that provides it, when it is one of ours; the message
    then says what to ``pip install``. ``reason`` says why this name was asked for when the
    user did not write it (a default).
    """

    def __init__(
        self,
        group: str,
        name: str,
        installed: list[str],
        *,
        package: str | None = None,
        reason: str | None = None,
    ) -> None:
        names = ", ".join(sorted(installed)) or "none"
        why = f" ({reason})" if reason else ""
        message = f"no {group!r} driver named {name!r} is installed{why}; installed: {names}"
        if package:
            message += f"; pip install {package} to add it"
        super().__init__(message)
        self.group = group
        self.name = name
        self.installed = sorted(installed)
        self.package = package
        self.reason = reason


class DriverLoadError(DriverError):
    """A driver is installed but importing or checking it failed."""


class PlatformError(StreamSpaceError):
    """A platform could not do what it was asked; the message says why."""


class NotSupported(PlatformError):
    """The driver does not have the capability the call needs."""


class SessionNotFound(PlatformError, LookupError):
    """The platform manages no session with that id."""


class StaleGeneration(PlatformError):
    """A command carries an older generation than the one already applied."""


class SessionVetoed(StreamSpaceError):
    """A ``prepare_session_spec`` hook refused to let a session start."""


class LeaseError(StreamSpaceError):
    """A lease backend failed (unreachable, corrupt, misconfigured)."""


class LeaseLost(LeaseError):
    """The caller no longer holds the lease it tried to renew."""


class StreamRefused(StreamSpaceError, ConnectionError):
    """A VNC stream could not be opened: the agent refused it, or its connection is gone.

    Attributes:
        reason: why, for people (the agent's ``vnc.close`` reason when it gave one).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
