"""A small, stateful fake Kubernetes API server for the tests, with a docker-backed kubelet.

It serves, over real HTTP on 127.0.0.1, the calls the plugin makes, with the behaviour of a
real API server that those calls rely on (shapes from the Kubernetes API reference):

* every object gets ``uid``, ``creationTimestamp`` and a ``resourceVersion`` from one
  counter; a PUT carrying a stale ``resourceVersion`` is 409 ``Conflict``; a create of an
  existing name is 409 ``AlreadyExists``; a missing object, or a create in a namespace that
  does not exist, is 404 ``NotFound``; errors are ``Status`` objects;
* ``generateName``; ``metadata.generation`` that grows when the spec changes;
* status subresources: a PUT of the main resource keeps the stored status;
* ``labelSelector`` (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``);
* garbage collection by ``ownerReferences`` (background): when an owner is gone, its
  dependents are deleted;
* a Deployment controller (Deployment → ReplicaSet → Pods, ``Recreate``) and a kubelet that
  runs each Pod's first container with Docker, ports published on 127.0.0.1 only, PVCs
  and emptyDirs as named volumes; Pod status as a kubelet reports it (ContainerCreating,
  ErrImagePull / ImagePullBackOff, Running and Ready once the TCP readiness probe answers,
  CrashLoopBackOff with the last termination); and ``pods/portforward`` over WebSocket
  (``v4.channel.k8s.io``) to the container's published port.

It records every call as ``(verb, group, resource)``, as RBAC sees it, so a test can compare
them with the RBAC manifest; ``forbid`` makes a verb on a resource 403 Forbidden.

What it leaves out: watches, PATCH, finalizers, foreground deletion, admission,
scheduling (every Pod is scheduled at once; a Pod with a ``nodeSelector`` key
``fake.streamspace.io/unschedulable`` stays Pending as Unschedulable).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import docker
from aiohttp import WSMsgType, web

T = TypeVar("T")

RUN_LABEL = "streamspace.test/fakeapi"


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    kind: str
    resource: str
    status_subresource: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS: dict[tuple[str, str], Kind] = {
    ("coordination.k8s.io", "leases"): Kind("coordination.k8s.io", "v1", "Lease", "leases", False),
    ("apps", "deployments"): Kind("apps", "v1", "Deployment", "deployments", True),
    ("apps", "replicasets"): Kind("apps", "v1", "ReplicaSet", "replicasets", True),
    ("", "pods"): Kind("", "v1", "Pod", "pods", True),
    ("", "services"): Kind("", "v1", "Service", "services", True),
    ("", "persistentvolumeclaims"): Kind(
        "", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", True
    ),
}

_LABEL_KEY = re.compile(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_MICRO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)")
_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_SET_REQ = re.compile(r"^\s*(!?[^\s!=()]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


class HttpError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details = details or {}

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def _requirement(key: str, op: str, values: set[str]) -> Callable[[dict[str, str]], bool]:
    def matches(labels: dict[str, str]) -> bool:
        if op == "in":
            return labels.get(key) in values
        if op == "notin":
            return labels.get(key) not in values
        return (key in labels) == (op == "exists")

    return matches


def parse_selector(text: str) -> list[Callable[[dict[str, str]], bool]]:
    """Parse a label selector into predicates; 400 BadRequest when it is malformed."""
    preds: list[Callable[[dict[str, str]], bool]] = []
    parts: list[str] = []
    depth, current = 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    for raw in parts:
        part = raw.strip()
        bad = HttpError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        if not part:
            raise bad
        match = _SET_REQ.match(part)
        if match:
            key, op, values = (
                match.group(1),
                match.group(2),
                {v.strip() for v in match.group(3).split(",") if v.strip()},
            )
            if not _LABEL_KEY.match(key):
                raise bad
            if op == "in":
                preds.append(_requirement(key, "in", values))
            else:
                preds.append(_requirement(key, "notin", values))
            continue
        for op in ("!=", "==", "="):
            if op in part:
                key, _, value = (s.strip() for s in part.partition(op))
                if not _LABEL_KEY.match(key) or not _VALUE.fullmatch(value):
                    raise bad
                if op == "!=":
                    preds.append(_requirement(key, "notin", {value}))
                else:
                    preds.append(_requirement(key, "in", {value}))
                break
        else:
            negate = part.startswith("!")
            key = part[1:].strip() if negate else part
            if not _LABEL_KEY.match(key):
                raise bad
            if negate:
                preds.append(_requirement(key, "!", set()))
            else:
                preds.append(_requirement(key, "exists", set()))
    return preds


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _PodRun:
    """What the kubelet knows of one pod's container."""

    container_id: str | None = None
    ports: dict[int, int] = field(default_factory=dict)
    """Container port → port published on 127.0.0.1."""
    task: asyncio.Task[None] | None = None


