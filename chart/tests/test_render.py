"""Each value set renders, lints clean, and gives objects that are valid Kubernetes for every
version the chart claims; and the objects say what the programs need."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from conftest import CHART, NAMESPACE, VALUE_SETS, Rendered, container, env, kube_versions

API = "streamspace-api"
AGENT = "streamspace-k8s-agent"
REDIS = "streamspace-redis"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_is_clean(name: str) -> None:
    """`helm lint --strict` finds nothing above "icon is recommended" (an info)."""
    for version in (kube_versions()[0], kube_versions()[-1]):
        report = helm.lint(CHART, VALUE_SETS[name], strict=True, kube_version=f"v{version}.0")
        assert report["errors"] == [], report
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [], problems


@pytest.mark.parametrize("version", kube_versions())
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_is_valid_kubernetes(
    rendered: dict[str, Rendered], name: str, version: str
) -> None:
    """Every object passes the official OpenAPI schema of `version`, unknown fields refused."""
    objects = rendered[name].objects
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} is invalid for {version}: {exc}")


def test_value_sets_make_the_objects_they_ask_for(rendered: dict[str, Rendered]) -> None:
    always = {("Deployment", API), ("Service", API)}
    secrets = {("Secret", "streamspace-admin-credentials"), ("Secret", "streamspace-jwt")}
    agent = {
        ("Deployment", AGENT),
        ("ServiceAccount", AGENT),
        ("Role", AGENT),
        ("RoleBinding", AGENT),
    }
    expected = {
        "defaults": always | secrets | {("PersistentVolumeClaim", "streamspace-api-home")},
        "api-ha-redis": always
        | secrets
        | {
            ("Secret", "streamspace-db"),
            ("Service", REDIS),
            ("StatefulSet", REDIS),
            ("PodDisruptionBudget", API),
        },
        "agent-ha": always
        | secrets
        | agent
        | {("PersistentVolumeClaim", "streamspace-api-home"), ("PodDisruptionBudget", AGENT)},
        "external-db-secret": always | secrets | agent,
        "ingress": always
        | secrets
        | {("PersistentVolumeClaim", "streamspace-api-home"), ("Ingress", "streamspace")},
    }
    for name, kinds in expected.items():
        assert set(rendered[name].kinds()) == kinds, name


def test_api_probes_point_at_health_and_ready(rendered: dict[str, Rendered]) -> None:
    for name, r in rendered.items():
        api = container(r.get("Deployment", API), "api")
        (port,) = api["ports"]
        assert (port["name"], port["containerPort"]) == ("http", 8080), name
        assert env(api)["PORT"]["value"] == "8080"
        assert api["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}, name
        assert api["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}, name
        assert api["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}, name
        service = r.get("Service", API)
        assert service["spec"]["ports"][0]["targetPort"] == "http"


def readme_service_monitor() -> dict[str, Any]:
    """The ServiceMonitor README.md gives under "Coming from the seed guide's chart"."""
    blocks = (CHART / "README.md").read_text().split("```yaml\n")[1:]
    monitors: list[dict[str, Any]] = [
        doc
        for block in blocks
        for doc in yaml.safe_load_all(block.split("```", 1)[0])
        if doc and doc.get("kind") == "ServiceMonitor"
    ]
    (monitor,) = monitors
    return monitor


@pytest.mark.parametrize("name", VALUE_SETS)
def test_the_readmes_service_monitor_scrapes_the_api_service(
    rendered: dict[str, Rendered], name: str
) -> None:
    """The seed guide's ServiceMonitor selects `component: control-plane`, as README.md's
    does: that selects the API Service alone, and README's endpoint is a port it has, on the
    path the control plane serves metrics at."""
    monitor = readme_service_monitor()
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector == {"component": "control-plane"}
    r = rendered[name]
    chosen = [
        s["metadata"]["name"]
        for s in r.all("Service")
        if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert chosen == [API], name
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in r.get("Service", API)["spec"]["ports"]}


def test_the_seeds_agent_service_account_name_can_be_kept(render: Any) -> None:
    """`k8sAgent.serviceAccount.name=streamspace-agent` gives the subject the seed guide's
    `kubectl auth can-i ... --as system:serviceaccount:streamspace:streamspace-agent` asks
    about, bound to the agent's Role."""
    r = render({"k8sAgent": {"enabled": True, "serviceAccount": {"name": "streamspace-agent"}}})
    account = r.get("ServiceAccount", "streamspace-agent")
    assert account["metadata"]["namespace"] == NAMESPACE
    assert r.get("RoleBinding", AGENT)["subjects"] == [
        {"kind": "ServiceAccount", "name": "streamspace-agent", "namespace": NAMESPACE}
    ]
    pod = r.get("Deployment", AGENT)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "streamspace-agent"


