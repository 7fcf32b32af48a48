"""StreamSpace's ``docker`` platform: sessions as containers on a Docker engine.

``pip install streamspace-docker`` and set ``PLATFORM=docker`` on the agent.
"""

from __future__ import annotations

from streamspace_docker.platform import (
    LABEL_DESIRED,
    LABEL_GENERATION,
    LABEL_SPEC,
    DockerOptions,
    DockerPlatform,
)

__all__ = ["LABEL_DESIRED", "LABEL_GENERATION", "LABEL_SPEC", "DockerOptions", "DockerPlatform"]
