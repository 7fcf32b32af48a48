"""Driver loading: entry points found by name, clear errors, and the ``plugins`` listing."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import pytest

from streamspace_sdk import drivers
from streamspace_sdk.cli import main
from streamspace_sdk.errors import DriverLoadError, DriverNotFound
from streamspace_sdk.lease import Lease
from streamspace_sdk.leases import MemoryLease, NoLease
from streamspace_sdk.platform import Platform
from streamspace_sdk.testing import MemoryPlatform
from streamspace_sdk.transport import Transport

REPO = Path(__file__).resolve().parents[2]
"""The monorepo, whose ``plugins/`` hold the packages :data:`drivers.KNOWN_PACKAGES` names."""

FANCY = """
from streamspace_sdk.testing import MemoryPlatform

class FancyPlatform(MemoryPlatform):
    name = "fancy"
    capabilities = frozenset({"adopt", "gpu"})
"""


def install_throwaway(
    root: Path,
    dist: str,
    version: str,
    entry_points: dict[str, dict[str, str]],
    module: str,
    source: str,
) -> Path:
    """Lay out an installed distribution (module + dist-info) the way an installer does."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, names in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in names.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def fancy_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A throwaway package declaring platform ``fancy`` and a broken platform ``broken``."""
    site = install_throwaway(
        tmp_path / "site",
        "fancy-platform",
        "1.2.3",
        {drivers.PLATFORMS: {"fancy": "fancy_platform:FancyPlatform"}},
        "fancy_platform",
        FANCY,
    )
    install_throwaway(
        site,
        "broken-platform",
        "0.0.1",
        {drivers.PLATFORMS: {"broken": "broken_platform:Nope"}},
        "broken_platform",
        "raise ImportError('needs libfoo, which is not installed')\n",
    )
    install_throwaway(
        site,
        "not-a-platform",
        "0.1.0",
        {drivers.PLATFORMS: {"wrong": "wrong_platform:Thing"}},
        "wrong_platform",
        "class Thing:\n    name = 'wrong'\n",
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    importlib.invalidate_caches()
    drivers.refresh()
    yield site
    drivers.refresh()


def test_builtin_leases_load_by_name():
    assert drivers.load_driver_class(drivers.LEASES, "memory") is MemoryLease
    assert isinstance(drivers.load_driver(drivers.LEASES, "none"), NoLease)


def test_missing_driver_names_group_name_and_installed():
    with pytest.raises(DriverNotFound) as caught:
        drivers.load_driver(drivers.LEASES, "zookeeper")
    message = str(caught.value)
    assert "'streamspace.leases'" in message
    assert "'zookeeper'" in message
    assert "memory, none" in message
    assert caught.value.installed == ["memory", "none"]


@pytest.mark.parametrize(
    ("group", "name", "package"),
    [
        (drivers.LEASES, "file", "streamspace-lease-file"),
        (drivers.LEASES, "kubernetes", "streamspace-k8s"),
        (drivers.PLATFORMS, "docker", "streamspace-docker"),
    ],
)
def test_missing_driver_of_ours_names_the_package_to_install(
    group: str, name: str, package: str
) -> None:
    """A driver one of our packages provides, when missing, says what to pip install."""
    with pytest.raises(DriverNotFound) as caught:
        drivers.load_driver(group, name, extensions=[MemoryLease])
    assert f"pip install {package}" in str(caught.value)
    assert caught.value.package == package
    assert f"{name!r}" in str(caught.value)


def test_missing_unknown_driver_names_no_package() -> None:
    with pytest.raises(DriverNotFound) as caught:
        drivers.load_driver(drivers.LEASES, "zookeeper")
    assert "pip install" not in str(caught.value)
    assert caught.value.package is None


def test_known_packages_match_the_plugins_entry_points() -> None:
    """KNOWN_PACKAGES names, for each driver our plugin packages register, the package that
    registers it: a driver renamed, moved or added in a plugins/*/pyproject.toml fails here."""
    if not REPO.joinpath("plugins").is_dir():
        pytest.skip("needs the monorepo's plugins/ (the sdk is tested outside it)")
    registered: dict[tuple[str, str], str] = {}
    for pyproject in sorted(REPO.joinpath("plugins").glob("*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        for group, entries in project.get("entry-points", {}).items():
            if group in drivers.DRIVER_GROUPS:
                for name in entries:
                    registered[(group, name)] = project["name"]
    assert registered, "no plugin registers a driver: is REPO right?"
    assert registered == drivers.KNOWN_PACKAGES


def test_missing_driver_in_empty_group_says_none():
    with pytest.raises(DriverNotFound, match="installed: none"):
        drivers.load_driver("streamspace.nothing-here", "ws-mux")


def test_extensions_inject_a_driver_without_entry_points():
    platform = drivers.load_driver(
        drivers.PLATFORMS, "memory", agent_id="a1", base=MemoryPlatform, extensions=[MemoryPlatform]
    )
    assert isinstance(platform, MemoryPlatform)
    assert platform.agent_id == "a1"
    with pytest.raises(DriverNotFound, match="installed: memory"):
        drivers.load_driver(drivers.PLATFORMS, "docker", extensions=[MemoryPlatform])


def test_extension_of_the_wrong_kind_is_refused():
    with pytest.raises(
        DriverLoadError, match=r"not a subclass of streamspace_sdk\.platform\.Platform"
    ):
        drivers.load_driver_class(drivers.PLATFORMS, "memory", extensions=[MemoryLease])


def test_throwaway_package_is_found_by_the_loader(fancy_site: Path):
    cls = drivers.load_driver_class(drivers.PLATFORMS, "fancy", base=Platform)
    assert cls.__name__ == "FancyPlatform"
    assert "fancy" in drivers.entry_point_names(drivers.PLATFORMS)


def test_broken_package_is_a_load_error_naming_it(fancy_site: Path):
    with pytest.raises(DriverLoadError) as caught:
        drivers.load_driver_class(drivers.PLATFORMS, "broken")
    message = str(caught.value)
    assert "broken-platform" in message
    assert "broken_platform:Nope" in message
    assert "needs libfoo" in message


def test_entry_point_to_a_non_platform_is_refused(fancy_site: Path):
    with pytest.raises(DriverLoadError, match="not a subclass"):
        drivers.load_driver_class(drivers.PLATFORMS, "wrong")


def test_two_packages_with_one_name_is_an_error(fancy_site: Path, tmp_path: Path):
    install_throwaway(
        tmp_path / "site2",
        "fancy-fork",
        "9.9.9",
        {drivers.PLATFORMS: {"fancy": "fancy_fork:FancyPlatform"}},
        "fancy_fork",
        FANCY,
    )
    sys.path.insert(0, str(tmp_path / "site2"))
    drivers.refresh()
    try:
        with pytest.raises(DriverLoadError, match="2 packages register 'fancy'"):
            drivers.load_driver_class(drivers.PLATFORMS, "fancy")
    finally:
        sys.path.remove(str(tmp_path / "site2"))


def test_list_plugins_shows_version_entry_point_capabilities_and_errors(fancy_site: Path):
    infos = {(i.group, i.name): i for i in drivers.list_plugins()}
    fancy = infos[(drivers.PLATFORMS, "fancy")]
    assert fancy.distribution == "fancy-platform"
    assert fancy.version == "1.2.3"
    assert fancy.entry_point == "fancy_platform:FancyPlatform"
    assert fancy.capabilities == ("adopt", "gpu")
    assert fancy.error is None
    assert "needs libfoo" in (infos[(drivers.PLATFORMS, "broken")].error or "")
    assert infos[(drivers.LEASES, "memory")].distribution == "streamspace-sdk"


def test_cli_plugins_lists_the_throwaway_package(fancy_site: Path, tmp_path: Path):
    env = {"PYTHONPATH": str(fancy_site), "XDG_CACHE_HOME": str(tmp_path / "cache2")}
    run = subprocess.run(
        [sys.executable, "-m", "streamspace_sdk.cli", "plugins"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert "fancy" in run.stdout, run.stdout
    assert "fancy-platform 1.2.3" in run.stdout, run.stdout
    assert "fancy_platform:FancyPlatform" in run.stdout
    assert "adopt,gpu" in run.stdout
    assert "ERROR: ImportError: needs libfoo" in run.stdout
    assert run.returncode == 1, "a broken plugin makes `plugins` fail so CI notices"


def test_cli_plugins_json(capsys: pytest.CaptureFixture[str]):
    assert main(["plugins", "--json", "--group", drivers.LEASES]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {p["name"] for p in listed} == {"memory", "none"}
    assert all(p["group"] == drivers.LEASES for p in listed)


def test_cli_without_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2
    assert "usage: streamspace-agent" in capsys.readouterr().err


def test_every_sdk_entry_point_resolves_to_its_abc():
    ours = [i for i in drivers.list_plugins() if i.distribution == "streamspace-sdk"]
    assert {(i.group, i.name) for i in ours} >= {
        (drivers.LEASES, "memory"),
        (drivers.LEASES, "none"),
    }
    for info in ours:
        assert info.error is None, info
        if drivers.DRIVER_GROUPS.get(info.group) is not None:
            cls: type[Platform | Lease | Transport] = drivers.load_driver_class(
                info.group, info.name
            )
            assert cls.name == info.name, f"{info.entry_point} declares name {cls.name!r}"
