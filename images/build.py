"""Build StreamSpace's container images with the local Docker engine, from local wheels.

    python images/build.py                          # all three, on a locally made base
    python images/build.py control-plane --base-image python:3.11-slim-bookworm

Images (each ``images/<name>/Dockerfile``):

- ``streamspace/control-plane``: ``streamspace-controlplane serve`` on port 8080;
- ``streamspace/k8s-agent``: ``streamspace-agent run`` with ``PLATFORM=kubernetes``;
- ``streamspace/docker-agent``: ``streamspace-agent run`` with ``PLATFORM=docker``.

What it does:

1. The base. ``--base-image`` names one (a public ``python:3.11-slim-bookworm`` where a
   registry answers); by default a minimal Debian bookworm with ``python3``,
   ``python3-venv`` and ``ca-certificates`` is made here with ``mmdebstrap`` (as root;
   Debian's ``mmdebstrap`` package) and ``docker import``-ed as ``streamspace/python-base:
   bookworm``. It carries a label with the hash of its recipe and is made again only when
   the recipe changes (or with ``--rebuild-base``), so a machine builds it once.
2. The wheels, on this host: the StreamSpace packages each image installs (with
   ``pip wheel``, from this checkout) and every third-party dependency (``pip download``
   for the base's Python version, libc and machine, read from the base itself), so the
   image build needs no index: nothing in it reaches PyPI.
3. ``docker build --build-arg BASE_IMAGE=<base>`` of a context holding the Dockerfile,
   ``deps/`` (third-party wheels) and ``project/`` (StreamSpace wheels), which the
   Dockerfile installs with ``pip install --no-index`` into ``/opt/streamspace``. The
   dependency layer is cached by the engine until the dependencies change.

The images run as uid 10001 (user ``streamspace``, home ``/home/streamspace``). The script
prints one ``<tag> <image id>`` line per image it built; progress goes to standard error.
Needs the ``docker`` Python package, ``streamspace-docker`` (its
:func:`~streamspace_docker.image.ensure_rootfs_image` makes the base) and a Docker engine
(``DOCKER_HOST`` or the local socket).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import docker
import docker.errors

from streamspace_docker.image import Rootfs, ensure_rootfs_image
from streamspace_sdk.errors import PlatformError

__all__ = [
    "BASE_IMAGE",
    "IMAGES",
    "BuildError",
    "Target",
    "build_images",
    "ensure_base",
    "main",
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

BASE_IMAGE = "streamspace/python-base:bookworm"
"""The tag of the base this script makes when no ``--base-image`` is given."""

IMAGES: dict[str, str] = {
    "control-plane": "streamspace/control-plane",
    "k8s-agent": "streamspace/k8s-agent",
    "docker-agent": "streamspace/docker-agent",
}
"""Image name (the folder of its Dockerfile) → repository."""

PROJECT_DIRS = ("sdk", "controlplane", "plugins")
"""Where the StreamSpace packages live: a folder with a pyproject.toml, or a folder of them."""

_MIRRORS = (
    "deb http://deb.debian.org/debian bookworm bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
_BASE_OPTIONS = (
    "--variant=minbase",
    # Merge /usr with symlinks rather than Debian's usrmerge package, which pulls in perl.
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
)
_BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
_BASE_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
)
_BASE_HOOKS = (
    # The standard library's byte code stays: the images run as a user who could not
    # write it, so every process start would compile it again.
    'rm -rf "$1/var/cache/apt" "$1/var/lib/apt/lists" "$1/var/log/apt"',
)
_BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
BASE = Rootfs(
    suite="bookworm",
    packages=_BASE_PACKAGES,
    options=_BASE_OPTIONS,
    excludes=_BASE_EXCLUDES,
    hooks=_BASE_HOOKS,
    changes=_BASE_CHANGES,
    mirrors=_MIRRORS,
)
"""The recipe of the base made when no ``--base-image`` is given."""
_UV_MANYLINUX = (17, 28, *range(31, 41))
"""The glibc minors ``uv pip compile --python-platform`` knows (``x86_64-manylinux_2_36``)."""
_CACHE = Path.home() / ".cache" / "streamspace-images"
"""Where dependency wheels are kept between builds, a folder per target."""
_NEED_UV = "uv (pip install uv) builds the wheels and resolves the dependencies"
_LAYER_LINE = re.compile(r"^ ---> ([0-9a-f]{12})$")
"""The classic builder's line naming the layer a step made or found in its cache."""
_PACKAGES_ARG = re.compile(r'^ARG PACKAGES="([^"]+)"\s*$', re.MULTILINE)
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class BuildError(Exception):
    """A step of the build failed; the message says which and why."""


