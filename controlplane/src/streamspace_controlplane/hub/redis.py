"""The ``redis`` hub: several control-plane replicas behind one Service, sharing one Redis.

What Redis holds (every key under ``REDIS_KEY_PREFIX``):

- ``agent:{agent_id}:conn:{pod}``: the connection id a replica holds for an agent and when
  it attached, expiring ``AGENT_HEARTBEAT_TIMEOUT`` after the agent's last heartbeat there;
  ``pod:{pod}:agents`` lists them, so the entries of a dead replica are removed at once.
- ``pod:{pod}``: a replica's internal URL, expiring ``REPLICA_TIMEOUT`` after it last said
  it is alive; ``pods`` lists the replicas.
- ``leader``: the replica that runs the cluster-wide passes, a lease of ``REPLICA_TIMEOUT``.
- ``ticket:{key}``: single-use VNC, relay and stream tickets, taken with ``GETDEL``.
- the channel ``inbox:{pod}``: notices for a replica (``wake`` an agent's outbox, run a
  ``schedule`` or ``reconcile`` pass), and ``broadcast`` for all (a session ``event`` was
  stored). They are hints: the PostgreSQL outbox is the record of truth, and every replica
  looks there for due commands each second, so a notice lost with Redis costs at most
  that second (an event stream reads the store at least every 15 s).

A Redis outage leaves the agents connected here served (commands still flow through the
store); replicas cannot reach each other's agents until it is back, which ``/ready`` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import ClassVar, TypeVar, get_args
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streamspace_controlplane.hub.base import AgentConnection, HubUnavailable, Notice, Replica
from streamspace_controlplane.hub.memory import MemoryHub
from streamspace_controlplane.settings import ControlPlaneSettings
from streamspace_sdk.errors import ConfigError
from streamspace_sdk.redact import redact_url

__all__ = ["RedisHub"]

logger = logging.getLogger("streamspace.controlplane.hub")

T = TypeVar("T")

_TIMEOUT_S = 2.0
"""Longest a Redis call may take; a hub call that needs Redis fails after it."""
_OUTBOX_LIMIT = 10_000
"""Most notices waiting to be published; past it new ones are dropped (they are hints)."""
_NOTICES: frozenset[str] = frozenset(get_args(Notice))

# KEYS[1] = the key; ARGV[1] = the value it must hold (a prefix of it for agent entries).
_DELETE_IF_OURS = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, string.len(ARGV[1])) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS[1] = the leader key; ARGV = pod, lease ms. Returns 1 while this pod leads.
_LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class RedisHub(MemoryHub):
    """Agents connected to this replica, and the other replicas, through Redis.

    Raises:
        ConfigError: ``REDIS_URL`` is unset or not a Redis URL, or this replica has no
            address the others can reach (see ``INTERNAL_URL``).
    """

    name: ClassVar[str] = "redis"
    capabilities: ClassVar[frozenset[str]] = frozenset({"multi-replica"})

    def __init__(self, settings: ControlPlaneSettings | None = None) -> None:
        super().__init__(settings)
        settings = self.settings
        if settings.redis_url is None:
            raise ConfigError("REDIS_URL: is required with AGENT_HUB_BACKEND=redis")
        secret = settings.redis_url.get_secret_value()
        scheme = urlsplit(secret).scheme
        userinfo = secret.partition("://")[2].rpartition("@")[0]
        if userinfo and urlsplit(secret).netloc.rpartition("@")[0] != userinfo:
            raise ConfigError(
                "REDIS_URL: its password holds '#', '/', '?' or '@' unencoded; "
                "percent-encode it (urllib.parse.quote(password, safe=''))"
            )
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(
                f"REDIS_URL: must be a redis://, rediss:// or unix:// URL, not {scheme or 'no'} "
                "scheme"
            )
        self.redis_url = redact_url(secret)
        """``REDIS_URL`` without its password, for messages."""
        self.url = settings.replica_url()
        self.agent_ttl_s = settings.agent_heartbeat_timeout
        """An agent entry lives this long after the agent's last heartbeat here."""
        self.replica_ttl_s = settings.replica_timeout
        """A replica silent this long is dead; also the leader's lease."""
        try:
            self._redis: aioredis.Redis = aioredis.Redis.from_url(
                secret,
                decode_responses=True,
                socket_timeout=_TIMEOUT_S,
                socket_connect_timeout=_TIMEOUT_S,
                health_check_interval=30,
            )
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL: {exc}") from None
        self._prefix = settings.redis_key_prefix
        self._delete_if_ours = self._redis.register_script(_DELETE_IF_OURS)
        self._lead = self._redis.register_script(_LEAD)
        self._attached: dict[str, str] = {}
        """Agent id → the entry value written for its current connection here."""
        self._lead_until = 0.0
        """Monotonic time up to which this replica is sure it leads."""
        # (agent id, or None for the leader, or "*" for everyone; notice; argument)
        self._outbox: asyncio.Queue[tuple[str | None, Notice, str]] = asyncio.Queue(_OUTBOX_LIMIT)
        self._tasks: list[asyncio.Task[None]] = []
        self._problem: str | None = None

    # -- keys -------------------------------------------------------------------------------

    def _agent_key(self, agent_id: str, pod: str) -> str:
        return f"{self._prefix}agent:{agent_id}:conn:{pod}"

    def _pod_key(self, pod: str) -> str:
        return f"{self._prefix}pod:{pod}"

    def _pod_agents_key(self, pod: str) -> str:
        return f"{self._prefix}pod:{pod}:agents"

    def _inbox(self, pod: str) -> str:
        return f"{self._prefix}inbox:{pod}"

    @property
    def _pods_key(self) -> str:
        return f"{self._prefix}pods"

    @property
    def _broadcast(self) -> str:
        return f"{self._prefix}broadcast"

    @property
    def _leader_key(self) -> str:
        return f"{self._prefix}leader"

    def _ticket_key(self, key: str) -> str:
        return f"{self._prefix}ticket:{key}"

    @contextlib.asynccontextmanager
    async def _call(self, what: str) -> AsyncIterator[None]:
        """Turn Redis failures into :class:`HubUnavailable` naming ``what`` and the URL."""
        try:
            yield
        except (RedisError, OSError) as exc:
            self._problem = f"redis unreachable at {self.redis_url}: {exc}"
            raise HubUnavailable(f"cannot {what}: {self._problem}") from exc

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Check Redis answers, announce this replica, start its loops.

        Raises:
            HubUnavailable: Redis does not answer at ``REDIS_URL``.
        """
        async with self._call("start the redis hub"):
            await _done(self._redis.ping())
        logger.info("Connected to Redis at %s", self.redis_url)
        await self._beat()
        self._tasks = [
            asyncio.create_task(self._beat_loop(), name="streamspace-hub-beat"),
            asyncio.create_task(self._listen_loop(), name="streamspace-hub-inbox"),
            asyncio.create_task(self._publish_loop(), name="streamspace-hub-outbox"),
        ]
        logger.info(
            "Redis AgentHub initialized (multi-pod mode): replica %s at %s", self.pod, self.url
        )

    async def stop(self) -> None:
        """Stop the loops and withdraw: hand leadership over, remove this replica's entries."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            # Cancelled again until done: redis-py can swallow a cancellation that lands
            # in the middle of a command.
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=1.0)
        try:
            async with self._call("withdraw the replica"):
                await self._delete_if_ours(keys=[self._leader_key], args=[self.pod])
                await self._forget_pod(self.pod)
        except HubUnavailable as exc:
            logger.warning("Leaving Redis entries to expire: %s", exc)
        self._lead_until = 0.0
        await self._redis.aclose()

    # -- this replica's agents --------------------------------------------------------------

    async def attach(self, conn: AgentConnection) -> AgentConnection | None:
        old = await super().attach(conn)
        value = f"{conn.conn_id} {int(time.time() * 1000)}"
        self._attached[conn.agent_id] = value
        try:
            await self._write_entry(conn.agent_id, value)
        except HubUnavailable as exc:
            logger.warning(
                "Agent %s is served here, but other replicas cannot find it: %s",
                conn.agent_id,
                exc,
            )
        return old

    async def detach(self, conn: AgentConnection) -> bool:
        if not await super().detach(conn):
            return False
        self._attached.pop(conn.agent_id, None)
        try:
            async with self._call("remove an agent entry"):
                await self._delete_if_ours(
                    keys=[self._agent_key(conn.agent_id, self.pod)], args=[conn.conn_id + " "]
                )
                await _done(self._redis.srem(self._pod_agents_key(self.pod), conn.agent_id))
        except HubUnavailable as exc:
            logger.warning("Agent %s left; its entry expires by itself: %s", conn.agent_id, exc)
        return True

    async def refresh(self, conn: AgentConnection) -> None:
        value = self._attached.get(conn.agent_id)
        if value is None or self.local(conn.agent_id) is not conn:
            return
        try:
            await self._write_entry(conn.agent_id, value)
        except HubUnavailable as exc:
            logger.warning("Could not refresh agent %s's entry: %s", conn.agent_id, exc)

    async def _write_entry(self, agent_id: str, value: str) -> None:
        async with (
            self._call("record an agent entry"),
            self._redis.pipeline(transaction=False) as pipe,
        ):
            pipe.set(self._agent_key(agent_id, self.pod), value, px=_ms(self.agent_ttl_s))
            pipe.sadd(self._pod_agents_key(self.pod), agent_id)
            await pipe.execute()

    # -- the replicas -----------------------------------------------------------------------

    async def replicas(self) -> dict[str, str]:
        """Return the live replicas: pod id → internal URL.

        Raises:
            HubUnavailable: Redis does not answer.
        """
        async with self._call("list the replicas"):
            pods: dict[str, str] = await _done(self._redis.hgetall(self._pods_key))
            if not pods:
                return {}
            alive = await self._redis.mget([self._pod_key(p) for p in pods])
        return {pod: url for (pod, _), url in zip(pods.items(), alive, strict=True) if url}

    async def locate(self, agent_id: str) -> Replica | None:
        """Return the replica whose entry for the agent is the newest, this one first.

        Raises:
            HubUnavailable: Redis does not answer.
        """
        if self.local(agent_id) is not None:
            return Replica(self.pod, self.url or "")
        others = {p: u for p, u in (await self.replicas()).items() if p != self.pod}
        if not others:
            return None
        async with self._call("locate an agent"):
            entries = await self._redis.mget([self._agent_key(agent_id, p) for p in others])
        best: tuple[int, str] | None = None
        for pod, entry in zip(others, entries, strict=True):
            if entry is None:
                continue
            _conn, _, attached = entry.partition(" ")
            stamp = int(attached) if attached.isdigit() else 0
            if best is None or stamp > best[0]:
                best = (stamp, pod)
        return None if best is None else Replica(best[1], others[best[1]])

    def leading(self) -> bool:
        return time.monotonic() < self._lead_until

    def notify_holder(self, agent_id: str, notice: Notice) -> None:
        if self.local(agent_id) is not None:
            self._deliver(notice, agent_id)
        else:
            self._post(agent_id, notice, agent_id)

    def notify_leader(self, notice: Notice) -> None:
        if self.leading():
            self._deliver(notice)
        else:
            self._post(None, notice, "")

    def notify_all(self, notice: Notice, arg: str) -> None:
        self._post("*", notice, arg)

    def _post(self, agent_id: str | None, notice: Notice, arg: str) -> None:
        try:
            self._outbox.put_nowait((agent_id, notice, arg))
        except asyncio.QueueFull:
            logger.warning("Dropped a %s notice: %d are waiting for Redis", notice, _OUTBOX_LIMIT)

    async def _publish_loop(self) -> None:
        while True:
            agent_id, notice, arg = await self._outbox.get()
            try:
                if agent_id == "*":
                    message = json.dumps({"notice": notice, "arg": arg, "from": self.pod})
                    async with self._call("publish a notice"):
                        await self._redis.publish(self._broadcast, message)
                    continue
                if agent_id is None:
                    async with self._call("find the leader"):
                        pod = await self._redis.get(self._leader_key)
                else:
                    replica = await self.locate(agent_id)
                    pod = None if replica is None else replica.pod
                if pod is None or pod == self.pod:
                    if pod == self.pod:
                        self._deliver(notice, arg)
                    continue
                async with self._call("publish a notice"):
                    await self._redis.publish(
                        self._inbox(pod), json.dumps({"notice": notice, "arg": arg})
                    )
            except HubUnavailable as exc:
                logger.debug("Dropped a %s notice: %s", notice, exc)

    async def _listen_loop(self) -> None:
        delay = 0.1
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._inbox(self.pod), self._broadcast)
                delay = 0.1
                while True:
                    # A bounded wait, not listen(): a quiet channel is no failure, and
                    # each call lets redis-py ping a connection idle for too long.
                    message = await pubsub.get_message(timeout=_TIMEOUT_S / 2)
                    if message is not None:
                        self._on_message(message.get("data"))
            except (RedisError, OSError) as exc:
                self._problem = f"redis unreachable at {self.redis_url}: {exc}"
                logger.warning("Inbox subscription lost (%s); retrying in %.1fs", exc, delay)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.replica_ttl_s / 3)

    def _on_message(self, data: object) -> None:
        try:
            message = json.loads(data)  # type: ignore[arg-type]
            notice, arg = message["notice"], message.get("arg", "")
        except (TypeError, ValueError, KeyError, AttributeError):
            logger.warning("Ignored a malformed hub message: %.200r", data)
            return
        if notice not in _NOTICES or not isinstance(arg, str):
            logger.warning("Ignored an unknown hub notice: %.200r", data)
            return
        if message.get("from") == self.pod:
            return  # our own broadcast: this replica acted on it already
        self._deliver(notice, arg)

    # -- liveness and leadership ------------------------------------------------------------

    async def _beat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.replica_ttl_s / 3)
            try:
                await self._beat()
            except HubUnavailable as exc:
                logger.warning("Replica heartbeat failed: %s", exc)

    async def _beat(self) -> None:
        """Say this replica is alive, take or keep the leadership, and, leading, clear the
        entries of replicas that went silent."""
        sent = time.monotonic()
        ttl = _ms(self.replica_ttl_s)
        async with self._call("announce the replica"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self._pod_key(self.pod), self.url or "", px=ttl)
                pipe.hset(self._pods_key, self.pod, self.url or "")
                await pipe.execute()
            leads = bool(await self._lead(keys=[self._leader_key], args=[self.pod, ttl]))
        self._problem = None
        was_leading = self.leading()
        # Sure of the lease only up to when it was renewed, measured from before the call.
        self._lead_until = sent + self.replica_ttl_s * 0.9 if leads else 0.0
        if leads and not was_leading:
            logger.info("Replica %s leads the cluster-wide passes", self.pod)
            self._deliver("lead")
        elif was_leading and not leads:
            logger.warning("Replica %s no longer leads", self.pod)
        if leads:
            await self._clear_dead()

    async def _clear_dead(self) -> None:
        async with self._call("list the replicas"):
            pods: dict[str, str] = await _done(self._redis.hgetall(self._pods_key))
            others = [p for p in pods if p != self.pod]
            if not others:
                return
            alive = await self._redis.mget([self._pod_key(p) for p in others])
        for pod, url in zip(others, alive, strict=True):
            if url is None:
                await self._forget_pod(pod)
                logger.warning("Replica %s went silent; removed its entries", pod)

    async def _forget_pod(self, pod: str) -> None:
        async with self._call("remove a replica's entries"):
            agents = await _done(self._redis.smembers(self._pod_agents_key(pod)))
            async with self._redis.pipeline(transaction=False) as pipe:
                for agent_id in agents:
                    pipe.delete(self._agent_key(agent_id, pod))
                pipe.delete(self._pod_agents_key(pod), self._pod_key(pod))
                pipe.hdel(self._pods_key, pod)
                await pipe.execute()

    # -- tickets and readiness --------------------------------------------------------------

    async def put_ticket(self, key: str, value: str, ttl_s: float) -> None:
        async with self._call("store a ticket"):
            await self._redis.set(self._ticket_key(key), value, px=_ms(ttl_s))

    async def take_ticket(self, key: str) -> str | None:
        async with self._call("redeem a ticket"):
            value: str | None = await self._redis.getdel(self._ticket_key(key))
        return value

    async def problems(self) -> list[str]:
        try:
            async with self._call("ping"):
                await _done(self._redis.ping())
        except HubUnavailable:
            return [self._problem or f"redis unreachable at {self.redis_url}"]
        self._problem = None
        return []


async def _done(result: Awaitable[T] | T) -> T:
    """Await a redis-py command, whose stubs also allow the synchronous client's result."""
    if inspect.isawaitable(result):
        return await result
    return result


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
