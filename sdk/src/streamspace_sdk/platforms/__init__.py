"""Platform drivers built into the SDK.

=========  ==========================================  =====================================
name       class                                       runs a session as
=========  ==========================================  =====================================
process    :class:`~.process.ProcessPlatform`          a local process group (TigerVNC Xvnc)
=========  ==========================================  =====================================

Each is registered in the ``streamspace.platforms`` entry-point group and chosen with
``PLATFORM=<name>``.
"""

from __future__ import annotations

from streamspace_sdk.platforms.process import ProcessPlatform

__all__ = ["ProcessPlatform"]
