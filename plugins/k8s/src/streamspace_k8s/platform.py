"""The ``kubernetes`` platform: one Deployment, Service and home claim per session.

The cluster is the record of truth: every object the platform makes carries the standard
labels (and the raw session id, user, generation and spec in annotations), so a restarted
agent, or a new HA leader, lists the sessions in ``NAMESPACE`` by label selector and adopts
them. Calls go through the official ``kubernetes`` client in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from kubernetes import client as k8s
from kubernetes.stream import portforward
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from streamspace_k8s._client import ApiError, ClusterSettings, KubeClient, Unreachable
from streamspace_sdk.errors import PlatformError, SessionNotFound
from streamspace_sdk.platform import (
    LABEL_AGENT_ID,
    LABEL_MANAGED_BY,
    LABEL_SESSION_ID,
    LABEL_TEMPLATE,
    LABEL_USER,
    MANAGED_BY,
    Capacity,
    Platform,
    SessionSpec,
    SessionState,
    SessionStatus,
    VncEndpoint,
)
from streamspace_sdk.settings import Duration, PullPolicy, StreamSpaceSettings, driver_settings

__all__ = [
    "ANNOTATION_DESIRED",
    "ANNOTATION_GENERATION",
    "ANNOTATION_SESSION_ID",
    "ANNOTATION_SPEC",
    "APP_SESSION",
    "LABEL_APP",
    "LABEL_HOME",
    "LABEL_SESSION",
    "KubernetesOptions",
    "KubernetesPlatform",
    "label_value",
]

log = logging.getLogger(__name__)

ANNOTATION_SESSION_ID = "streamspace.io/session-id"
"""The session id as given (a label value may have had to be shortened)."""
ANNOTATION_USER = "streamspace.io/user"
"""The user name as given."""
ANNOTATION_GENERATION = "streamspace.io/generation"
"""The generation of the last command applied to the session."""
ANNOTATION_DESIRED = "streamspace.io/desired"
"""``running`` or ``hibernated``."""
ANNOTATION_SPEC = "streamspace.io/spec"
"""The session's spec as JSON, so a new agent process can wake it."""
LABEL_HOME = "streamspace.io/home"
"""Claim label: ``user`` (a user's persistent home) or ``session`` (removed with the session)."""
LABEL_APP = "app"
"""Label ``app=session`` on a session's Deployment, pod and Service, for the seed guide's
``kubectl get pods -l app=session``. Not in any selector: selectors keep the
``streamspace.io/*`` labels, so Deployments made before it are still adopted."""
APP_SESSION = "session"
"""The value of :data:`LABEL_APP`."""
LABEL_SESSION = "session"
"""Label ``session=<session id>`` (as :func:`label_value` makes it) on a session's
Deployment, pod and Service, for the seed guide's ``kubectl get pods -l session=<id>``.
Not in any selector, as :data:`LABEL_APP`."""


