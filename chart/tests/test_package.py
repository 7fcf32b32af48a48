"""`helm package` ships the chart and nothing of its tests or tooling."""

from __future__ import annotations

import tarfile
from pathlib import Path

import helm_python as helm
from conftest import CHART, parse


def test_package_holds_only_the_chart(tmp_path: Path) -> None:
    archive = helm.package(CHART, destination=tmp_path)
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    assert "streamspace/values.schema.json" in names
    assert "streamspace/templates/NOTES.txt" in names
    leaked = [n for n in names if n.split("/")[1] in {"tests", "tools", "values.schema.yaml"}]
    assert leaked == []
    with helm.Chart.load(archive) as packaged:
        r = parse(packaged.render({}, name="streamspace", namespace="streamspace"))
    assert ("Deployment", "streamspace-api") in r.kinds()
