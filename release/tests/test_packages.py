"""Every published package: built, checked, installed alone beside the SDK, and loaded.

The session builds an sdist of each package and a wheel from that sdist (``python -m
build``, so a file missing from an sdist fails here) into a temporary folder. Then, for
each package, a fresh venv (``uv venv``) gets only the SDK's wheel and the package's wheel
(``uv pip install``; third-party dependencies come from the index), and the tests run the
package's commands and entry points there, in that venv's own interpreter.

Needs ``build``, ``twine``, ``uv`` and ``packaging`` beside pytest (tox: ``pkg``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
CHECKER = Path(__file__).with_name("_entry_points.py")
SDK = "streamspace-sdk"
DRIVER_GROUPS = (
    "streamspace.platforms",
    "streamspace.leases",
    "streamspace.transports",
    "streamspace.stores",
    "streamspace.hubs",
)
HOOK_GROUP = "streamspace"


@dataclass(frozen=True)
class Package:
    """One folder with a pyproject.toml, as it declares itself."""

    name: str
    version: str
    path: Path
    entry_points: dict[str, dict[str, str]]
    scripts: dict[str, str]
    dependencies: list[str]
    module: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "module", self.name.replace("-", "_"))


def _find_packages() -> dict[str, Package]:
    found = {}
    for pyproject in [
        REPO / "sdk" / "pyproject.toml",
        REPO / "controlplane" / "pyproject.toml",
        *sorted((REPO / "plugins").glob("*/pyproject.toml")),
    ]:
        project = tomllib.loads(pyproject.read_text())["project"]
        found[project["name"]] = Package(
            name=project["name"],
            version=project["version"],
            path=pyproject.parent,
            entry_points=project.get("entry-points", {}),
            scripts=project.get("scripts", {}),
            dependencies=project.get("dependencies", []),
        )
    return found


PACKAGES = _find_packages()
NAMES = sorted(PACKAGES)


@dataclass(frozen=True)
class Dist:
    sdist: Path
    wheel: Path


@dataclass(frozen=True)
class Venv:
    package: Package
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def run(self, *argv: str | Path) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` (a script of this venv, or an absolute command) in a clean env."""
        command = [str(a) for a in argv]
        if "/" not in command[0]:
            command[0] = str(self.path / "bin" / command[0])
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            cwd=self.path,
            env={"PATH": f"{self.path / 'bin'}:/usr/bin:/bin", "HOME": str(self.path)},
        )


def _run(argv: list[str | Path], what: str) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.fail(f"{what} needs {argv[2]} beside pytest: {done.stderr.strip()}", pytrace=False)
    assert done.returncode == 0, f"{what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="session")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dist]:
    """Build every package's sdist, and its wheel from the sdist, once."""
    out = tmp_path_factory.mktemp("dist")

    def build(package: Package) -> Dist:
        folder = out / package.name
        _run(
            [sys.executable, "-m", "build", "--installer=uv", "--outdir", folder, package.path],
            f"python -m build {package.path.relative_to(REPO)}",
        )
        sdists, wheels = sorted(folder.glob("*.tar.gz")), sorted(folder.glob("*.whl"))
        assert len(sdists) == 1, sdists
        assert len(wheels) == 1, wheels
        return Dist(sdist=sdists[0], wheel=wheels[0])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(NAMES, pool.map(build, [PACKAGES[n] for n in NAMES]), strict=True))


@pytest.fixture(scope="session", params=NAMES)
def venv(
    request: pytest.FixtureRequest, dists: dict[str, Dist], tmp_path_factory: pytest.TempPathFactory
) -> Venv:
    """A fresh venv holding one package's wheel and the SDK's, and what they require."""
    package = PACKAGES[request.param]
    path = tmp_path_factory.mktemp(f"venv-{package.name}")
    uv = [sys.executable, "-m", "uv"]
    _run([*uv, "venv", "--quiet", "--python", sys.executable, path], "uv venv")
    wheels = {dists[SDK].wheel, dists[package.name].wheel}
    _run(
        [*uv, "pip", "install", "--quiet", "--python", path / "bin" / "python", *sorted(wheels)],
        f"uv pip install {' '.join(w.name for w in sorted(wheels))}",
    )
    return Venv(package=package, path=path)


def _metadata(wheel: Path) -> dict[str, list[str]]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(name).decode())
    fields: dict[str, list[str]] = {}
    for key, value in message.items():
        fields.setdefault(key, []).append(value)
    fields["Description"] = [str(message.get_payload())]
    return fields


def test_twine_check_strict(dists: dict[str, Dist]) -> None:
    """Every sdist and wheel passes `twine check --strict` (PyPI would render its README)."""
    files = [f for d in dists.values() for f in (d.sdist, d.wheel)]
    out = _run([sys.executable, "-m", "twine", "check", "--strict", *files], "twine check")
    assert out.count("PASSED") == len(files), out