class FakeApiServer:
    """The fake API server; ``start()`` in a thread of its own, ``stop()`` removes all."""

    def __init__(self, *, docker_host: str | None = None, prefix: str = "") -> None:
        self.prefix = prefix or f"ssk8s{uuid.uuid4().hex[:8]}"
        """Prefix of every Docker container and volume the kubelet makes."""
        self.docker_host = docker_host
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        """(group, resource, namespace, name) → stored object."""
        self.namespaces: set[str] = set()
        self.calls: list[tuple[str, str, str]] = []
        """(verb, group, resource[/subresource]) of every request, as RBAC sees them."""
        self.forbidden: set[tuple[str, str, str]] = set()
        self.bodies: list[dict[str, Any]] = []
        """Every object a client sent in a create or update, as sent."""
        self.token = secrets.token_hex(8)
        self._rv = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._changed: asyncio.Event | None = None
        self._controller: asyncio.Task[None] | None = None
        self._pods: dict[str, _PodRun] = {}
        self._volumes_to_remove: set[str] = set()
        self._known_claim_volumes: set[str] = set()
        self._cleanups: set[asyncio.Task[None]] = set()
        self._docker: docker.APIClient | None = None

    # -- life --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> None:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._serve())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=main, name="fake-apiserver", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake API server did not start")

    async def _serve(self) -> None:
        self._changed = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self._port = sock.getsockname()[1]
        self._controller = asyncio.create_task(self._control())

    def stop(self) -> None:
        if self._loop is None:
            return
        self.call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = None

    async def _shutdown(self) -> None:
        if self._controller is not None:
            self._controller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._controller
        for run in self._pods.values():
            if run.task is not None:
                run.task.cancel()
        if self._docker is not None:
            await asyncio.to_thread(self._docker_cleanup)
        if self._runner is not None:
            await self._runner.cleanup()

    def _docker_cleanup(self) -> None:
        api = self._docker
        assert api is not None
        for _ in range(50):  # removals the kubelet began may still be under way
            rows = api.containers(all=True, filters={"label": f"{RUN_LABEL}={self.prefix}"})
            if not rows:
                break
            for row in rows:
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    api.remove_container(row["Id"], force=True)
            time.sleep(0.1)
        selector = {"label": f"{RUN_LABEL}={self.prefix}"}
        for _ in range(50):  # a volume or network is busy until its containers are gone
            volumes = api.volumes(filters=selector).get("Volumes") or []
            networks = api.networks(filters=selector)
            if not volumes and not networks:
                break
            for volume in volumes:
                with contextlib.suppress(docker.errors.APIError):
                    api.remove_volume(volume["Name"], force=True)
            for net in networks:
                with contextlib.suppress(docker.errors.APIError):
                    api.remove_network(net["Id"])
            time.sleep(0.1)
        api.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the server's loop from another thread and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def write_kubeconfig(self, path: Path, *, token: str | None = None) -> Path:
        """Write a kubeconfig pointing at this server; return its path."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "agent", "user": {"token": token or self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config))
        return path

    # -- helpers for tests (call from any thread) ---------------------------------------------

    def add_namespace(self, name: str) -> None:
        async def add() -> None:
            self.namespaces.add(name)

        self.call(add())

    def get(self, group: str, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        async def get() -> dict[str, Any] | None:
            found = self.objects.get((group, resource, namespace, name))
            return copy.deepcopy(found) if found is not None else None

        return self.call(get())

    def list_objects(self, group: str, resource: str, namespace: str) -> list[dict[str, Any]]:
        async def items() -> list[dict[str, Any]]:
            return [
                copy.deepcopy(o)
                for (g, r, ns, _), o in sorted(self.objects.items())
                if g == group and r == resource and ns == namespace
            ]

        return self.call(items())

    def put_object(self, group: str, resource: str, namespace: str, obj: dict[str, Any]) -> None:
        """Store ``obj`` as a foreign client (kubectl) would create it."""

        async def put() -> None:
            self._create(KINDS[(group, resource)], namespace, copy.deepcopy(obj))

        self.call(put())

    def forbid(self, verb: str, group: str, resource: str) -> None:
        self.forbidden.add((verb, group, resource))

    # -- HTTP --------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                raise HttpError(401, "Unauthorized", "Unauthorized")
            return await self._route(request)
        except HttpError as exc:
            return web.json_response(exc.status(), status=exc.code)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, rest = parts[1], parts[3:]
        else:
            raise HttpError(404, "NotFound", "the server could not find the requested resource")
        if rest[:1] == ["namespaces"] and len(rest) <= 2 and group == "":
            return await self._namespaces(request, rest[1] if len(rest) == 2 else None)
        if len(rest) < 3 or rest[0] != "namespaces":
            raise HttpError(404, "NotFound", "the server could not find the requested resource")
        namespace, resource = rest[1], rest[2]
        name = rest[3] if len(rest) > 3 else None
        sub = rest[4] if len(rest) > 4 else None
        kind = KINDS.get((group, resource))
        if kind is None:
            raise HttpError(404, "NotFound", "the server could not find the requested resource")
        method = request.method
        if sub == "portforward" and resource == "pods" and name is not None:
            # WebSocket upgrades are GETs: API servers before 1.35 authorise them as
            # "get", newer ones (AuthorizePodWebsocketUpgradeCreatePermission) as "create".
            self._authorise("create" if method == "POST" else "get", group, "pods/portforward")
            return await self._portforward(request, namespace, name)
        if sub is not None:
            raise HttpError(404, "NotFound", f"subresource {sub} is not served by the fake")
        verb = {
            ("GET", False): "list",
            ("GET", True): "get",
            ("POST", False): "create",
            ("PUT", True): "update",
            ("DELETE", True): "delete",
        }.get((method, name is not None))
        if verb is None:
            raise HttpError(405, "MethodNotAllowed", f"{method} is not served by the fake")
        self._authorise(verb, group, resource, namespace)
        if verb == "list":
            return web.json_response(self._list(kind, namespace, request.query))
        if verb == "get":
            assert name is not None
            return web.json_response(self._read(kind, namespace, name))
        body = await request.json() if request.can_read_body else None
        if verb in ("create", "update") and isinstance(body, dict):
            self.bodies.append(copy.deepcopy(body))
            if not body.get("kind") or not body.get("apiVersion"):
                # what the API server's decoder says of a body without its type
                missing = "Kind" if not body.get("kind") else "Version"
                raise HttpError(
                    400,
                    "BadRequest",
                    f"Object '{missing}' is missing in '{json.dumps(body)[:200]}'",
                )
        if verb == "create":
            if not isinstance(body, dict):
                raise HttpError(400, "BadRequest", "the request body must be an object")
            dry = request.query.get("dryRun") == "All"
            created = self._create(kind, namespace, body, dry_run=dry)
            return web.json_response(created, status=201)
        assert name is not None
        if verb == "update":
            if not isinstance(body, dict):
                raise HttpError(400, "BadRequest", "the request body must be an object")
            return web.json_response(self._update(kind, namespace, name, body))
        policy = (body or {}).get("propagationPolicy") if isinstance(body, dict) else None
        return web.json_response(self._delete(kind, namespace, name, policy))

    def _authorise(self, verb: str, group: str, resource: str, namespace: str = "") -> None:
        self.calls.append((verb, group, resource))
        if (verb, group, resource) in self.forbidden:
            where = f' in the namespace "{namespace}"' if namespace else ""
            raise HttpError(
                403,
                "Forbidden",
                f"{resource}{'.' + group if group else ''} is forbidden: User "
                f'"system:serviceaccount:streamspace:streamspace-agent" cannot {verb} '
                f'resource "{resource}" in API group "{group}"{where}',
                {"kind": resource},
            )

    async def _namespaces(self, request: web.Request, name: str | None) -> web.StreamResponse:
        if request.method == "POST" and name is None:
            self._authorise("create", "", "namespaces")
            body = await request.json()
            ns = body["metadata"]["name"]
            if ns in self.namespaces:
                raise HttpError(409, "AlreadyExists", f'namespaces "{ns}" already exists')
            self.namespaces.add(ns)
            return web.json_response(self._namespace(ns), status=201)
        if request.method == "GET" and name is not None:
            self._authorise("get", "", "namespaces")
            if name not in self.namespaces:
                raise HttpError(404, "NotFound", f'namespaces "{name}" not found')
            return web.json_response(self._namespace(name))
        raise HttpError(405, "MethodNotAllowed", "not served by the fake")

    def _namespace(self, name: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name))},
            "status": {"phase": "Active"},
        }

    # -- storage -----------------------------------------------------------------------------

    def _bump(self) -> str:
        self._rv += 1
        if self._changed is not None:
            self._changed.set()
        return str(self._rv)

    def _not_found(self, kind: Kind, name: str) -> HttpError:
        plural = f"{kind.resource}.{kind.group}" if kind.group else kind.resource
        return HttpError(
            404,
            "NotFound",
            f'{plural} "{name}" not found',
            {"name": name, "group": kind.group, "kind": kind.resource},
        )

    def _list(self, kind: Kind, namespace: str, query: Any) -> dict[str, Any]:
        preds = parse_selector(query.get("labelSelector", ""))
        items = []
        for (g, r, ns, _), obj in sorted(self.objects.items()):
            if (g, r, ns) != (kind.group, kind.resource, namespace):
                continue
            labels = obj["metadata"].get("labels") or {}
            if all(p(labels) for p in preds):
                item = copy.deepcopy(obj)
                item.pop("kind", None)
                item.pop("apiVersion", None)
                items.append(item)
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _read(self, kind: Kind, namespace: str, name: str) -> dict[str, Any]:
        found = self.objects.get((kind.group, kind.resource, namespace, name))
        if found is None:
            raise self._not_found(kind, name)
        return copy.deepcopy(found)

    def _check_body(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("kind") not in (None, kind.kind) or body.get("apiVersion") not in (
            None,
            kind.api_version,
        ):
            raise HttpError(
                400,
                "BadRequest",
                f"the object is a {body.get('apiVersion')}/{body.get('kind')}, "
                f"not a {kind.api_version}/{kind.kind}",
            )
        if kind.resource == "leases":
            for name in ("acquireTime", "renewTime"):
                value = (body.get("spec") or {}).get(name)
                if value is not None and not _MICRO_TIME.fullmatch(str(value)):
                    # what apimachinery's MicroTime.UnmarshalJSON says of anything else
                    raise HttpError(
                        400,
                        "BadRequest",
                        f'parsing time "{value}" as "2006-01-02T15:04:05.000000Z07:00": '
                        "cannot parse",
                    )
        meta = body.get("metadata")
        if not isinstance(meta, dict):
            raise HttpError(422, "Invalid", "metadata: Required value")
        for key, value in (meta.get("labels") or {}).items():
            if not _LABEL_KEY.match(key) or len(key.rpartition("/")[2]) > 63:
                raise HttpError(422, "Invalid", f"metadata.labels: Invalid value: {key!r}")
            if not re.fullmatch(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?", value) or (
                len(value) > 63
            ):
                raise HttpError(422, "Invalid", f"metadata.labels: Invalid value: {value!r}")
        return meta

    def _create(
        self, kind: Kind, namespace: str, body: dict[str, Any], *, dry_run: bool = False
    ) -> dict[str, Any]:
        meta = self._check_body(kind, body)
        if meta.get("namespace") not in (None, namespace):
            raise HttpError(
                400, "BadRequest", "the namespace of the object does not match the request"
            )
        if namespace not in self.namespaces:
            raise HttpError(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                {"name": namespace, "kind": "namespaces"},
            )
        name = meta.get("name")
        if not name:
            stem = meta.get("generateName")
            if not stem:
                raise HttpError(
                    422, "Invalid", "metadata.name: Required value: name or generateName"
                )
            alphabet = "bcdfghjklmnpqrstvwxz2456789"
            name = stem + "".join(secrets.choice(alphabet) for _ in range(5))
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 253:
            raise HttpError(422, "Invalid", f"metadata.name: Invalid value: {name!r}")
        key = (kind.group, kind.resource, namespace, name)
        if key in self.objects:
            plural = f"{kind.resource}.{kind.group}" if kind.group else kind.resource
            raise HttpError(
                409,
                "AlreadyExists",
                f'{plural} "{name}" already exists',
                {"name": name, "group": kind.group, "kind": kind.resource},
            )
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        meta = obj["metadata"]
        meta.pop("resourceVersion", None)
        meta.update(
            name=name,
            namespace=namespace,
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
        )
        if "spec" in obj:
            meta["generation"] = 1
        if kind.status_subresource:
            obj["status"] = {}
        if kind.resource == "persistentvolumeclaims":
            obj["status"] = {"phase": "Pending"}
        if kind.resource == "services":
            obj["spec"].setdefault("type", "ClusterIP")
            obj["spec"]["clusterIP"] = f"10.96.{self._rv % 250}.{len(self.objects) % 250 + 1}"
        if dry_run:
            return obj
        meta["resourceVersion"] = self._bump()
        self.objects[key] = obj
        return copy.deepcopy(obj)

    def _update(
        self, kind: Kind, namespace: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        meta = self._check_body(kind, body)
        key = (kind.group, kind.resource, namespace, name)
        stored = self.objects.get(key)
        if stored is None:
            raise self._not_found(kind, name)
        if meta.get("name") not in (None, name):
            raise HttpError(400, "BadRequest", "the name of the object does not match the URL")
        wanted = meta.get("resourceVersion")
        if wanted and wanted != stored["metadata"]["resourceVersion"]:
            plural = f"{kind.resource}.{kind.group}" if kind.group else kind.resource
            raise HttpError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {plural} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                {"name": name, "group": kind.group, "kind": kind.resource},
            )
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        old_meta = stored["metadata"]
        new_meta = obj["metadata"]
        for keep in ("uid", "creationTimestamp", "namespace", "name", "generation"):
            if keep in old_meta:
                new_meta[keep] = old_meta[keep]
        if kind.status_subresource:
            obj["status"] = copy.deepcopy(stored.get("status", {}))
        if "spec" in obj and obj.get("spec") != stored.get("spec"):
            new_meta["generation"] = int(old_meta.get("generation", 0)) + 1
        if kind.resource == "services":
            obj["spec"]["clusterIP"] = stored["spec"].get("clusterIP")
        new_meta["resourceVersion"] = self._bump()
        self.objects[key] = obj
        return copy.deepcopy(obj)

    def _delete(self, kind: Kind, namespace: str, name: str, policy: str | None) -> dict[str, Any]:
        key = (kind.group, kind.resource, namespace, name)
        stored = self.objects.pop(key, None)
        if stored is None:
            raise self._not_found(kind, name)
        self._bump()
        if policy == "Orphan":
            uid = stored["metadata"]["uid"]
            for obj in self.objects.values():
                refs = obj["metadata"].get("ownerReferences") or []
                kept = [r for r in refs if r.get("uid") != uid]
                if len(kept) != len(refs):
                    obj["metadata"]["ownerReferences"] = kept
                    obj["metadata"]["resourceVersion"] = self._bump()
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {
                "name": name,
                "group": kind.group,
                "kind": kind.resource,
                "uid": stored["metadata"]["uid"],
            },
        }

    def _set_status(self, key: tuple[str, str, str, str], status: dict[str, Any]) -> None:
        obj = self.objects.get(key)
        if obj is not None and obj.get("status") != status:
            obj["status"] = status
            obj["metadata"]["resourceVersion"] = self._bump()

    # -- controllers -------------------------------------------------------------------------

    async def _control(self) -> None:
        assert self._changed is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.1)
            self._changed.clear()
            try:
                self._collect_garbage()
                self._deployments()
                self._replicasets()
                self._claims()
                self._kubelet()
                await self._remove_volumes()
            except Exception as exc:  # keep serving; a test will see the symptom
                print(f"fake API server controller error: {exc!r}")

    def _collect_garbage(self) -> None:
        while True:
            uids = {o["metadata"]["uid"] for o in self.objects.values()}
            orphans = [
                key
                for key, obj in self.objects.items()
                if (refs := obj["metadata"].get("ownerReferences"))
                and all(r.get("uid") not in uids for r in refs)
            ]
            if not orphans:
                return
            for key in orphans:
                del self.objects[key]
            self._bump()

    def _owned(self, resource: str, owner: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
        uid = owner["metadata"]["uid"]
        return [
            (key, obj)
            for key, obj in self.objects.items()
            if key[1] == resource
            and any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])
        ]

    @staticmethod
    def _owner_ref(owner: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def _deployments(self) -> None:
        for key, dep in list(self.objects.items()):
            if key[1] != "deployments":
                continue
            ns = key[2]
            template = dep["spec"]["template"]
            digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
            rs_name = f"{dep['metadata']['name']}-{digest}"
            replicas = int(dep["spec"].get("replicas", 1))
            owned = self._owned("replicasets", dep)
            for rs_key, _ in owned:
                if rs_key[3] != rs_name:  # Recreate: the old ReplicaSet goes first
                    del self.objects[rs_key]
                    self._bump()
            rs_key = ("apps", "replicasets", ns, rs_name)
            rs = self.objects.get(rs_key)
            if rs is None:
                labels = {**(template["metadata"].get("labels") or {}), "pod-template-hash": digest}
                rs_template = copy.deepcopy(template)
                rs_template["metadata"]["labels"] = labels
                self._create(
                    KINDS[("apps", "replicasets")],
                    ns,
                    {
                        "metadata": {
                            "name": rs_name,
                            "labels": labels,
                            "ownerReferences": [self._owner_ref(dep)],
                        },
                        "spec": {
                            "replicas": replicas,
                            "selector": dep["spec"]["selector"],
                            "template": rs_template,
                        },
                    },
                )
            elif rs["spec"]["replicas"] != replicas:
                rs["spec"]["replicas"] = replicas
                rs["metadata"]["resourceVersion"] = self._bump()
            pods = [
                p
                for _, rs_obj in self._owned("replicasets", dep)
                for _, p in self._owned("pods", rs_obj)
            ]
            ready = sum(1 for p in pods if _pod_ready(p))
            status: dict[str, Any] = {
                "observedGeneration": dep["metadata"].get("generation", 1),
                "replicas": len(pods),
                "updatedReplicas": len(pods),
            }
            if ready:
                status["readyReplicas"] = ready
                status["availableReplicas"] = ready
            self._set_status(key, status)

    def _replicasets(self) -> None:
        for key, rs in list(self.objects.items()):
            if key[1] != "replicasets":
                continue
            pods = self._owned("pods", rs)
            want = int(rs["spec"].get("replicas", 1))
            for pod_key, _ in pods[want:]:
                del self.objects[pod_key]
                self._bump()
            for _ in range(want - len(pods)):
                template = copy.deepcopy(rs["spec"]["template"])
                self._create(
                    KINDS[("", "pods")],
                    key[2],
                    {
                        "metadata": {
                            "generateName": f"{rs['metadata']['name']}-",
                            "labels": template["metadata"].get("labels") or {},
                            "annotations": template["metadata"].get("annotations") or {},
                            "ownerReferences": [self._owner_ref(rs)],
                        },
                        "spec": template["spec"],
                    },
                )
            self._set_status(
                key,
                {
                    "replicas": min(len(pods), want),
                    "observedGeneration": rs["metadata"]["generation"],
                },
            )

    def _claims(self) -> None:
        for key, pvc in self.objects.items():
            if key[1] == "persistentvolumeclaims" and pvc["status"].get("phase") != "Bound":
                requested = pvc["spec"]["resources"]["requests"]["storage"]
                pvc["status"] = {
                    "phase": "Bound",
                    "accessModes": pvc["spec"]["accessModes"],
                    "capacity": {"storage": requested},
                }
                pvc["spec"]["volumeName"] = f"pvc-{pvc['metadata']['uid']}"
                pvc["metadata"]["resourceVersion"] = self._bump()

    def volume_name(self, namespace: str, claim: str) -> str:
        """The Docker volume backing a PVC."""
        return f"{self.prefix}-pvc-{namespace}-{claim}"

    def _kubelet(self) -> None:
        live = {
            obj["metadata"]["uid"]: key for key, obj in self.objects.items() if key[1] == "pods"
        }
        for uid, key in live.items():
            if uid not in self._pods:
                run = _PodRun()
                self._pods[uid] = run
                run.task = asyncio.create_task(self._run_pod_reporting(key, uid, run))
        for uid in [u for u in self._pods if u not in live]:
            run = self._pods.pop(uid)
            if run.task is not None:
                run.task.cancel()
            task = asyncio.create_task(self._remove_container(run))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
        claims = {
            self.volume_name(k[2], k[3]) for k in self.objects if k[1] == "persistentvolumeclaims"
        }
        for name in list(self._known_claim_volumes):
            if name not in claims:
                self._known_claim_volumes.discard(name)
                self._volumes_to_remove.add(name)

    async def _engine(self, call: Callable[[docker.APIClient], T]) -> T:
        if self._docker is None:
            self._docker = docker.APIClient(
                base_url=self.docker_host or "unix:///var/run/docker.sock", version="auto"
            )
        api = self._docker
        return await asyncio.to_thread(call, api)

    async def _remove_container(self, run: _PodRun) -> None:
        if run.container_id is None:
            return
        cid = run.container_id

        def remove(api: docker.APIClient) -> None:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                api.remove_container(cid, force=True, v=True)

        await self._engine(remove)

    async def _remove_volumes(self) -> None:
        for name in list(self._volumes_to_remove):

            def remove(api: docker.APIClient, name: str = name) -> bool:
                try:
                    api.remove_volume(name)
                except docker.errors.NotFound:
                    return True
                except docker.errors.APIError:
                    return False  # still in use by a container being removed
                return True

            if await self._engine(remove):
                self._volumes_to_remove.discard(name)

    def _pod_status(
        self,
        key: tuple[str, str, str, str],
        phase: str,
        container: dict[str, Any],
        *,
        ready: bool = False,
        scheduled: bool = True,
        unschedulable: str = "",
    ) -> None:
        pod = self.objects.get(key)
        if pod is None:
            return
        now = _now()
        conditions = [
            {
                "type": "PodScheduled",
                "status": "True" if scheduled else "False",
                "lastTransitionTime": now,
            }
        ]
        if unschedulable:
            conditions[0].update(reason="Unschedulable", message=unschedulable)
        if scheduled:
            conditions.append(
                {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now}
            )
        status: dict[str, Any] = {"phase": phase, "conditions": conditions}
        if scheduled:
            status.update(hostIP="172.18.0.2", podIP="10.244.0.10", startTime=now)
            status["containerStatuses"] = [container]
        old = pod.get("status") or {}
        # keep transition times stable when nothing else changed
        if {**old, "conditions": None, "startTime": None} == {
            **status,
            "conditions": None,
            "startTime": None,
        } and [(c["type"], c["status"]) for c in old.get("conditions", [])] == [
            (c["type"], c["status"]) for c in conditions
        ]:
            return
        self._set_status(key, status)

    async def _run_pod_reporting(
        self, key: tuple[str, str, str, str], uid: str, run: _PodRun
    ) -> None:
        """Run the pod; an engine error is the kubelet's CreateContainerError."""
        try:
            await self._run_pod(key, uid, run)
        except docker.errors.APIError as exc:
            pod = self.objects.get(key)
            if pod is not None:
                c = pod["spec"]["containers"][0]
                self._pod_status(
                    key,
                    "Pending",
                    {
                        "name": c["name"],
                        "image": c["image"],
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "started": False,
                        "state": {
                            "waiting": {
                                "reason": "CreateContainerError",
                                "message": str(exc.explanation or exc),
                            }
                        },
                    },
                )

    async def _run_pod(self, key: tuple[str, str, str, str], uid: str, run: _PodRun) -> None:
        pod = self.objects[key]
        spec = pod["spec"]
        c = spec["containers"][0]
        base = {
            "name": c["name"],
            "image": c["image"],
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "started": False,
        }
        selector = spec.get("nodeSelector") or {}
        if "fake.streamspace.io/unschedulable" in selector:
            self._pod_status(
                key,
                "Pending",
                base,
                scheduled=False,
                unschedulable="0/1 nodes are available: 1 node(s) didn't match "
                "Pod's node affinity/selector.",
            )
            return
        waiting = {**base, "state": {"waiting": {"reason": "ContainerCreating"}}}
        self._pod_status(key, "Pending", waiting)

        def has_image(api: docker.APIClient) -> bool:
            try:
                api.inspect_image(c["image"])
            except docker.errors.ImageNotFound:
                return False
            return True

        if not await self._engine(has_image):
            policy = c.get("imagePullPolicy", "IfNotPresent")
            if policy == "Never":
                reason, message = (
                    "ErrImageNeverPull",
                    (f'Container image "{c["image"]}" is not present with pull policy of Never'),
                )
                self._pod_status(
                    key,
                    "Pending",
                    {**base, "state": {"waiting": {"reason": reason, "message": message}}},
                )
                return
            self._pod_status(
                key,
                "Pending",
                {
                    **base,
                    "state": {
                        "waiting": {
                            "reason": "ErrImagePull",
                            "message": f'failed to pull and unpack image "{c["image"]}": not found',
                        }
                    },
                },
            )
            await asyncio.sleep(0.3)  # the kubelet's back-off, shortened
            self._pod_status(
                key,
                "Pending",
                {
                    **base,
                    "state": {
                        "waiting": {
                            "reason": "ImagePullBackOff",
                            "message": f'Back-off pulling image "{c["image"]}"',
                        }
                    },
                },
            )
            return

        ns = key[2]
        binds: list[str] = []
        volumes: dict[str, str] = {}
        for vol in spec.get("volumes") or []:
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                if ("", "persistentvolumeclaims", ns, claim) not in self.objects:
                    self._pod_status(key, "Pending", {**waiting})
                    return  # a real kubelet waits for the claim; the fake gives up
                name = self.volume_name(ns, claim)
                self._known_claim_volumes.add(name)
            else:
                name = f"{self.prefix}-empty-{uid[:8]}-{vol['name']}"
            volumes[vol["name"]] = name
        for mount in c.get("volumeMounts") or []:
            binds.append(f"{volumes[mount['name']]}:{mount['mountPath']}")
        sc = {**(spec.get("securityContext") or {}), **(c.get("securityContext") or {})}
        user = None
        if "runAsUser" in sc:
            user = f"{sc['runAsUser']}:{sc.get('runAsGroup', sc.get('fsGroup', sc['runAsUser']))}"
        ports = [int(p["containerPort"]) for p in c.get("ports") or []]
        env = {e["name"]: e.get("value", "") for e in c.get("env") or []}
        labels = {RUN_LABEL: self.prefix}

        network = f"{self.prefix}-net"

        def create(api: docker.APIClient) -> tuple[str, dict[int, int]]:
            if not api.networks(names=[network]):
                with contextlib.suppress(docker.errors.APIError):
                    api.create_network(network, driver="bridge", labels=labels)
            for name in volumes.values():
                api.create_volume(name, labels=labels)
            host_config = api.create_host_config(
                binds=binds,
                port_bindings={p: ("127.0.0.1", None) for p in ports},
                network_mode=network,
            )
            made = api.create_container(
                c["image"],
                name=f"{self.prefix}-{ns}-{pod['metadata']['name']}",
                entrypoint=c.get("command"),
                command=c.get("args"),
                environment=env,
                user=user,
                labels=labels,
                ports=ports,
                host_config=host_config,
            )
            cid = made["Id"]
            api.start(cid)
            published: dict[int, int] = {}
            info = api.inspect_container(cid)
            for spec_port, bindings in (info["NetworkSettings"]["Ports"] or {}).items():
                for b in bindings or []:
                    if b.get("HostIp") == "127.0.0.1":
                        published[int(spec_port.split("/")[0])] = int(b["HostPort"])
            return cid, published

        run.container_id, run.ports = await self._engine(create)
        started = _now()
        running = {
            **base,
            "started": True,
            "containerID": f"docker://{run.container_id}",
            "state": {"running": {"startedAt": started}},
        }
        self._pod_status(key, "Running", running)
        probe = (c.get("readinessProbe") or {}).get("tcpSocket")
        probe_port = None
        if probe is not None:
            target = probe["port"]
            if isinstance(target, str):
                target = next(
                    int(p["containerPort"]) for p in c["ports"] if p.get("name") == target
                )
            probe_port = int(target)
        cid = run.container_id
        assert cid is not None
        ready = False
        while key in self.objects:
            state = (await self._engine(lambda api: api.inspect_container(cid)))["State"]
            if not state["Running"]:
                code = int(state["ExitCode"])
                self._pod_status(
                    key,
                    "Running",
                    {
                        **base,
                        "restartCount": 1,
                        "containerID": f"docker://{cid}",
                        "state": {
                            "waiting": {
                                "reason": "CrashLoopBackOff",
                                "message": f"back-off 10s restarting failed container={c['name']} "
                                f"pod={pod['metadata']['name']}",
                            }
                        },
                        "lastState": {
                            "terminated": {
                                "exitCode": code,
                                "reason": "Completed" if code == 0 else "Error",
                                "startedAt": started,
                                "finishedAt": _now(),
                                "containerID": f"docker://{cid}",
                            }
                        },
                    },
                )
                return
            now_ready = probe_port is None or await self._engine(
                lambda api: listening(api, cid, probe_port)
            )
            if now_ready != ready:
                ready = now_ready
                self._pod_status(key, "Running", {**running, "ready": ready}, ready=ready)
            await asyncio.sleep(0.1)  # the kubelet's probe period, shortened

    # -- port-forward ------------------------------------------------------------------------

    async def _portforward(
        self, request: web.Request, namespace: str, name: str
    ) -> web.StreamResponse:
        pod = self.objects.get(("", "pods", namespace, name))
        if pod is None:
            raise self._not_found(KINDS[("", "pods")], name)
        run = self._pods.get(pod["metadata"]["uid"])
        if (pod.get("status") or {}).get("phase") != "Running" or run is None:
            raise HttpError(400, "BadRequest", f"pod {name} is not running")
        ports = [int(p) for p in request.query.getall("ports", []) for p in p.split(",")]
        if len(ports) != 1:
            raise HttpError(400, "BadRequest", "the fake forwards exactly one port")
        port = ports[0]
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
        if not ws.can_prepare(request).ok:
            raise HttpError(400, "BadRequest", "port-forward needs a WebSocket upgrade")
        await ws.prepare(request)
        if ws.ws_protocol != "v4.channel.k8s.io":
            await ws.close()
            return ws
        prefix = port.to_bytes(2, "little")
        await ws.send_bytes(b"\x00" + prefix)
        await ws.send_bytes(b"\x01" + prefix)
        host_port = run.ports.get(port)
        try:
            if host_port is None:
                raise OSError(f"port {port} is not published")
            reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
        except OSError as exc:
            await ws.send_bytes(
                b"\x01" + f"error forwarding port {port} to pod {name}: {exc}".encode()
            )
            await ws.close()
            return ws

        async def upstream() -> None:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY and msg.data[:1] == b"\x00":
                    writer.write(msg.data[1:])
                    await writer.drain()
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break

        async def downstream() -> None:
            while data := await reader.read(65536):
                await ws.send_bytes(b"\x00" + data)

        up = asyncio.create_task(upstream())
        down = asyncio.create_task(downstream())
        with contextlib.suppress(Exception):
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        writer.close()
        await ws.close()
        return ws


def _pod_ready(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def listening(api: docker.APIClient, container_id: str, port: int) -> bool:
    """Whether something listens on ``port`` inside the container: what a TCP probe's
    connect to the pod's IP would find. Read from the container's /proc/net/tcp*, because a
    connect through Docker's published port succeeds even when nothing listens inside."""
    exec_id = api.exec_create(container_id, ["cat", "/proc/net/tcp", "/proc/net/tcp6"])["Id"]
    table = api.exec_start(exec_id).decode(errors="replace")
    wanted = f":{port:04X}"
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1].endswith(wanted) and fields[3] == "0A":
            return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
