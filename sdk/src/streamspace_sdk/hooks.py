"""Hook plugins: loading them, the data they receive, and the typed facade that calls them.

Build a plugin manager with :func:`make_plugin_manager`, wrap it in :class:`Hooks`, and call
hooks only through the facade: it awaits ``async`` implementations, chains
``prepare_session_spec``, isolates observers and checks what implementations return.
Calling ``pm.hook.<name>(...)`` directly skips all of that.

The specs themselves live in :mod:`streamspace_sdk.hookspecs`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar, overload

import pluggy
from pydantic import AfterValidator, AwareDatetime, Field

from streamspace_sdk import hookspecs
from streamspace_sdk._models import WireModel
from streamspace_sdk.errors import ConfigError
from streamspace_sdk.platform import ACTIONS, SessionSpec, SessionState
from streamspace_sdk.settings import PluginSettings, load_settings

__all__ = [
    "ENTRY_POINT_GROUP",
    "AuditRecord",
    "CommandHandler",
    "CommandRegistry",
    "Hooks",
    "Principal",
    "Role",
    "RouteRegistry",
    "RouteSpec",
    "SessionEvent",
    "make_plugin_manager",
    "maybe_await",
]

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
"""The entry-point group hook plugins register under."""

logger = logging.getLogger("streamspace.hooks")

T = TypeVar("T")


def _now() -> datetime:
    return datetime.now(UTC)


_UtcDatetime = Annotated[AwareDatetime, AfterValidator(lambda value: value.astimezone(UTC))]
"""A datetime with a time zone, converted to UTC; a naive one is refused as ambiguous."""


# -- data the hooks receive --------------------------------------------------------------


class SessionEvent(WireModel):
    """One lifecycle transition of a session, as ``session_event`` observers receive it."""

    session_id: str = Field(min_length=1)
    """The session that changed."""
    state: SessionState
    """The state it is in now."""
    previous_state: SessionState | None = None
    """The state it left; ``None`` for a session's first event (``pending``)."""
    detail: str = ""
    """Why, for people (e.g. ``no agent matches region eu-west``); empty when obvious."""
    agent_id: str | None = None
    """The agent that runs it; ``None`` until it is scheduled."""
    at: _UtcDatetime = Field(default_factory=_now)
    """When the transition happened (UTC); defaults to now."""


Role = Literal["admin", "user", "agent"]
"""What a principal is: a StreamSpace admin, an ordinary user, or an agent."""


class Principal(WireModel):
    """Who is asking, as ``authorize`` implementations receive it."""

    username: str = Field(min_length=1)
    """The user's name, or the agent's ``AGENT_ID`` when ``role`` is ``agent``."""
    role: Role
    """``admin``, ``user`` or ``agent``."""


class AuditRecord(WireModel):
    """One audited action, as ``audit_event`` sinks receive it; treat ``detail`` as read-only."""

    actor: str = Field(min_length=1)
    """Who did it: a username, an agent id, or ``anonymous`` for a failed log-in."""
    action: str = Field(min_length=1)
    """What was done, e.g. ``session.create`` or ``auth.login_failed``."""
    resource: str
    """What it was done to, e.g. ``session/abc123``; empty when there is none."""
    detail: dict[str, Any] = Field(default_factory=dict)
    """Facts worth keeping (template, client address, reason); JSON-serialisable."""
    at: _UtcDatetime = Field(default_factory=_now)
    """When it happened (UTC); defaults to now."""


# -- registries handed to register_* hooks ----------------------------------------------

CommandHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
"""An agent command: an async function from the command's arguments to its result."""


def _by(plugin: str | None) -> str:
    return f"plugin {plugin!r}" if plugin is not None else "code outside any plugin"


class _Registry:
    """What both registries share: knowing which plugin is contributing right now."""

    def __init__(self) -> None:
        self._plugin: str | None = None

    @contextmanager
    def _contributing(self, plugin: str) -> Iterator[None]:
        # Set by Hooks around each implementation, so a conflict can name both plugins.
        previous, self._plugin = self._plugin, plugin
        try:
            yield
        finally:
            self._plugin = previous


