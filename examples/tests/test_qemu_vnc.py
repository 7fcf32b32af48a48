"""Issue 10's "done when": the QEMU example starts a VM session whose screen a VNC client
reads through the control plane's ``/vnc/{id}``.

Real processes throughout: the control plane on SQLite, ``streamspace-agent run`` with
``PLATFORM=qemu`` (the example package, found through its entry point), a QEMU VM, and a
viewer doing the RFB handshake over the WebSocket and reading a whole frame.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import (
    AGENT,
    WAIT_S,
    Stack,
    clean_env,
    create_session,
    create_template,
    vnc_url,
    wait_state,
)

from streamspace_sdk.testing import Screen, read_screen

BIOS_SCREEN = (720, 400)
"""SeaBIOS's text screen, "No bootable device" on a disk-less VM."""
BOOTED_SCREEN = (640, 400)
"""VGA mode 13h, which the boot sector below switches to."""
BOOT_MODE_13H = bytes.fromhex("b81300cd10faf4ebfd").ljust(510, b"\0") + b"\x55\xaa"
"""mov ax, 13h; int 10h; cli; hlt; jmp back to hlt; the boot signature."""


async def screen_of(
    admin: httpx.AsyncClient, stack: Stack, session_id: str, size: tuple[int, int]
) -> Screen:
    """Read the session's screen through ``/vnc/{id}`` until it has ``size``.

    The guest changes video modes as it boots (the VGA BIOS starts at 640x480), and
    nothing tells a viewer when it is done: each try is a new viewer with a new token.
    """
    deadline = time.monotonic() + WAIT_S
    while True:
        screen = await read_screen(await vnc_url(admin, stack, session_id))
        if (screen.width, screen.height) == size:
            return screen
        if time.monotonic() > deadline:
            pytest.fail(f"the screen stays {screen.width}x{screen.height}, not {size}")
        await asyncio.sleep(0.05)


async def vm_gone(state_dir: Path, session_id: str) -> bool:
    return not (state_dir / "sessions" / session_id).exists()


@pytest.mark.asyncio
async def test_vm_screen_is_readable_through_the_control_plane(
    stack: Stack, tmp_path: Path
) -> None:
    admin = await stack.start_control_plane()
    state_dir = tmp_path / "qemu"
    (state_dir / "images").mkdir(parents=True)
    (state_dir / "images" / "boot.img").write_bytes(BOOT_MODE_13H)
    await stack.start_agent(
        "qemu-agent", AGENT, PLATFORM="qemu", QEMU_STATE_DIR=str(state_dir), MAX_SESSIONS="2"
    )
    await create_template(admin, "vm", display_name="A VM", platform="qemu")
    await create_template(
        admin,
        "vm-disk",
        display_name="A VM booting a disk",
        platform="qemu",
        platform_options={"disk": "boot.img"},
    )

    bios = await create_session(admin, "vm")
    booted = await create_session(admin, "vm-disk")
    await wait_state(admin, bios, "running")
    await wait_state(admin, booted, "running")
    session = (await admin.get(f"/api/v1/sessions/{bios}")).json()
    assert (session["agent_id"], session["platform"]) == ("qemu-agent", "qemu")

    screen = await screen_of(admin, stack, bios, BIOS_SCREEN)
    assert screen.name == f"QEMU (streamspace-{bios})"
    assert len(screen.colours()) >= 2, "the BIOS screen is blank: no text on it"
    disk_screen = await screen_of(admin, stack, booted, BOOTED_SCREEN)
    assert disk_screen.name == f"QEMU (streamspace-{booted})"

    for session_id in (bios, booted):
        r = await admin.patch(f"/api/v1/sessions/{session_id}", json={"state": "stopped"})
        assert r.status_code == 200, r.text
        await wait_state(admin, session_id, "stopped")
        assert await vm_gone(state_dir, session_id), "stopped, but its VM's state is there"


def test_agent_without_qemu_exits_saying_what_to_install(tmp_path: Path) -> None:
    env = clean_env(
        AGENT_ID="no-qemu",
        CONTROL_PLANE_URL="ws://127.0.0.1:9",  # never dialled: the check comes first
        PLATFORM="qemu",
        QEMU_BINARY="qemu-system-x86_64-not-installed",
        QEMU_STATE_DIR=str(tmp_path / "qemu"),
        HEALTH_PORT="0",
    )
    done = subprocess.run(AGENT, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 2, done
    assert "QEMU_BINARY 'qemu-system-x86_64-not-installed' is not installed" in done.stderr
    assert "apt-get install qemu-system-x86" in done.stderr