_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
_POLL_S = 0.1
"""Interval of the start's look at the pod: the API offers watches, but a poll keeps the
RBAC to get and list and the agent free of long-lived streams."""
_FAILING = frozenset(
    {
        "ImagePullBackOff",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)
"""Container waiting reasons after which a start gives up."""


class KubernetesOptions(BaseModel):
    """What a template may set in ``platform_options`` for the ``kubernetes`` platform."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node_selector: dict[str, str] = Field(default_factory=dict)
    """The pod's ``nodeSelector``."""
    tolerations: list[dict[str, JsonValue]] = Field(default_factory=list)
    """The pod's ``tolerations``, as in the Pod API."""
    image_pull_secrets: list[str] = Field(default_factory=list)
    """Names of Secrets for pulling the image, besides ``IMAGE_PULL_SECRETS``."""
    image_pull_policy: PullPolicy | None = None
    """Overrides ``IMAGE_PULL_POLICY``."""
    home_path: str | None = Field(default=None, pattern=r"^/")
    """Where the home is mounted and ``HOME`` points; unset: ``K8S_HOME_PATH``."""
    run_as_user: int | None = Field(default=None, ge=1)
    """Non-root uid of the session; unset: ``K8S_RUN_AS_USER``."""


class KubernetesPlatform(Platform):
    """Runs each session as a Deployment in ``NAMESPACE``; the ``kubernetes`` platform.

    Per session ``ss-<session id>``: a Deployment of one replica (zero when hibernated,
    strategy ``Recreate`` so two pods never share a home) whose pod runs the template's image
    (its ``command`` replaces the image's entrypoint) as a non-root user with no privilege
    escalation and every capability dropped, the template's resources as requests and
    limits, its env, node selector and tolerations, and a TCP readiness probe on the VNC
    port; a ClusterIP Service for the VNC port; and a home claim: ``home-<user>`` (kept
    after the session, for the user's next one) when the template asks for a persistent home,
    else a claim of the session's own. The Service and the session's own claim have an owner
    reference to the Deployment, so deleting the Deployment removes them.

    ``start`` returns ``running`` once the pod is Ready. It fails with
    :class:`PlatformError`, removing what it made, when the pod's container cannot start
    (image pull back-off, crash loop, a bad config) or ``K8S_START_TIMEOUT`` passes.

    VNC (``VNC_ACCESS``): ``service`` returns the Service's cluster DNS name, for an agent
    in the cluster; ``port-forward`` returns a port on 127.0.0.1 of the agent's host that is
    forwarded, connection by connection, to the pod through the API server (as
    ``kubectl port-forward``), for an agent outside the cluster.

    Capabilities: ``hibernate``, ``persistent_home`` and ``adopt``.
    """

    name: ClassVar[str] = "kubernetes"
    capabilities: ClassVar[frozenset[str]] = frozenset({"hibernate", "persistent_home", "adopt"})

    class Settings(ClusterSettings):
        """Settings of the ``kubernetes`` platform, with the seed guide's names."""

        namespace: str = Field(
            default="streamspace", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
        )
        """Namespace the sessions live in (it must exist)."""

        max_sessions: int = Field(default=10, ge=0)
        """Sessions this agent runs at once (``MAX_SESSIONS``, as the agent's)."""

        vnc_access: Literal["service", "port-forward"] = "service"
        """How the agent reaches a session's VNC server: the Service (agent in the cluster)
        or a port-forward through the API server (agent outside it)."""

        image_pull_policy: PullPolicy = "IfNotPresent"
        """The container's ``imagePullPolicy``; templates may override it."""

        image_pull_secrets: str = ""
        """Comma-separated names of Secrets in ``NAMESPACE`` for pulling session images."""

        storage_class: str | None = None
        """``storageClassName`` of the home claims; unset: the cluster's default class."""

        home_storage_size: str = Field(default="10Gi", pattern=_QUANTITY)
        """Size requested for each home claim."""

        k8s_home_path: str = Field(default="/home/streamspace", pattern=r"^/")
        """Where the home is mounted; templates may override it."""

        k8s_run_as_user: int = Field(default=1000, ge=1)
        """Non-root uid (and gid, and fsGroup) sessions run as; templates may override it."""

        k8s_start_timeout: Annotated[Duration, Field(gt=0)] = 300.0
        """Seconds from creating the Deployment to its pod being Ready (image pulls included)."""

    def __init__(self, settings: StreamSpaceSettings | None = None, *, agent_id: str) -> None:
        settings = driver_settings(KubernetesPlatform.Settings, settings, "KubernetesPlatform")
        super().__init__(settings, agent_id=agent_id)
        self.config: KubernetesPlatform.Settings = settings
        self.client = KubeClient(settings)
        self._admission = asyncio.Lock()
        self._starting: set[str] = set()

    # -- names -------------------------------------------------------------------------------

    @staticmethod
    def object_name(session_id: str) -> str:
        """The name of the session's Deployment and Service (a DNS-1035 label)."""
        return "ss-" + _dns(session_id, 50)

    @staticmethod
    def home_claim(user: str) -> str:
        """The name of a user's persistent home claim."""
        return "home-" + _dns(user, 50)

    def instance_scope(self) -> str:
        """The namespace of the cluster: agents there manage the same sessions."""
        return f"kubernetes:{self.client.server or self.config.kubeconfig or 'in-cluster'}/" + (
            self.config.namespace
        )

    # -- checks ------------------------------------------------------------------------------

    async def check(self) -> None:
        """Fail now, saying what to fix, if the cluster is unreachable, the namespace
        missing, or the agent may not manage sessions there.

        Raises:
            PlatformError: what is wrong and how to fix it.
        """
        ns = self.config.namespace
        await self._api(
            "list Deployments", "GET", self._apps("deployments"), query=[("limit", "1")]
        )
        probe = _service_body("streamspace-check", ns, {LABEL_MANAGED_BY: MANAGED_BY}, 5900)
        await self._api(
            "create Services (dry run)",
            "POST",
            self._core("services"),
            body=probe,
            query=[("dryRun", "All")],
        )
        log.info("Connected to Kubernetes at %s, namespace %s", self.client.where(), ns)

    async def close(self) -> None:
        await self.client.close()

    # -- driver methods ----------------------------------------------------------------------

    async def _start(self, spec: SessionSpec) -> SessionStatus:
        options = self.options(spec, KubernetesOptions)
        if not spec.image:
            raise PlatformError("the kubernetes platform needs an image: set the template's image")
        sid = spec.session_id
        found = await self._deployment(sid)
        if found is not None:
            current = await self._observe(found)
            if current.state == "running":
                # Already running at an older generation: it is what was asked for.
                await self._annotate(sid, spec.generation, "running", spec, replicas=None)
                return current.model_copy(update={"generation": spec.generation})
            if current.state == "hibernated":
                return await self._wake(spec)
            await self._remove(sid)  # a failed or half-made session: start afresh
        await self._admit(sid, "was not started")
        try:
            try:
                await self._create(spec, options)
                return await self._await_ready(sid, spec.generation)
            except BaseException:
                with contextlib.suppress(PlatformError):
                    await self._remove(sid)
                raise
        finally:
            self._starting.discard(sid)

    async def _admit(self, sid: str, otherwise: str) -> None:
        """Take a place for the session, or raise if ``MAX_SESSIONS`` are active."""
        async with self._admission:
            active = [s for s in await self._list_sessions() if s.state in ("starting", "running")]
            taken = len({s.session_id for s in active} | self._starting)
            if taken >= self.config.max_sessions:
                raise PlatformError(
                    f"this agent runs {taken} sessions, its limit (MAX_SESSIONS="
                    f"{self.config.max_sessions}); session {sid!r} {otherwise}"
                )
            self._starting.add(sid)

    async def _wake(self, spec: SessionSpec) -> SessionStatus:
        sid = spec.session_id
        await self._admit(sid, "stays hibernated")
        try:
            await self._annotate(sid, spec.generation, "running", spec, replicas=1)
            return await self._await_ready(sid, spec.generation)
        finally:
            self._starting.discard(sid)

    async def _stop(self, session_id: str, generation: int) -> SessionStatus:
        await self._remove(session_id)
        return SessionStatus(session_id=session_id, generation=generation, state="stopped")

    async def _hibernate(self, session_id: str, generation: int) -> SessionStatus:
        _stop_forwarder(self._forward_key(session_id))
        await self._annotate(session_id, generation, "hibernated", None, replicas=0)
        return SessionStatus(
            session_id=session_id,
            generation=generation,
            state="hibernated",
            detail="scaled to zero; the home claim is kept",
        )

    async def _status(self, session_id: str) -> SessionStatus | None:
        found = await self._deployment(session_id)
        return await self._observe(found) if found is not None else None

    async def _list_sessions(self) -> list[SessionStatus]:
        selector = self._selector()
        deployments = await self._items("deployments", selector)
        pods = await self._items("pods", selector)
        return [self._state(d, pods) for d in deployments if _annotation(d, ANNOTATION_SESSION_ID)]

    async def _vnc_endpoint(self, session_id: str) -> VncEndpoint:
        status = await self._status(session_id)
        if status is None or status.state != "running" or status.vnc is None:
            raise SessionNotFound(f"session {session_id!r} is not running here")
        return status.vnc

    async def _capacity(self) -> Capacity:
        return Capacity(max_sessions=self.config.max_sessions)

    # -- making ------------------------------------------------------------------------------

    async def _create(self, spec: SessionSpec, options: KubernetesOptions) -> None:
        sid, ns = spec.session_id, self.config.namespace
        name = self.object_name(sid)
        labels = self._labels(spec)
        claim_name: str
        session_claim: dict[str, Any] | None = None
        claim_labels = {k: labels[k] for k in (LABEL_AGENT_ID, LABEL_MANAGED_BY, LABEL_USER)}
        if spec.persistent_home:
            claim_name = self.home_claim(spec.user)
            await self._ensure_home(claim_name, {**claim_labels, LABEL_HOME: "user"}, spec.user)
        else:
            body = self._claim_body(
                {"generateName": f"{name}-home-"},
                {**claim_labels, LABEL_SESSION_ID: labels[LABEL_SESSION_ID], LABEL_HOME: "session"},
                {ANNOTATION_SESSION_ID: sid},
            )
            session_claim = await self._api(
                "create the session's home claim",
                "POST",
                self._core("persistentvolumeclaims"),
                body=body,
            )
            claim_name = session_claim["metadata"]["name"]
        deployment = self._deployment_body(spec, options, labels, claim_name)
        try:
            made = await self._api(
                f"create Deployment {name!r}",
                "POST",
                self._apps("deployments"),
                body=deployment,
                expect=(409,),
            )
        except ApiError:
            why = await self._conflict("Deployment", self._apps("deployments"), name)
            raise PlatformError(why) from None
        owner = _owner(made)
        service = _service_body(
            name,
            ns,
            labels,
            spec.vnc_port,
            selector=self._pod_selector(sid),
            annotations={ANNOTATION_SESSION_ID: sid},
        )
        service["metadata"]["ownerReferences"] = [owner]
        try:
            await self._api(
                f"create Service {name!r}",
                "POST",
                self._core("services"),
                body=service,
                expect=(409,),
            )
        except ApiError:
            old = await self._get(self._core("services", name))
            if old is None or _annotation(old, ANNOTATION_SESSION_ID) != sid or not self._ours(old):
                raise PlatformError(
                    await self._conflict("Service", self._core("services"), name)
                ) from None
            # Ours, left by an earlier start of this session: replace it.
            await self._delete(self._core("services", name), f"remove Service {name!r}")
            await self._api(
                f"create Service {name!r}", "POST", self._core("services"), body=service
            )
        if session_claim is not None:
            await self._own(session_claim, owner)

    async def _own(self, claim: dict[str, Any], owner: dict[str, Any]) -> None:
        """Give the session's claim an owner reference to its Deployment (a versioned write)."""
        path = self._core("persistentvolumeclaims", claim["metadata"]["name"])
        for _ in range(5):
            claim["metadata"]["ownerReferences"] = [owner]
            try:
                await self._api("adopt the home claim", "PUT", path, body=claim, expect=(409,))
                return
            except ApiError:
                fresh = await self._get(path)
                if fresh is None:
                    raise PlatformError("the session's home claim vanished during start") from None
                claim = fresh
        raise PlatformError("the session's home claim kept changing during start")

    async def _ensure_home(self, name: str, labels: dict[str, str], user: str) -> None:
        body = self._claim_body({"name": name}, labels, {ANNOTATION_USER: user})
        try:
            await self._api(
                f"create home claim {name!r}",
                "POST",
                self._core("persistentvolumeclaims"),
                body=body,
                expect=(409,),
            )
        except ApiError:
            old = await self._get(self._core("persistentvolumeclaims", name))
            if old is None:
                raise PlatformError(f"the home claim {name!r} was removed during start") from None
            if not self._ours(old, agent=False) or _annotation(old, ANNOTATION_USER) != user:
                raise PlatformError(
                    f"a PersistentVolumeClaim named {name!r} already exists in "
                    f"{self.config.namespace} and is not the StreamSpace home of {user!r}; it "
                    "is left alone: remove or rename it"
                ) from None

    def _claim_body(
        self, naming: dict[str, str], labels: dict[str, str], annotations: dict[str, str]
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": self.config.home_storage_size}},
        }
        if self.config.storage_class is not None:
            spec["storageClassName"] = self.config.storage_class
        return {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                **naming,
                "namespace": self.config.namespace,
                "labels": labels,
                "annotations": annotations,
            },
            "spec": spec,
        }

    def _deployment_body(
        self,
        spec: SessionSpec,
        options: KubernetesOptions,
        labels: dict[str, str],
        claim: str,
    ) -> dict[str, Any]:
        """The session's Deployment, in the apps/v1 API's shape."""
        sid = spec.session_id
        home = options.home_path or self.config.k8s_home_path
        uid = options.run_as_user or self.config.k8s_run_as_user
        env = {
            **spec.env,
            "HOME": home,
            "VNC_PORT": str(spec.vnc_port),
            "STREAMSPACE_SESSION_ID": sid,
            "STREAMSPACE_USER": spec.user,
        }
        container: dict[str, Any] = {
            "name": "session",
            "image": spec.image,
            "imagePullPolicy": options.image_pull_policy or self.config.image_pull_policy,
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "ports": [{"name": "vnc", "containerPort": spec.vnc_port, "protocol": "TCP"}],
            "readinessProbe": {
                "tcpSocket": {"port": "vnc"},
                "periodSeconds": 2,
                "failureThreshold": 3,
            },
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": uid,
                "runAsGroup": uid,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [{"name": "home", "mountPath": home}],
        }
        if spec.command:
            container["command"] = list(spec.command)
        resources = _resources(spec)
        if resources:
            container["resources"] = resources
        secrets = [s.strip() for s in self.config.image_pull_secrets.split(",") if s.strip()]
        secrets += [s for s in options.image_pull_secrets if s not in secrets]
        pod_spec: dict[str, Any] = {
            "containers": [container],
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": uid,
                "runAsGroup": uid,
                "fsGroup": uid,
            },
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "volumes": [{"name": "home", "persistentVolumeClaim": {"claimName": claim}}],
        }
        if secrets:
            pod_spec["imagePullSecrets"] = [{"name": s} for s in secrets]
        if options.node_selector:
            pod_spec["nodeSelector"] = dict(options.node_selector)
        if options.tolerations:
            pod_spec["tolerations"] = [dict(t) for t in options.tolerations]
        annotations = {
            ANNOTATION_SESSION_ID: sid,
            ANNOTATION_USER: spec.user,
            ANNOTATION_GENERATION: str(spec.generation),
            ANNOTATION_DESIRED: "running",
            ANNOTATION_SPEC: spec.model_dump_json(),
        }
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": self.object_name(sid),
                "namespace": self.config.namespace,
                "labels": labels,
                "annotations": annotations,
            },
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": self._pod_selector(sid)},
                "template": {
                    "metadata": {"labels": labels, "annotations": {ANNOTATION_SESSION_ID: sid}},
                    "spec": pod_spec,
                },
            },
        }

    async def _annotate(
        self,
        session_id: str,
        generation: int,
        desired: str,
        spec: SessionSpec | None,
        *,
        replicas: int | None,
    ) -> None:
        """Record a command on the Deployment (and scale it): a versioned replace."""
        for _ in range(5):
            found = await self._deployment(session_id)
            if found is None:
                raise SessionNotFound(f"session {session_id!r} has no Deployment")
            meta = found["metadata"]
            meta.setdefault("annotations", {})
            meta["annotations"][ANNOTATION_GENERATION] = str(generation)
            meta["annotations"][ANNOTATION_DESIRED] = desired
            if spec is not None:
                meta["annotations"][ANNOTATION_SPEC] = spec.model_dump_json()
            if replicas is not None:
                found["spec"]["replicas"] = replicas
            found.pop("status", None)
            found["apiVersion"], found["kind"] = "apps/v1", "Deployment"  # lists omit them
            path = self._apps("deployments", meta["name"])
            try:
                await self._api(
                    f"update Deployment {meta['name']!r}", "PUT", path, body=found, expect=(409,)
                )
                return
            except ApiError:
                continue  # changed since we read it: read again
        raise PlatformError(f"the Deployment of session {session_id!r} kept changing")

    async def _conflict(self, kind: str, collection: str, name: str) -> str:
        other = await self._get(f"{collection}/{name}")
        if other is None:
            return f"the {kind} name {name!r} was taken and freed while this start ran"
        labels = other["metadata"].get("labels") or {}
        owner = labels.get(LABEL_AGENT_ID)
        whose = (
            f"belongs to agent {owner!r}"
            if owner and labels.get(LABEL_MANAGED_BY) == MANAGED_BY
            else "is not managed by StreamSpace"
        )
        return (
            f"a {kind} named {name!r} already exists in namespace {self.config.namespace} and "
            f"{whose}; it is left alone: remove or rename it"
        )

    # -- removing ----------------------------------------------------------------------------

    async def _remove(self, session_id: str) -> None:
        """Delete the session's Deployment, Service and own claim (the owner references
        would take the last two with the Deployment; deleting them too frees their names
        now rather than when the garbage collector comes by)."""
        _stop_forwarder(self._forward_key(session_id))
        found = await self._deployment(session_id)
        name = found["metadata"]["name"] if found is not None else self.object_name(session_id)
        # The Service first: with the Deployment gone, the garbage collector may race us.
        service = await self._get(self._core("services", name))
        if (
            service is not None
            and self._ours(service)
            and _annotation(service, ANNOTATION_SESSION_ID) == session_id
        ):
            await self._delete(self._core("services", name), f"remove Service {name!r}")
        if found is not None:
            await self._delete(
                self._apps("deployments", name),
                f"remove Deployment {name!r}",
                body={"propagationPolicy": "Background"},
            )
        selector = self._selector(session_id) + f",{LABEL_HOME}=session"
        for claim in await self._items("persistentvolumeclaims", selector):
            if _annotation(claim, ANNOTATION_SESSION_ID) == session_id:
                cname = claim["metadata"]["name"]
                await self._delete(
                    self._core("persistentvolumeclaims", cname), f"remove home claim {cname!r}"
                )

    async def _delete(self, path: str, what: str, body: dict[str, Any] | None = None) -> None:
        with contextlib.suppress(ApiError):
            await self._api(what, "DELETE", path, body=body, expect=(404,))

    # -- observing ---------------------------------------------------------------------------

    async def _deployment(self, session_id: str) -> dict[str, Any] | None:
        for found in await self._items("deployments", self._selector(session_id)):
            if _annotation(found, ANNOTATION_SESSION_ID) == session_id:
                return found
        return None

    async def _observe(self, deployment: dict[str, Any]) -> SessionStatus:
        sid = _annotation(deployment, ANNOTATION_SESSION_ID)
        pods = await self._items("pods", self._selector(sid))
        return self._state(deployment, pods)

    def _state(self, deployment: dict[str, Any], pods: list[dict[str, Any]]) -> SessionStatus:
        sid = _annotation(deployment, ANNOTATION_SESSION_ID)
        try:
            generation = int(_annotation(deployment, ANNOTATION_GENERATION) or 0)
        except ValueError:
            generation = 0
        mine = [
            p
            for p in pods
            if _annotation(p, ANNOTATION_SESSION_ID) == sid
            and not p["metadata"].get("deletionTimestamp")
        ]
        meta: dict[str, JsonValue] = {
            "deployment": deployment["metadata"]["name"],
            "namespace": self.config.namespace,
        }
        state: SessionState
        vnc = None
        if deployment["metadata"].get("deletionTimestamp"):
            state, detail = "stopping", "the Deployment is being deleted"
        elif _annotation(deployment, ANNOTATION_DESIRED) == "hibernated":
            state, detail = "hibernated", "scaled to zero; the home claim is kept"
        elif not mine:
            state, detail = "starting", "waiting for the Deployment's pod"
        else:
            pod = max(mine, key=lambda p: str(p["metadata"].get("creationTimestamp", "")))
            meta["pod"] = pod["metadata"]["name"]
            state, detail = _pod_state(pod)
            if state == "running":
                vnc = self._endpoint(sid, deployment)
        return SessionStatus(
            session_id=sid,
            generation=generation,
            state=state,
            detail=detail,
            vnc=vnc,
            platform_metadata=meta,
        )

    def _endpoint(self, session_id: str, deployment: dict[str, Any]) -> VncEndpoint:
        spec = _spec(deployment)
        port = spec.vnc_port if spec is not None else 5900
        name = deployment["metadata"]["name"]
        if self.config.vnc_access == "service":
            return VncEndpoint(host=f"{name}.{self.config.namespace}.svc", port=port)
        forwarder = _forwarder(
            self._forward_key(session_id),
            lambda: _Forwarder(self, self._pod_selector(session_id), session_id, port),
        )
        return VncEndpoint(host="127.0.0.1", port=forwarder.port)

    async def _await_ready(self, session_id: str, generation: int) -> SessionStatus:
        timeout = self.config.k8s_start_timeout
        deadline = time.monotonic() + timeout
        detail = ""
        while True:
            found = await self._deployment(session_id)
            if found is None:
                raise PlatformError(f"the Deployment of session {session_id!r} was removed")
            pods = await self._items("pods", self._selector(session_id))
            mine = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
            if mine:
                pod = max(mine, key=lambda p: str(p["metadata"].get("creationTimestamp", "")))
                state, detail = _pod_state(pod)
                reason = _waiting_reason(pod)
                if state == "running":
                    self._starting.discard(session_id)
                    return self._state(found, pods)
                if state == "failed" or reason in _FAILING:
                    raise PlatformError(f"session {session_id!r} cannot start: {detail}")
            if time.monotonic() > deadline:
                raise PlatformError(
                    f"session {session_id!r} was not ready within K8S_START_TIMEOUT "
                    f"({timeout:g}s): {detail or 'no pod was made'}"
                )
            await asyncio.sleep(_POLL_S)

    # -- the API -----------------------------------------------------------------------------

    def _labels(self, spec: SessionSpec) -> dict[str, str]:
        labels: dict[str, str] = {}
        for key, value in spec.labels.items():
            if key in (LABEL_SESSION_ID, LABEL_AGENT_ID, LABEL_USER, LABEL_TEMPLATE):
                labels[key] = label_value(value)
            elif not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value) or len(value) > 63:
                raise PlatformError(
                    f"the template's label {key}={value!r} is not a valid Kubernetes label"
                )
            else:
                labels[key] = value
        # The seed guide's short labels win over a template's, as the standard ones do.
        labels[LABEL_APP] = APP_SESSION
        labels[LABEL_SESSION] = label_value(spec.session_id)
        return labels

    def _selector(self, session_id: str | None = None) -> str:
        parts = [
            f"{LABEL_AGENT_ID}={label_value(self.agent_id)}",
            f"{LABEL_MANAGED_BY}={MANAGED_BY}",
        ]
        if session_id is not None:
            parts.append(f"{LABEL_SESSION_ID}={label_value(session_id)}")
        return ",".join(parts)

    def _pod_selector(self, session_id: str) -> dict[str, str]:
        return {
            LABEL_SESSION_ID: label_value(session_id),
            LABEL_AGENT_ID: label_value(self.agent_id),
            LABEL_MANAGED_BY: MANAGED_BY,
        }

    def _ours(self, obj: dict[str, Any], *, agent: bool = True) -> bool:
        labels = obj["metadata"].get("labels") or {}
        if labels.get(LABEL_MANAGED_BY) != MANAGED_BY:
            return False
        return not agent or labels.get(LABEL_AGENT_ID) == label_value(self.agent_id)

    def _forward_key(self, session_id: str) -> tuple[str, str, str]:
        return (
            self.client.server or str(self.config.kubeconfig),
            self.config.namespace,
            session_id,
        )

    def _core(self, resource: str, name: str | None = None) -> str:
        path = f"/api/v1/namespaces/{self.config.namespace}/{resource}"
        return f"{path}/{name}" if name is not None else path

    def _apps(self, resource: str, name: str | None = None) -> str:
        path = f"/apis/apps/v1/namespaces/{self.config.namespace}/{resource}"
        return f"{path}/{name}" if name is not None else path

    async def _items(self, resource: str, selector: str) -> list[dict[str, Any]]:
        path = (self._apps if resource == "deployments" else self._core)(resource)
        answer = await self._api(
            f"list {resource}", "GET", path, query=[("labelSelector", selector)]
        )
        return [dict(i) for i in answer.get("items") or []]

    async def _get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self._api(f"read {path.rsplit('/', 2)[-2]}", "GET", path, expect=(404,))
        except ApiError:
            return None

    async def _api(
        self,
        what: str,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        query: list[tuple[str, str]] | None = None,
        expect: tuple[int, ...] = (),
    ) -> dict[str, Any]:
        """One call to the API server.

        Raises:
            ApiError: an error whose status is in ``expect``, for the caller to handle.
            PlatformError: any other failure, saying what to fix.
        """
        try:
            return await self.client.request(method, path, body=body, query=query)
        except Unreachable as exc:
            raise PlatformError(
                f"cannot {what}: the Kubernetes API server {self.client.where()} did not answer "
                f"({exc}); is the cluster up, and KUBECONFIG right?"
            ) from None
        except ApiError as exc:
            if exc.status in expect:
                raise
            ns = self.config.namespace
            if exc.status == 403:
                raise PlatformError(
                    f"cannot {what}: forbidden ({exc.message}); bind the agent's service "
                    f"account to the Role in streamspace_k8s/rbac.yaml in namespace {ns}"
                ) from None
            if exc.status == 404 and method == "POST":
                raise PlatformError(
                    f"cannot {what}: {exc.message}; does NAMESPACE={ns} exist? "
                    f"(kubectl create namespace {ns})"
                ) from None
            raise PlatformError(f"cannot {what}: {exc.message} (HTTP {exc.status})") from None