class CommandRegistry(_Registry):
    """Agent commands contributed by plugins, by name.

    Names are unique across plugins and may not be a built-in action (``start``,
    ``stop``, ``hibernate``, ``wake``), so one plugin can never silently replace another's
    command or the platform's.
    """

    def __init__(self) -> None:
        super().__init__()
        self._handlers: dict[str, CommandHandler] = {}
        self._owners: dict[str, str | None] = {}

    def add(self, name: str, handler: CommandHandler) -> None:
        """Register ``handler`` as the agent command ``name``.

        Args:
            name: The command's name, e.g. ``snapshot``; non-empty, no surrounding spaces.
            handler: An async function taking the command's arguments as a dict and
                returning its result as a dict.

        Raises:
            ValueError: The name is empty, built in, or already registered; the message
                names the plugins involved.
            TypeError: ``handler`` is not callable.
        """
        if not name or name != name.strip():
            raise ValueError(f"agent command name {name!r} must be non-empty, without spaces")
        if name in ACTIONS:
            raise ValueError(
                f"agent command {name!r} from {_by(self._plugin)} would replace the built-in "
                f"action of that name; choose another name"
            )
        if not callable(handler):
            raise TypeError(f"handler of agent command {name!r} is not callable: {handler!r}")
        if name in self._handlers:
            raise ValueError(
                f"agent command {name!r} is registered twice: by {_by(self._owners[name])} "
                f"and by {_by(self._plugin)}"
            )
        self._handlers[name] = handler
        self._owners[name] = self._plugin

    def get(self, name: str) -> CommandHandler | None:
        """Return the handler of command ``name``, or ``None`` if no plugin added it."""
        return self._handlers.get(name)

    def names(self) -> list[str]:
        """Return the registered command names, sorted."""
        return sorted(self._handlers)

    def plugin_of(self, name: str) -> str | None:
        """Return the name of the plugin that added command ``name``, if a plugin did.

        Raises:
            KeyError: No command of that name is registered.
        """
        return self._owners[name]

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __len__(self) -> int:
        return len(self._handlers)


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One HTTP route a plugin contributes; the control plane mounts it."""

    path: str
    """URL path, starting with ``/``; may hold the framework's ``{param}`` placeholders."""
    endpoint: Callable[..., Any]
    """What handles the request, as the control plane's framework (Starlette) accepts it."""
    methods: tuple[str, ...] = ("GET",)
    """Upper-case HTTP methods the route answers."""
    name: str | None = None
    """Name for reverse URL lookups; unique when set."""
    plugin: str | None = None
    """The plugin that added it; ``None`` when added outside a hook."""


class RouteRegistry(_Registry):
    """HTTP routes contributed by plugins; it only records them.

    The SDK does not depend on a web framework, so nothing here is Starlette; the control
    plane turns each :class:`RouteSpec` into a route. A (path, method) pair, and a route
    name, belong to one plugin only.
    """

    def __init__(self) -> None:
        super().__init__()
        self._routes: list[RouteSpec] = []

    def add(
        self,
        path: str,
        endpoint: Callable[..., Any],
        methods: Iterable[str] = ("GET",),
        name: str | None = None,
    ) -> RouteSpec:
        """Record a route.

        Args:
            path: URL path, starting with ``/``.
            endpoint: The request handler.
            methods: HTTP methods it answers, e.g. ``("GET", "POST")``; case-insensitive.
            name: Optional name for reverse URL lookups.

        Returns:
            The recorded route.

        Raises:
            ValueError: The path does not start with ``/``, no method is given, or the
                (path, method) pair or the name is taken; the message names the plugins.
            TypeError: ``endpoint`` is not callable, or ``methods`` is a single string.
        """
        if not path.startswith("/"):
            raise ValueError(f"route path {path!r} must start with '/'")
        if isinstance(methods, str):
            raise TypeError(f"methods must be a sequence such as ({methods!r},), not a string")
        wanted = tuple(dict.fromkeys(m.strip().upper() for m in methods))
        if not wanted or not all(wanted):
            raise ValueError(f"route {path!r} needs at least one HTTP method")
        if not callable(endpoint):
            raise TypeError(f"endpoint of route {path!r} is not callable: {endpoint!r}")
        for route in self._routes:
            for method in wanted:
                if route.path == path and method in route.methods:
                    raise ValueError(
                        f"route {method} {path} is registered twice: by {_by(route.plugin)} "
                        f"and by {_by(self._plugin)}"
                    )
            if name is not None and route.name == name:
                raise ValueError(
                    f"route name {name!r} is registered twice: by {_by(route.plugin)} "
                    f"({route.path}) and by {_by(self._plugin)} ({path})"
                )
        route = RouteSpec(path, endpoint, wanted, name, self._plugin)
        self._routes.append(route)
        return route

    @property
    def routes(self) -> list[RouteSpec]:
        """The recorded routes, in the order they were added."""
        return list(self._routes)

    def __len__(self) -> int:
        return len(self._routes)


