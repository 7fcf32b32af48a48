"""The conformance kit and test doubles for plugin authors (public API).

Opt in with ``pytest_plugins = ["streamspace_sdk.testing.plugin"]`` and the
``streamspace-sdk[testing]`` extra, then subclass a suite and provide its one fixture:

=========================  ======================  ==========================================
suite                      required fixture        checks
=========================  ======================  ==========================================
``LeaseConformance``       ``lease_factory``       acquire, renew, release, expiry, fencing
``PlatformConformance``    ``platform_factory``    start/stop idempotency, adoption, hibernate
``TransportConformance``   ``transport_pair``      bytes intact, close, backpressure, streams
``ElectionMachine``        ``make_lease`` method   one leader at a time, epochs that grow
=========================  ======================  ==========================================

``TcpBalancer`` stands in for a Service in front of several control planes, and for a bad
network (``Faults``: latency, bandwidth, slicing, black hole, reset after N bytes; ``cut``).

A VNC viewer (RFB 3.8, security type None, Raw) reads a session's screen pixel by pixel:
``read_screen(url)`` through the control plane's ``/vnc/{id}``, ``read_screen_tcp(host,
port)`` from its VNC port (``drawn=True`` waits for a desktop that has drawn something);
``rfb_handshake`` and ``read_framebuffer`` over an ``RfbStream`` (a WebSocket or a TCP
connection) for more frames on one connection.
"""

from __future__ import annotations

from streamspace_sdk.testing.base import BaseConformance
from streamspace_sdk.testing.clock import AdvancingClock, FakeClock, settle
from streamspace_sdk.testing.doubles import (
    MemoryByteStream,
    MemoryHomeProbe,
    MemoryPlatform,
    MemoryPlatformState,
    memory_stream_pair,
)
from streamspace_sdk.testing.election import ElectionMachine, FaultyLease
from streamspace_sdk.testing.fake_control_plane import FakeControlPlane
from streamspace_sdk.testing.lease import LeaseConformance, LeaseFactory
from streamspace_sdk.testing.platform import (
    HomeProbe,
    PlatformConformance,
    PlatformFactory,
    SpecFactory,
)
from streamspace_sdk.testing.rfb import (
    RFB_VERSION,
    PixelFormat,
    RfbStream,
    Screen,
    ServerInit,
    read_drawn_framebuffer,
    read_framebuffer,
    read_screen,
    read_screen_tcp,
    rfb_handshake,
    rfb_tcp,
)
from streamspace_sdk.testing.tcp import Faults, TcpBalancer
from streamspace_sdk.testing.transport import StreamPairFactory, TransportConformance

__all__ = [
    "RFB_VERSION",
    "AdvancingClock",
    "BaseConformance",
    "ElectionMachine",
    "FakeClock",
    "FakeControlPlane",
    "Faults",
    "FaultyLease",
    "HomeProbe",
    "LeaseConformance",
    "LeaseFactory",
    "MemoryByteStream",
    "MemoryHomeProbe",
    "MemoryPlatform",
    "MemoryPlatformState",
    "PixelFormat",
    "PlatformConformance",
    "PlatformFactory",
    "RfbStream",
    "Screen",
    "ServerInit",
    "SpecFactory",
    "StreamPairFactory",
    "TcpBalancer",
    "TransportConformance",
    "memory_stream_pair",
    "read_drawn_framebuffer",
    "read_framebuffer",
    "read_screen",
    "read_screen_tcp",
    "rfb_handshake",
    "rfb_tcp",
    "settle",
]
