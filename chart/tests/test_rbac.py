"""The agent's Role grants exactly what the streamspace-k8s plugin's RBAC manifest asks: the
plugin's own tests check that manifest against every call its code makes."""

from __future__ import annotations

from typing import Any

import yaml
from conftest import REPO, VALUE_SETS, Rendered

MANIFEST = REPO / "plugins" / "k8s" / "src" / "streamspace_k8s" / "rbac.yaml"


def canonical(rules: list[dict[str, Any]]) -> list[tuple[tuple[str, ...], ...]]:
    """Rules as sorted tuples, so that only order and spelling of the YAML may differ."""
    return sorted(
        (
            tuple(sorted(rule["apiGroups"])),
            tuple(sorted(rule["resources"])),
            tuple(sorted(rule["verbs"])),
        )
        for rule in rules
    )


def manifest_rules() -> list[dict[str, Any]]:
    (role,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d["kind"] == "Role"]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def test_agent_role_equals_the_plugins_manifest(rendered: dict[str, Rendered]) -> None:
    wanted = canonical(manifest_rules())
    assert ("coordination.k8s.io",) in {rule[0] for rule in wanted}  # leases are in it
    for name, values in VALUE_SETS.items():
        if not values.get("k8sAgent", {}).get("enabled"):
            assert not rendered[name].all("Role"), name
            continue
        (role,) = rendered[name].all("Role")
        assert canonical(role["rules"]) == wanted, name
        for rule in role["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames


def test_role_has_no_duplicate_or_wildcard_grants(rendered: dict[str, Rendered]) -> None:
    (role,) = rendered["agent-ha"].all("Role")
    triples = [
        (verb, group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    ]
    assert len(triples) == len(set(triples))
    assert "*" not in {part for triple in triples for part in triple}