# -- calling and loading ----------------------------------------------------------------


@overload
async def maybe_await(value: Awaitable[T]) -> T: ...
@overload
async def maybe_await(value: T) -> T: ...
async def maybe_await(value: Any) -> Any:
    """Return ``value``, awaiting it first if it is awaitable.

    The one place that lets a hook implementation be either ``def`` or ``async def``.
    """
    if inspect.isawaitable(value):
        return await value
    return value


class _PluginManager(pluggy.PluginManager):
    """pluggy's manager, remembering whether :class:`Hooks` should trace its calls."""

    def __init__(self, *, trace_hooks: bool) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.trace_hooks = trace_hooks


def _hook_names() -> list[str]:
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return sorted(name for name, obj in vars(hookspecs).items() if hasattr(obj, marker))


def _label(impl: pluggy.HookImpl) -> str:
    # pluggy names an object registered without a name by its id(); its class reads better.
    if impl.plugin_name == str(id(impl.plugin)):
        return type(impl.plugin).__qualname__
    return impl.plugin_name


def _call_order(pm: pluggy.PluginManager, hook_name: str) -> list[pluggy.HookImpl]:
    """Return the hook's implementations in pluggy's call order, refusing wrappers."""
    caller: pluggy.HookCaller | None = getattr(pm.hook, hook_name, None)
    if caller is None:
        return []
    impls = caller.get_hookimpls()
    for impl in impls:
        if impl.wrapper or impl.hookwrapper:
            # Hooks awaits each implementation itself, which a wrapper could not surround.
            raise pluggy.PluginValidationError(
                impl.plugin,
                f"plugin {_label(impl)!r}: hook wrappers are not supported on StreamSpace "
                f"hooks ({hook_name!r}); drop wrapper=True/hookwrapper=True",
            )
    # pluggy keeps implementations in reverse call order: last registered, tryfirst last.
    return impls[::-1]


def _format_kwargs(kwargs: Mapping[str, object]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in kwargs.items())


def _trace_before(
    hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]
) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        plugins = [_label(impl) for impl in reversed(impls)]
        logger.debug("hook %s(%s) -> plugins %s", hook_name, _format_kwargs(kwargs), plugins)


def _trace_after(
    outcome: pluggy.Result[Any],
    hook_name: str,
    impls: Sequence[pluggy.HookImpl],
    kwargs: Mapping[str, Any],
) -> None:
    if outcome.exception is not None:
        logger.debug("hook %s raised %r", hook_name, outcome.exception)
    else:
        logger.debug("hook %s returned %r", hook_name, outcome.get_result())


def _installed_plugin_names() -> list[str]:
    # Imported here: drivers.py is the only module that reads entry-point metadata, and
    # this is the only path that needs it.
    from streamspace_sdk.drivers import entry_point_names

    return entry_point_names(ENTRY_POINT_GROUP)


