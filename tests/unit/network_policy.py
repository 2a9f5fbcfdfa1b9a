"""Kubernetes NetworkPolicy ingress semantics, evaluated offline: may a connection from one pod
(or from outside the cluster) reach a pod's port? Pure logic over rendered manifests, so the
policies can be checked as a table of who may reach what (tests/unit/test_k8s_network_policies.py).

What it implements, as the NetworkPolicy API defines it: a pod is isolated for ingress once any
policy in its namespace selects it with `Ingress` among its policy types (or, with no
`policyTypes`, always); an isolated pod accepts a connection that at least one rule of one such
policy admits. A rule admits when its `from` is absent or empty (any source) or one of its peers
matches, and its `ports` is absent or empty (any port) or one entry matches. A peer's
`podSelector` alone means pods of the policy's namespace; `namespaceSelector` alone, every pod
of the matching namespaces; both, the matching pods of those namespaces; `ipBlock`, sources by
address (pods' addresses are not modelled: an ipBlock matches only sources outside the
cluster). Selectors: `matchLabels` and `matchExpressions` (In, NotIn, Exists, DoesNotExist); an
empty selector matches everything. Ports: a number or a container port's name, the protocol
(TCP by default) and `endPort` ranges. Not modelled: egress (the manifests restrict ingress
only) and a pod reaching itself, which policies never block.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pod:
    """A pod as policies see it: its namespace, labels and named container ports."""

    namespace: str
    labels: Mapping[str, str]
    ports: Mapping[str, int] = field(default_factory=dict)  # name → number


@dataclass(frozen=True)
class External:
    """A source outside the cluster (a client on the internet, a load balancer's address)."""

    address: str = "203.0.113.7"


Source = Pod | External


def selector_matches(selector: Mapping, labels: Mapping[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or ():
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or ()
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown selector operator {operator!r}")
    return True


def _namespace(policy: Mapping) -> str:
    return policy["metadata"].get("namespace", "default")


def _peer_admits(peer: Mapping, source: Source, policy_namespace: str,
                 namespaces: Mapping[str, Mapping[str, str]]) -> bool:
    if "ipBlock" in peer:
        if not isinstance(source, External):
            return False
        address = ipaddress.ip_address(source.address)
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(cidr) for cidr in block.get("except") or ())
    if isinstance(source, External):
        return False
    pods, spaces = peer.get("podSelector"), peer.get("namespaceSelector")
    if spaces is None:
        in_namespace = source.namespace == policy_namespace
    else:
        in_namespace = selector_matches(spaces, namespaces.get(source.namespace, {}))
    return in_namespace and (pods is None or selector_matches(pods, source.labels))


def _port_admits(entry: Mapping, destination: Pod, port: int, protocol: str) -> bool:
    if entry.get("protocol", "TCP") != protocol:
        return False
    if "port" not in entry:
        return True
    wanted = entry["port"]
    if isinstance(wanted, str):
        return destination.ports.get(wanted) == port
    return wanted <= port <= entry.get("endPort", wanted)


def _isolates_ingress(policy: Mapping) -> bool:
    types = policy["spec"].get("policyTypes")
    return types is None or "Ingress" in types


def allowed(policies: Iterable[Mapping], namespaces: Mapping[str, Mapping[str, str]],
            source: Source, destination: Pod, port: int, protocol: str = "TCP") -> bool:
    """Whether `source` may open a connection to `port` of `destination` under `policies`
    (NetworkPolicy objects as rendered; `namespaces`: each namespace's labels)."""
    selecting = [p for p in policies
                 if p["kind"] == "NetworkPolicy" and _namespace(p) == destination.namespace
                 and _isolates_ingress(p)
                 and selector_matches(p["spec"].get("podSelector", {}), destination.labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or ():
            peers = rule.get("from") or ()
            if peers and not any(_peer_admits(peer, source, _namespace(policy), namespaces)
                                 for peer in peers):
                continue
            entries = rule.get("ports") or ()
            if not entries or any(_port_admits(e, destination, port, protocol) for e in entries):
                return True
    return False
