"""StreamSpace's ``file`` lease: leader election between agent processes on one host.

``pip install streamspace-lease-file`` and set ``ENABLE_HA=true HA_BACKEND=file`` on the agent.
"""

from __future__ import annotations

from streamspace_lease_file.lease import DEFAULT_LEASE_FILE, FileLease

__all__ = ["DEFAULT_LEASE_FILE", "FileLease"]