# -- port-forward ----------------------------------------------------------------------------


class _Forwarder:
    """A port on 127.0.0.1 whose connections are forwarded to the session's ready pod
    through the API server's ``pods/portforward`` (WebSocket, ``v4.channel.k8s.io``).

    Threads, not the event loop: the official client's port-forward is blocking, and a
    forwarder outlives the event loop of any one caller."""

    def __init__(
        self, platform: KubernetesPlatform, selector: dict[str, str], session_id: str, port: int
    ) -> None:
        self.platform = platform
        self.selector = ",".join(f"{k}={v}" for k, v in selector.items())
        self.session_id = session_id
        self.remote_port = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name=f"vnc-forward-{session_id}", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _pod(self, api: k8s.ApiClient) -> str | None:
        config = self.platform.config
        core = k8s.CoreV1Api(api)
        pods = core.list_namespaced_pod(
            config.namespace, label_selector=self.selector, _request_timeout=config.kube_api_timeout
        )
        for pod in pods.items or []:
            conditions = (pod.status.conditions if pod.status else None) or []
            if any(c.type == "Ready" and c.status == "True" for c in conditions):
                return str(pod.metadata.name) if pod.metadata is not None else None
        return None

    def _serve(self, conn: socket.socket) -> None:
        try:
            api = self.platform.client.built()
            if api is None:
                return
            name = self._pod(api)
            if name is None:
                log.warning("VNC of session %s: no ready pod to forward to", self.session_id)
                return
            core = k8s.CoreV1Api(api)
            forward = portforward(
                core.connect_get_namespaced_pod_portforward,
                name,
                self.platform.config.namespace,
                ports=str(self.remote_port),
            )
            try:
                _pump(conn, forward.socket(self.remote_port))
            finally:
                forward.close()
        except Exception as exc:
            log.warning("VNC of session %s: port-forward failed: %s", self.session_id, exc)
        finally:
            conn.close()


