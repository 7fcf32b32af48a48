"""Load every entry point one distribution declares, and check each is the plugin it claims.

Run by the interpreter of a venv the distribution is installed in (not by pytest):

    python _entry_points.py streamspace-k8s

It prints one JSON object per entry point: group, name, value, and ``error`` (``null`` when
the entry point loads and is right). A driver must subclass its group's ABC and carry
``name`` (the entry point's own name) and ``capabilities`` (a frozenset); a hook plugin
(group ``streamspace``) must register with the SDK's plugin manager, whose specs validate
it, and implement at least one hook. A group that starts with ``streamspace`` but is none
of these is a typo and an error.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import sys

DRIVER_BASES = {
    "streamspace.platforms": ("streamspace_sdk.platform", "Platform"),
    "streamspace.leases": ("streamspace_sdk.lease", "Lease"),
    "streamspace.transports": ("streamspace_sdk.transport", "Transport"),
    "streamspace.stores": ("streamspace_controlplane.store.base", "Store"),
    "streamspace.hubs": ("streamspace_controlplane.hub.base", "Hub"),
}
HOOKS = "streamspace"


def check(ep: md.EntryPoint) -> str | None:
    """Return what is wrong with ``ep``, or ``None``."""
    try:
        loaded = ep.load()
    except Exception as exc:
        return f"does not load: {type(exc).__name__}: {exc}"
    if ep.group == HOOKS:
        return check_hooks(loaded)
    module, attribute = DRIVER_BASES[ep.group]
    base = getattr(importlib.import_module(module), attribute)
    if not (isinstance(loaded, type) and issubclass(loaded, base)):
        return f"{loaded!r} is not a subclass of {module}.{attribute}"
    if getattr(loaded, "name", None) != ep.name:
        return f"{loaded.__qualname__}.name is {getattr(loaded, 'name', None)!r}, not {ep.name!r}"
    if not isinstance(getattr(loaded, "capabilities", None), frozenset):
        return f"{loaded.__qualname__}.capabilities is not a frozenset"
    return None


def check_hooks(plugin: object) -> str | None:
    from streamspace_sdk.hooks import make_plugin_manager
    from streamspace_sdk.settings import PluginSettings

    try:
        pm = make_plugin_manager(
            settings=PluginSettings(), plugins=[plugin], load_entrypoints=False
        )
    except Exception as exc:
        return f"the hook specs refuse it: {type(exc).__name__}: {exc}"
    if not pm.get_hookcallers(plugin):
        return f"{plugin!r} implements no hook (no function marked @hookimpl)"
    return None


def main(distribution: str) -> int:
    results = []
    for ep in md.distribution(distribution).entry_points:
        if ep.group in DRIVER_BASES or ep.group == HOOKS:
            error = check(ep)
        elif ep.group.startswith("streamspace"):
            error = f"unknown group {ep.group!r}: not one of {sorted([*DRIVER_BASES, HOOKS])}"
        else:
            continue  # console_scripts and other tools' groups
        results.append({"group": ep.group, "name": ep.name, "value": ep.value, "error": error})
    for result in results:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
