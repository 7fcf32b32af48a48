"""Finding and loading plugins: the only module that calls stevedore or ``importlib.metadata``.

A **driver** is "exactly one of these, chosen by name in config" (a platform, a lease, a
transport, a store, a hub); :func:`load_driver` picks it by name from its entry-point group.
:func:`list_plugins` lists every installed driver and hook plugin with where it came from.
"""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from stevedore import DriverManager
from stevedore.exception import MultipleMatches, NoMatches
from stevedore.extension import Extension, ExtensionManager

from streamspace_sdk.errors import DriverLoadError, DriverNotFound
from streamspace_sdk.hookspecs import PROJECT_NAME
from streamspace_sdk.lease import Lease
from streamspace_sdk.platform import Platform
from streamspace_sdk.transport import Transport

__all__ = [
    "DRIVER_GROUPS",
    "HOOKS",
    "HUBS",
    "KNOWN_PACKAGES",
    "LEASES",
    "PLATFORMS",
    "STORES",
    "TRANSPORTS",
    "PluginInfo",
    "entry_point_names",
    "list_plugins",
    "load_driver",
    "load_driver_class",
    "refresh",
]

PLATFORMS = "streamspace.platforms"
LEASES = "streamspace.leases"
TRANSPORTS = "streamspace.transports"
STORES = "streamspace.stores"
HUBS = "streamspace.hubs"
HOOKS = PROJECT_NAME

DRIVER_GROUPS: dict[str, type | None] = {
    PLATFORMS: Platform,
    LEASES: Lease,
    TRANSPORTS: Transport,
    STORES: None,  # the base classes live in the control plane, which passes ``base=``
    HUBS: None,
}
"""Driver groups and the ABC each driver must subclass (``None``: checked by the caller)."""

KNOWN_PACKAGES: dict[tuple[str, str], str] = {
    (PLATFORMS, "docker"): "streamspace-docker",
    (PLATFORMS, "kubernetes"): "streamspace-k8s",
    (LEASES, "file"): "streamspace-lease-file",
    (LEASES, "redis"): "streamspace-lease-redis",
    (LEASES, "swarm"): "streamspace-lease-swarm",
    (LEASES, "kubernetes"): "streamspace-k8s",
}
"""The package that provides each of our drivers not in the SDK, by (group, name): what
:class:`~streamspace_sdk.errors.DriverNotFound` tells the user to install."""

T = TypeVar("T")


@dataclass(frozen=True)
class PluginInfo:
    """One installed entry point, as ``streamspace-agent plugins`` shows it."""

    group: str
    name: str
    distribution: str
    version: str
    entry_point: str
    capabilities: tuple[str, ...] = ()
    error: str | None = None
    """Why it failed to load; ``None`` when it loaded."""


def refresh() -> None:
    """Forget the entry points read so far, so packages installed since are seen.

    stevedore reads each group once per process; call this after installing a plugin into
    a running interpreter.
    """
    ExtensionManager.ENTRY_POINT_CACHE.clear()


def entry_point_names(group: str) -> list[str]:
    """Return the sorted names installed in entry-point ``group``."""
    return sorted({ep.name for ep in md.entry_points(group=group)})


