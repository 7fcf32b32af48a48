"""The agent process: elect, connect, register, heartbeat, carry out commands, report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.protocol import State

from streamspace_sdk import drivers
from streamspace_sdk._models import WireModel
from streamspace_sdk.agent._backoff import Backoff
from streamspace_sdk.agent._commands import CommandRunner
from streamspace_sdk.agent._health import HealthServer
from streamspace_sdk.agent._outcomes import Outcome, closed, refused_http
from streamspace_sdk.agent._status import StatusReporter
from streamspace_sdk.agent._vnc import SocketLink, VncRelay
from streamspace_sdk.clock import Clock
from streamspace_sdk.elector import LeaderElector
from streamspace_sdk.errors import ConfigError, DriverNotFound, LeaseLost, ProtocolError
from streamspace_sdk.hooks import Hooks, make_plugin_manager
from streamspace_sdk.lease import Lease, LeaseRecord
from streamspace_sdk.platform import Capacity, Platform, Usage
from streamspace_sdk.protocol import (
    AGENT_PATHS,
    MAX_TEXT_FRAME_BYTES,
    PROTOCOL_VERSION,
    AgentHello,
    AgentWelcome,
    Command,
    CommandAck,
    Error,
    Frame,
    Heartbeat,
    Shutdown,
    VncClose,
    VncCredit,
    VncOpen,
    VncOpened,
    dump_frame,
    error_frame,
    parse_frame,
)
from streamspace_sdk.redact import redact_url
from streamspace_sdk.settings import AgentSettings
from streamspace_sdk.transport import Transport

__all__ = ["AGENT_PATH", "Agent", "agent_url", "event_loop_factory"]

logger = logging.getLogger("streamspace.agent")

AGENT_PATH = AGENT_PATHS[0]
"""The control plane's agent endpoint, appended to ``CONTROL_PLANE_URL``."""

_GOING_AWAY = 1001


def agent_url(control_plane_url: str) -> str:
    """Return the WebSocket URL the agent dials for ``CONTROL_PLANE_URL``.

    A URL that already ends in the agent endpoint (``/api/v1/agents/connect``, or the seed
    Helm values' ``/agent/ws``) is used as it is; any other gets ``/api/v1/agents/connect``
    appended to its path, so ``wss://streamspace.example.com`` and a control plane behind
    a path prefix both work.
    """
    parts = urlsplit(control_plane_url)
    path = parts.path.rstrip("/")
    if not path.endswith(AGENT_PATHS):
        path += AGENT_PATH
    return urlunsplit(parts._replace(path=path))


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return uvloop's loop factory where uvloop is installed, else ``None`` (asyncio's).

    The agent relays every viewer's bytes; uvloop's C event loop costs about a fifth less
    CPU per megabyte relayed (``bench/vnc_relay.py``) and behaves as asyncio's does.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)


def _agent_version() -> str:
    from streamspace_sdk import __version__  # the package imports this module first

    return __version__


