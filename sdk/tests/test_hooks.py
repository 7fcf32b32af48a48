"""Hook specs, loading, and the typed facade; plus meta-tests that keep tests and docs in step.

Every hookspec needs a ``test_hook_<name>`` here and a heading in ``docs/hooks.md`` that is
its exact signature: ``### `name(arg, arg)` ``.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pluggy
import pytest
from pydantic import ValidationError

from streamspace_sdk import drivers, hookspecs
from streamspace_sdk.errors import ConfigError, SessionVetoed
from streamspace_sdk.hooks import (
    AuditRecord,
    CommandRegistry,
    Hooks,
    Principal,
    RouteRegistry,
    SessionEvent,
    make_plugin_manager,
    maybe_await,
)
from streamspace_sdk.hookspecs import hookimpl
from streamspace_sdk.platform import SessionSpec
from streamspace_sdk.settings import PluginSettings

DOCS = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"
HOOK_NAMES = sorted(
    name for name, obj in vars(hookspecs).items() if hasattr(obj, f"{hookspecs.PROJECT_NAME}_spec")
)


def settings(*, trace: bool = False) -> PluginSettings:
    """Return settings that do not depend on the environment the tests run in."""
    return PluginSettings(streamspace_load_plugins=None, streamspace_trace_hooks=trace)


def make_hooks(*plugins: object, trace: bool = False) -> Hooks:
    pm = make_plugin_manager(
        settings=settings(trace=trace), plugins=plugins, load_entrypoints=False
    )
    return Hooks(pm)


def make_spec(**changes: Any) -> SessionSpec:
    return SessionSpec(session_id="s1", generation=3, user="alice", template="firefox", **changes)


def hook_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "streamspace.hooks" and r.levelno == level]


# -- prepare_session_spec ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_hook_prepare_session_spec() -> None:
    class AddTimezone:
        @hookimpl
        def prepare_session_spec(self, spec: SessionSpec, agent_id: str) -> SessionSpec:
            return spec.model_copy(update={"env": {**spec.env, "TZ": "UTC", "AGENT": agent_id}})

    class CapMemory:
        # Async, and taking only the argument it needs (pluggy's opt-in arguments).
        @hookimpl
        async def prepare_session_spec(self, spec: SessionSpec) -> SessionSpec:
            resources = spec.resources.model_copy(update={"memory_limit_mib": 2048})
            return spec.model_copy(update={"resources": resources})

    class Abstain:
        @hookimpl
        def prepare_session_spec(self) -> None:
            return None

    hooks = make_hooks(AddTimezone(), CapMemory(), Abstain())
    original = make_spec(env={"LANG": "C"})

    prepared = await hooks.prepare_session_spec(original, agent_id="agent-1")

    assert prepared.env == {"LANG": "C", "TZ": "UTC", "AGENT": "agent-1"}
    assert prepared.resources.memory_limit_mib == 2048
    assert original.env == {"LANG": "C"}, "the input spec is never changed in place"


@pytest.mark.asyncio
async def test_prepare_session_spec_without_plugins_keeps_the_spec() -> None:
    spec = make_spec()
    assert await make_hooks().prepare_session_spec(spec, "agent-1") is spec


@pytest.mark.asyncio
async def test_prepare_session_spec_chains_in_pluggy_call_order() -> None:
    def stamp(mark: str) -> object:
        class Stamp:
            @hookimpl
            def prepare_session_spec(self, spec: SessionSpec) -> SessionSpec:
                trail = spec.labels.get("trail", "")
                return spec.model_copy(update={"labels": {"trail": trail + mark}})

        return Stamp()

    class First:
        @hookimpl(tryfirst=True)
        def prepare_session_spec(self, spec: SessionSpec) -> SessionSpec:
            return spec.model_copy(update={"labels": {"trail": "F"}})

    # Registered in order F, a, b: tryfirst runs first, then the last registered first.
    hooks = make_hooks(First(), stamp("a"), stamp("b"))

    prepared = await hooks.prepare_session_spec(make_spec(), "agent-1")

    assert prepared.labels == {"trail": "Fba"}
    order = [impl.plugin for impl in reversed(hooks.pm.hook.prepare_session_spec.get_hookimpls())]
    assert isinstance(order[0], First)


@pytest.mark.asyncio
async def test_prepare_session_spec_veto_propagates_and_stops_the_chain() -> None:
    called: list[str] = []

    class Mutator:
        @hookimpl
        def prepare_session_spec(self, spec: SessionSpec) -> None:
            called.append("mutator")

    class Quota:
        @hookimpl
        async def prepare_session_spec(self, spec: SessionSpec) -> None:
            raise SessionVetoed("alice has 3 sessions running; the limit is 3")

    hooks = make_hooks(Mutator(), Quota())  # Quota, registered last, is called first.

    with pytest.raises(SessionVetoed, match="the limit is 3") as info:
        await hooks.prepare_session_spec(make_spec(), "agent-1")

    assert called == []
    assert any("Quota" in note for note in info.value.__notes__)


@pytest.mark.asyncio
async def test_prepare_session_spec_checks_what_plugins_return() -> None:
    class ReturnsDict:
        @hookimpl
        def prepare_session_spec(self, spec: SessionSpec) -> object:
            return spec.model_dump()

    class BumpsGeneration:
        @hookimpl
        def prepare_session_spec(self, spec: SessionSpec) -> SessionSpec:
            return spec.model_copy(update={"generation": spec.generation + 1})

    with pytest.raises(TypeError, match=r"ReturnsDict.*returned dict"):
        await make_hooks(ReturnsDict()).prepare_session_spec(make_spec(), "agent-1")
    with pytest.raises(ValueError, match=r"BumpsGeneration.*generation"):
        await make_hooks(BumpsGeneration()).prepare_session_spec(make_spec(), "agent-1")


# -- session_event -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_hook_session_event() -> None:
    seen: list[tuple[str, SessionEvent]] = []

    class SyncObserver:
        @hookimpl
        def session_event(self, event: SessionEvent) -> None:
            seen.append(("sync", event))

    class AsyncObserver:
        @hookimpl
        async def session_event(self, event: SessionEvent) -> None:
            seen.append(("async", event))

    event = SessionEvent(
        session_id="s1", state="running", previous_state="starting", agent_id="agent-1"
    )
    await make_hooks(SyncObserver(), AsyncObserver()).session_event(event)

    assert seen == [("async", event), ("sync", event)]


def test_session_event_times_are_utc() -> None:
    paris = timezone(timedelta(hours=1))
    event = SessionEvent(
        session_id="s1", state="pending", at=datetime(2025, 1, 1, 12, tzinfo=paris)
    )
    assert event.at == datetime(2025, 1, 1, 11, tzinfo=UTC)
    assert event.at.utcoffset() == timedelta(0)
    assert SessionEvent(session_id="s1", state="pending").at.tzinfo is UTC
    with pytest.raises(ValidationError, match="timezone"):
        SessionEvent(session_id="s1", state="pending", at=datetime(2025, 1, 1, 12))


@pytest.mark.asyncio
async def test_session_event_observer_exception_is_logged_and_swallowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    class Healthy:
        @hookimpl
        def session_event(self, event: SessionEvent) -> None:
            seen.append(event.state)

    class Broken:
        @hookimpl
        async def session_event(self, event: SessionEvent) -> None:
            raise RuntimeError("metrics backend down")

    hooks = make_hooks(Healthy(), Broken())  # Broken, registered last, is called first.
    with caplog.at_level(logging.ERROR, logger="streamspace.hooks"):
        await hooks.session_event(SessionEvent(session_id="s1", state="failed"))

    assert seen == ["failed"], "the other observers still run"
    [record] = hook_records(caplog, logging.ERROR)
    assert "session_event" in record.getMessage()
    assert "Broken" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


# -- register_commands -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_hook_register_commands() -> None:
    async def snapshot(args: dict[str, Any]) -> dict[str, Any]:
        return {"snapshot": f"{args['session_id']}-snap"}

    class Snapshots:
        @hookimpl
        def register_commands(self, registry: CommandRegistry) -> None:
            registry.add("snapshot", snapshot)

    class Logs:
        @hookimpl
        async def register_commands(self, registry: CommandRegistry) -> None:
            registry.add("tail-logs", snapshot)

    registry = await make_hooks(Snapshots(), Logs()).register_commands()

    assert registry.names() == ["snapshot", "tail-logs"]
    assert "snapshot" in registry
    assert len(registry) == 2
    handler = registry.get("snapshot")
    assert handler is not None
    assert await handler({"session_id": "s1"}) == {"snapshot": "s1-snap"}
    assert registry.get("nope") is None
    assert registry.plugin_of("snapshot") is not None
    assert "Snapshots" in (registry.plugin_of("snapshot") or "")


@pytest.mark.asyncio
async def test_register_commands_refuses_a_name_twice_naming_both_plugins() -> None:
    async def handler(args: dict[str, Any]) -> dict[str, Any]:
        return {}

    class Alpha:
        @hookimpl
        def register_commands(self, registry: CommandRegistry) -> None:
            registry.add("snapshot", handler)

    class Beta:
        @hookimpl
        def register_commands(self, registry: CommandRegistry) -> None:
            registry.add("snapshot", handler)

    with pytest.raises(ValueError, match="'snapshot' is registered twice") as info:
        await make_hooks(Alpha(), Beta()).register_commands()
    assert "Alpha" in str(info.value)
    assert "Beta" in str(info.value)


def test_command_registry_refuses_built_in_and_bad_names() -> None:
    async def handler(args: dict[str, Any]) -> dict[str, Any]:
        return {}

    registry = CommandRegistry()
    with pytest.raises(ValueError, match="built-in"):
        registry.add("start", handler)
    with pytest.raises(ValueError, match="non-empty"):
        registry.add("", handler)
    with pytest.raises(TypeError, match="not callable"):
        registry.add("snapshot", "handler")  # type: ignore[arg-type]
    registry.add("snapshot", handler)
    assert registry.plugin_of("snapshot") is None


# -- register_routes ---------------------------------------------------------------------


async def endpoint(request: object) -> object:
    return request


@pytest.mark.asyncio
async def test_hook_register_routes() -> None:
    class Reports:
        @hookimpl
        def register_routes(self, registry: RouteRegistry) -> None:
            registry.add("/plugins/reports", endpoint, name="reports")
            registry.add("/plugins/reports", endpoint, methods=("post", "PUT"))

    registry = await make_hooks(Reports()).register_routes()

    first, second = registry.routes
    assert (first.path, first.methods, first.name) == ("/plugins/reports", ("GET",), "reports")
    assert first.endpoint is endpoint
    assert second.methods == ("POST", "PUT")
    assert first.plugin is not None
    assert "Reports" in first.plugin
    assert len(registry) == 2


@pytest.mark.asyncio
async def test_register_routes_refuses_a_path_and_method_twice_naming_both_plugins() -> None:
    class Alpha:
        @hookimpl
        def register_routes(self, registry: RouteRegistry) -> None:
            registry.add("/plugins/x", endpoint, methods=("GET", "POST"))

    class Beta:
        @hookimpl
        def register_routes(self, registry: RouteRegistry) -> None:
            registry.add("/plugins/x", endpoint, methods=("POST",))

    with pytest.raises(ValueError, match="POST /plugins/x is registered twice") as info:
        await make_hooks(Alpha(), Beta()).register_routes()
    assert "Alpha" in str(info.value)
    assert "Beta" in str(info.value)


def test_route_registry_checks_its_arguments() -> None:
    registry = RouteRegistry()
    registry.add("/a", endpoint, name="a")
    with pytest.raises(ValueError, match="route name 'a' is registered twice"):
        registry.add("/b", endpoint, name="a")
    with pytest.raises(ValueError, match="must start with '/'"):
        registry.add("b", endpoint)
    with pytest.raises(TypeError, match="not a string"):
        registry.add("/b", endpoint, methods="GET")
    with pytest.raises(ValueError, match="at least one HTTP method"):
        registry.add("/b", endpoint, methods=())
    with pytest.raises(TypeError, match="not callable"):
        registry.add("/b", None)  # type: ignore[arg-type]
    registry.add("/a", endpoint, methods=("DELETE",))
    assert [r.methods for r in registry.routes] == [("GET",), ("DELETE",)]


# -- authorize ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_hook_authorize() -> None:
    class GpuForAdmins:
        @hookimpl
        def authorize(self, principal: Principal, resource: str) -> bool | None:
            if resource == "template/gpu":
                return principal.role == "admin"
            return None

    hooks = make_hooks(GpuForAdmins())
    admin = Principal(username="root", role="admin")
    alice = Principal(username="alice", role="user")

    assert await hooks.authorize(admin, "session.create", "template/gpu") is True
    assert await hooks.authorize(alice, "session.create", "template/gpu") is False
    assert await hooks.authorize(alice, "session.create", "template/firefox") is None
    assert await make_hooks().authorize(alice, "session.create", "template/gpu") is None
    assert hooks.pm.hook.authorize.spec is not None
    assert hooks.pm.hook.authorize.spec.opts["firstresult"] is True


@pytest.mark.asyncio
async def test_authorize_stops_at_the_first_non_none_result() -> None:
    called: list[str] = []

    class Allow:
        @hookimpl
        def authorize(self) -> bool:
            called.append("allow")
            return True

    class Deny:
        @hookimpl
        def authorize(self) -> bool:
            called.append("deny")
            return False

    class Defer:
        @hookimpl
        async def authorize(self) -> None:
            # An async None must defer, not count as a decision.
            called.append("defer")

    hooks = make_hooks(Allow(), Deny(), Defer())  # called Defer, Deny, Allow
    principal = Principal(username="alice", role="user")

    assert await hooks.authorize(principal, "session.delete", "session/s1") is False
    assert called == ["defer", "deny"]


@pytest.mark.asyncio
async def test_authorize_refuses_a_non_bool_decision() -> None:
    class Sloppy:
        @hookimpl
        def authorize(self) -> object:
            return "yes"

    principal = Principal(username="alice", role="user")
    with pytest.raises(TypeError, match=r"Sloppy.*returned str"):
        await make_hooks(Sloppy()).authorize(principal, "session.create", "template/x")


# -- audit_event -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_hook_audit_event(caplog: pytest.LogCaptureFixture) -> None:
    shipped: list[AuditRecord] = []

    class Siem:
        @hookimpl
        async def audit_event(self, record: AuditRecord) -> None:
            shipped.append(record)

    class BrokenSink:
        @hookimpl
        def audit_event(self, record: AuditRecord) -> None:
            raise OSError("disk full")

    record = AuditRecord(
        actor="alice", action="session.create", resource="session/s1", detail={"ip": "10.0.0.1"}
    )
    with caplog.at_level(logging.ERROR, logger="streamspace.hooks"):
        await make_hooks(Siem(), BrokenSink()).audit_event(record)

    assert shipped == [record]
    assert record.at.tzinfo is UTC
    [logged] = hook_records(caplog, logging.ERROR)
    assert "BrokenSink" in logged.getMessage()


# -- loading -----------------------------------------------------------------------------


def test_check_pending_rejects_a_misspelt_hook() -> None:
    class Typo:
        @hookimpl
        def prepare_sesion_spec(self, spec: SessionSpec) -> None:
            return None

    with pytest.raises(pluggy.PluginValidationError, match="prepare_sesion_spec") as info:
        make_plugin_manager(settings=settings(), plugins=[Typo()], load_entrypoints=False)
    assert any("prepare_session_spec" in note for note in info.value.__notes__)


def test_register_rejects_an_argument_the_spec_lacks() -> None:
    class WrongArgument:
        @hookimpl
        def authorize(self, principal: Principal, verb: str) -> None:
            return None

    with pytest.raises(pluggy.PluginValidationError, match="verb"):
        make_plugin_manager(settings=settings(), plugins=[WrongArgument()], load_entrypoints=False)


def test_wrapper_implementations_are_refused() -> None:
    class Wrapper:
        @hookimpl(wrapper=True)
        def session_event(self, event: SessionEvent) -> Iterator[None]:
            yield

    with pytest.raises(pluggy.PluginValidationError, match="wrappers are not supported"):
        make_plugin_manager(settings=settings(), plugins=[Wrapper()], load_entrypoints=False)


@pytest.fixture
def install_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[dict[str, str]], None]]:
    """Install a distribution whose ``streamspace`` entry points map names to module code."""
    modules: list[str] = []

    def install(plugins: dict[str, str]) -> None:
        dist = tmp_path / "ss_hooktest-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ss-hooktest\nVersion: 0.1\n")
        lines = ["[streamspace]"]
        for name, code in plugins.items():
            module = f"ss_hooktest_{name}"
            modules.append(module)
            lines.append(f"{name} = {module}")
            if code:
                (tmp_path / f"{module}.py").write_text(textwrap.dedent(code))
        (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(tmp_path))

    yield install
    for module in modules:
        sys.modules.pop(module, None)


OBSERVER = """
from streamspace_sdk.hookspecs import hookimpl

