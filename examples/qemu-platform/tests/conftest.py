"""Fixtures: real QEMU VMs under a state directory of this run, and their screens' sizes
(read with the SDK kit's RFB viewer).

The tests fail, never skip, when ``qemu-system-x86_64`` is missing: install Debian's
``qemu-system-x86``. Every VM a test leaves is killed when the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamspace_example_qemu import QemuPlatform
from streamspace_sdk import SessionSpec
from streamspace_sdk.testing import RFB_VERSION, rfb_handshake, rfb_tcp

pytest_plugins = ["streamspace_sdk.testing.plugin"]

# mov ax, 13h; int 10h; cli; hlt; jmp back to hlt; then the boot signature
BOOT_MODE_13H = bytes.fromhex("b81300cd10faf4ebfd").ljust(510, b"\0") + b"\x55\xaa"
"""A disk image of one boot sector that switches the screen to VGA mode 13h and halts. A
VM that boots it shows 640x400 (mode 13h, doubled) instead of the BIOS's 720x400 text."""
BIOS_SCREEN = (720, 400)
BOOTED_SCREEN = (640, 400)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This run's root; every VM whose pid file is under it is killed at the end."""
    root = tmp_path_factory.mktemp("qemu")
    yield root
    for pid_file in root.glob("**/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            if str(pid_file).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def state_dir(run_dir: Path) -> Path:
    path = run_dir / uuid.uuid4().hex[:8]
    path.mkdir()
    return path


@pytest.fixture
def image_dir(state_dir: Path) -> Path:
    """QEMU_IMAGE_DIR with ``boot.img`` (mode 13h) and ``garbage.qcow2`` (not an image)."""
    images = state_dir / "images"
    images.mkdir()
    (images / "boot.img").write_bytes(BOOT_MODE_13H)
    (images / "garbage.qcow2").write_bytes(b"this is not a qcow2 image\n" * 40)
    return images


def settings(state_dir: Path, **overrides: Any) -> QemuPlatform.Settings:
    values: dict[str, Any] = {
        "qemu_state_dir": state_dir,
        "qemu_stop_timeout": 2,
        "qemu_start_timeout": 20,
        "max_sessions": 2,
    }
    return QemuPlatform.Settings(**(values | overrides))


def make_spec(session_id: str, generation: int = 1, **fields: Any) -> SessionSpec:
    values: dict[str, Any] = {
        "session_id": session_id,
        "generation": generation,
        "user": "alice",
        "template": "vm",
    }
    return SessionSpec(**(values | fields))


def new_id(stem: str = "q") -> str:
    return f"{stem}-{uuid.uuid4().hex[:10]}"


async def wait_screen(host: str, port: int, size: tuple[int, int], timeout_s: float = 10) -> str:
    """Wait until the VM's screen has ``size``; return its desktop name.

    The screen changes as the guest sets video modes (the VGA BIOS starts at 640x480,
    SeaBIOS then shows 720x400 text); the VM cannot tell us, so poll it, briefly.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        width, height, name = await server_init(host, port)
        if (width, height) == size:
            return name
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"the screen stays {width}x{height}, not {size[0]}x{size[1]}")
        await asyncio.sleep(0.05)


async def server_init(host: str, port: int, timeout_s: float = 5.0) -> tuple[int, int, str]:
    """Do an RFB 3.8 handshake (security type None) and return ServerInit's framebuffer
    width, height and desktop name."""
    async with asyncio.timeout(timeout_s), rfb_tcp(host, port) as rfb:
        banner, init = await rfb_handshake(rfb)
    assert banner == RFB_VERSION, banner
    return init.width, init.height, init.name
