"""StreamSpace example platform plugin: sessions as QEMU virtual machines.

Registered as the ``qemu`` driver of the ``streamspace.platforms`` entry-point group, so an
agent runs it with ``PLATFORM=qemu``.
"""

from __future__ import annotations

from streamspace_example_qemu.platform import INSTALL_HINT, QemuOptions, QemuPlatform

__all__ = ["INSTALL_HINT", "QemuOptions", "QemuPlatform"]