def _load_entrypoints(pm: pluggy.PluginManager, names: list[str] | None) -> None:
    if names is None:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:
            exc.add_note(
                f"while loading hook plugins from entry-point group {ENTRY_POINT_GROUP!r}; "
                "set STREAMSPACE_LOAD_PLUGINS to load only some"
            )
            raise
        return
    installed = _installed_plugin_names()
    missing = [name for name in names if name not in installed]
    if missing:
        what = "no hook plugin named" if len(missing) == 1 else "no hook plugins named"
        raise ConfigError(
            f"STREAMSPACE_LOAD_PLUGINS: {what} {', '.join(repr(name) for name in missing)} "
            f"in entry-point group {ENTRY_POINT_GROUP!r}; "
            f"installed: {', '.join(sorted(installed)) or 'none'}"
        )
    for name in names:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
        except Exception as exc:
            exc.add_note(
                f"while loading hook plugin {name!r} from entry-point group "
                f"{ENTRY_POINT_GROUP!r} (listed in STREAMSPACE_LOAD_PLUGINS)"
            )
            raise


def make_plugin_manager(
    *,
    settings: PluginSettings | None = None,
    plugins: Iterable[object] = (),
    load_entrypoints: bool = True,
) -> pluggy.PluginManager:
    """Build the plugin manager of the ``streamspace`` hooks and load the plugins.

    Entry-point plugins load first (all of group ``streamspace``, or only those named by
    ``STREAMSPACE_LOAD_PLUGINS``), then ``plugins`` in order. Every implementation is
    checked against its spec here, so a misspelt hook or argument fails at start-up rather
    than being silently never called.

    Args:
        settings: Which plugins load and whether calls are traced; read from the
            environment when ``None``.
        plugins: Plugin objects (modules, classes, instances) to register as well.
        load_entrypoints: Whether to load plugins from entry points at all; tests and
            embedders turn it off to use only ``plugins``.

    Returns:
        The manager; wrap it in :class:`Hooks` to call the hooks.

    Raises:
        ConfigError: ``STREAMSPACE_LOAD_PLUGINS`` names a plugin that is not installed, or
            a plugin setting is malformed.
        pluggy.PluginValidationError: An implementation names no known hook, takes an
            argument its spec lacks, or is a hook wrapper.
    """
    if settings is None:
        settings = load_settings(PluginSettings)
    pm = _PluginManager(trace_hooks=settings.streamspace_trace_hooks)
    pm.add_hookspecs(hookspecs)
    if settings.streamspace_trace_hooks:
        # Covers direct pm.hook calls; Hooks traces the calls it makes itself.
        pm.add_hookcall_monitoring(_trace_before, _trace_after)
    if load_entrypoints:
        _load_entrypoints(pm, settings.plugin_names())
    for plugin in plugins:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        exc.add_note(f"StreamSpace hooks are: {', '.join(_hook_names())}")
        raise
    for hook_name in _hook_names():
        _call_order(pm, hook_name)
    return pm


