"""The fake API server answers as a real one does, in the shapes of the API reference."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from conftest import NAMESPACE
from fakeapi import FakeApiServer, parse_selector


def call(
    server: FakeApiServer, method: str, path: str, body: Any = None, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        server.url + path,
        data=data,
        method=method,
        headers={
            "Authorization": f"Bearer {token or server.token}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases"
CM_LEASE = {
    "apiVersion": "coordination.k8s.io/v1",
    "kind": "Lease",
    "metadata": {"name": "x"},
    "spec": {"holderIdentity": "a"},
}


def lease(name: str, **meta: Any) -> dict[str, Any]:
    return {**CM_LEASE, "metadata": {"name": name, **meta}}


def test_create_get_conflict_and_not_found(apiserver: FakeApiServer) -> None:
    code, made = call(apiserver, "POST", LEASES, lease("fk-1"))
    assert code == 201
    assert made["metadata"]["uid"]
    assert made["metadata"]["resourceVersion"]
    code, again = call(apiserver, "POST", LEASES, lease("fk-1"))
    assert (code, again["kind"], again["reason"]) == (409, "Status", "AlreadyExists")
    assert again["details"] == {"name": "fk-1", "group": "coordination.k8s.io", "kind": "leases"}
    stale = made["metadata"]["resourceVersion"]
    code, updated = call(apiserver, "PUT", f"{LEASES}/fk-1", made)
    assert code == 200
    assert int(updated["metadata"]["resourceVersion"]) > int(stale)
    code, refused = call(apiserver, "PUT", f"{LEASES}/fk-1", made)
    assert (code, refused["reason"]) == (409, "Conflict")
    assert "the object has been modified" in refused["message"]
    code, gone = call(apiserver, "GET", f"{LEASES}/nothing")
    assert (code, gone["reason"], gone["message"]) == (
        404,
        "NotFound",
        'leases.coordination.k8s.io "nothing" not found',
    )
    code, _ = call(apiserver, "DELETE", f"{LEASES}/fk-1")
    assert code == 200
    assert call(apiserver, "DELETE", f"{LEASES}/fk-1")[0] == 404


def test_missing_namespace_unauthorised_and_typeless(apiserver: FakeApiServer) -> None:
    code, status = call(apiserver, "POST", LEASES.replace(NAMESPACE, "nowhere"), lease("a"))
    assert (code, status["message"]) == (404, 'namespaces "nowhere" not found')
    assert call(apiserver, "GET", LEASES.replace(NAMESPACE, "nowhere"))[1]["items"] == []
    assert call(apiserver, "GET", LEASES, token="wrong")[0] == 401
    code, status = call(apiserver, "POST", LEASES, {"metadata": {"name": "b"}})
    assert (code, status["reason"]) == (400, "BadRequest")


def test_generate_name_and_micro_time(apiserver: FakeApiServer) -> None:
    code, made = call(apiserver, "POST", LEASES, {**CM_LEASE, "metadata": {"generateName": "g-"}})
    assert code == 201
    assert made["metadata"]["name"].startswith("g-")
    assert len(made["metadata"]["name"]) == 7
    bad = {**lease("t"), "spec": {"renewTime": "2026-01-01T00:00:00+00:00"}}
    code, status = call(apiserver, "POST", LEASES, bad)
    assert (code, status["reason"]) == (400, "BadRequest")


def test_status_subresource_and_generation(apiserver: FakeApiServer) -> None:
    path = f"/api/v1/namespaces/{NAMESPACE}/services"
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "fk-svc"},
        "spec": {"ports": [{"port": 80}]},
        "status": {"loadBalancer": {"x": 1}},
    }
    code, made = call(apiserver, "POST", path, svc)
    assert code == 201
    assert made["status"] == {}, "status is not written through the main resource"
    assert made["metadata"]["generation"] == 1
    made["spec"]["ports"] = [{"port": 81}]
    made["status"] = {"loadBalancer": {"y": 2}}
    code, updated = call(apiserver, "PUT", f"{path}/fk-svc", made)
    assert updated["status"] == {}
    assert updated["metadata"]["generation"] == 2
    assert updated["spec"]["clusterIP"] == made["spec"]["clusterIP"]


def test_label_selectors(apiserver: FakeApiServer) -> None:
    for name, labels in (("s-1", {"a": "1", "b": "x"}), ("s-2", {"a": "2"})):
        call(apiserver, "POST", LEASES, lease(name, labels=labels))

    def names(selector: str) -> set[str]:
        code, listed = call(apiserver, "GET", f"{LEASES}?labelSelector={selector}")
        assert code == 200, listed
        assert listed["kind"] == "LeaseList"
        assert all("kind" not in i for i in listed["items"]), "list items carry no kind"
        return {i["metadata"]["name"] for i in listed["items"]}

    assert names("a=1") == {"s-1"}
    assert names("a!=1,a") == {"s-2"}
    assert names("a%20in%20(1,2),!b") == {"s-2"}
    assert names("b") == {"s-1"}
    assert call(apiserver, "GET", f"{LEASES}?labelSelector=a%3D%3D%3D1")[0] == 400


def test_parse_selector_rejects_bad_keys() -> None:
    with pytest.raises(Exception, match="unable to parse"):
        parse_selector("bad key=1")


def test_garbage_collection_by_owner(apiserver: FakeApiServer) -> None:
    _, owner = call(apiserver, "POST", LEASES, lease("owner"))
    ref = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
    }
    call(apiserver, "POST", LEASES, lease("dependent", ownerReferences=[ref]))
    call(apiserver, "DELETE", f"{LEASES}/owner")
    import time

    deadline = time.monotonic() + 5
    while apiserver.get("coordination.k8s.io", "leases", NAMESPACE, "dependent") is not None:
        assert time.monotonic() < deadline, "the dependent was not collected"
        time.sleep(0.05)  # the collector runs in the server's own thread
