"""Build a desktop session image on this host, with no registry: ``streamspace/desktop``.

A Debian rootfs with TigerVNC's ``Xvnc`` and ``xterm``, made by ``mmdebstrap`` and loaded
with ``docker import``. It runs as user ``streamspace`` (uid 1000, home
``/home/streamspace``) and serves VNC on ``$VNC_PORT`` (5900) without a password: the
``docker`` platform publishes that port on 127.0.0.1 only. The image carries a label with a
hash of its recipe, so a build is skipped when the engine already has this recipe's image.

Run ``python -m streamspace_docker.image`` (as root, for mmdebstrap; Debian's ``mmdebstrap``
package) to build it; the tests and a template with ``image: streamspace/desktop:bookworm``
use it. :func:`ensure_rootfs_image` makes any such image from a :class:`Rootfs` recipe
(``images/build.py`` makes the Python base of the StreamSpace images with it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import docker

from streamspace_sdk.errors import PlatformError

__all__ = [
    "DESKTOP",
    "DESKTOP_IMAGE",
    "RECIPE_LABEL",
    "Rootfs",
    "ensure_desktop_image",
    "ensure_rootfs_image",
    "main",
]

log = logging.getLogger(__name__)

DESKTOP_IMAGE = "streamspace/desktop:bookworm"
"""The tag of the image this module builds."""

RECIPE_LABEL = "io.streamspace.recipe"
"""Image label holding the hash of the recipe an image was built from."""

_SUITE = "bookworm"
_PACKAGES = ("tigervnc-standalone-server", "xterm")

_START_SCRIPT = """\
#!/bin/sh
# StreamSpace desktop: Xvnc on display :1, and an xterm that comes back when it is closed.
set -eu
(
    while [ ! -S /tmp/.X11-unix/X1 ]; do sleep 0.1; done
    while true; do
        DISPLAY=:1 xterm -title "StreamSpace ${STREAMSPACE_SESSION_ID:-desktop}" || true
        sleep 1
    done
) &
exec Xvnc :1 -rfbport "${VNC_PORT:-5900}" -SecurityTypes None -geometry "${GEOMETRY:-1280x800}" \\
    -depth 24 -nolisten tcp -desktop streamspace
"""

_HOOKS = (
    'chroot "$1" useradd --uid 1000 --create-home --home-dir /home/streamspace '
    "--shell /bin/sh streamspace",
    'install -d -m 1777 "$1/tmp/.X11-unix"',
)

_CHANGES = (
    "USER streamspace",
    "WORKDIR /home/streamspace",
    "ENV HOME=/home/streamspace",
    "EXPOSE 5900",
    'CMD ["/usr/local/bin/streamspace-desktop"]',
)

_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")


@dataclass(frozen=True)
class Rootfs:
    """What ``mmdebstrap`` puts into an image, and what ``docker import`` sets on it."""

    suite: str
    """Debian release, e.g. ``bookworm``."""
    packages: tuple[str, ...]
    """Packages installed on top of the variant's."""
    options: tuple[str, ...] = ("--variant=minbase",)
    """Further ``mmdebstrap`` options."""
    excludes: tuple[str, ...] = ()
    """Paths dpkg leaves out (``path-exclude`` globs)."""
    hooks: tuple[str, ...] = ()
    """``--customize-hook`` commands, run with the rootfs as ``$1``."""
    files: tuple[tuple[str, str], ...] = ()
    """``(path in the image, content)``, installed with mode 755 after the hooks."""
    changes: tuple[str, ...] = ()
    """Dockerfile instructions ``docker import`` applies (``USER``, ``CMD``, ...)."""
    mirrors: tuple[str, ...] = ()
    """APT sources; none: mmdebstrap's default mirror."""

    def recipe_id(self) -> str:
        """Return a hash of everything that goes into the image."""
        parts = [repr(field) for field in astuple(self)]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


DESKTOP = Rootfs(
    suite=_SUITE,
    packages=_PACKAGES,
    excludes=_EXCLUDES,
    hooks=_HOOKS,
    files=(("/usr/local/bin/streamspace-desktop", _START_SCRIPT),),
    changes=_CHANGES,
)
"""The desktop session image's recipe."""