class Hooks:
    """The typed way to call hooks: one async method per hook in :mod:`hookspecs`.

    Implementations are called one at a time in pluggy's call order (``tryfirst``, then
    last registered first); each may be ``def`` or ``async def``. When the manager was
    built with ``STREAMSPACE_TRACE_HOOKS`` on, every implementation's call and result is
    logged at DEBUG to the ``streamspace.hooks`` logger.

    Args:
        pm: A manager from :func:`make_plugin_manager`.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm
        self._trace = isinstance(pm, _PluginManager) and pm.trace_hooks

    @property
    def pm(self) -> pluggy.PluginManager:
        """The wrapped plugin manager."""
        return self._pm

    async def prepare_session_spec(self, spec: SessionSpec, agent_id: str) -> SessionSpec:
        """Pass ``spec`` through every implementation in turn and return the result.

        Each implementation receives the previous one's spec; ``None`` keeps it.

        Raises:
            SessionVetoed: An implementation refused the session; later ones are not called.
            TypeError: An implementation returned something other than a spec or ``None``.
            ValueError: An implementation changed the session id or generation.
        """
        hook = "prepare_session_spec"
        for impl in _call_order(self._pm, hook):
            result = await self._call(hook, impl, {"spec": spec, "agent_id": agent_id})
            if result is None:
                continue
            if not isinstance(result, SessionSpec):
                raise TypeError(
                    f"plugin {_label(impl)!r} returned {type(result).__name__} from {hook}; "
                    "expected a SessionSpec or None"
                )
            if (result.session_id, result.generation) != (spec.session_id, spec.generation):
                raise ValueError(
                    f"plugin {_label(impl)!r} changed the session id or generation in {hook}; "
                    "a spec may be changed in every other field"
                )
            spec = result
        return spec

    async def session_event(self, event: SessionEvent) -> None:
        """Tell every observer about ``event``; an observer's exception is logged, not raised."""
        await self._notify("session_event", {"event": event})

    async def register_commands(self) -> CommandRegistry:
        """Collect the agent commands every plugin contributes.

        Raises:
            ValueError: Two plugins added the same command name, or a built-in one.
        """
        registry = CommandRegistry()
        for impl in _call_order(self._pm, "register_commands"):
            with registry._contributing(_label(impl)):
                await self._call("register_commands", impl, {"registry": registry})
        return registry

    async def register_routes(self) -> RouteRegistry:
        """Collect the control-plane routes every plugin contributes.

        Raises:
            ValueError: Two plugins added the same path and method, or the same name.
        """
        registry = RouteRegistry()
        for impl in _call_order(self._pm, "register_routes"):
            with registry._contributing(_label(impl)):
                await self._call("register_routes", impl, {"registry": registry})
        return registry

    async def authorize(self, principal: Principal, action: str, resource: str) -> bool | None:
        """Return the first non-None decision of the policy plugins, or ``None`` if all defer.

        Implementations after the first decision are not called. An exception propagates:
        callers must treat it as a denial.

        Raises:
            TypeError: An implementation returned something other than a bool or ``None``.
        """
        hook = "authorize"
        kwargs = {"principal": principal, "action": action, "resource": resource}
        for impl in _call_order(self._pm, hook):
            result = await self._call(hook, impl, kwargs)
            if result is None:
                continue
            if not isinstance(result, bool):
                raise TypeError(
                    f"plugin {_label(impl)!r} returned {type(result).__name__} from {hook}; "
                    "expected True, False or None"
                )
            return result
        return None

    async def audit_event(self, record: AuditRecord) -> None:
        """Hand ``record`` to every audit sink; a sink's exception is logged, not raised."""
        await self._notify("audit_event", {"record": record})

    async def _notify(self, hook: str, kwargs: Mapping[str, object]) -> None:
        for impl in _call_order(self._pm, hook):
            try:
                await self._call(hook, impl, kwargs)
            except Exception:
                logger.exception(
                    "hook %s: plugin %r raised; ignored, so the other observers and the "
                    "caller go on",
                    hook,
                    _label(impl),
                )

    async def _call(self, hook: str, impl: pluggy.HookImpl, kwargs: Mapping[str, object]) -> object:
        # Each implementation takes only the arguments it names (pluggy's opt-in arguments).
        args = [kwargs[name] for name in impl.argnames]
        trace = self._trace and logger.isEnabledFor(logging.DEBUG)
        if trace:
            logger.debug(
                "hook %s: calling plugin %r (%s)", hook, _label(impl), _format_kwargs(kwargs)
            )
        try:
            result = await maybe_await(impl.function(*args))
        except Exception as exc:
            if trace:
                logger.debug("hook %s: plugin %r raised %r", hook, _label(impl), exc)
            exc.add_note(f"raised by hook plugin {_label(impl)!r} in {hook}")
            raise
        if trace:
            logger.debug("hook %s: plugin %r returned %r", hook, _label(impl), result)
        return result