@hookimpl
def session_event(event):
    pass
"""


@pytest.mark.parametrize(
    ("load_plugins", "loaded"),
    [
        (None, {"alpha", "beta"}),
        ("beta", {"beta"}),
        (" alpha , beta ", {"alpha", "beta"}),
        ("", set()),
    ],
)
def test_load_plugins_loads_the_listed_entry_points(
    install_plugins: Callable[[dict[str, str]], None],
    monkeypatch: pytest.MonkeyPatch,
    load_plugins: str | None,
    loaded: set[str],
) -> None:
    install_plugins({"alpha": OBSERVER, "beta": OBSERVER})
    monkeypatch.delenv("STREAMSPACE_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("STREAMSPACE_TRACE_HOOKS", raising=False)
    if load_plugins is not None:
        monkeypatch.setenv("STREAMSPACE_LOAD_PLUGINS", load_plugins)

    pm = make_plugin_manager()

    assert {name for name in ("alpha", "beta") if pm.has_plugin(name)} == loaded


def test_load_plugins_with_an_unknown_name_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMSPACE_LOAD_PLUGINS", "quota,nope")
    monkeypatch.setattr(drivers, "entry_point_names", lambda group: ["audit", "quota"])

    with pytest.raises(ConfigError) as info:
        make_plugin_manager()

    message = str(info.value)
    assert message.startswith("STREAMSPACE_LOAD_PLUGINS:")
    assert "'nope'" in message
    assert "'quota'" not in message.split(";")[0], "only the missing name is blamed"
    assert "installed: audit, quota" in message


def test_a_broken_entry_point_names_the_plugin(
    install_plugins: Callable[[dict[str, str]], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugins({"broken": ""})  # the entry point's module does not exist
    monkeypatch.setenv("STREAMSPACE_LOAD_PLUGINS", "broken")

    with pytest.raises(ModuleNotFoundError) as info:
        make_plugin_manager(settings=PluginSettings(streamspace_load_plugins="broken"))
    assert any("'broken'" in note for note in info.value.__notes__)


@pytest.mark.asyncio
async def test_trace_hooks_logs_every_call_at_debug(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Observer:
        @hookimpl
        def session_event(self, event: SessionEvent) -> None:
            pass

    class Policy:
        @hookimpl
        def authorize(self) -> bool:
            return True

    monkeypatch.setenv("STREAMSPACE_TRACE_HOOKS", "true")
    pm = make_plugin_manager(plugins=[Observer(), Policy()], load_entrypoints=False)
    principal = Principal(username="alice", role="user")

    with caplog.at_level(logging.DEBUG, logger="streamspace.hooks"):
        await Hooks(pm).authorize(principal, "session.create", "template/x")
        pm.hook.session_event(event=SessionEvent(session_id="s1", state="running"))

    messages = [r.getMessage() for r in hook_records(caplog, logging.DEBUG)]
    assert any("authorize" in m and "Policy" in m and "principal=" in m for m in messages)
    assert any("authorize" in m and "returned True" in m for m in messages)
    assert any(m.startswith("hook session_event(event=") for m in messages)
    assert any("session_event returned []" in m for m in messages)


@pytest.mark.asyncio
async def test_hooks_are_silent_when_tracing_is_off(caplog: pytest.LogCaptureFixture) -> None:
    class Policy:
        @hookimpl
        def authorize(self) -> bool:
            return True

    hooks = make_hooks(Policy())
    with caplog.at_level(logging.DEBUG, logger="streamspace.hooks"):
        await hooks.authorize(Principal(username="a", role="agent"), "agent.register", "agent/a")
        hooks.pm.hook.authorize(principal=None, action="x", resource="y")
    assert hook_records(caplog, logging.DEBUG) == []


@pytest.mark.asyncio
async def test_maybe_await() -> None:
    async def seven() -> int:
        return 7

    assert await maybe_await(7) == 7
    assert await maybe_await(seven()) == 7
    assert await maybe_await("not awaitable") == "not awaitable"


# -- meta-tests: every hook is tested and documented ------------------------------------


def test_there_are_hooks() -> None:
    assert HOOK_NAMES == [
        "audit_event",
        "authorize",
        "prepare_session_spec",
        "register_commands",
        "register_routes",
        "session_event",
    ]


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hook_has_a_test(name: str) -> None:
    assert callable(globals().get(f"test_hook_{name}")), f"write test_hook_{name} in {__file__}"


def test_every_hook_test_names_a_hook() -> None:
    tests = {name.removeprefix("test_hook_") for name in globals() if name.startswith("test_hook_")}
    assert tests <= set(HOOK_NAMES), f"tests for hooks that do not exist: {tests - set(HOOK_NAMES)}"


def documented_signatures() -> dict[str, str]:
    """Map hook name to the signature its ``### `name(args)` `` heading in the docs shows."""
    headings = re.findall(r"^### `((\w+)\(.*\))`$", DOCS.read_text(), flags=re.MULTILINE)
    return {name: heading for heading, name in headings}