def _min(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


class Agent:
    """A StreamSpace agent: runs sessions on a platform for the control plane it dials.

    ``Agent(settings, platform=MyPlatform(...)).run()`` is a complete agent process. It:

    * with ``ENABLE_HA``, contends for the leader lease and connects only while it leads
      (losing the lease closes the socket at once; sessions keep running);
    * dials ``CONTROL_PLANE_URL`` (see :func:`agent_url`) with ``AGENT_TOKEN``, registers
      with ``agent.hello`` listing every session the platform reports, so running sessions
      are adopted, and heartbeats at the interval the control plane asks for (or
      ``HEARTBEAT_INTERVAL``, the smaller);
    * acknowledges each command at once, carries it out (one at a time per session,
      concurrently across sessions) and answers with its result; a result the socket could
      not take is sent again after reconnecting;
    * reports ``session.status`` for every change it observes: after commands, and from a
      poll of the platform every heartbeat interval;
    * reconnects with capped exponential backoff and full jitter (:class:`Backoff`);
    * serves ``/health`` and ``/ready`` on ``HEALTH_PORT``;
    * on SIGTERM or SIGINT (:meth:`run`) or :meth:`stop`: takes no more commands, waits up
      to :attr:`drain_timeout_s` for those in progress, sends ``shutdown``, closes the
      socket, releases the lease and closes the platform, leaving every session running.

    Args:
        settings: the agent's settings (:class:`~streamspace_sdk.settings.AgentSettings`).
        platform: what runs sessions; by default the ``PLATFORM`` driver from the
            ``streamspace.platforms`` entry points, built for ``AGENT_ID``.
        lease: the leader lease replicas contend for; by default the ``HA_BACKEND`` driver
            (see :meth:`AgentSettings.lease_driver`) when ``ENABLE_HA`` is true. Passing one
            turns leader election on.
        hooks: hook plugins; by default every plugin installed in the ``streamspace`` group
            (as ``STREAMSPACE_LOAD_PLUGINS`` allows).
        clock: times the leader election and the lease a default ``lease`` is built with (a
            ``FakeClock`` in tests); socket timeouts and heartbeats use the event loop's time.
        backoff: the waits between connection attempts; tests pass short ones.

    Raises:
        ConfigError: lease timings that cannot work.
        DriverNotFound: ``PLATFORM`` or ``HA_BACKEND`` (or, unset, its default: ``kubernetes``
            with ``PLATFORM=kubernetes``, else ``file``) names a driver that is not installed;
            the message names the package to install.
        DriverLoadError: the driver is installed but fails to load.
    """

    welcome_timeout_s: float = 10.0
    """Seconds to wait for ``agent.welcome`` after the hello (the control plane's own hello
    timeout is 10 s too)."""
    open_timeout_s: float = 10.0
    """Seconds the TCP, TLS and WebSocket handshakes may take together."""
    close_timeout_s: float = 2.0
    """Seconds to wait for the control plane's answer to a close; then the socket is dropped."""
    drain_timeout_s: float = 10.0
    """Seconds a stopping agent waits for commands in progress. Kubernetes gives a pod 30 s
    between SIGTERM and SIGKILL, so 10 s leaves room for the rest of the shutdown."""

    def __init__(
        self,
        settings: AgentSettings,
        platform: Platform | None = None,
        *,
        lease: Lease | None = None,
        hooks: Hooks | None = None,
        clock: Clock | None = None,
        backoff: Backoff | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.settings = settings
        self.url = agent_url(settings.control_plane_url)
        self._shown_url = redact_url(self.url)
        """The URL as logs and ``/ready`` show it: a password in it as ``***``."""
        self.identity = f"{socket.gethostname()}_{uuid.uuid4().hex}"
        """This process's name in the leader election: host name and a random suffix, as
        client-go makes them, so a restarted process is never taken for its predecessor."""
        self.backoff = backoff if backoff is not None else Backoff()
        self.platform: Platform = (
            platform
            if platform is not None
            else drivers.load_driver(
                drivers.PLATFORMS, settings.platform, base=Platform, agent_id=settings.agent_id
            )
        )
        self.hooks = hooks if hooks is not None else Hooks(make_plugin_manager())
        if lease is None and settings.enable_ha:
            lease = self._load_lease(clock)
        self.lease = lease
        self._clock = clock
        self._elector = self._new_elector() if lease is not None else None
        self._rng = random.Random()
        self._ws: ClientConnection | None = None
        self._connection_id: str | None = None
        self._problem = "not connected yet"
        self._draining = False
        self._serving = False
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._step_back = asyncio.Event()
        self._health: HealthServer | None = None
        self._reporter = StatusReporter(
            agent_id=settings.agent_id,
            hooks=self.hooks,
            send=self._send,
            busy=lambda session_id: self._runner.busy(session_id),
        )
        self.transport: Transport = (
            transport
            if transport is not None
            else drivers.load_driver(drivers.TRANSPORTS, settings.vnc_transport, base=Transport)
        )
        """The ``VNC_TRANSPORT`` driver carrying viewers' bytes."""
        self._vnc = VncRelay(self.platform, self.transport)
        self._runner = CommandRunner(
            platform=self.platform,
            hooks=self.hooks,
            agent_id=settings.agent_id,
            send=self._send,
            observe=self._reporter.observe,
        )

    def _load_lease(self, clock: Clock | None) -> Lease:
        """Load the ``HA_BACKEND`` lease, saying which it is and whether it was the default."""
        backend = self.settings.lease_driver()
        if self.settings.ha_backend:
            logger.info("High availability: lease backend %s (HA_BACKEND)", backend)
            return drivers.load_driver(drivers.LEASES, backend, base=Lease, clock=clock)
        platform = self.settings.platform
        reason = f"HA_BACKEND is unset, and {backend} is its default with PLATFORM={platform}"
        logger.info(
            "High availability: lease backend %s, the default with PLATFORM=%s "
            "(set HA_BACKEND to choose another)",
            backend,
            platform,
        )
        try:
            return drivers.load_driver(drivers.LEASES, backend, base=Lease, clock=clock)
        except DriverNotFound as exc:
            raise DriverNotFound(
                exc.group, exc.name, exc.installed, package=exc.package, reason=reason
            ) from None

    # -- state -------------------------------------------------------------------------------

    @property
    def registered(self) -> bool:
        """Whether the control plane has welcomed this agent on a socket that is open now."""
        ws = self._ws
        if ws is None or self._connection_id is None:
            return False
        return ws.protocol.state is State.OPEN

    @property
    def connection_id(self) -> str | None:
        """The id the control plane gave the current connection, while registered."""
        return self._connection_id if self.registered else None

    @property
    def elector(self) -> LeaderElector | None:
        """The leader elector of this process (``None`` without HA); it is replaced after
        the agent steps back from leading."""
        return self._elector

    @property
    def commands_in_flight(self) -> int:
        """How many commands are queued or running now."""
        return self._runner.in_flight

    @property
    def unsent_results(self) -> int:
        """How many command results wait for a connection to be sent on."""
        return len(self._runner.unsent)

    @property
    def vnc_streams_requested(self) -> int:
        """How many ``vnc.open`` frames the control plane has sent, served or not."""
        return self._vnc.requested

    @property
    def vnc_streams_open(self) -> int:
        """How many VNC streams are connected to a session's VNC server now (a closing one
        counts until both of its ends are closed)."""
        return self._vnc.active

    @property
    def health_port(self) -> int | None:
        """The port ``/health`` and ``/ready`` listen on while serving (``None`` when off)."""
        return self._health.port if self._health is not None else None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Return whether the agent is ready, and the body ``/ready`` answers with.

        Ready while registered, or, with HA, while following a known leader.
        """
        body: dict[str, Any] = {"agent_id": self.settings.agent_id}
        elector = self._elector
        role = "standalone" if elector is None else "leader"
        if self._stopping.is_set():
            return False, {**body, "status": "not ready", "reason": "the agent is stopping"}
        if self.registered:
            return True, {
                **body,
                "status": "ready",
                "role": role,
                "connection_id": self._connection_id,
            }
        if elector is not None and not elector.is_leader:
            leader = elector.leader
            if leader is not None and leader != self.identity:
                return True, {**body, "status": "ready", "role": "follower", "leader": leader}
            return False, {
                **body,
                "status": "not ready",
                "role": "follower",
                "reason": "no leader is known: the lease is free or its backend is unreachable",
            }
        return False, {**body, "status": "not ready", "role": role, "reason": self._problem}

    # -- running -----------------------------------------------------------------------------

    def run(self) -> None:
        """Run the agent until SIGTERM or SIGINT, then shut down cleanly (sessions keep running).

        Configures logging at ``LOG_LEVEL`` when nothing else has. Blocks; for use as a
        program's main function. Inside an event loop, use :meth:`serve` instead.
        """
        if not logging.getLogger().handlers:
            logging.basicConfig(level=self.settings.log_level, format="%(levelname)s: %(message)s")
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(self._serve_with_signals())

    async def serve(self) -> None:
        """Run the agent until :meth:`stop`; then shut down cleanly (sessions keep running).

        Raises:
            PlatformError: the platform's :meth:`~streamspace_sdk.Platform.check` failed.
            ConfigError: ``HEALTH_PORT`` cannot be listened on.
            RuntimeError: the agent is already serving, or has served.
        """
        if self._serving:
            raise RuntimeError("an Agent serves once; build a new one")
        self._serving = True
        main: asyncio.Task[None] | None = None
        try:
            await self.platform.check()
            await self._start_health()
            logger.info(
                "Starting StreamSpace agent %s (platform %s, control plane %s, HA %s)",
                self.settings.agent_id,
                self.platform.name,
                self._shown_url,
                f"on, identity {self.identity}" if self._elector is not None else "off",
            )
            main = asyncio.create_task(
                self._lead_and_follow() if self._elector is not None else self._connect_forever(),
                name="agent connection",
            )
            stopping = asyncio.create_task(self._stopping.wait())
            try:
                await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if main.done():
                main.result()  # it only ends early by failing; let that be seen
            await self._shut_down(main)
        finally:
            await self._clean_up(main)

    def request_stop(self) -> None:
        """Ask :meth:`serve` to shut down; returns at once (safe in a signal handler)."""
        self._stopping.set()

    async def stop(self) -> None:
        """Shut the agent down cleanly and wait until :meth:`serve` has returned."""
        self.request_stop()
        if self._serving:
            await self._done.wait()

    async def _serve_with_signals(self) -> None:
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        try:
            await self.serve()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping.is_set():
            logger.info("Received %s again; already shutting down", sig.name)
            return
        logger.info("Received %s; shutting down (sessions keep running)", sig.name)
        self.request_stop()

    async def _start_health(self) -> None:
        port = self.settings.health_port
        if port == 0:
            return
        host = self.settings.health_host
        server = HealthServer(host, port, self.readiness)
        try:
            await server.start()
        except OSError as exc:
            raise ConfigError(
                f"HEALTH_PORT: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self._health = server
        logger.info("Health endpoints on http://%s:%d/health and /ready", host, server.port)

    async def _shut_down(self, main: asyncio.Task[None]) -> None:
        """Finish commands in progress, say goodbye, close the socket, release the lease."""
        logger.info("Shutting down: no new commands; sessions keep running")
        self._draining = True
        await self._runner.drain(self.drain_timeout_s)
        ws = self._ws
        if ws is not None and self.registered:
            await self._send(Shutdown(reason="agent shutting down"))
            with contextlib.suppress(Exception):
                await ws.close(_GOING_AWAY, "agent shutting down")
        if self._elector is not None:
            await self._elector.stop()
        main.cancel()
        await asyncio.wait({main})

    async def _clean_up(self, main: asyncio.Task[None] | None) -> None:
        """Release everything, whether the shutdown was clean or not."""
        try:
            if main is not None and not main.done():
                main.cancel()
                await asyncio.wait({main})
            await self._runner.cancel()
            if self._elector is not None:
                await self._elector.stop()
            await self._close("platform", self.platform.close)
            if self.lease is not None:
                await self._close("lease", self.lease.close)
            if self._health is not None:
                await self._health.close()
            logger.info("Agent stopped; sessions keep running")
        finally:
            self._stopping.set()
            self._done.set()

    @staticmethod
    async def _close(what: str, close: Callable[[], Awaitable[None]]) -> None:
        try:
            await close()
        except Exception:
            logger.exception("Closing the %s failed", what)

    # -- leader election ---------------------------------------------------------------------

    def _new_elector(self) -> LeaderElector:
        assert self.lease is not None
        return LeaderElector.from_settings(
            self.lease,
            self.identity,
            self.settings,
            clock=self._clock,
            on_started_leading=self._on_started_leading,
            on_stopped_leading=self._on_stopped_leading,
        )

    async def _lead_and_follow(self) -> None:
        """Take part in the election; while leading, the connection loop runs.

        When the control plane refuses the fencing epoch (another leader registered), step
        back: stop this elector (releasing the lease), wait, and contend again with a new one.
        """
        attempt = 0
        while True:
            elector = self._elector
            assert elector is not None
            self._step_back.clear()
            election = asyncio.create_task(elector.run(), name="leader election")
            stepping_back = asyncio.create_task(self._step_back.wait())
            try:
                await asyncio.wait({election, stepping_back}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stepping_back.cancel()
                await elector.stop()
                await asyncio.wait({election})
            if self._stopping.is_set() or not self._step_back.is_set():
                return
            delay = self.backoff.delay(attempt, self._rng)
            attempt += 1
            logger.warning(
                "Stepped back to FOLLOWER: the control plane knows a newer leader; contending "
                "for the lease again in %.2fs",
                delay,
            )
            if not await self._pause(delay):
                return
            self._elector = self._new_elector()

    def _on_started_leading(self, record: LeaseRecord) -> Awaitable[None]:
        logger.info("Leading with fencing epoch %d; connecting to the control plane", record.epoch)
        return self._connect_forever()

    async def _on_stopped_leading(self) -> None:
        self._connection_id = None
        if self._stopping.is_set():
            return
        logger.warning(
            "No longer the leader: the connection to the control plane is closed and commands "
            "in progress are abandoned; sessions keep running"
        )
        await self._runner.cancel()

    # -- the connection loop -----------------------------------------------------------------

    async def _connect_forever(self) -> None:
        """Connect, serve, and reconnect with backoff until stopped (or told to step back)."""
        attempt = 0
        while not self._stopping.is_set():
            outcome = await self._connect_once()
            if outcome.step_back:
                self._step_back.set()
                return
            if self._stopping.is_set():
                return
            if outcome.lasted_s > self.backoff.reset_after_s:
                attempt = 0
            if outcome.wait_s is not None:
                delay = outcome.wait_s
            else:
                delay = self.backoff.delay(attempt, self._rng)
                attempt += 1
            self._problem = f"{outcome.reason}; reconnecting in {delay:.1f}s"
            logger.info("Reconnecting to the control plane in %.2fs", delay)
            if not await self._pause(delay):
                return

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``; return ``False`` at once if the agent is stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return not self._stopping.is_set()

    async def _connect_once(self) -> Outcome:
        """Make one attempt: dial, register, and serve until the socket closes."""
        since = self._reporter.mark()
        try:
            hello = await self._hello()
        except LeaseLost as exc:
            return Outcome(f"not the leader: {exc}")
        except Exception as exc:
            logger.exception("Could not read the platform's sessions and capacity")
            return Outcome(f"the platform failed: {type(exc).__name__}: {exc}")
        self._problem = f"connecting to {self._shown_url}"
        logger.info(
            "Registering agent with Control Plane at %s (agent %s)",
            self._shown_url,
            self.settings.agent_id,
        )
        try:
            ws = await connect(
                self.url,
                additional_headers=self._headers(),
                compression=None,  # small frames; deflate costs more than it saves
                open_timeout=self.open_timeout_s,
                close_timeout=self.close_timeout_s,
                ping_interval=self.settings.ws_ping_interval,
                ping_timeout=self.settings.ws_ping_timeout,
                max_size=MAX_TEXT_FRAME_BYTES,
                user_agent_header=f"streamspace-agent/{_agent_version()}",
            )
        except InvalidStatus as exc:
            return refused_http(exc.response.status_code, self._shown_url, self.settings.agent_id)
        except (OSError, TimeoutError, WebSocketException) as exc:
            detail = str(exc) or type(exc).__name__
            logger.warning(
                "Could not connect to the control plane at %s: %s", self._shown_url, detail
            )
            return Outcome(f"cannot connect to the control plane: {detail}")
        try:
            return await self._converse(ws, hello, since)
        finally:
            self._ws = None
            self._connection_id = None
            with contextlib.suppress(Exception):
                await ws.close()

    async def _converse(self, ws: ClientConnection, hello: AgentHello, since: int) -> Outcome:
        loop = asyncio.get_running_loop()
        registered_at: float | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            await ws.send(dump_frame(hello))
            welcome = await self._await_welcome(ws)
            registered_at = loop.time()
            self._ws = ws
            self._connection_id = welcome.connection_id
            self._vnc.attach(SocketLink(ws, self.url))
            interval = min(welcome.heartbeat_interval_s, self.settings.heartbeat_interval)
            logger.info("Agent registered successfully: %s", self.settings.agent_id)
            logger.info("WebSocket connection established (connection %s)", welcome.connection_id)
            logger.info("Heartbeat sent every %g seconds", interval)
            if welcome.protocol_version != PROTOCOL_VERSION:
                logger.warning(
                    "The control plane speaks protocol version %d; this agent speaks %d",
                    welcome.protocol_version,
                    PROTOCOL_VERSION,
                )
            await self._reporter.registered(hello.sessions, since)
            await self._runner.flush()
            tasks = [
                asyncio.create_task(self._heartbeat(interval), name="heartbeat"),
                asyncio.create_task(self._poll(interval), name="status poll"),
            ]
            return await self._read(ws, registered_at)
        except ConnectionClosed as exc:
            lasted = loop.time() - registered_at if registered_at is not None else 0.0
            if self._stopping.is_set():
                return Outcome("the agent is stopping", lasted_s=lasted)
            return closed(
                exc,
                lasted_s=lasted,
                agent_id=self.settings.agent_id,
                ha=self._elector is not None,
                superseded_wait_s=self.backoff.cap_s,
            )
        except TimeoutError:
            logger.warning(
                "The control plane sent no agent.welcome within %gs; closing the connection",
                self.welcome_timeout_s,
            )
            return Outcome("no agent.welcome from the control plane")
        finally:
            await self._vnc.detach("the connection to the control plane closed")
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled() and (failure := task.exception()) is not None:
                    logger.error("The %s task failed", task.get_name(), exc_info=failure)

    async def _await_welcome(self, ws: ClientConnection) -> AgentWelcome:
        async with asyncio.timeout(self.welcome_timeout_s):
            while True:
                message = await ws.recv()
                if isinstance(message, bytes):
                    continue
                try:
                    frame = parse_frame(message)
                except ProtocolError as exc:
                    logger.warning("Ignored a bad frame before agent.welcome: %s", exc)
                    continue
                if isinstance(frame, AgentWelcome):
                    return frame
                if isinstance(frame, Error):
                    self._log_error(frame)
                else:
                    logger.warning("Expected agent.welcome, got %s; ignoring it", frame.type)

    async def _read(self, ws: ClientConnection, registered_at: float) -> Outcome:
        """Read frames until the socket closes (raising ``ConnectionClosed``) or a frame ends it."""
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                try:
                    await self._vnc.receive_binary(message)
                except ProtocolError as exc:
                    logger.warning("Refused a binary frame from the control plane: %s", exc)
                    await self._send(error_frame(exc))
                continue
            try:
                frame = parse_frame(message)
            except ProtocolError as exc:
                logger.warning("Refused a frame from the control plane: %s", exc)
                await self._send(error_frame(exc))
                continue
            try:
                outcome = await self._dispatch(ws, frame, registered_at)
            except ConnectionClosed:
                raise
            except Exception:
                logger.exception("Handling a %s frame failed", frame.type)
                continue
            if outcome is not None:
                return outcome

    async def _dispatch(
        self, ws: ClientConnection, frame: Frame, registered_at: float
    ) -> Outcome | None:
        if isinstance(frame, Command):
            if self._draining or self._stopping.is_set():
                logger.info("Ignored command %s: the agent is shutting down", frame.command_id)
                return None
            elector = self._elector
            if elector is not None and not elector.is_leader:
                logger.warning(
                    "Ignored command %s: this replica is no longer the leader", frame.command_id
                )
                await ws.close(_GOING_AWAY, "no longer the leader")
                return Outcome("no longer the leader")
            await self._send(CommandAck(command_id=frame.command_id))
            await self._runner.receive(frame)
        elif isinstance(frame, Shutdown):
            wait = frame.reconnect_after_s
            if wait is not None:
                wait += self._rng.uniform(0.0, self.backoff.base_s)
            logger.info(
                "The control plane is shutting down (%s); reconnecting %s",
                frame.reason or "no reason given",
                f"in {wait:.2f}s" if wait is not None else "with backoff",
            )
            await ws.close(1000, "control plane shutting down")
            lasted = asyncio.get_running_loop().time() - registered_at
            return Outcome("the control plane shut down", lasted_s=lasted, wait_s=wait)
        elif isinstance(frame, Error):
            self._log_error(frame)
        elif isinstance(frame, VncOpen):
            self._vnc.open(frame)
        elif isinstance(frame, VncClose | VncCredit | VncOpened):
            await self._vnc.receive(frame)
        else:
            logger.warning(
                "Refused a frame of type %s: the control plane does not send it", frame.type
            )
            await self._send(
                Error(
                    code="unexpected",
                    message=f"{frame.type} is not a frame the control plane sends to an agent",
                    ref=frame.type,
                )
            )
        return None

    async def _heartbeat(self, interval_s: float) -> None:
        usage = Usage()
        while True:
            await asyncio.sleep(interval_s)
            try:
                usage = await self.platform.usage()
            except Exception:
                logger.exception("Reading the platform's usage failed; sending the last known")
            if not await self._send(Heartbeat(usage=usage)):
                return
            logger.debug("Heartbeat sent")

    async def _poll(self, interval_s: float) -> None:
        last_failure = ""
        while True:
            since = self._reporter.mark()
            try:
                sessions = await self.platform.list_sessions()
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
                if failure != last_failure:
                    logger.warning("Listing the platform's sessions failed: %s", failure)
                last_failure = failure
            else:
                last_failure = ""
                try:
                    await self._reporter.poll(sessions, since)
                except Exception:
                    logger.exception("Reporting session changes failed")
            await asyncio.sleep(interval_s)

    # -- frames and outcomes -----------------------------------------------------------------

    async def _hello(self) -> AgentHello:
        elector = self._elector
        holder, epoch = None, 0
        if elector is not None:
            epoch = elector.fencing_token()
            holder = elector.identity
        sessions = await self.platform.list_sessions()
        return AgentHello(
            agent_id=self.settings.agent_id,
            platform=self.platform.name,
            region=self.settings.region,
            capacity=await self._capacity(),
            usage=await self.platform.usage(),
            agent_version=_agent_version(),
            transports=[self.transport.name],
            instance_id=self.platform.instance_scope(),
            lease_holder=holder,
            fencing_epoch=epoch,
            sessions=sessions,
        )

    async def _capacity(self) -> Capacity:
        """The platform's capacity, capped by ``MAX_SESSIONS``, ``MAX_CPU`` and ``MAX_MEMORY``."""
        capacity = await self.platform.capacity()
        s = self.settings
        return Capacity(
            max_sessions=min(capacity.max_sessions, s.max_sessions),
            max_cpu_m=_min(
                capacity.max_cpu_m, round(s.max_cpu * 1000) if s.max_cpu is not None else None
            ),
            max_memory_mib=_min(
                capacity.max_memory_mib,
                round(s.max_memory * 1024) if s.max_memory is not None else None,
            ),
        )

    def _headers(self) -> dict[str, str]:
        token = self.settings.agent_token
        return {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}

    async def _send(self, frame: WireModel) -> bool:
        """Send ``frame`` on the registered connection; ``False`` when there is none."""
        ws = self._ws
        if ws is None or self._connection_id is None:
            return False
        try:
            await ws.send(dump_frame(frame))
        except ConnectionClosed:
            return False
        return True

    @staticmethod
    def _log_error(frame: Error) -> None:
        logger.warning(
            "The control plane refused a frame: %s: %s%s",
            frame.code,
            frame.message,
            f" (ref {frame.ref})" if frame.ref else "",
        )
