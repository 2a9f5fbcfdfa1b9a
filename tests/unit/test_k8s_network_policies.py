"""deploy/k8s and deploy/monitoring, checked as a table of who may reach what: the rendered
NetworkPolicies are evaluated (tests/unit/network_policy.py) for every source and every port
of every workload, and the result must equal EXPECTED, for both overlays. The evaluator's
semantics are checked first, on tiny hand-made policies. And every container runs as a
numeric non-root user, without privilege escalation or capabilities."""

from __future__ import annotations

import pytest

from tests.unit.network_policy import External, Pod, allowed, selector_matches
from tests.unit.test_k8s_manifests import K8S, MONITORING, OVERLAYS, WORKLOADS, render

NAMESPACES = {name: {"kubernetes.io/metadata.name": name}
              for name in ("infermesh", "monitoring", "default")}

# Sources that no manifest describes: the operator's meshctl in a pod labelled
# app.kubernetes.io/name=operator (docs/deploy.md), a stranger's pod in the mesh's namespace, a
# pod in another namespace that claims to be Prometheus, an HPA's Prometheus adapter, and a
# client outside the cluster.
EXTRA_SOURCES = {
    "operator": Pod("infermesh", {"app.kubernetes.io/name": "operator"}),
    "stranger": Pod("infermesh", {"app.kubernetes.io/name": "debug"}),
    "impostor": Pod("default", {"app.kubernetes.io/name": "prometheus"}),
    "prometheus-adapter": Pod("monitoring", {"app.kubernetes.io/name": "prometheus-adapter"}),
    "internet": External(),
}
EVERYONE = frozenset({"gateway", "registry", "ratelimit", "scheduler", "auditor", "replica",
                      "etcd", "prometheus", "grafana", *EXTRA_SOURCES})
ETCD_CLIENTS = frozenset({"gateway", "registry", "ratelimit", "scheduler", "auditor", "replica"})

# (workload, port) → who may open a connection to it. Every port of every workload is listed.
EXPECTED: dict[tuple[str, int], frozenset[str]] = {
    ("gateway", 50051): EVERYONE,                                  # the public gRPC API
    ("gateway", 8080): EVERYONE,                                   # the OpenAI HTTP API
    ("gateway", 9100): frozenset({"prometheus", "registry"}),      # + the canary judge
    ("registry", 50051): frozenset({"gateway", "replica", "operator"}),
    ("registry", 9100): frozenset({"prometheus"}),
    ("ratelimit", 50051): frozenset({"gateway"}),
    ("ratelimit", 9100): frozenset({"prometheus"}),
    ("scheduler", 50051): frozenset({"gateway", "operator"}),
    ("scheduler", 9100): frozenset({"prometheus"}),
    ("auditor", 50051): frozenset({"gateway", "registry", "operator"}),
    ("auditor", 9100): frozenset({"prometheus"}),
    ("replica", 8001): frozenset({"gateway"}),                     # Triton's gRPC
    ("replica", 8000): frozenset(),                                # Triton's HTTP: probes only
    ("replica", 8002): frozenset({"prometheus"}),                  # Triton's metrics
    ("replica", 50051): frozenset({"gateway", "scheduler"}),       # the sidecar
    ("replica", 9100): frozenset({"prometheus"}),                  # the sidecar's metrics
    ("etcd", 2379): ETCD_CLIENTS,                                      # never monitoring, operator
    ("etcd", 2380): frozenset({"etcd"}),
    ("etcd", 2381): frozenset({"prometheus"}),
    ("prometheus", 9090): frozenset({"grafana", "prometheus-adapter"}),
    ("grafana", 3000): frozenset(),                                # port-forward only
}


def _pods(rendered: list[dict]) -> dict[str, Pod]:
    """workload name → a pod of it, as its template describes."""
    pods = {}
    for doc in (d for d in rendered if d["kind"] in WORKLOADS):
        template = doc["spec"]["template"]
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"]
                 for p in c.get("ports", [])}
        pods[doc["metadata"]["name"]] = Pod(doc["metadata"]["namespace"],
                                            template["metadata"]["labels"], ports)
    return pods


