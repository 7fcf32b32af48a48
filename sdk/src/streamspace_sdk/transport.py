"""The VNC transport contract: how a viewer's bytes travel between control plane and agent.

A transport gives the agent one :class:`ByteStream` per viewer; the agent pipes it to the
session's VNC server. Bytes are relayed, never decoded. Every stream has a bounded buffer:
``write`` waits while the peer has granted no credit, so a slow reader slows the writer
instead of growing memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Protocol

from streamspace_sdk.settings import StreamSpaceSettings

if TYPE_CHECKING:
    from streamspace_sdk.protocol import Frame, VncOpen

__all__ = ["DEFAULT_WINDOW_BYTES", "AgentLink", "ByteStream", "Transport"]

DEFAULT_WINDOW_BYTES = 1024 * 1024
"""Bytes a sender may have in flight per stream before it needs credit. A 256 KiB window
cost ``ws-mux`` twice the CPU per MB relayed (``bench/vnc_relay.py``: 3.8 against 1.9 ms/MB
for control plane + agent) as senders stalled on every credit round trip; at 1 MiB a
stalled viewer holds at most 1 MiB on each side, so 1,000 stalled at once stay under 1 GiB."""


class AgentLink(Protocol):
    """The agent's connection to the control plane, as a transport sees it."""

    @property
    def url(self) -> str:
        """The control plane's base URL (``ws://`` or ``wss://``)."""
        ...

    async def send(self, frame: Frame) -> None:
        """Send one protocol frame on the agent's socket."""
        ...

    async def send_binary(self, data: bytes) -> None:
        """Send one binary frame on the agent's socket."""
        ...


class ByteStream(ABC):
    """One viewer's byte stream, in order and intact, with flow control."""

    close_reason: str = ""
    """Why the stream closed, once it has, when the peer said (empty otherwise)."""

    @abstractmethod
    async def read(self) -> bytes:
        """Return the next chunk of bytes; ``b""`` once the peer has closed."""

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """Send ``data``; waits while the peer's window is full. Raises after close."""

    @abstractmethod
    async def close(self) -> None:
        """Close both directions; the peer's ``read`` then returns ``b""``. Idempotent."""


class Transport(ABC):
    """A VNC transport. Subclass it and register it in ``streamspace.transports``.

    Capabilities: ``multiplexed`` (streams share the agent's socket),
    ``dedicated`` (a socket per stream).
    """

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()

    class Settings(StreamSpaceSettings):
        """The driver's own settings, read from the environment when it is built."""

    def __init__(self, settings: StreamSpaceSettings | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings()

    async def open_stream(self, link: AgentLink, request: VncOpen) -> ByteStream:
        """Open the agent's end of the stream the control plane asked for, ready for bytes.

        The agent calls it once it has connected to the session's VNC server; a stream it
        cannot serve it refuses with ``vnc.close`` instead. Raises ``ProtocolError`` (a
        request this transport cannot serve) or ``StreamRefused`` (the control plane's end
        is gone); the agent answers either with ``vnc.close``.
        """
        return await self._open_stream(link, request)

    @abstractmethod
    async def _open_stream(self, link: AgentLink, request: VncOpen) -> ByteStream:
        """Open the stream and tell the control plane, as the transport does."""