@dataclass(frozen=True)
class Target:
    """The interpreter of a base image: what its dependency wheels must be built for."""

    python: tuple[int, int, int]
    """Python's version, e.g. ``(3, 11, 2)``; markers such as ``python_full_version`` need all
    three parts."""
    machine: str
    """``platform.machine()``, e.g. ``x86_64``."""
    glibc: tuple[int, int]
    """The C library's version, e.g. ``(2, 36)``; wheels are chosen by manylinux tag."""

    def uv_args(self) -> list[str]:
        """Return ``uv pip compile`` options that resolve for this interpreter."""
        usable = [m for m in _UV_MANYLINUX if m <= self.glibc[1]]
        if self.glibc[0] != 2 or not usable:
            raise BuildError(f"glibc {self.glibc} is older than manylinux_2_17; no wheels fit")
        return [
            "--only-binary=:all:",
            f"--python-version={'.'.join(map(str, self.python))}",
            f"--python-platform={self.machine}-manylinux_2_{max(usable)}",
        ]

    def key(self) -> str:
        """Return a folder name for wheels of this target, e.g. ``cp311-x86_64-glibc2.36``."""
        major, minor, _ = self.python
        return f"cp{major}{minor}-{self.machine}-glibc{self.glibc[0]}.{self.glibc[1]}"

    def pip_args(self) -> list[str]:
        """Return ``pip download`` options that select wheels this interpreter can load."""
        major, minor, _ = self.python
        platforms = [f"manylinux_2_{m}_{self.machine}" for m in range(self.glibc[1], 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        platforms += [f"{tag}_{self.machine}" for m, tag in legacy.items() if m <= self.glibc[1]]
        return [
            "--only-binary=:all:",
            f"--python-version={major}.{minor}",
            "--implementation=cp",
            f"--abi=cp{major}{minor}",
            *(f"--platform={p}" for p in platforms),
        ]


@dataclass(frozen=True)
class Package:
    """One StreamSpace distribution of this checkout."""

    name: str
    version: str
    path: Path
    requires: frozenset[str]
    """Names of the StreamSpace distributions it depends on."""


Progress = Callable[[str], None]


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- the base -------------------------------------------------------------------------------


def ensure_base(
    client: docker.DockerClient,
    tag: str = BASE_IMAGE,
    *,
    rebuild: bool = False,
    progress: Progress = _say,
) -> str:
    """Return the id of the base ``tag``, making it first unless the engine has this recipe's.

    Raises:
        BuildError: ``mmdebstrap`` is missing or fails, or the engine refuses the import.
    """
    try:
        return ensure_rootfs_image(client.api, tag, BASE, rebuild=rebuild, progress=progress)
    except PlatformError as exc:
        hint = ""
        if "needs mmdebstrap" in str(exc):
            hint = "; or pass --base-image python:3.11-slim-bookworm where a registry answers"
        raise BuildError(f"{exc}{hint}") from None


def probe_target(client: docker.DockerClient, image: str) -> Target:
    """Return what the ``python3`` of ``image`` is, by running it once.

    Raises:
        BuildError: the image has no ``python3``, or it is not on glibc.
    """
    script = (
        "import platform, sys; "
        "print(*sys.version_info[:3], platform.machine(), *platform.libc_ver())"
    )
    try:
        out = client.containers.run(
            image, ["python3", "-c", script], remove=True, user="0", network_disabled=True
        )
    except docker.errors.ContainerError as exc:
        raise BuildError(f"{image} cannot run python3: {exc}") from None
    except docker.errors.ImageNotFound:
        raise BuildError(f"the engine has no image {image}; pull or build it first") from None
    fields = out.decode().split()
    if len(fields) != 6 or fields[4] != "glibc":
        raise BuildError(
            f"{image}: python3 reports {out.decode().strip()!r}; the images need a CPython "
            "on glibc (Debian, Ubuntu, the python:*-slim images)"
        )
    libc = [int(p) for p in fields[5].split(".")[:2]]
    return Target(
        python=(int(fields[0]), int(fields[1]), int(fields[2])),
        machine=fields[3],
        glibc=(libc[0], libc[1]),
    )


# -- the wheels -----------------------------------------------------------------------------


def find_packages(repo: Path = REPO) -> dict[str, Package]:
    """Return this checkout's StreamSpace distributions by name."""
    found: dict[str, Package] = {}
    for top in PROJECT_DIRS:
        for pyproject in sorted(
            [repo / top / "pyproject.toml", *(repo / top).glob("*/pyproject.toml")]
        ):
            if not pyproject.is_file():
                continue
            project = tomllib.loads(pyproject.read_text())["project"]
            found[project["name"]] = Package(
                name=project["name"],
                version=project["version"],
                path=pyproject.parent,
                requires=frozenset(_names(project.get("dependencies", []))),
            )
    return {
        name: replace(package, requires=package.requires & found.keys())
        for name, package in found.items()
    }


def _names(requirements: Iterable[str]) -> Iterable[str]:
    for requirement in requirements:
        match = _REQUIREMENT_NAME.match(requirement)
        if match:
            yield match.group(1).lower().replace("_", "-")


def image_packages(name: str) -> list[str]:
    """Return the distributions the Dockerfile of image ``name`` installs (its PACKAGES)."""
    dockerfile = (HERE / name / "Dockerfile").read_text()
    match = _PACKAGES_ARG.search(dockerfile)
    if match is None:
        raise BuildError(f'images/{name}/Dockerfile has no ARG PACKAGES="..." line')
    return match.group(1).split()


def closure(names: Iterable[str], packages: dict[str, Package]) -> list[Package]:
    """Return the packages ``names`` and every StreamSpace package they need, sorted."""
    todo, seen = list(names), set[str]()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in packages:
            raise BuildError(f"{name} is not a package of this checkout: {sorted(packages)}")
        seen.add(name)
        todo.extend(packages[name].requires)
    return [packages[n] for n in sorted(seen)]


def build_project_wheels(
    packages: Iterable[Package], out: Path, *, python: str, progress: Progress
) -> dict[str, Path]:
    """Build a wheel of each package into ``out`` with ``uv build``; return them by name."""
    packages = list(packages)
    progress(f"building wheels of {', '.join(p.name for p in packages)}")

    def one(package: Package) -> Path:
        argv = [python, "-m", "uv", "build", "--quiet", "--wheel", "--out-dir", str(out)]
        _run([*argv, str(package.path)], missing=_NEED_UV)
        stem = f"{package.name.replace('-', '_')}-{package.version}-"
        matches = sorted(out.glob(f"{stem}*.whl"))
        if not matches:
            raise BuildError(f"uv build made no wheel {stem}*.whl of {package.path}")
        return matches[0]

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((p.name for p in packages), pool.map(one, packages), strict=True))


def download_deps(
    wheels: Iterable[Path],
    out: Path,
    target: Target,
    *,
    python: str,
    cache: Path | None = None,
    progress: Progress,
) -> list[Path]:
    """Put the third-party wheels that ``wheels`` need on ``target`` into ``out``.

    ``uv pip compile`` resolves for the target's interpreter (pip evaluates markers such as
    ``python_full_version < "3.11.3"`` for the host's, even with ``--python-version``); pip
    downloads the pins ``cache`` lacks, as wheels for the target's platform tags, into
    ``cache`` (a folder per target, kept between builds: a wheel of one version never
    changes, so only new pins cost a download).
    """
    wheels = list(wheels)
    cache = (cache or _CACHE) / target.key()
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="streamspace-deps-") as tmp:
        wanted = Path(tmp, "requirements.in")
        wanted.write_text(
            "".join(f"{w.name.split('-')[0]} @ {w.resolve().as_uri()}\n" for w in wheels)
        )
        pins_file = Path(tmp, "requirements.txt")
        compile_ = [python, "-m", "uv", "pip", "compile", "--quiet", "--no-header"]
        compile_ += ["--no-annotate", *target.uv_args(), "--output-file", str(pins_file)]
        _run([*compile_, str(wanted)], missing=_NEED_UV)
        pins = {}
        for line in pins_file.read_text().splitlines():
            name, sep, version = line.strip().partition("==")
            if sep:
                pins[_canonical(name), version] = line.strip()
            elif line.strip() and " @ file:" not in line:
                raise BuildError(f"uv pip compile wrote a pin this script cannot read: {line!r}")
        missing = [pin for key, pin in sorted(pins.items()) if key not in _cached(cache)]
        if missing:
            progress(f"downloading {len(missing)} wheels into {cache}")
            pins_file.write_text("\n".join(missing) + "\n")
            download = ["download", "--no-deps", "--dest", str(cache), *target.pip_args()]
            _pip(python, [*download, "--requirement", str(pins_file)])
    found = _cached(cache)
    lost = [pins[key] for key in pins if key not in found]
    if lost:
        raise BuildError(f"pip downloaded no wheel for {', '.join(lost)} into {cache}")
    deps = [Path(shutil.copy2(found[key], out / found[key].name)) for key in sorted(pins)]
    progress(f"{len(deps)} dependency wheels, {sum(d.stat().st_size for d in deps) >> 20} MiB")
    return deps


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _cached(folder: Path) -> dict[tuple[str, str], Path]:
    """Return the wheels in ``folder`` by canonical name and version."""
    found = {}
    for wheel in folder.glob("*.whl"):
        name, version, *_ = wheel.name.split("-")
        found[_canonical(name), version] = wheel
    return found


