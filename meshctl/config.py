"""Where meshctl finds a service (the gateway, the registry …) and its API key, first found wins:

1. the flag (`--gateway`, `--api-key` …);
2. the environment (`INFERMESH_GATEWAY`, `INFERMESH_API_KEY` …);
3. the current context of the config file (`meshctl config use-context NAME`; `--context NAME`
   or `INFERMESH_CONTEXT` for one command): its endpoints, its `api-key-file`, and, for what it
   does not name, the embedded stack in its `state-dir`;
4. the embedded stack in `INFERMESH_STATE_DIR` (default `./.infermesh`, what `make run` writes)
   — only when no context is in use: a context never falls back to whatever stack the current
   directory holds.

A stored key (a context's key file, a stack's key) is used only with an endpoint from the same
place: a key is never sent to an endpoint it was not stored with (a flag or the environment
must then give the key too).

TLS trust comes from the same place as the endpoint (`tls_for`): a flag or environment
endpoint with `INFERMESH_TLS_CA_FILE` (and `_CERT_FILE`/`_KEY_FILE`, the operator's certificate
that internal services ask for); a context's `tls-ca-file`/`tls-cert-file`/`tls-key-file`, or
its stack's; the local stack's CA and operator certificate (from its `stack.json`: its `env`
file gives other clients the CA only, `operator-env` the operator's certificate too). With no
CA anywhere, the system's roots verify the server, unless `INFERMESH_TLS_MODE=
plaintext-development` says plaintext.

The config file is YAML, kubectl-style, at `INFERMESH_CONFIG` or `<user config dir>/infermesh/
config.yaml`; it holds key *file* paths, never keys.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import typer

from deploy.local.state import StackInfo, load_state
from services.common import tls

DEFAULT_STATE_DIR = pathlib.Path(os.environ.get("INFERMESH_STATE_DIR", ".infermesh"))
# What a context may name; `state-dir` and `api-key-file` besides these endpoints.
SERVICES = ("gateway", "registry", "scheduler", "auditor", "prometheus", "etcd", "triton",
            "triton-metrics")
TLS_FIELDS = ("tls-ca-file", "tls-cert-file", "tls-key-file")
CONTEXT_FIELDS = (*SERVICES, "api-key-file", *TLS_FIELDS, "state-dir")

selected_context: str | None = None  # `meshctl --context NAME …`, set by the app's callback


def config_path() -> pathlib.Path:
    explicit = os.environ.get("INFERMESH_CONFIG")
    if explicit:
        return pathlib.Path(explicit)
    return pathlib.Path(typer.get_app_dir("infermesh")) / "config.yaml"


@dataclass
class MeshConfig:
    """The config file: named contexts (each a mapping of CONTEXT_FIELDS) and the current one."""

    current_context: str = ""
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: pathlib.Path | None = None) -> MeshConfig:
        import yaml

        path = path or config_path()
        if not path.exists():
            return cls()
        try:
            raw: Any = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise typer.BadParameter(f"{path} is not valid YAML: {exc}") from None
        contexts = {str(name): {str(k): str(v) for k, v in (values or {}).items()}
                    for name, values in (raw.get("contexts") or {}).items()}
        return cls(str(raw.get("current-context") or ""), contexts)

    def save(self, path: pathlib.Path | None = None) -> pathlib.Path:
        import yaml

        path = path or config_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"current-context": self.current_context,
                                        "contexts": self.contexts}, sort_keys=True))
        return path

    def active(self) -> tuple[str, dict[str, str]] | None:
        """The context in force: `--context`, `INFERMESH_CONTEXT`, then `current-context`."""
        name = selected_context or os.environ.get("INFERMESH_CONTEXT") or self.current_context
        if not name:
            return None
        if name not in self.contexts:
            raise typer.BadParameter(
                f"no context {name!r} in {config_path()} (meshctl config get-contexts)")
        return name, self.contexts[name]


def _state_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("INFERMESH_STATE_DIR", ".infermesh"))


def _stack_value(state: StackInfo | None, service: str) -> str | None:
    if state is None:
        return None
    if service == "gateway":
        return state.gateway
    if service == "etcd":
        return state.etcd
    if service == "triton-metrics":
        return state.metrics.get("triton")
    return state.endpoints.get(service)


def resolve(service: str, explicit: str | None = None) -> str | None:
    """`service`'s value (an endpoint, or `api-key`) by the order in the module docstring."""
    return _resolve(service, explicit)[0]


