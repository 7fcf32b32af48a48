"""StreamSpace's ``redis`` lease: leader election for HA agents over a shared Redis.

``pip install streamspace-lease-redis`` and set ``ENABLE_HA=true HA_BACKEND=redis`` and
``REDIS_URL`` on every replica of the agent.
"""

from __future__ import annotations

from streamspace_lease_redis.lease import RedisLease

__all__ = ["RedisLease"]