def ensure_desktop_image(
    client: docker.APIClient,
    tag: str = DESKTOP_IMAGE,
    *,
    rebuild: bool = False,
    progress: Callable[[str], None] = log.info,
) -> str:
    """Return the id of the desktop image ``tag``, building it first unless the engine has
    this recipe's image.

    Raises:
        PlatformError: ``mmdebstrap`` is missing or fails, or the engine refuses the import.
    """
    return ensure_rootfs_image(client, tag, DESKTOP, rebuild=rebuild, progress=progress)


def ensure_rootfs_image(
    client: docker.APIClient,
    tag: str,
    rootfs: Rootfs,
    *,
    rebuild: bool = False,
    progress: Callable[[str], None] = log.info,
) -> str:
    """Return the id of ``tag``, making it from ``rootfs`` first unless the engine has an
    image of this recipe under that tag. A replaced image is removed when nothing uses it.

    Raises:
        PlatformError: ``mmdebstrap`` is missing or fails, or the engine refuses the import.
    """
    wanted = rootfs.recipe_id()
    found = _inspect(client, tag)
    labels = ((found or {}).get("Config") or {}).get("Labels") or {}
    if not rebuild and found is not None and labels.get(RECIPE_LABEL) == wanted:
        return str(found["Id"])
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise PlatformError(
            f"building {tag} needs mmdebstrap: apt-get install mmdebstrap (and run as root)"
        )
    with tempfile.TemporaryDirectory(prefix="streamspace-image-") as tmp:
        installs = []
        for i, (path, content) in enumerate(rootfs.files):
            source = Path(tmp, f"file-{i}")
            source.write_text(content)
            installs.append(f'install -D -m 755 "{source}" "$1{path}"')
        archive = Path(tmp, "rootfs.tar")
        argv = [
            mmdebstrap,
            *rootfs.options,
            f"--include={','.join(rootfs.packages)}",
            *(f"--dpkgopt=path-exclude={p}" for p in rootfs.excludes),
            *(f"--customize-hook={h}" for h in (*rootfs.hooks, *installs)),
            rootfs.suite,
            str(archive),
            *rootfs.mirrors,
        ]
        progress(f"building {tag} with mmdebstrap ({rootfs.suite}: {', '.join(rootfs.packages)})")
        _run(argv, progress)
        progress(f"importing {archive.stat().st_size // 2**20} MiB into the engine as {tag}")
        repository, _, version = tag.rpartition(":")
        if not repository or "/" in version:
            repository, version = tag, "latest"
        try:
            client.import_image(
                src=str(archive),
                repository=repository,
                tag=version,
                changes=[*rootfs.changes, f"LABEL {RECIPE_LABEL}={wanted}"],
            )
        except docker.errors.DockerException as exc:
            raise PlatformError(f"the Docker engine refused to import {tag}: {exc}") from None
    previous, found = found, _inspect(client, tag)
    if found is None:
        raise PlatformError(f"the engine reported no error, yet has no image {tag}")
    progress(f"{tag} is {found['Id']}")
    if previous is not None and previous["Id"] != found["Id"]:
        with contextlib.suppress(docker.errors.APIError):  # containers or images still use it
            client.remove_image(previous["Id"])
    return str(found["Id"])


def _inspect(client: docker.APIClient, tag: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = client.inspect_image(tag)  # type: ignore[no-untyped-call]
    except docker.errors.ImageNotFound:
        return None
    return found


def _run(argv: list[str], progress: Callable[[str], None]) -> None:
    """Run ``argv``, passing its lines to ``progress``; raise with its last lines on failure."""
    tail: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = [*tail[-19:], line]
            if line.startswith("I: "):  # mmdebstrap's stage lines; the rest is apt's detail
                progress(line)
    if proc.returncode != 0:
        lines = "\n".join(tail)
        raise PlatformError(f"mmdebstrap failed (exit {proc.returncode}); it said:\n{lines}")


def main(argv: Sequence[str] | None = None) -> int:
    """Build the desktop image; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m streamspace_docker.image", description=__doc__)
    parser.add_argument("--tag", default=DESKTOP_IMAGE, help=f"image tag (default {DESKTOP_IMAGE})")
    parser.add_argument("--rebuild", action="store_true", help="build even if it is up to date")
    parser.add_argument(
        "--docker-host",
        default="unix:///var/run/docker.sock",
        help="the engine's address, as DOCKER_HOST",
    )
    args = parser.parse_args(argv)
    try:
        client = docker.APIClient(base_url=args.docker_host, version="auto")
        image = ensure_desktop_image(client, args.tag, rebuild=args.rebuild, progress=print)
    except (PlatformError, docker.errors.DockerException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
