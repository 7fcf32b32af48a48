"""values.schema.json refuses bad values at install with a message naming the key, and it
and the README's values reference are generated from the documented values.schema.yaml."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType
from typing import Any

import helm_python as helm
import pytest
import yaml
from conftest import CHART


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate", CHART / "tools" / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("generate", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("values", "messages"),
    [
        ({"api": {"replicaCount": "four"}}, ["at '/api/replicaCount': got string, want integer"]),
        ({"api": {"replicaCount": 0}}, ["at '/api/replicaCount': minimum: got 0, want 1"]),
        ({"redis": {"enabled": "yes"}}, ["at '/redis/enabled': got string, want boolean"]),
        ({"database": {"port": "5432"}}, ["at '/database/port': got string, want integer"]),
        (
            {"api": {"replicacount": 2}},
            ["at '/api': additional properties 'replicacount' not allowed"],
        ),
        (
            {"api": {"image": {"pullPolicy": "Sometimes"}}},
            ["at '/api/image/pullPolicy': value must be one of"],
        ),
        ({"jwt": {"secret": "short"}}, ["at '/jwt/secret'", "minLength: got 5, want 32"]),
        (
            {"k8sAgent": {"ha": {"leaseDuration": "15 seconds"}}},
            ["at '/k8sAgent/ha/leaseDuration': '15 seconds' does not match pattern"],
        ),
        (
            {"k8sAgent": {"config": {"agentId": "-bad"}}},
            ["at '/k8sAgent/config/agentId': '-bad' does not match pattern"],
        ),
        (
            {"k8sAgent": {"config": {"controlPlaneURL": "ftp://x"}}},
            ["at '/k8sAgent/config/controlPlaneURL'"],
        ),
        ({"api": {"env": {"bad-name": "x"}}}, ["invalid propertyName 'bad-name'"]),
        (
            {"api": {"env": {"LOG_LEVEL": ["DEBUG"]}}},
            ["at '/api/env/LOG_LEVEL': got array, want boolean or number or string"],
        ),
    ],
)
def test_bad_values_fail_the_install_with_the_schemas_message(
    chart: helm.Chart, values: dict[str, Any], messages: list[str]
) -> None:
    with pytest.raises(helm.HelmValuesError) as checked:
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError) as rendered:
        chart.render(values, name="streamspace", namespace="streamspace")
    for text in (str(checked.value), str(rendered.value)):
        for message in messages:
            assert message in text


def test_defaults_and_every_value_set_pass_the_schema(chart: helm.Chart) -> None:
    from conftest import VALUE_SETS

    for values in VALUE_SETS.values():
        chart.validate_schema(values)


def test_values_schema_json_is_generated_from_the_yaml() -> None:
    assert (CHART / "values.schema.json").read_text() == generator().schema_json(), (
        "values.schema.json is out of date: run python tools/generate.py"
    )
    assert json.loads((CHART / "values.schema.json").read_text())["additionalProperties"] is False


def test_readme_values_reference_is_generated() -> None:
    text = (CHART / "README.md").read_text()
    assert generator().updated_readme(text) == text, (
        "README.md's values reference is out of date: run python tools/generate.py"
    )


def _leaves(schema: dict[str, Any], node: dict[str, Any], values: Any, path: str) -> list[str]:
    problems = []
    gen = generator()
    for key, child in node.get("properties", {}).items():
        child = gen._resolve(schema, child)
        where = f"{path}{key}"
        if key == "global":
            continue
        if not child.get("description"):
            problems.append(f"{where} has no description")
        if not isinstance(values, dict) or key not in values:
            problems.append(f"{where} is in the schema but not in values.yaml")
            continue
        if "properties" in child:
            problems += _leaves(schema, child, values[key], where + ".")
    return problems


def test_every_key_is_documented_and_has_a_default() -> None:
    schema = yaml.safe_load((CHART / "values.schema.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert _leaves(schema, schema, values, "") == []
