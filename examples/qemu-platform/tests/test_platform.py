"""What the qemu platform does beyond the conformance kit: the VM it runs, its options,
its settings, adoption details, and every bad input."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from pathlib import Path

import pytest
import uvloop
from conftest import (
    BIOS_SCREEN,
    BOOTED_SCREEN,
    make_spec,
    new_id,
    server_init,
    settings,
    wait_screen,
)

from streamspace_example_qemu import INSTALL_HINT, QemuPlatform
from streamspace_example_qemu import platform as qemu_module
from streamspace_sdk import ConfigError, Platform, PlatformError, load_driver
from streamspace_sdk.platform import LABEL_AGENT_ID, LABEL_SESSION_ID


@pytest.fixture
def platform(state_dir: Path, image_dir: Path) -> QemuPlatform:
    return QemuPlatform(settings(state_dir, qemu_image_dir=image_dir), agent_id="agent-a")


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def descriptors(pid: int | str) -> list[str]:
    """What the open descriptors of process ``pid`` point to (``pipe:[...]``, paths...)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            found.append(os.readlink(fd))
    return found


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie its new parent did not reap counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except OSError:
        return True


@pytest.mark.asyncio
async def test_check_passes_with_qemu_installed(platform: QemuPlatform) -> None:
    await platform.check()
    assert (platform.state_dir / "sessions").is_dir()


@pytest.mark.asyncio
async def test_check_says_what_to_install_when_qemu_is_missing(state_dir: Path) -> None:
    missing = QemuPlatform(settings(state_dir, qemu_binary="no-such-qemu"), agent_id="a")
    with pytest.raises(PlatformError, match="QEMU_BINARY 'no-such-qemu' is not installed") as e:
        await missing.check()
    assert INSTALL_HINT in str(e.value)


@pytest.mark.asyncio
async def test_check_refuses_kvm_without_dev_kvm(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu_module, "_KVM_DEVICE", state_dir / "no-kvm")  # a host without it
    kvm = QemuPlatform(settings(state_dir, qemu_accel="kvm"), agent_id="a")
    with pytest.raises(PlatformError, match=r"QEMU_ACCEL=kvm needs .* /dev/kvm"):
        await kvm.check()


def test_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, state_dir: Path
) -> None:
    monkeypatch.setenv("QEMU_STATE_DIR", str(state_dir))
    monkeypatch.setenv("QEMU_MEMORY", "128")
    monkeypatch.setenv("QEMU_STOP_TIMEOUT", "500ms")
    monkeypatch.setenv("MAX_SESSIONS", "3")
    platform = load_driver("streamspace.platforms", "qemu", base=Platform, agent_id="env")
    assert isinstance(platform, QemuPlatform)
    assert platform.state_dir == state_dir
    assert platform.image_dir == state_dir / "images"
    assert (platform.config.qemu_memory, platform.config.qemu_stop_timeout) == (128, 0.5)
    assert platform.config.max_sessions == 3


def test_a_bad_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QEMU_MEMORY", "8")
    with pytest.raises(ConfigError, match="QEMU_MEMORY"):
        QemuPlatform(agent_id="env")
    monkeypatch.setenv("QEMU_MEMORY", "64")
    monkeypatch.setenv("QEMU_ACCEL", "hvf")
    with pytest.raises(ConfigError, match="QEMU_ACCEL"):
        QemuPlatform(agent_id="env")


@pytest.mark.asyncio
async def test_vm_shows_the_bios_screen_named_after_the_session(
    platform: QemuPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_TOKEN", "agent-secret")  # as in an agent process
    sid = new_id()
    status = await platform.start(make_spec(sid, resources={"memory_limit_mib": 96}))
    assert status.state == "running"
    assert status.vnc is not None
    assert status.vnc.host == "127.0.0.1"
    name = await wait_screen(status.vnc.host, status.vnc.port, BIOS_SCREEN)
    assert name == f"QEMU (streamspace-{sid})"
    pid = status.platform_metadata["pid"]
    assert isinstance(pid, int)
    argv = cmdline(pid)
    assert argv[argv.index("-m") + 1] == "96"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert "-drive" not in argv  # disk-less by default
    assert environ(pid) == [b"PATH=" + platform.config.path.encode(), b"LC_ALL=C", b""]
    await platform.stop(sid, 2)
    assert gone(pid)


@pytest.mark.asyncio
async def test_template_disk_is_booted_and_never_written(
    platform: QemuPlatform, image_dir: Path
) -> None:
    before = (image_dir / "boot.img").read_bytes()
    sid = new_id()
    status = await platform.start(make_spec(sid, platform_options={"disk": "boot.img"}))
    assert status.vnc is not None
    await wait_screen(status.vnc.host, status.vnc.port, BOOTED_SCREEN)
    await platform.stop(sid, 2)
    assert (image_dir / "boot.img").read_bytes() == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"disks": "boot.img"}, r"disks: Extra inputs .*; it knows: disk, disk_format"),
        ({"disk": "../../etc/passwd"}, r"disk: String should match pattern"),
        ({"disk": "boot.img", "disk_format": "vmdk"}, r"disk_format: Input should be"),
        ({"disk": "absent.img"}, r"disk 'absent.img' is not a file in QEMU_IMAGE_DIR"),
    ],
)
@pytest.mark.asyncio
async def test_bad_platform_options_fail_the_start_and_leave_nothing(
    platform: QemuPlatform, options: dict[str, str], message: str
) -> None:
    sid = new_id()
    with pytest.raises(PlatformError, match=message):
        await platform.start(make_spec(sid, platform_options=options))
    assert await platform.status(sid) is None
    assert list((platform.state_dir / "sessions").glob("*")) == []


