"""StreamSpace control plane: REST API, agent hub, command outbox, scheduler and reconciler."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("streamspace-controlplane")
except PackageNotFoundError:  # running from a source tree without metadata
    __version__ = "0.0.0"

__all__ = ["__version__"]