def _pump(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b.fileno(), selectors.EVENT_READ, a)
        peers = {a.fileno(): (a, b), b.fileno(): (b, a)}
        while True:
            for key, _ in sel.select():
                src, dst = peers[key.fd]
                try:
                    data = src.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                dst.sendall(data)


_FORWARDERS: dict[tuple[str, str, str], _Forwarder] = {}
_FORWARDERS_LOCK = threading.Lock()


def _forwarder(key: tuple[str, str, str], make: Callable[[], _Forwarder]) -> _Forwarder:
    """The one forwarder of a session in this process (every platform object shares it,
    so a restarted platform object reports the same endpoint)."""
    with _FORWARDERS_LOCK:
        found = _FORWARDERS.get(key)
        if found is None:
            found = _FORWARDERS[key] = make()
        return found


def _stop_forwarder(key: tuple[str, str, str]) -> None:
    with _FORWARDERS_LOCK:
        found = _FORWARDERS.pop(key, None)
    if found is not None:
        found.close()


# -- helpers ---------------------------------------------------------------------------------


def label_value(text: str) -> str:
    """Return ``text`` as a label value: itself when valid, else a cleaned, hashed form."""
    if _LABEL_VALUE.match(text) and len(text) <= 63:
        return text
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")[:40].strip("-_.") or "x"
    return f"{cleaned}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _dns(text: str, limit: int) -> str:
    """Return ``text`` as part of a DNS-1035 label, unique for each ``text``."""
    if re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", text) and len(text) <= limit:
        return text
    cleaned = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[: limit - 11].strip("-")
    return f"{cleaned or 'x'}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _annotation(obj: dict[str, Any], key: str) -> str:
    return str((obj["metadata"].get("annotations") or {}).get(key, ""))


