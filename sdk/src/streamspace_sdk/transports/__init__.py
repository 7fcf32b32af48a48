"""VNC transport drivers built into the SDK.

=========  ===========================================  ======================================
name       class                                        carries each viewer as
=========  ===========================================  ======================================
ws-mux     :class:`~.mux.MuxTransport`                  binary frames on the agent's own socket
=========  ===========================================  ======================================

Each is registered in the ``streamspace.transports`` entry-point group and chosen with
``VNC_TRANSPORT=<name>``.
"""

from __future__ import annotations

from streamspace_sdk.transports.mux import MuxLink, MuxStream, MuxStreams, MuxTransport

__all__ = ["MuxLink", "MuxStream", "MuxStreams", "MuxTransport"]