def _resolve(service: str, explicit: str | None,
             stored: tuple[str, ...] = ("context", "local")) -> tuple[str | None, str]:
    """(value, where it came from: explicit | env | context | local | none). `stored`: which
    stored places may answer (a key may come only from where its endpoint came from)."""
    if explicit:
        return explicit, "explicit"
    variable = "INFERMESH_" + service.upper().replace("-", "_")
    if os.environ.get(variable):
        return os.environ[variable], "env"
    active = MeshConfig.load().active()
    if active is not None:
        if "context" not in stored:
            return None, "none"  # a chosen context never falls back to the local stack
        _, context = active
        if service == "api-key" and context.get("api-key-file"):
            key_file = pathlib.Path(context["api-key-file"]).expanduser()
            try:
                return key_file.read_text().strip(), "context"
            except OSError as exc:
                raise typer.BadParameter(f"cannot read api-key-file {key_file}: {exc}") from None
        if context.get(service):
            return context[service], "context"
        if context.get("state-dir"):
            state = load_state(pathlib.Path(context["state-dir"]).expanduser())
            found = state.api_key if service == "api-key" and state else _stack_value(state,
                                                                                      service)
            return found or None, "context"
        return None, "none"  # a context that names no such value: never the local stack's
    if "local" not in stored:
        return None, "none"
    state = load_state(_state_dir())
    if service == "api-key":
        return (state.api_key if state else None), "local"
    return _stack_value(state, service), "local"


def service_endpoint(service: str, endpoint: str | None) -> str:
    """`service`'s host:port; a usage error (exit 2) naming the ways to give it if none."""
    found = resolve(service, endpoint)
    if not found:
        variable = "INFERMESH_" + service.upper().replace("-", "_")
        raise typer.BadParameter(f"no {service}: pass --{service}, set {variable}, or use a "
                                 "context (meshctl config set-context)")
    return found


def api_key(explicit: str | None, stored: tuple[str, ...] = ("context", "local")) -> str:
    found, _ = _resolve("api-key", explicit, stored)
    if not found:
        raise typer.BadParameter("no API key: pass --api-key, set INFERMESH_API_KEY, or use a "
                                 "context with --api-key-file")
    return found


def endpoint_and_key(service: str, endpoint: str | None, key: str | None) -> tuple[str, str]:
    """`service`'s host:port and the API key, each by the order in the module docstring — but
    a stored key (a context's, the local stack's) only with an endpoint from the same place, so
    a key is never sent to an endpoint it was not stored with."""
    found, source = _resolve(service, endpoint)
    if not found:
        service_endpoint(service, None)  # raises the usage error naming the ways to give it
    stored = (source,) if source in ("context", "local") else ()
    return found, api_key(key, stored)


def gateway_and_key(gateway: str | None, key: str | None) -> tuple[str, str]:
    return endpoint_and_key("gateway", gateway, key)


def _tls_from_files(ca: str | None, cert: str | None, key: str | None) -> tls.MeshTls | None:
    settings = tls.TlsSettings(ca_file=ca, cert_file=cert, key_file=key)
    if ca is None:
        if settings.mode is tls.TlsMode.PLAINTEXT_DEVELOPMENT:
            return None
        return tls.MeshTls(ca=None)  # the system's roots
    try:
        return tls.MeshTls.load(settings.model_copy(update={"mode": tls.TlsMode.MUTUAL}),
                                need_certificate=False)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def tls_for(service: str, endpoint: str | None) -> tls.MeshTls | None:
    """How to reach `service` at the endpoint resolved from the flag `endpoint`: the TLS
    material stored where that endpoint came from (module docstring); None: plaintext."""
    _, source = _resolve(service, endpoint)
    if source in ("explicit", "env", "none"):
        return _tls_from_files(*(os.environ.get(f"INFERMESH_TLS_{name}_FILE")
                                 for name in ("CA", "CERT", "KEY")))
    if source == "context":
        active = MeshConfig.load().active()
        assert active is not None
        _, context = active
        if context.get("tls-ca-file") or not context.get("state-dir"):
            return _tls_from_files(*(context.get(name) for name in TLS_FIELDS))
        state = load_state(pathlib.Path(context["state-dir"]).expanduser())
    else:
        state = load_state(_state_dir())
    return state.client_tls() if state is not None else None