@pytest.mark.parametrize("name", NAMES)
def test_dist_metadata(dists: dict[str, Dist], name: str) -> None:
    """The wheel names the version in pyproject.toml, a license, Python 3.11+ and a Markdown
    README that shows `pip install <name>`; the sdist carries README, CHANGELOG and pyproject;
    the wheel marks its package typed."""
    package, dist = PACKAGES[name], dists[name]
    meta = _metadata(dist.wheel)
    assert meta["Name"] == [name]
    assert meta["Version"] == [package.version]
    assert meta["Requires-Python"] == [">=3.11"]
    assert meta.get("License-Expression") == ["Apache-2.0"]
    assert meta["Description-Content-Type"] == ["text/markdown"]
    assert f"pip install {name}" in meta["Description"][0]
    with tarfile.open(dist.sdist) as archive:
        members = {m.split("/", 1)[1] for m in archive.getnames() if "/" in m}
    assert {"README.md", "CHANGELOG.md", "pyproject.toml", "PKG-INFO"} <= members, members
    with zipfile.ZipFile(dist.wheel) as archive:
        assert f"{package.module}/py.typed" in archive.namelist()


@pytest.mark.parametrize("name", NAMES)
def test_changelog_has_an_unreleased_section_and_the_version(name: str) -> None:
    """CHANGELOG.md has an "Unreleased" section, or one for the version being released."""
    package = PACKAGES[name]
    changelog = (package.path / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (.+)$", changelog, flags=re.MULTILINE)
    assert headings, f"{package.path.relative_to(REPO)}/CHANGELOG.md has no ## sections"
    assert "Unreleased" in headings[0] or package.version in headings[0], headings[0]


@pytest.mark.parametrize("name", [n for n in NAMES if n != SDK])
def test_requires_the_sdk_by_a_range_holding_its_version(name: str) -> None:
    """Siblings require `streamspace-sdk` by a bounded range that the SDK's version meets."""
    sdk = [r for r in map(Requirement, PACKAGES[name].dependencies) if r.name == SDK]
    assert len(sdk) == 1, f"{name} must require {SDK} once"
    spec = sdk[0].specifier
    assert sdk[0].url is None, "a path or URL dependency cannot be published"
    assert spec.contains(PACKAGES[SDK].version), f"{spec} excludes {PACKAGES[SDK].version}"
    assert any(s.operator == "<" for s in spec), f"{spec} has no upper bound"


def test_installs_alone_beside_the_sdk(venv: Venv) -> None:
    """The package's wheel installs with only the SDK's wheel, and its requirements hold."""
    done = venv.run(
        "python",
        "-c",
        "import importlib.metadata as md, json; "
        "print(json.dumps(sorted(d.metadata['Name'] for d in md.distributions())))",
    )
    assert done.returncode == 0, done.stderr
    ours = {n for n in json.loads(done.stdout) if n.startswith("streamspace")}
    assert ours == {SDK, venv.package.name}
    check = subprocess.run(
        [sys.executable, "-m", "uv", "pip", "check", "--python", str(venv.python)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_plugins_command_lists_its_entry_points(venv: Venv) -> None:
    """`streamspace-agent plugins` (`streamspace-controlplane plugins` for the control
    plane's stores and hubs) lists each of the package's drivers, with its version."""
    command = (
        "streamspace-controlplane"
        if "streamspace-controlplane" in venv.package.scripts
        else "streamspace-agent"
    )
    done = venv.run(command, "plugins", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    listed = {
        (p["group"], p["name"]): (p["distribution"], p["version"], p["entry_point"], p["error"])
        for p in json.loads(done.stdout)
    }
    declared = {
        (group, name): value
        for group, entries in venv.package.entry_points.items()
        for name, value in entries.items()
    }
    assert declared, f"{venv.package.name} declares no entry points"
    for key, value in declared.items():
        assert listed.get(key) == (venv.package.name, venv.package.version, value, None), (
            f"{key}: {listed.get(key)}"
        )


def test_entry_points_load_and_are_the_right_kind(venv: Venv) -> None:
    """Every entry point the package declares loads in its venv and subclasses its group's
    ABC (Platform, Lease, Transport, Store, Hub) with a matching `name`; hook plugins
    implement hooks the SDK's specs accept; no group is misspelt."""
    done = venv.run("python", CHECKER, venv.package.name)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    declared = {
        (group, name)
        for group, entries in venv.package.entry_points.items()
        for name in entries
        if group in DRIVER_GROUPS or group.startswith(HOOK_GROUP)
    }
    assert {(r["group"], r["name"]) for r in results} == declared
    assert [r for r in results if r["error"]] == []


def test_console_scripts_answer_help(venv: Venv) -> None:
    """Each console script the package declares starts and prints its usage."""
    for script in venv.package.scripts:
        done = venv.run(script, "--help")
        assert done.returncode == 0, f"{script} --help: {done.stderr}"
        assert "usage:" in done.stdout
