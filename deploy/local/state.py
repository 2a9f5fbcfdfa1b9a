"""A running stack's state on disk: `stack.json` (what `StackInfo` holds), `env` (the same as
shell variables, for any client) and `operator-env` (`env` plus the operator's certificate, for
an admin's tools), in the stack's state directory. Light on purpose: every `meshctl` command reads
it to find the stack, and should not pay for importing what starts one."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
from dataclasses import dataclass, field

import grpc

from services.common import tls


@dataclass(frozen=True)
class CertificateFiles:
    """One kind's PEM files in a stack's `tls` directory, and the CA bundle that verifies
    every peer (made by `certificates.make_mesh_certificates`)."""

    ca: pathlib.Path
    cert: pathlib.Path
    key: pathlib.Path

    def env(self) -> dict[str, str]:
        """The `INFERMESH_TLS_*` variables of a process holding this certificate."""
        return {"INFERMESH_TLS_MODE": tls.TlsMode.MUTUAL.value,
                "INFERMESH_TLS_CA_FILE": str(self.ca), "INFERMESH_TLS_CERT_FILE": str(self.cert),
                "INFERMESH_TLS_KEY_FILE": str(self.key)}


def ca_file(directory: pathlib.Path) -> pathlib.Path:
    return directory / "ca.pem"


def files_for(directory: pathlib.Path, kind: str) -> CertificateFiles:
    return CertificateFiles(ca_file(directory), directory / f"{kind}.pem",
                            directory / f"{kind}.key")


@dataclass
class StackInfo:
    """What a caller needs to use a running stack (also what `.infermesh/env` holds)."""

    gateway: str
    api_key: str
    model: str  # the real model (torch engine)
    reference_model: str  # the reference engine: made-up text, modelled serving costs
    etcd: str
    endpoints: dict[str, str]
    metrics: dict[str, str]
    pids: dict[str, int]
    openai_base_url: str = ""  # the gateway's OpenAI-compatible HTTP API
    mesh_token: str = ""  # plaintext development: what the services present to each other
    tls_dir: str = ""  # the stack's CA and certificates (certificates.py); "": plaintext
    # Model → the Triton model serving the version the stack registered (each version is its own).
    triton_models: dict[str, str] = field(default_factory=dict)
    # The sidecar's key to Triton's model control (backends/triton/control.py); tests read it.
    triton_control_token_file: str = ""
    traces_dir: str = ""  # where the stack's trace receiver writes (`meshctl trace`); "": none

    def env_lines(self, operator: bool = False) -> str:
        """`export` lines of the stack's endpoints and key, with the CA (`client_env`), or with
        the operator's certificate too (`operator_env`)."""
        values = {
            "INFERMESH_GATEWAY": self.gateway,
            "INFERMESH_REGISTRY": self.endpoints["registry"],
            "INFERMESH_SCHEDULER": self.endpoints["scheduler"],
            "INFERMESH_AUDITOR": self.endpoints["auditor"],
            "INFERMESH_API_KEY": self.api_key,
            "INFERMESH_MODEL": self.model,
            "INFERMESH_REFERENCE_MODEL": self.reference_model,
            "INFERMESH_ETCD": self.etcd,
            "INFERMESH_TRITON": self.endpoints["triton"],
            "INFERMESH_TRITON_METRICS": self.metrics["triton"],
            "INFERMESH_PROMETHEUS": self.endpoints["prometheus"],
            "INFERMESH_OPENAI_BASE_URL": self.openai_base_url,
        }
        values.update(self.operator_env() if operator else self.client_env())
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())


    def client_env(self) -> dict[str, str]:
        """`INFERMESH_TLS_CA_FILE` of a client of this stack (the SDK, examples, HTTP clients):
        the CA that verifies the gateway, and no certificate ({} for a plaintext stack)."""
        if not self.tls_dir:
            return {}
        return {"INFERMESH_TLS_CA_FILE": str(ca_file(pathlib.Path(self.tls_dir)))}

    def operator_env(self) -> dict[str, str]:
        """`client_env` and the operator's certificate (`operator.infermesh`), which the
        internal services' admin calls (registry, auditor, `ListReplicas`) and etcd ask for:
        an admin's meshctl or SDK only, never every client ({} for a plaintext stack)."""
        if not self.tls_dir:
            return {}
        return {name: value for name, value in self.service_security(tls.OPERATOR).items()
                if name != "INFERMESH_TLS_MODE"}

    def service_security(self, kind: str) -> dict[str, str]:
        """The INFERMESH_* variables that make a process of `kind` one of this stack's: its
        certificate, or in a plaintext-development stack the mode and the mesh token."""
        if not self.tls_dir:
            return {"INFERMESH_TLS_MODE": tls.TlsMode.PLAINTEXT_DEVELOPMENT.value,
                    "INFERMESH_MESH_TOKEN": self.mesh_token}
        return files_for(pathlib.Path(self.tls_dir), kind).env()

    def client_tls(self, kind: str = tls.OPERATOR) -> tls.MeshTls | None:
        """The CA and `kind`'s certificate (the operator's: what meshctl and the tests hold),
        None for a plaintext-development stack."""
        if not self.tls_dir:
            return None
        files = files_for(pathlib.Path(self.tls_dir), kind)
        return tls.MeshTls.load(tls.TlsSettings(mode=tls.TlsMode.MUTUAL, ca_file=files.ca,
                                                cert_file=files.cert, key_file=files.key))

    def channel(self, name: str = "gateway", endpoint: str | None = None) -> grpc.aio.Channel:
        """A channel to the stack's process `name` (or to `endpoint`, another of that kind),
        as its clients dial it: the gateway checked by its address, the others by their
        mesh identity, with the operator's certificate."""
        kind = name.split("-")[0]
        return tls.channel(endpoint or self.endpoints[name], None if kind == "gateway" else kind,
                           self.client_tls())


def write_state(state_dir: pathlib.Path, info: StackInfo) -> None:
    """Owner-only files: they hold the admin key and the mesh token."""
    for name, text in (("env", info.env_lines()),
                       ("operator-env", info.env_lines(operator=True)),
                       ("stack.json", json.dumps(info.__dict__, indent=2))):
        path = state_dir / name
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        path.chmod(0o600)  # a file left by an older run keeps its mode otherwise


def load_state(state_dir: pathlib.Path) -> StackInfo | None:
    path = state_dir / "stack.json"
    if not path.exists():
        return None
    return StackInfo(**json.loads(path.read_text()))


def forget_state(state_dir: pathlib.Path) -> None:
    """A stopped stack leaves no endpoints or key behind for scripts to pick up."""
    for name in ("stack.json", "env", "operator-env"):
        (state_dir / name).unlink(missing_ok=True)