def spec_signature(name: str) -> str:
    return f"{name}({', '.join(inspect.signature(getattr(hookspecs, name)).parameters)})"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hook_is_documented_with_its_signature(name: str) -> None:
    documented = documented_signatures()
    assert name in documented, f"add a heading ### `{spec_signature(name)}` to {DOCS}"
    assert documented[name] == spec_signature(name)


def test_every_documented_hook_exists() -> None:
    assert set(documented_signatures()) == set(HOOK_NAMES)


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hook_has_a_facade_method(name: str) -> None:
    method = getattr(Hooks, name, None)
    assert inspect.iscoroutinefunction(method), f"add async Hooks.{name}"
    facade = list(inspect.signature(method).parameters)[1:]
    spec = list(inspect.signature(getattr(hookspecs, name)).parameters)
    # register_* hooks receive a registry that the facade builds and returns.
    assert facade == [p for p in spec if p != "registry"]


def doc_plugin_examples() -> list[Any]:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    return [
        pytest.param(code, id=re.findall(r"@hookimpl\n(?:async )?def (\w+)", code)[0])
        for code in blocks
        if "@hookimpl" in code
    ]


@pytest.mark.parametrize("code", doc_plugin_examples())
def test_doc_examples_are_valid_plugins(code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if "starlette" in code and importlib.util.find_spec("starlette") is None:
        # The sdk does not depend on Starlette; the control plane and route plugins do.
        responses = types.ModuleType("starlette.responses")
        responses.JSONResponse = dict  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "starlette", types.ModuleType("starlette"))
        monkeypatch.setitem(sys.modules, "starlette.responses", responses)
    module = types.ModuleType("hooks_md_example")
    exec(compile(code, str(DOCS), "exec"), module.__dict__)
    pm = make_plugin_manager(settings=settings(), plugins=[module], load_entrypoints=False)
    assert pm.get_hookcallers(module), "the example implements no hook"