def test_agent_probes_point_at_its_health_port(rendered: dict[str, Rendered]) -> None:
    agent = container(rendered["agent-ha"].get("Deployment", AGENT), "agent")
    (port,) = agent["ports"]
    assert port["name"] == "health"
    assert env(agent)["HEALTH_PORT"]["value"] == str(port["containerPort"]) == "8082"
    assert agent["livenessProbe"]["httpGet"] == {"path": "/health", "port": "health"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}


def test_defaults_run_one_api_on_sqlite_kept_on_a_claim(rendered: dict[str, Rendered]) -> None:
    r = rendered["defaults"]
    deployment = r.get("Deployment", API)
    assert deployment["spec"]["replicas"] == 1
    # one SQLite file: the old pod must stop before the new one opens it
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    api = container(deployment, "api")
    variables = env(api)
    assert not {"DB_HOST", "AGENT_HUB_BACKEND", "REDIS_URL"} & set(variables)
    assert variables["STREAMSPACE_HOME"]["value"] == "/var/lib/streamspace"
    mounts = {m["name"]: m["mountPath"] for m in api["volumeMounts"]}
    assert mounts["home"] == "/var/lib/streamspace"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["home"]["persistentVolumeClaim"]["claimName"] == "streamspace-api-home"
    assert r.get("Deployment", API)["metadata"]["namespace"] == NAMESPACE
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert api["image"] == f"streamspace/control-plane:{app_version}"
    assert not r.all("StatefulSet")