@pytest.fixture(scope="module", params=OVERLAYS)
def cluster(request: pytest.FixtureRequest) -> list[dict]:
    """An overlay and the monitoring namespace, as applied together."""
    return render(K8S / "overlays" / request.param) + render(MONITORING)


def test_who_may_reach_what_is_exactly_the_table(cluster: list[dict]) -> None:
    pods = _pods(cluster)
    sources = {**pods, **EXTRA_SOURCES}
    assert set(sources) == EVERYONE
    ports = {(name, port) for name, pod in pods.items() for port in pod.ports.values()}
    assert ports == set(EXPECTED), "a port without a row, or a row without a port"
    policies = [d for d in cluster if d["kind"] == "NetworkPolicy"]
    differences = []
    for (name, port), expected in sorted(EXPECTED.items()):
        reached = {source_name for source_name, source in sources.items()
                   if allowed(policies, NAMESPACES, source, pods[name], port)}
        if reached != expected:
            differences.append(f"{name}:{port} admits {sorted(reached - expected)} too many, "
                               f"{sorted(expected - reached)} too few")
    assert not differences, "\n".join(differences)


def test_both_namespaces_deny_by_default(cluster: list[dict]) -> None:
    denies = {(d["metadata"]["namespace"], d["metadata"]["name"]): d["spec"]
              for d in cluster if d["kind"] == "NetworkPolicy"
              and d["metadata"]["name"] == "default-deny-ingress"}
    assert denies == {(ns, "default-deny-ingress"): {"podSelector": {}, "policyTypes": ["Ingress"]}
                      for ns in ("infermesh", "monitoring")}


def test_every_container_runs_as_a_numeric_user_without_privileges(cluster: list[dict]) -> None:
    for doc in (d for d in cluster if d["kind"] in WORKLOADS):
        pod = doc["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{doc['metadata']['name']}/{container['name']}"
            context = pod.get("securityContext", {}) | container.get("securityContext", {})
            assert context.get("runAsNonRoot") is True, where
            assert isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert "add" not in context.get("capabilities", {}), where
            assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert not context.get("privileged"), where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), doc["metadata"]["name"]


# -- the evaluator, on tiny hand-made policies --------------------------------------------------

NS = {"a": {"kubernetes.io/metadata.name": "a", "team": "x"},
      "b": {"kubernetes.io/metadata.name": "b"}}
WEB = Pod("a", {"app": "web"}, {"http": 80})
DB = Pod("a", {"app": "db", "tier": "data"}, {"sql": 5432})
OTHER_NS_WEB = Pod("b", {"app": "web"})


def policy(spec: dict, namespace: str = "a") -> dict:
    return {"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": namespace},
            "spec": spec}


def test_no_policy_selecting_a_pod_leaves_it_open():
    other = policy({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]})
    assert allowed([other], NS, External(), DB, 5432)
    assert not allowed([other], NS, DB, WEB, 80)


def test_an_egress_only_policy_does_not_isolate_ingress():
    egress = policy({"podSelector": {}, "policyTypes": ["Egress"]})
    assert allowed([egress], NS, WEB, DB, 5432)
    no_types = policy({"podSelector": {}})  # no policyTypes: Ingress is implied
    assert not allowed([no_types], NS, WEB, DB, 5432)


def test_rules_add_up_across_policies_and_a_rule_needs_peer_and_port():
    deny = policy({"podSelector": {}, "policyTypes": ["Ingress"]})
    web_to_db = policy({"podSelector": {"matchLabels": {"app": "db"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                     "ports": [{"port": 5432}]}]})
    assert allowed([deny, web_to_db], NS, WEB, DB, 5432)
    assert not allowed([deny, web_to_db], NS, WEB, DB, 5433)
    assert not allowed([deny, web_to_db], NS, DB, DB, 5432)
    assert not allowed([deny, web_to_db], NS, OTHER_NS_WEB, DB, 5432)  # podSelector: same ns
    assert not allowed([deny, web_to_db], NS, WEB, DB, 5432, protocol="UDP")