def _pip(python: str, args: list[str]) -> None:
    _run([python, "-m", "pip", "--disable-pip-version-check", "--no-input", *args])


def _run(argv: list[str], *, missing: str | None = None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, errors="replace", check=False)
    if missing is not None and "No module named" in done.stderr:
        raise BuildError(f"{missing}; {argv[0]} has no module {argv[2]}")
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise BuildError(f"{shlex.join(argv[:4])} ... failed (exit {done.returncode}):\n{tail}")


# -- the images -----------------------------------------------------------------------------


def build_images(
    names: Sequence[str],
    *,
    client: docker.DockerClient,
    base_image: str | None = None,
    tag: str = "local",
    rebuild_base: bool = False,
    python: str = sys.executable,
    progress: Progress = _say,
) -> dict[str, str]:
    """Build the images ``names`` as ``<repository>:<tag>``; return their ids by tag.

    Raises:
        BuildError: a step failed (the message names it and shows its last output).
    """
    unknown = sorted(set(names) - IMAGES.keys())
    if unknown:
        raise BuildError(f"unknown image {', '.join(unknown)}; known: {', '.join(IMAGES)}")
    if base_image is None:
        ensure_base(client, rebuild=rebuild_base, progress=progress)
        base_image = BASE_IMAGE
    target = probe_target(client, base_image)
    progress(
        f"base {base_image}: Python {'.'.join(map(str, target.python))}, {target.machine}, "
        f"glibc {'.'.join(map(str, target.glibc))}"
    )
    packages = find_packages()
    wanted = {name: closure(image_packages(name), packages) for name in names}
    if any(p.name == "streamspace-controlplane" for ps in wanted.values() for p in ps):
        _vendor_novnc(progress)
    built: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="streamspace-images-") as tmp:
        all_wanted = {p.name: p for ps in wanted.values() for p in ps}
        wheels = build_project_wheels(
            all_wanted.values(), Path(tmp, "wheels"), python=python, progress=progress
        )
        for name in names:
            context = Path(tmp, name)
            project = context / "project"
            project.mkdir(parents=True)
            shutil.copy2(HERE / name / "Dockerfile", context / "Dockerfile")
            ours = [Path(shutil.copy2(wheels[p.name], project)) for p in wanted[name]]
            progress(f"{name}: dependencies of {', '.join(p.name for p in wanted[name])}")
            download_deps(ours, context / "deps", target, python=python, progress=progress)
            image_tag = f"{IMAGES[name]}:{tag}"
            version = packages[image_packages(name)[0]].version
            built[image_tag] = _docker_build(
                client, name, context, image_tag, base_image, version, progress
            )
    return built