def _spec(deployment: dict[str, Any]) -> SessionSpec | None:
    raw = _annotation(deployment, ANNOTATION_SPEC)
    try:
        return SessionSpec.model_validate_json(raw) if raw else None
    except ValidationError:
        return None


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _service_body(
    name: str,
    namespace: str,
    labels: dict[str, str],
    port: int,
    *,
    selector: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": "ClusterIP",
            "selector": selector or dict(labels),
            "ports": [{"name": "vnc", "port": port, "targetPort": "vnc", "protocol": "TCP"}],
        },
    }


def _resources(spec: SessionSpec) -> dict[str, dict[str, str]]:
    r = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if r.cpu_request_m is not None:
        requests["cpu"] = f"{r.cpu_request_m}m"
    if r.memory_request_mib is not None:
        requests["memory"] = f"{r.memory_request_mib}Mi"
    if r.cpu_limit_m is not None:
        limits["cpu"] = f"{r.cpu_limit_m}m"
    if r.memory_limit_mib is not None:
        limits["memory"] = f"{r.memory_limit_mib}Mi"
    out: dict[str, dict[str, str]] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _waiting_reason(pod: dict[str, Any]) -> str:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting:
            return str(waiting.get("reason") or "")
    return ""


def _pod_state(pod: dict[str, Any]) -> tuple[SessionState, str]:
    """What a session is, from its pod: ``starting`` with Kubernetes's reason while it is
    pending, ``running`` once Ready, ``failed`` with the container's reason."""
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    scheduled = conditions.get("PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        why = scheduled.get("reason") or "Unschedulable"
        return "starting", f"{why}: {scheduled.get('message', '')}".rstrip(": ")
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        last = (cs.get("lastState") or {}).get("terminated") or {}
        if (
            "terminated" in state
            or (state.get("waiting") or {}).get("reason") == "CrashLoopBackOff"
        ):
            ended = state.get("terminated") or last
            why = ended.get("reason") or "Error"
            code = ended.get("exitCode")
            lead = "CrashLoopBackOff: " if "waiting" in state else ""
            return "failed", f"{lead}the container exited ({why}, exit code {code})"
        waiting = state.get("waiting")
        if waiting:
            reason = waiting.get("reason") or "Waiting"
            message = waiting.get("message") or ""
            return "starting", f"{reason}: {message}" if message else reason
    ready = conditions.get("Ready")
    if status.get("phase") == "Running" and ready is not None and ready.get("status") == "True":
        return "running", ""
    if status.get("phase") in ("Failed", "Succeeded"):
        return "failed", f"the pod {status.get('phase', '').lower()} ({status.get('reason', '')})"
    if status.get("phase") == "Running":
        return "starting", "waiting for the VNC server (readiness probe)"
    return "starting", "Pending"