def test_an_empty_from_or_ports_admits_everything_on_that_side():
    open_port = policy({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]})
    assert allowed([open_port], NS, External(), WEB, 80)
    assert allowed([open_port], NS, OTHER_NS_WEB, WEB, 80)
    assert not allowed([open_port], NS, OTHER_NS_WEB, WEB, 81)
    open_peer = policy({"podSelector": {}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]})
    assert allowed([open_peer], NS, WEB, DB, 1) and allowed([open_peer], NS, WEB, DB, 65535)
    nothing = policy({"podSelector": {}, "ingress": []})
    assert not allowed([nothing], NS, WEB, DB, 5432)


def test_namespace_and_pod_selectors_in_one_peer_both_apply():
    both = policy({"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}},
         "podSelector": {"matchLabels": {"app": "web"}}}]}]})
    assert allowed([both], NS, OTHER_NS_WEB, DB, 5432)
    assert not allowed([both], NS, Pod("b", {"app": "cron"}), DB, 5432)
    assert not allowed([both], NS, WEB, DB, 5432)  # right pod, wrong namespace
    either = policy({"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}},
        {"podSelector": {"matchLabels": {"app": "web"}}}]}]})
    assert allowed([either], NS, Pod("b", {"app": "cron"}), DB, 5432)
    assert allowed([either], NS, WEB, DB, 5432)
    assert not allowed([either], NS, Pod("a", {"app": "cron"}), DB, 5432)
    every_namespace = policy({"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {}}]}]})
    assert allowed([every_namespace], NS, OTHER_NS_WEB, DB, 5432)
    assert not allowed([every_namespace], NS, External(), DB, 5432)


def test_policies_select_pods_of_their_own_namespace_only():
    deny_b = policy({"podSelector": {}, "policyTypes": ["Ingress"]}, namespace="b")
    assert allowed([deny_b], NS, External(), WEB, 80)
    assert not allowed([deny_b], NS, WEB, OTHER_NS_WEB, 80)


def test_named_ports_ranges_and_ip_blocks():
    named = policy({"podSelector": {}, "ingress": [{"ports": [{"port": "sql"}]}]})
    assert allowed([named], NS, WEB, DB, 5432)
    assert not allowed([named], NS, WEB, WEB, 5432)  # web has no port named sql
    ranged = policy({"podSelector": {}, "ingress": [{"ports": [{"port": 8000, "endPort": 8002}]}]})
    assert allowed([ranged], NS, WEB, DB, 8001) and not allowed([ranged], NS, WEB, DB, 8003)
    blocks = policy({"podSelector": {}, "ingress": [{"from": [
        {"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}}]}]})
    assert allowed([blocks], NS, External("203.0.113.7"), DB, 5432)
    assert not allowed([blocks], NS, External("203.0.113.200"), DB, 5432)
    assert not allowed([blocks], NS, WEB, DB, 5432)


def test_selector_expressions():
    labels = {"app": "db", "tier": "data"}
    assert selector_matches({}, labels)
    assert selector_matches({"matchExpressions": [
        {"key": "app", "operator": "In", "values": ["db", "cache"]},
        {"key": "tier", "operator": "Exists"},
        {"key": "canary", "operator": "DoesNotExist"},
        {"key": "app", "operator": "NotIn", "values": ["web"]}]}, labels)
    assert not selector_matches({"matchExpressions": [
        {"key": "app", "operator": "NotIn", "values": ["db"]}]}, labels)
    assert not selector_matches({"matchExpressions": [
        {"key": "zone", "operator": "In", "values": ["a"]}]}, labels)
    assert not selector_matches({"matchLabels": {"app": "db", "tier": "web"}}, labels)
    with pytest.raises(ValueError):
        selector_matches({"matchExpressions": [{"key": "app", "operator": "Gt"}]}, labels)
