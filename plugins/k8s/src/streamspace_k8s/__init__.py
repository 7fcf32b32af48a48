"""StreamSpace on Kubernetes: the ``kubernetes`` platform and the ``kubernetes`` lease."""

from __future__ import annotations

from streamspace_k8s.lease import KubernetesLease
from streamspace_k8s.platform import KubernetesOptions, KubernetesPlatform

__all__ = ["KubernetesLease", "KubernetesOptions", "KubernetesPlatform"]
