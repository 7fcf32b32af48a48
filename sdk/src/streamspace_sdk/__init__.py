"""StreamSpace agent SDK.

The names below are the public API; modules starting with ``_`` are private. The wire
messages live in :mod:`streamspace_sdk.protocol` and the conformance kit in
:mod:`streamspace_sdk.testing`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from streamspace_sdk.agent import Agent
from streamspace_sdk.clock import Clock, SystemClock
from streamspace_sdk.drivers import list_plugins, load_driver, load_driver_class
from streamspace_sdk.elector import LeaderElector
from streamspace_sdk.errors import (
    ConfigError,
    DriverLoadError,
    DriverNotFound,
    LeaseError,
    LeaseLost,
    NotSupported,
    PlatformError,
    ProtocolError,
    SessionNotFound,
    SessionVetoed,
    StaleGeneration,
    StreamSpaceError,
)
from streamspace_sdk.hooks import Hooks, make_plugin_manager
from streamspace_sdk.hookspecs import hookimpl
from streamspace_sdk.lease import Lease, LeaseRecord
from streamspace_sdk.platform import (
    Capacity,
    Platform,
    Resources,
    SessionSpec,
    SessionStatus,
    Usage,
    VncEndpoint,
)
from streamspace_sdk.protocol import PROTOCOL_VERSION
from streamspace_sdk.settings import AgentSettings, Duration, load_settings
from streamspace_sdk.transport import ByteStream, Transport

try:
    __version__ = version("streamspace-sdk")
except PackageNotFoundError:  # running from a source tree without metadata
    __version__ = "0.0.0"

__all__ = [
    "PROTOCOL_VERSION",
    "Agent",
    "AgentSettings",
    "ByteStream",
    "Capacity",
    "Clock",
    "ConfigError",
    "DriverLoadError",
    "DriverNotFound",
    "Duration",
    "Hooks",
    "LeaderElector",
    "Lease",
    "LeaseError",
    "LeaseLost",
    "LeaseRecord",
    "NotSupported",
    "Platform",
    "PlatformError",
    "ProtocolError",
    "Resources",
    "SessionNotFound",
    "SessionSpec",
    "SessionStatus",
    "SessionVetoed",
    "StaleGeneration",
    "StreamSpaceError",
    "SystemClock",
    "Transport",
    "Usage",
    "VncEndpoint",
    "__version__",
    "hookimpl",
    "list_plugins",
    "load_driver",
    "load_driver_class",
    "load_settings",
    "make_plugin_manager",
]
