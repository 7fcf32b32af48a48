"""VNC transport drivers built into the SDK.

============  =========================================  ======================================
name          class                                      carries each viewer as
============  =========================================  ======================================
ws-mux        :class:`~.mux.MuxTransport`                binary frames on the agent's own socket
ws-dedicated  :class:`~.dedicated.DedicatedTransport`    a WebSocket the agent dials per viewer
============  =========================================  ======================================

Each is registered in the ``streamspace.transports`` entry-point group and chosen with
``VNC_TRANSPORT=<name>``.
"""

from __future__ import annotations

from streamspace_sdk.transports.dedicated import DedicatedStream, DedicatedTransport, stream_url
from streamspace_sdk.transports.mux import MuxLink, MuxStream, MuxStreams, MuxTransport

__all__ = [
    "DedicatedStream",
    "DedicatedTransport",
    "MuxLink",
    "MuxStream",
    "MuxStreams",
    "MuxTransport",
    "stream_url",
]
