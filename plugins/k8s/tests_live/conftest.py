"""Live tests: the same suites against a real cluster named by ``KUBECONFIG``.

Not part of the default run (``testpaths = ["tests"]``); run them with
``pytest tests_live`` (``tox -e k8s-live``). They fail, never skip, without a cluster.
Sessions run ``LIVE_IMAGE`` (default ``streamspace/desktop:bookworm``, which must be
pullable by, or loaded into, the cluster: ``kind load docker-image ...``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client, config

pytest_plugins = ["streamspace_sdk.testing.plugin"]

KUBECONFIG = os.environ.get("KUBECONFIG", "")
IMAGE = os.environ.get("LIVE_IMAGE", "streamspace/desktop:bookworm")
RUN = uuid.uuid4().hex[:6]


@pytest.fixture(scope="session")
def namespace() -> Iterator[str]:
    """A namespace of this run's own, deleted at the end."""
    if not KUBECONFIG:
        pytest.fail("the live tests need KUBECONFIG naming a real cluster (kind, k3d)")
    api = config.new_client_from_config(config_file=KUBECONFIG)
    core = client.CoreV1Api(api)
    name = f"sslive-{RUN}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)
    api.close()
