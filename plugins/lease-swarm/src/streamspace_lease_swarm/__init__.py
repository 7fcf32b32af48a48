"""StreamSpace's ``swarm`` lease: leader election on Docker Swarm managers' Raft store.

``pip install streamspace-lease-swarm`` and set ``ENABLE_HA=true HA_BACKEND=swarm``.
"""

from __future__ import annotations

from streamspace_lease_swarm.lease import LABEL_PREFIX, SwarmLease

__all__ = ["LABEL_PREFIX", "SwarmLease"]