def load_driver_class(
    group: str,
    name: str,
    *,
    base: type[T] | None = None,
    extensions: Sequence[type] | None = None,
) -> type[T]:
    """Return the driver class registered as ``name`` in ``group``.

    Args:
        group: entry-point group, e.g. :data:`PLATFORMS`.
        name: the driver's name, as configured (``PLATFORM=docker``).
        base: the class the driver must subclass; defaults to the group's ABC.
        extensions: driver classes to choose from instead of the installed entry points
            (each matched by its ``name`` attribute); for tests.

    Raises:
        DriverNotFound: nothing of that name; names the group, what is installed and, for
            one of our drivers, the package to install (:data:`KNOWN_PACKAGES`).
        DriverLoadError: it is installed but fails to import, or is not a subclass of ``base``.
    """
    expected = base if base is not None else DRIVER_GROUPS.get(group)
    cls: object
    try:
        if extensions is not None:
            cls = _from_extensions(group, name, extensions)
        elif name not in entry_point_names(group):
            raise NoMatches(name)  # checked first so stevedore logs no warning of its own
        else:
            manager: DriverManager[Any] = DriverManager(
                namespace=group,
                name=name,
                invoke_on_load=False,
                on_load_failure_callback=_raise_load_error,
            )
            cls = manager.driver
    except NoMatches:
        installed = (
            [getattr(e, "name", "?") for e in extensions]
            if extensions is not None
            else entry_point_names(group)
        )
        raise DriverNotFound(
            group, name, installed, package=KNOWN_PACKAGES.get((group, name))
        ) from None
    except MultipleMatches:
        sources = [
            f"{_dist_name(ep)} ({ep.value})" for ep in md.entry_points(group=group, name=name)
        ]
        raise DriverLoadError(
            f"{len(sources)} packages register {name!r} in {group!r}: {', '.join(sources)}; "
            "uninstall all but one"
        ) from None
    if expected is not None and not (isinstance(cls, type) and issubclass(cls, expected)):
        raise DriverLoadError(
            f"{group!r} driver {name!r} is {cls!r}, which is not a subclass of "
            f"{expected.__module__}.{expected.__qualname__}"
        )
    return cast("type[T]", cls)


def load_driver(
    group: str,
    name: str,
    /,
    *args: Any,
    base: type[T] | None = None,
    extensions: Sequence[type] | None = None,
    **kwargs: Any,
) -> T:
    """Load the driver ``name`` from ``group`` and build it with ``args`` and ``kwargs``.

    The driver reads its own settings from the environment when built, unless a
    ``settings`` object is passed. Errors as :func:`load_driver_class`.
    """
    cls: type[T] = load_driver_class(group, name, base=base, extensions=extensions)
    return cls(*args, **kwargs)


def list_plugins(groups: Iterable[str] | None = None) -> list[PluginInfo]:
    """List every installed plugin of ``groups`` (all StreamSpace groups by default).

    Drivers are imported to read their capabilities; one that fails to import is listed
    with its ``error`` instead of breaking the listing.
    """
    found: list[PluginInfo] = []
    for group in groups if groups is not None else [*DRIVER_GROUPS, HOOKS]:
        for ep in sorted(md.entry_points(group=group), key=lambda e: e.name):
            capabilities: tuple[str, ...] = ()
            error = None
            try:
                loaded = ep.load()
            except Exception as exc:  # a broken plugin must not hide the others
                error = f"{type(exc).__name__}: {exc}"
            else:
                capabilities = tuple(sorted(getattr(loaded, "capabilities", ()) or ()))
            found.append(
                PluginInfo(
                    group=group,
                    name=ep.name,
                    distribution=_dist_name(ep),
                    version=ep.dist.version if ep.dist is not None else "unknown",
                    entry_point=ep.value,
                    capabilities=capabilities,
                    error=error,
                )
            )
    return found


def _from_extensions(group: str, name: str, extensions: Sequence[type]) -> type:
    for cls in extensions:
        if getattr(cls, "name", None) == name:
            ext: Extension[Any] = Extension(
                name, md.EntryPoint(name, f"{cls.__module__}:{cls.__qualname__}", group), cls, None
            )
            return cast(type, DriverManager.make_test_instance(ext, namespace=group).driver)
    raise NoMatches(f"no {group!r} driver {name!r} among the given extensions")


def _raise_load_error(_manager: object, ep: md.EntryPoint, err: BaseException) -> None:
    raise DriverLoadError(
        f"{ep.group!r} driver {ep.name!r} from {_dist_name(ep)} ({ep.value}) failed to "
        f"load: {type(err).__name__}: {err}"
    ) from err


def _dist_name(ep: md.EntryPoint) -> str:
    if ep.dist is None:  # stevedore's cached entry points carry no distribution
        found = [e for e in md.entry_points(group=ep.group, name=ep.name) if e.value == ep.value]
        ep = found[0] if found else ep
    return ep.dist.name if ep.dist is not None else "unknown"
