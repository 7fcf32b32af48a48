"""The store: its contract and drivers (``sqlite``, ``postgres``)."""

from __future__ import annotations

from streamspace_controlplane.store.base import (
    Conflict,
    LastAdmin,
    NotFound,
    StaleEpoch,
    Store,
    StoreError,
)

__all__ = ["Conflict", "LastAdmin", "NotFound", "StaleEpoch", "Store", "StoreError"]