def test_secrets_reach_the_api_by_the_seed_names(rendered: dict[str, Rendered]) -> None:
    variables = env(container(rendered["defaults"].get("Deployment", API), "api"))
    refs = {
        name: (v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
        for name, v in variables.items()
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    assert refs == {
        "JWT_SECRET": ("streamspace-jwt", "secret"),
        "ADMIN_USERNAME": ("streamspace-admin-credentials", "username"),
        "ADMIN_PASSWORD": ("streamspace-admin-credentials", "password"),
    }
    admin = rendered["defaults"].get("Secret", "streamspace-admin-credentials")
    assert set(admin["data"]) == {"username", "password"}


def _downward(var: dict[str, Any]) -> str:
    return str(var["valueFrom"]["fieldRef"]["fieldPath"])


def test_api_ha_uses_postgres_and_the_charts_redis(rendered: dict[str, Rendered]) -> None:
    r = rendered["api-ha-redis"]
    deployment = r.get("Deployment", API)
    assert deployment["spec"]["replicas"] == 4
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    variables = env(container(deployment, "api"))
    assert variables["AGENT_HUB_BACKEND"]["value"] == "redis"
    service = r.get("Service", REDIS)
    (port,) = service["spec"]["ports"]
    assert variables["REDIS_URL"]["value"] == f"redis://{REDIS}:{port['port']}/0"
    assert service["spec"]["selector"].items() <= (
        r.get("StatefulSet", REDIS)["spec"]["template"]["metadata"]["labels"].items()
    )
    assert container(r.get("StatefulSet", REDIS), "redis")["image"] == "docker.io/redis:7-alpine"
    # each replica's id in the hub, and where the other replicas reach it
    assert _downward(variables["POD_NAME"]) == "metadata.name"
    assert _downward(variables["POD_IP"]) == "status.podIP"
    assert variables["DB_HOST"]["value"] == "postgres.example.com"
    assert variables["DB_PORT"]["value"] == "5432"
    assert variables["DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "streamspace-db",
        "key": "password",
    }
    assert "persistentVolumeClaim" not in str(deployment["spec"]["template"]["spec"]["volumes"])
    affinity = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    term = affinity["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_external_db_secret_gives_every_db_variable(rendered: dict[str, Rendered]) -> None:
    r = rendered["external-db-secret"]
    variables = env(container(r.get("Deployment", API), "api"))
    refs = {
        name: variables[name]["valueFrom"]["secretKeyRef"]
        for name in ("DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD")
    }
    # the seed guide's keys; those with a default in the control plane may be left out
    assert refs == {
        "DB_HOST": {"name": "streamspace-db", "key": "host"},
        "DB_PORT": {"name": "streamspace-db", "key": "port", "optional": True},
        "DB_NAME": {"name": "streamspace-db", "key": "database", "optional": True},
        "DB_USER": {"name": "streamspace-db", "key": "username", "optional": True},
        "DB_PASSWORD": {"name": "streamspace-db", "key": "password"},
    }
    assert r.maybe("Secret", "streamspace-db") is None
    assert r.maybe("PersistentVolumeClaim", "streamspace-api-home") is None


def test_ingress_carries_websockets_with_cookie_affinity(rendered: dict[str, Rendered]) -> None:
    r = rendered["ingress"]
    ingress = r.get("Ingress", "streamspace")
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/websocket-services"] == API
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert notes["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert notes["nginx.ingress.kubernetes.io/session-cookie-name"] == "streamspace-affinity"
    assert notes["cert-manager.io/cluster-issuer"] == "letsencrypt-prod"
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"hosts": ["streamspace.example.com"], "secretName": "streamspace-tls"}]
    (rule,) = spec["rules"]
    assert rule["host"] == "streamspace.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = r.get("Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert "https://streamspace.example.com" in r.notes


def test_agent_ha_gets_the_kubernetes_lease(rendered: dict[str, Rendered]) -> None:
    r = rendered["agent-ha"]
    deployment = r.get("Deployment", AGENT)
    assert deployment["spec"]["replicas"] == 5
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    variables = {k: v.get("value") for k, v in env(container(deployment, "agent")).items()}
    assert {k: variables.get(k) for k in _HA} == {
        "ENABLE_HA": "true",
        "HA_BACKEND": "kubernetes",
        "LEASE_LOCK_NAME": "k8s-agent-leader",
        "LEASE_LOCK_NAMESPACE": NAMESPACE,
        "LEASE_DURATION": "15s",
        "RENEW_DEADLINE": "10s",
        "RETRY_PERIOD": "2s",
    }
    assert variables["PLATFORM"] == "kubernetes"
    assert variables["NAMESPACE"] == r.get("Role", AGENT)["metadata"]["namespace"] == NAMESPACE
    # the agent reaches this release's API Service by default
    service = r.get("Service", API)
    port = service["spec"]["ports"][0]["port"]
    assert variables["CONTROL_PLANE_URL"] == f"ws://{API}.{NAMESPACE}.svc:{port}"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == AGENT
    assert r.get("ServiceAccount", AGENT)
    binding = r.get("RoleBinding", AGENT)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": AGENT, "namespace": NAMESPACE}
    ]
    assert binding["roleRef"]["name"] == AGENT
    assert "podAntiAffinity" in pod["affinity"]


_HA = (
    "ENABLE_HA",
    "HA_BACKEND",
    "LEASE_LOCK_NAME",
    "LEASE_LOCK_NAMESPACE",
    "LEASE_DURATION",
    "RENEW_DEADLINE",
    "RETRY_PERIOD",
)


def test_single_agent_without_ha_never_runs_twice(rendered: dict[str, Rendered]) -> None:
    deployment = rendered["external-db-secret"].get("Deployment", AGENT)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    variables = env(container(deployment, "agent"))
    assert variables["ENABLE_HA"]["value"] == "false"
    assert not set(_HA[1:]) & set(variables)


def test_agent_token_comes_from_the_secret_notes_tell_how_to_make(
    rendered: dict[str, Rendered],
) -> None:
    r = rendered["agent-ha"]
    variables = env(container(r.get("Deployment", AGENT), "agent"))
    ref = variables["AGENT_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "streamspace-agent-token", "key": "token"}
    agent_id = variables["AGENT_ID"]["value"]
    assert f"streamspace-controlplane create-agent-token {agent_id}" in r.notes
    assert f"create secret generic -n {NAMESPACE} {ref['name']} --from-literal=token=" in r.notes


def test_notes_tell_how_to_read_the_admin_password(rendered: dict[str, Rendered]) -> None:
    for name in ("defaults", "api-ha-redis"):
        notes = rendered[name].notes
        assert (
            f"kubectl get secret -n {NAMESPACE} streamspace-admin-credentials "
            "-o jsonpath='{.data.password}' | base64 -d"
        ) in notes, name
    assert "my-admin" in rendered["everything"].notes


def test_everything_set_reaches_the_objects(rendered: dict[str, Rendered]) -> None:
    r = rendered["everything"]
    api = r.get("Deployment", API)
    assert "replicas" not in api["spec"]  # the HPA owns it
    hpa = r.get("HorizontalPodAutoscaler", API)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": API,
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 6)
    api_env = env(container(api, "api"))
    assert api_env["LOG_LEVEL"]["value"] == "DEBUG"
    assert api_env["AGENT_HUB_BACKEND"]["value"] == "redis"
    # extraEnv replaces the chart's REDIS_URL (a password from a Secret)
    assert api_env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "url"}
    assert api_env["ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "my-admin"
    assert r.maybe("Secret", "streamspace-admin-credentials") is None
    assert container(api, "api")["image"] == "registry.example.com/streamspace/control-plane:dev"
    ingress = r.get("Ingress", "streamspace")
    assert "nginx.ingress.kubernetes.io/websocket-services" not in ingress["metadata"].get(
        "annotations", {}
    )
    claim = r.get("StatefulSet", REDIS)["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["storageClassName"] == "fast"
    agent = r.get("Deployment", AGENT)
    agent_env = {k: v.get("value") for k, v in env(container(agent, "agent")).items()}
    assert agent_env["NAMESPACE"] == agent_env["LEASE_LOCK_NAMESPACE"] == "sessions"
    assert agent_env["MAX_CPU"] == "100"
    assert agent_env["MAX_MEMORY"] == "256"
    assert agent_env["CONTROL_PLANE_URL"] == "wss://desk.example.com"
    assert agent_env["STORAGE_CLASS"] == "fast"
    role = r.get("Role", AGENT)
    binding = r.get("RoleBinding", AGENT)
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "sessions"
    assert binding["subjects"][0] == {
        "kind": "ServiceAccount",
        "name": "desk-agent",
        "namespace": NAMESPACE,
    }
    assert agent["spec"]["template"]["spec"]["serviceAccountName"] == "desk-agent"
    assert "nodeAffinity" in agent["spec"]["template"]["spec"]["affinity"]
    token = env(container(agent, "agent"))["AGENT_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "agent-token", "key": "value"}


def test_users_env_replaces_the_charts(render: Any) -> None:
    r = render(
        {
            "api": {
                "replicaCount": 2,
                "env": {"AGENT_HUB_BACKEND": "redis", "REDIS_URL": "redis://mine:6379/3"},
            },
            "database": {"existingSecret": "streamspace-db"},
            "k8sAgent": {"enabled": True, "env": {"NAMESPACE": "elsewhere"}},
        }
    )
    api_env = env(container(r.get("Deployment", API), "api"))
    assert api_env["REDIS_URL"] == {"name": "REDIS_URL", "value": "redis://mine:6379/3"}
    assert api_env["AGENT_HUB_BACKEND"]["value"] == "redis"
    assert r.maybe("StatefulSet", REDIS) is None
    agent_env = env(container(r.get("Deployment", AGENT), "agent"))
    assert agent_env["NAMESPACE"]["value"] == "elsewhere"


def test_a_redis_of_ones_own_turns_the_redis_hub_on(render: Any) -> None:
    r = render({"api": {"env": {"REDIS_URL": "redis://my-redis.example.com:6379"}}})
    api_env = env(container(r.get("Deployment", API), "api"))
    assert api_env["AGENT_HUB_BACKEND"]["value"] == "redis"
    assert api_env["REDIS_URL"]["value"] == "redis://my-redis.example.com:6379"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"api": {"replicaCount": 4}, "redis": {"enabled": True}},
            "api.replicaCount=4 needs PostgreSQL: set database.host (with database.password) "
            "or database.existingSecret",
        ),
        (
            {"autoscaling": {"enabled": True}, "redis": {"enabled": True}},
            "autoscaling.enabled=true needs PostgreSQL",
        ),
        (
            {"api": {"replicaCount": 2}, "database": {"existingSecret": "db"}},
            "api.replicaCount=2 needs Redis for the agent hub: set redis.enabled=true, or "
            "api.env.REDIS_URL",
        ),
        (
            {
                "api": {"replicaCount": 2, "env": {"AGENT_HUB_BACKEND": "memory"}},
                "database": {"existingSecret": "db"},
                "redis": {"enabled": True},
            },
            "cannot use api.env.AGENT_HUB_BACKEND=memory",
        ),
        (
            {"k8sAgent": {"enabled": True, "replicaCount": 3}},
            "k8sAgent.replicaCount=3 needs k8sAgent.ha.enabled=true",
        ),
        ({"ingress": {"enabled": True}}, "ingress.enabled=true needs ingress.host"),
        (
            {
                "autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2},
                "database": {"existingSecret": "db"},
                "redis": {"enabled": True},
            },
            "autoscaling.maxReplicas (2) is below autoscaling.minReplicas (4)",
        ),
    ],
)
def test_values_the_programs_cannot_run_with_fail_the_install(
    render: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError) as failed:
        render(values)
    assert message in str(failed.value)


@pytest.mark.parametrize(
    "values",
    [
        {"api": {"env": None, "extraEnv": None, "resources": None, "podSecurityContext": None}},
        {"k8sAgent": {"enabled": True, "env": None, "extraEnv": None, "affinity": None}},
        {"ingress": {"enabled": True, "host": "desk.example.com", "annotations": None}},
        {"redis": {"enabled": True, "resources": None}},
    ],
)
def test_a_default_set_to_null_is_left_out(render: Any, values: dict[str, Any]) -> None:
    """`--set key=null` removes a default (Helm's rule); the templates still render."""
    r = render(values)
    for obj in r.objects:
        kubernetes_validate.validate(obj, kube_versions()[-1], strict=True)
    if "ingress" in values:
        annotations = r.get("Ingress", "streamspace")["metadata"]["annotations"]
        assert annotations == {"nginx.ingress.kubernetes.io/websocket-services": API}
    if "api" in values:
        assert "resources" not in container(r.get("Deployment", API), "api")