@pytest.mark.asyncio
async def test_qemu_error_is_the_reason_and_nothing_is_left(platform: QemuPlatform) -> None:
    sid = new_id()
    options = {"disk": "garbage.qcow2", "disk_format": "qcow2"}
    with pytest.raises(PlatformError, match="Image is not in qcow2 format"):
        await platform.start(make_spec(sid, platform_options=options))
    assert await platform.status(sid) is None
    assert (await platform.usage()).sessions == 0


@pytest.mark.asyncio
async def test_vm_killed_from_outside_is_failed_until_started_again(
    platform: QemuPlatform,
) -> None:
    sid = new_id()
    status = await platform.start(make_spec(sid))
    pid = status.platform_metadata["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)
    deadline = asyncio.get_running_loop().time() + 10
    while (now := await platform.status(sid)) is not None and now.state == "running":
        assert asyncio.get_running_loop().time() < deadline, "a killed VM still runs"
        await asyncio.sleep(0.02)
    assert now is not None
    assert (now.state, now.detail) == ("failed", "the VM exited")
    again = await platform.start(make_spec(sid, 2))
    assert (again.state, again.generation) == ("running", 2)
    assert again.platform_metadata["pid"] != pid
    await platform.stop(sid, 3)


@pytest.mark.asyncio
async def test_a_reused_pid_is_not_taken_for_the_vm(platform: QemuPlatform) -> None:
    sid = new_id()
    status = await platform.start(make_spec(sid))
    pid = status.platform_metadata["pid"]
    assert isinstance(pid, int)
    pid_file = platform.state_dir / "sessions" / sid / "qemu.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # a live process that is not this VM
    now = await platform.status(sid)
    assert now is not None
    assert now.state == "failed"
    pid_file.write_text(f"{pid}\n")
    await platform.stop(sid, 2)
    assert gone(pid)


@pytest.mark.asyncio
async def test_a_taken_port_is_retried_with_another(
    platform: QemuPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        free = qemu_module._free_port
        monkeypatch.setattr(qemu_module, "_free_port", lambda: next(ports, None) or free())
        sid = new_id()
        status = await platform.start(make_spec(sid))
    assert status.vnc is not None
    assert status.vnc.port != taken
    await wait_screen(status.vnc.host, status.vnc.port, BIOS_SCREEN)
    await platform.stop(sid, 2)


@pytest.mark.asyncio
async def test_new_object_adopts_with_labels_and_other_agents_keep_out(
    state_dir: Path, platform: QemuPlatform
) -> None:
    sid = new_id()
    await platform.start(make_spec(sid, labels={"team": "qa"}))
    config = settings(state_dir)
    reborn = QemuPlatform(config, agent_id="agent-a")
    (adopted,) = await reborn.list_sessions()
    assert (adopted.session_id, adopted.state) == (sid, "running")
    labels = adopted.platform_metadata["labels"]
    assert isinstance(labels, dict)
    assert (labels["team"], labels[LABEL_SESSION_ID], labels[LABEL_AGENT_ID]) == (
        "qa",
        sid,
        "agent-a",
    )
    other = QemuPlatform(config, agent_id="agent-b")
    assert await other.list_sessions() == []
    assert await other.status(sid) is None
    with pytest.raises(PlatformError, match="belongs to agent 'agent-a'"):
        await other.start(make_spec(sid, 2))
    assert (await reborn.stop(sid, 2)).state == "stopped"
    assert await platform.status(sid) is None


@pytest.mark.asyncio
async def test_odd_session_ids_get_safe_directories(platform: QemuPlatform) -> None:
    sid = "odd id/with,comma"
    status = await platform.start(make_spec(sid))
    assert status.vnc is not None
    assert (await server_init(status.vnc.host, status.vnc.port))[2] == f"QEMU (streamspace-{sid})"
    (folder,) = (platform.state_dir / "sessions").iterdir()
    assert folder.name.startswith("_")
    await platform.stop(sid, 2)
    assert list((platform.state_dir / "sessions").iterdir()) == []


def test_starts_under_uvloop_and_the_vm_holds_nothing_of_the_agent(state_dir: Path) -> None:
    """The agent runs on uvloop; under it, an asyncio subprocess leaves descriptors in the
    child that a daemonised QEMU would keep (and a start would hang reading its stderr)."""
    platform = QemuPlatform(settings(state_dir, qemu_start_timeout=10), agent_id="uv")

    async def start_and_look() -> list[str]:
        sid = new_id()
        status = await platform.start(make_spec(sid))
        assert status.state == "running"
        pid = status.platform_metadata["pid"]
        assert isinstance(pid, int)
        held = descriptors(pid)
        await platform.stop(sid, 2)
        return held

    held = uvloop.run(start_and_look())
    ours = set(descriptors("self"))
    shared = [t for t in held if t.startswith(("pipe:", "socket:")) and t in ours]
    assert not shared, f"the VM holds descriptors of the agent: {shared}"
    sockets = [t for t in held if t.startswith("socket:")]
    assert len(sockets) == 1, f"the VM should hold its VNC socket only: {held}"
