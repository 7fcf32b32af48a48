"""The docker platform against the real engine: what it makes, and every bad input."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import docker
import pytest
import pytest_asyncio
from conftest import (
    DOCKER_HOST,
    PREFIX,
    RUN,
    RUN_LABEL,
    EngineProxy,
    make_spec,
    new_id,
    session_containers,
    settings,
    volume_names,
)

from streamspace_docker import LABEL_DESIRED, LABEL_GENERATION, DockerOptions, DockerPlatform
from streamspace_docker.image import DESKTOP_IMAGE
from streamspace_sdk.errors import ConfigError, PlatformError
from streamspace_sdk.platform import (
    LABEL_AGENT_ID,
    LABEL_MANAGED_BY,
    LABEL_SESSION_ID,
    LABEL_TEMPLATE,
    LABEL_USER,
    MANAGED_BY,
    Resources,
)
from streamspace_sdk.settings import load_settings

pytestmark = pytest.mark.usefixtures("desktop_image")


@pytest_asyncio.fixture
async def platform(engine: docker.APIClient) -> AsyncIterator[DockerPlatform]:
    """A platform with an agent id of its own; its sessions are removed afterwards."""
    made = DockerPlatform(settings(), agent_id=f"t-{uuid.uuid4().hex[:8]}")
    yield made
    for status in await made.list_sessions():
        await made.stop(status.session_id, status.generation + 1)
    await made.close()


def inspect(engine: docker.APIClient, name: str) -> dict[str, Any]:
    found: dict[str, Any] = engine.inspect_container(name)
    return found


async def rfb_banner(host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        return await asyncio.wait_for(reader.readexactly(12), 10)
    finally:
        writer.close()


# -- what a session is made of ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_container_carries_labels_limits_env_and_a_loopback_port(
    platform: DockerPlatform, engine: docker.APIClient
) -> None:
    sid = new_id()
    spec = make_spec(
        sid,
        env={"GREETING": "hello"},
        resources=Resources(
            cpu_request_m=250, cpu_limit_m=1500, memory_request_mib=128, memory_limit_mib=512
        ),
        platform_options={"shm_size_mib": 256},
    )
    status = await platform.start(spec)
    assert status.state == "running"
    c = inspect(engine, f"{PREFIX}-{sid}")
    labels = c["Config"]["Labels"]
    assert labels[LABEL_SESSION_ID] == sid
    assert labels[LABEL_AGENT_ID] == platform.agent_id
    assert labels[LABEL_USER] == "alice"
    assert labels[LABEL_TEMPLATE] == "desktop"
    assert labels[LABEL_MANAGED_BY] == MANAGED_BY
    assert labels[LABEL_GENERATION] == "1"
    assert labels[LABEL_DESIRED] == "running"
    host = c["HostConfig"]
    assert host["NanoCpus"] == 1_500_000_000
    assert host["CpuShares"] == 256
    assert host["Memory"] == 512 * 2**20
    assert host["MemoryReservation"] == 128 * 2**20
    assert host["ShmSize"] == 256 * 2**20
    assert host["PidsLimit"] == 1024
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Init"] is True
    assert host["NetworkMode"] == f"{PREFIX}-{platform.agent_id}"
    assert host["PortBindings"] == {"5900/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    published = c["NetworkSettings"]["Ports"]["5900/tcp"]
    assert [b["HostIp"] for b in published] == ["127.0.0.1"], "never on 0.0.0.0"
    env = dict(e.split("=", 1) for e in c["Config"]["Env"])
    assert env["GREETING"] == "hello"
    assert env["HOME"] == "/home/streamspace"
    assert env["STREAMSPACE_SESSION_ID"] == sid
    (mount,) = c["Mounts"]
    assert (mount["Type"], mount["Name"], mount["Destination"]) == (
        "volume",
        f"{PREFIX}-session-{sid}",
        "/home/streamspace",
    )
    assert status.vnc is not None
    assert status.vnc.host == "127.0.0.1"
    assert status.vnc.port == int(published[0]["HostPort"])
    assert (await rfb_banner(status.vnc.host, status.vnc.port)).startswith(b"RFB ")


@pytest.mark.asyncio
async def test_the_agent_network_is_labelled_and_keeps_sessions_apart(
    platform: DockerPlatform, engine: docker.APIClient
) -> None:
    await platform.start(make_spec(new_id()))
    net = engine.inspect_network(f"{PREFIX}-{platform.agent_id}")
    assert net["Driver"] == "bridge"
    assert net["Labels"][LABEL_AGENT_ID] == platform.agent_id
    assert net["Labels"][LABEL_MANAGED_BY] == MANAGED_BY
    assert net["Options"]["com.docker.network.bridge.enable_icc"] == "false"


@pytest.mark.asyncio
async def test_persistent_home_is_a_user_volume_kept_at_stop(
    platform: DockerPlatform, engine: docker.APIClient
) -> None:
    user = f"u{uuid.uuid4().hex[:6]}"
    first, second = new_id(), new_id()
    await platform.start(make_spec(first, user=user, persistent_home=True))
    await platform.start(make_spec(new_id("plain"), user=user))
    home = f"{PREFIX}-home-{user}"
    assert home in volume_names(engine)
    await platform.stop(first, 2)
    assert home in volume_names(engine), "stop keeps the user's volume"
    await platform.start(make_spec(second, user=user, persistent_home=True))
    assert inspect(engine, f"{PREFIX}-{second}")["Mounts"][0]["Name"] == home


@pytest.mark.asyncio
async def test_stop_removes_the_container_and_a_session_volume(
    platform: DockerPlatform, engine: docker.APIClient
) -> None:
    sid = new_id()
    await platform.start(make_spec(sid))
    assert f"{PREFIX}-session-{sid}" in volume_names(engine)
    assert (await platform.stop(sid, 2)).state == "stopped"
    assert session_containers(engine, sid) == []
    assert f"{PREFIX}-session-{sid}" not in volume_names(engine)


@pytest.mark.asyncio
async def test_hibernate_keeps_a_stopped_container_and_the_volume(
    platform: DockerPlatform, engine: docker.APIClient
) -> None:
    sid = new_id()
    await platform.start(make_spec(sid))
    status = await platform.hibernate(sid, 2)
    assert (status.state, status.generation, status.vnc) == ("hibernated", 2, None)
    (row,) = session_containers(engine, sid)
    assert row["State"] == "created"
    assert row["Labels"][LABEL_DESIRED] == "hibernated"
    assert row["Labels"][LABEL_GENERATION] == "2"
    assert f"{PREFIX}-session-{sid}" in volume_names(engine)
    reborn = DockerPlatform(settings(), agent_id=platform.agent_id)
    adopted = await reborn.status(sid)
    assert adopted is not None
    assert (adopted.state, adopted.generation) == ("hibernated", 2)
    await reborn.close()
    woken = await platform.wake(make_spec(sid, 3))
    assert (woken.state, woken.generation) == ("running", 3)


@pytest.mark.asyncio
async def test_a_restarted_agent_reports_a_dead_container_as_failed(
    platform: DockerPlatform, engine: docker.APIClient
) -> None:
    sid = new_id()
    await platform.start(make_spec(sid))
    engine.kill(f"{PREFIX}-{sid}")
    engine.wait(f"{PREFIX}-{sid}")
    reborn = DockerPlatform(settings(), agent_id=platform.agent_id)
    try:
        listed = {s.session_id: s for s in await reborn.list_sessions()}
        assert listed[sid].state == "failed"
        assert "exit code 137" in listed[sid].detail
        assert (await reborn.stop(sid, 2)).state == "stopped"
    finally:
        await reborn.close()
    assert session_containers(engine, sid) == []


@pytest.mark.asyncio
async def test_capacity_comes_from_max_sessions_and_the_engine(
    platform: DockerPlatform, engine: docker.APIClient
) -> None:
    info = engine.info()
    capacity = await platform.capacity()
    assert capacity.max_sessions == 4
    assert capacity.max_cpu_m == info["NCPU"] * 1000
    assert capacity.max_memory_mib == info["MemTotal"] // 2**20
    await platform.start(
        make_spec(new_id(), resources=Resources(cpu_request_m=500, memory_limit_mib=256))
    )
    usage = await platform.usage()
    assert (usage.sessions, usage.cpu_m, usage.memory_mib) == (1, 500, 256)


@pytest.mark.asyncio
async def test_odd_session_ids_and_users_get_distinct_safe_names(platform: DockerPlatform) -> None:
    a = platform.container_name("a/b c")
    b = platform.container_name("a-b-c")
    assert a != b
    assert a.startswith(f"{PREFIX}-a-b-c-")
    assert platform.home_volume(make_spec("x", user="bob@example.com", persistent_home=True)) != (
        platform.home_volume(make_spec("x", user="bob-example.com", persistent_home=True))
    )
    status = await platform.start(make_spec("odd id/" + uuid.uuid4().hex[:6], user="bob@x.org"))
    assert status.state == "running"


def test_network_access_publishes_nothing() -> None:
    platform = DockerPlatform(settings(vnc_access="network"), agent_id="net")
    spec = platform.labelled(make_spec("n1", vnc_port=5901))
    config = platform.container_config(spec, DockerOptions())
    assert "port_bindings" not in config["host_config"]
    assert config["host_config"]["network_mode"] == f"{PREFIX}-net"
    assert config["environment"]["VNC_PORT"] == "5901"


@pytest.mark.asyncio
async def test_docker_host_over_tcp(proxy: EngineProxy) -> None:
    platform = DockerPlatform(settings(docker_host=proxy.url), agent_id=f"tcp-{RUN}")
    try:
        await platform.check()
        status = await platform.start(make_spec(new_id()))
        assert status.vnc is not None
        assert (await rfb_banner(status.vnc.host, status.vnc.port)).startswith(b"RFB ")
        assert platform.instance_scope().startswith("docker:")
        assert (await platform.stop(status.session_id, 2)).state == "stopped"
    finally:
        await platform.close()


@pytest.mark.asyncio
async def test_engine_calls_do_not_block_the_event_loop(proxy: EngineProxy) -> None:
    """While the engine sits on a create, the loop runs: other sessions are observed."""
    platform = DockerPlatform(settings(docker_host=proxy.url), agent_id=f"loop-{RUN}")
    try:
        proxy.hold_on(r"POST /v[\d.]+/containers/create")
        sid = new_id()
        start = asyncio.create_task(platform.start(make_spec(sid)))
        await proxy.held.wait()
        assert await platform.status(new_id()) is None  # answered while the create waits
        assert not start.done()
        proxy.release()
        assert (await start).state == "running"
    finally:
        await platform.close()


# -- bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["unix:///nonexistent/docker.sock", "tcp://127.0.0.1:9"])
@pytest.mark.asyncio
async def test_no_daemon_is_a_clear_error(host: str) -> None:
    platform = DockerPlatform(settings(docker_host=host), agent_id="nodaemon")
    with pytest.raises(PlatformError, match=r"Docker engine at .* did not answer.*dockerd"):
        await platform.check()
    with pytest.raises(PlatformError, match=host.replace(".", r"\.")):
        await platform.start(make_spec(new_id()))
    await platform.close()


def test_agent_without_a_daemon_exits_saying_so() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "AGENT_ID": "nodaemon",
        "CONTROL_PLANE_URL": "ws://127.0.0.1:9",
        "PLATFORM": "docker",
        "DOCKER_HOST": "unix:///nonexistent/docker.sock",
        "HEALTH_PORT": "0",
        "STREAMSPACE_LOAD_PLUGINS": "",
    }
    done = subprocess.run(
        [sys.executable, "-m", "streamspace_sdk.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "unix:///nonexistent/docker.sock did not answer" in done.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("IMAGE_PULL_POLICY", "Sometimes", "IMAGE_PULL_POLICY"),
        ("DOCKER_HOST", "ftp://engine", "DOCKER_HOST: 'ftp://engine' is not unix"),
        ("NETWORK_PREFIX", "no spaces", "NETWORK_PREFIX"),
        ("DOCKER_START_TIMEOUT", "soon", "DOCKER_START_TIMEOUT"),
        ("VNC_ACCESS", "0.0.0.0", "VNC_ACCESS"),
    ],
)
def test_bad_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        load_settings(DockerPlatform.Settings)


def test_pull_policy_ignores_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_PULL_POLICY", "never")
    assert load_settings(DockerPlatform.Settings).image_pull_policy == "Never"


@pytest.mark.asyncio
async def test_missing_image_with_policy_never(
    platform: DockerPlatform, engine: docker.APIClient
) -> None:
    sid = new_id()
    with pytest.raises(
        PlatformError, match=r"'streamspace-test/absent:1' .*IMAGE_PULL_POLICY is Never"
    ):
        await platform.start(make_spec(sid, image="streamspace-test/absent:1"))
    assert session_containers(engine, sid) == []
    assert f"{PREFIX}-session-{sid}" not in volume_names(engine)


@pytest.mark.parametrize("policy", ["IfNotPresent", "Always"])
@pytest.mark.asyncio
async def test_an_image_that_cannot_be_pulled_is_named(
    engine: docker.APIClient, policy: str
) -> None:
    # A registry on a closed loopback port: the pull fails at once, and stays on this host.
    image = f"127.0.0.1:9/{PREFIX}/desktop:1"
    engine.tag(DESKTOP_IMAGE, f"127.0.0.1:9/{PREFIX}/desktop", "1")
    if policy == "IfNotPresent":
        engine.remove_image(image)
    platform = DockerPlatform(settings(image_pull_policy=policy), agent_id=f"pull-{RUN}")
    sid = new_id()
    try:
        with pytest.raises(PlatformError, match=f"cannot pull image '{image}'"):
            await platform.start(make_spec(sid, image=image))
        assert session_containers(engine, sid) == []
    finally:
        await platform.close()
        if policy == "Always":
            engine.remove_image(image)


@pytest.mark.asyncio
async def test_no_image_in_the_template(platform: DockerPlatform) -> None:
    with pytest.raises(PlatformError, match="needs an image"):
        await platform.start(make_spec(new_id(), image=None))


@pytest.mark.asyncio
async def test_unknown_platform_option_is_named(
    platform: DockerPlatform, engine: docker.APIClient
) -> None:
    sid = new_id()
    with pytest.raises(PlatformError, match=r"privileged: Extra inputs.*knows: home_path"):
        await platform.start(make_spec(sid, platform_options={"privileged": True}))
    assert session_containers(engine, sid) == []


@pytest.mark.asyncio
async def test_a_foreign_container_with_the_name_is_left_alone(
    platform: DockerPlatform, engine: docker.APIClient
) -> None:
    sid = new_id()
    name = platform.container_name(sid)
    foreign = engine.create_container(DESKTOP_IMAGE, name=name, labels={RUN_LABEL: RUN})["Id"]
    with pytest.raises(PlatformError, match=r"already exists and is not managed by StreamSpace"):
        await platform.start(make_spec(sid))
    assert inspect(engine, name)["Id"] == foreign, "the foreign container must survive"
    assert f"{PREFIX}-session-{sid}" not in volume_names(engine)
    assert (await platform.status(sid)) is None


@pytest.mark.asyncio
async def test_a_foreign_volume_is_never_mounted(
    platform: DockerPlatform, engine: docker.APIClient
) -> None:
    user = f"v{uuid.uuid4().hex[:6]}"
    name = f"{PREFIX}-home-{user}"
    engine.create_volume(name, labels={"owner": "someone else"})
    sid = new_id()
    with pytest.raises(PlatformError, match=r"was not made by StreamSpace"):
        await platform.start(make_spec(sid, user=user, persistent_home=True))
    assert name in volume_names(engine)
    assert engine.inspect_volume(name)["Labels"] == {"owner": "someone else"}
    assert session_containers(engine, sid) == []


@pytest.mark.asyncio
async def test_a_container_that_exits_fails_the_start_with_its_output(
    platform: DockerPlatform, engine: docker.APIClient
) -> None:
    sid = new_id()
    command = ["sh", "-c", "echo the desktop cannot start >&2; exit 3"]
    with pytest.raises(PlatformError, match=r"exited during start(.|\n)*the desktop cannot start"):
        await platform.start(make_spec(sid, command=command))
    assert session_containers(engine, sid) == []
    assert f"{PREFIX}-session-{sid}" not in volume_names(engine)


@pytest.mark.asyncio
async def test_a_session_that_never_answers_times_out(engine: docker.APIClient) -> None:
    platform = DockerPlatform(settings(docker_start_timeout=1), agent_id=f"slow-{RUN}")
    sid = new_id()
    try:
        with pytest.raises(PlatformError, match=r"within DOCKER_START_TIMEOUT \(1s\)"):
            await platform.start(make_spec(sid, command=["sleep", "600"]))
    finally:
        await platform.close()
    assert session_containers(engine, sid) == []


@pytest.mark.parametrize(
    ("pattern", "forward"),
    [
        (r"POST /v[\d.]+/containers/create", False),  # the create never reaches the engine
        (r"POST /v[\d.]+/containers/create", True),  # it is made, but the answer is lost
        (r"POST /v[\d.]+/containers/[0-9a-f]+/start", False),  # made, never started
    ],
)
@pytest.mark.asyncio
async def test_the_engine_dying_mid_start_leaves_nothing_behind(
    proxy: EngineProxy, engine: docker.APIClient, pattern: str, forward: bool
) -> None:
    platform = DockerPlatform(settings(docker_host=proxy.url), agent_id=f"die-{RUN}")
    sid = new_id()
    try:
        proxy.die_on(pattern, forward=forward)
        with pytest.raises(PlatformError, match="did not answer"):
            await platform.start(make_spec(sid))
        assert proxy.died.is_set()
        proxy.revive()  # the engine is back: the next call finishes the cleanup
        assert await platform.status(sid) is None
        assert session_containers(engine, sid) == []
        assert f"{PREFIX}-session-{sid}" not in volume_names(engine)
        assert (await platform.start(make_spec(sid, 2))).state == "running"
        assert (await platform.stop(sid, 3)).state == "stopped"
    finally:
        await platform.close()


@pytest.mark.asyncio
async def test_the_engine_dying_mid_wake_keeps_the_session_hibernated(
    proxy: EngineProxy, engine: docker.APIClient
) -> None:
    platform = DockerPlatform(settings(docker_host=proxy.url), agent_id=f"wake-{RUN}")
    sid = new_id()
    try:
        await platform.start(make_spec(sid))
        await platform.hibernate(sid, 2)
        proxy.die_on(r"POST /v[\d.]+/containers/[0-9a-f]+/start")
        with pytest.raises(PlatformError, match="did not answer"):
            await platform.wake(make_spec(sid, 3))
        proxy.revive()
        status = await platform.status(sid)
        assert status is not None
        assert (status.state, status.generation) == ("hibernated", 2)
        assert f"{PREFIX}-session-{sid}" in volume_names(engine), "the home must survive"
        assert (await platform.wake(make_spec(sid, 3))).state == "running"
        await platform.stop(sid, 4)
    finally:
        await platform.close()


@pytest.mark.asyncio
async def test_max_sessions_zero_refuses_every_start(engine: docker.APIClient) -> None:
    platform = DockerPlatform(settings(max_sessions=0), agent_id=f"zero-{RUN}")
    sid = new_id()
    try:
        with pytest.raises(PlatformError, match=r"MAX_SESSIONS \(0\)"):
            await platform.start(make_spec(sid))
    finally:
        await platform.close()
    assert session_containers(engine, sid) == []


@pytest.mark.asyncio
async def test_docker_host_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", DOCKER_HOST)
    monkeypatch.setenv("NETWORK_PREFIX", PREFIX)
    platform = DockerPlatform(agent_id="env")
    assert platform.config.docker_host == DOCKER_HOST
    assert platform.network == f"{PREFIX}-env"
    await platform.check()
    await platform.close()