def _vendor_novnc(progress: Progress) -> None:
    """Put noVNC into the control plane's static files, so its wheel carries the viewer."""
    script = REPO / "controlplane" / "scripts" / "vendor_novnc.sh"
    progress(f"running {script.relative_to(REPO)} (noVNC for the web UI's viewer)")
    done = subprocess.run([str(script)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"{script} failed (exit {done.returncode}): {done.stderr.strip()}")


def _docker_build(
    client: docker.DockerClient,
    name: str,
    context: Path,
    tag: str,
    base_image: str,
    version: str,
    progress: Progress,
) -> str:
    progress(f"docker build {tag} (BASE_IMAGE={base_image})")
    image_id: str | None = None
    stage_id: str | None = None  # the build stage's last layer, the final stage's first FROM
    last_layer: str | None = None
    from_steps = 0
    tail: list[str] = []
    try:
        for chunk in client.api.build(
            path=str(context),
            tag=tag,
            buildargs={"BASE_IMAGE": base_image},
            labels={"org.opencontainers.image.version": version},
            rm=True,
            forcerm=True,
            pull=False,
            # Nothing is fetched (wheels install --no-index), and the default bridge may
            # be missing: another engine on this host may have removed docker0.
            network_mode="none",
            decode=True,
        ):
            if "error" in chunk:
                lines = "\n".join(tail[-20:])
                raise BuildError(f"docker build {tag} failed: {chunk['error'].strip()}\n{lines}")
            for text in str(chunk.get("stream", "")).splitlines():
                tail.append(text)
                layer = _LAYER_LINE.match(text)
                if layer:
                    last_layer = layer.group(1)
                elif text.startswith("Step "):
                    progress(f"  {text}")
                    if " : FROM " in text:
                        from_steps += 1
                        stage_id = last_layer if from_steps == 2 else stage_id
            aux = chunk.get("aux")
            if isinstance(aux, dict) and "ID" in aux:
                image_id = str(aux["ID"])
    except docker.errors.DockerException as exc:
        raise BuildError(f"docker build {tag} failed: {exc}") from None
    found = _inspect(client, tag)
    if found is None or (image_id is not None and found["Id"] != image_id):
        raise BuildError(f"docker build {tag} reported success, yet the engine has no such image")
    size = int(found.get("Size", 0)) >> 20
    progress(f"{tag} is {found['Id']} ({size} MiB)")
    if stage_id is not None:
        _remove_superseded(client, name, keep=stage_id, progress=progress)
    return str(found["Id"])


def _remove_superseded(
    client: docker.DockerClient, name: str, *, keep: str, progress: Progress
) -> None:
    """Remove untagged images of ``name`` left by earlier builds, except the cache ``keep``.

    A build whose dependencies changed leaves the old build stage behind (untagged, labelled
    ``io.streamspace.image=<name>-build``), and a tag that moved leaves the old image; both
    would otherwise pile up on a CI machine. An image a container still uses is left.
    """
    for label in (f"{name}-build", name):
        for image_id in client.api.images(
            quiet=True, filters={"dangling": True, "label": f"io.streamspace.image={label}"}
        ):
            if image_id.removeprefix("sha256:").startswith(keep):
                continue
            try:
                client.api.remove_image(image_id)
            except docker.errors.APIError:
                continue
            progress(f"removed {image_id[:19]}, superseded {label}")


def _inspect(client: docker.DockerClient, tag: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = client.api.inspect_image(tag)  # type: ignore[no-untyped-call]
    except docker.errors.ImageNotFound:
        return None
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Build the images named on the command line (all by default); return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python images/build.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE", help=f"of {', '.join(IMAGES)}")
    parser.add_argument("--tag", default="local", help="tag of the images (default: local)")
    parser.add_argument(
        "--base-image",
        help=f"BASE_IMAGE for the Dockerfiles (default: make {BASE_IMAGE} with mmdebstrap)",
    )
    parser.add_argument("--rebuild-base", action="store_true", help="make the base again")
    parser.add_argument(
        "--docker-host", help="the engine's address, as DOCKER_HOST (default: the environment)"
    )
    args = parser.parse_args(argv)
    try:
        client = (
            docker.DockerClient(base_url=args.docker_host)
            if args.docker_host
            else docker.from_env()
        )
        client.ping()
    except docker.errors.DockerException as exc:
        print(f"error: no Docker engine answers: {exc}", file=sys.stderr)
        return 1
    try:
        built = build_images(
            args.images or list(IMAGES),
            client=client,
            base_image=args.base_image,
            tag=args.tag,
            rebuild_base=args.rebuild_base,
        )
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for tag, image_id in built.items():
        print(tag, image_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
