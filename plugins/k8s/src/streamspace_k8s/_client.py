"""What the platform and the lease share: building the official client, calling it off the
event loop, and turning its errors into sentences.

The ``kubernetes`` client is untyped; everything it returns stays ``Any`` here and is read
as plain JSON (``_preload_content=False``), so the rest of the package handles dicts whose
shape is the API reference's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from pydantic import Field

from streamspace_sdk.settings import Duration, StreamSpaceSettings

__all__ = ["ApiError", "ClusterSettings", "KubeClient", "Unreachable"]

T = TypeVar("T")


class ClusterSettings(StreamSpaceSettings):
    """How to reach the API server: in-cluster config, else ``KUBECONFIG``."""

    kubeconfig: str | None = None
    """Path of a kubeconfig (or a ``:``-separated list, as kubectl's); unset: in-cluster
    config when running in a pod, else ``~/.kube/config``."""

    kube_context: str | None = None
    """Context of the kubeconfig to use; unset: its current context."""

    kubernetes_service_host: str | None = None
    """Set by the kubelet in every pod; when present and ``KUBECONFIG`` is not, the
    in-cluster service account is used."""

    kube_api_timeout: Annotated[Duration, Field(gt=0)] = 30.0
    """Seconds one call to the API server may take before it counts as unanswered."""


class ApiError(Exception):
    """The API server answered with an error status.

    Attributes:
        status: the HTTP status (404, 409, 403, ...).
        reason: the ``reason`` of the ``Status`` object (``NotFound``, ``AlreadyExists``,
            ``Conflict``, ``Forbidden``), empty when there was none.
        message: the server's message.
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message or reason or f"HTTP {status}")
        self.status = status
        self.reason = reason
        self.message = message or reason or f"HTTP {status}"


class Unreachable(Exception):
    """The API server did not answer (or the client could not even be configured)."""


class KubeClient:
    """One ``ApiClient`` built lazily from :class:`ClusterSettings`, with typed helpers."""

    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self._api: k8s.ApiClient | None = None
        self._lock = asyncio.Lock()
        self.server = ""
        """The API server's URL, once the client is built (for messages)."""

    def where(self) -> str:
        """Say where the cluster is, for error messages."""
        source = f"KUBECONFIG={self.settings.kubeconfig}" if self.settings.kubeconfig else ""
        if not source:
            source = (
                "the in-cluster service account"
                if self.settings.kubernetes_service_host
                else "~/.kube/config"
            )
        return f"{self.server or 'the API server'} (from {source})"

    async def api(self) -> k8s.ApiClient:
        async with self._lock:
            if self._api is None:
                self._api = await asyncio.to_thread(self._build)
            return self._api

    def built(self) -> k8s.ApiClient | None:
        """The client, if :meth:`api` built it already (for worker threads)."""
        return self._api

    def _build(self) -> k8s.ApiClient:
        cfg = k8s.Configuration()
        try:
            if self.settings.kubeconfig is None and self.settings.kubernetes_service_host:
                k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            else:
                k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=self.settings.kubeconfig,
                    context=self.settings.kube_context,
                    client_configuration=cfg,
                    persist_config=False,
                )
        except (ConfigException, OSError, TypeError, ValueError) as exc:
            raise Unreachable(f"cannot configure the Kubernetes client: {exc}") from None
        cfg.retries = 1
        self.server = str(cfg.host)
        return k8s.ApiClient(cfg)

    @property
    def timeout(self) -> float:
        return self.settings.kube_api_timeout

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        """Send one request to the API server in a worker thread; return its JSON answer.

        The body is sent as given: the generated models of the client reformat times
        (a MicroTime with zero microseconds loses its fraction, which API servers refuse),
        so the package writes plain JSON in the API reference's shapes.

        Raises:
            ApiError: the server answered with an error status.
            Unreachable: it did not answer.
        """
        api = await self.api()
        timeout = self.settings.kube_api_timeout

        def run() -> dict[str, Any]:
            try:
                params = api.param_serialize(
                    method=method,
                    resource_path=path,
                    query_params=query or None,
                    header_params={
                        "Accept": "application/json",
                        "Content-Type": "application/json",
                    },
                    body=body,
                    auth_settings=["BearerToken"],
                )
                response = api.call_api(*params, _request_timeout=timeout)
                response.read()  # type: ignore[no-untyped-call]
            except ApiException as exc:
                if not exc.status:
                    raise Unreachable(str(exc.reason)) from None
                raise _api_error(exc.status, exc.reason, exc.body) from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise Unreachable(_root(exc)) from None
            if response.status >= 400:
                raise _api_error(response.status, response.reason, response.data)
            answer: object = json.loads(response.data) if response.data else {}
            if not isinstance(answer, dict):
                raise Unreachable(f"the API server answered {method} {path} with no object")
            return answer

        return await asyncio.to_thread(run)

    async def run(self, blocking: Callable[[k8s.ApiClient], T]) -> T:
        """Run ``blocking(api_client)`` in a worker thread, mapping errors as :meth:`request`."""
        api = await self.api()

        def run() -> T:
            try:
                return blocking(api)
            except ApiException as exc:
                if not exc.status:
                    raise Unreachable(str(exc.reason)) from None
                raise _api_error(exc.status, exc.reason, exc.body) from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise Unreachable(_root(exc)) from None

        return await asyncio.to_thread(run)

    async def close(self) -> None:
        if self._api is not None:
            api, self._api = self._api, None
            await asyncio.to_thread(api.close)


def _api_error(status: int, http_reason: object, raw: object) -> ApiError:
    reason, message = str(http_reason or ""), ""
    try:
        body = json.loads(raw) if isinstance(raw, str | bytes) else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        reason = str(body.get("reason") or reason)
        message = str(body.get("message") or "")
    return ApiError(int(status), reason, message)


def _root(exc: BaseException) -> str:
    seen: BaseException = exc
    while True:
        nxt = getattr(seen, "reason", None)
        if isinstance(nxt, BaseException) and nxt is not seen:
            seen = nxt
            continue
        if seen.__cause__ is not None:
            seen = seen.__cause__
            continue
        break
    text = str(seen) or type(seen).__name__
    return text if len(text) < 300 else text[:300] + "..."
