"""A running stack's state on disk: `stack.json` (what `StackInfo` holds) and `env` (the same as
shell variables), in the stack's state directory. Light on purpose: every `meshctl` command reads
it to find the stack, and should not pay for importing what starts one."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
from dataclasses import dataclass, field


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
    mesh_token: str = ""  # what the stack's services present to each other (a fresh one per up)
    # Model → the Triton model serving the version the stack registered (each version is its own).
    triton_models: dict[str, str] = field(default_factory=dict)

    def env_lines(self) -> str:
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
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())


def write_state(state_dir: pathlib.Path, info: StackInfo) -> None:
    """Owner-only files: they hold the admin key and the mesh token."""
    for name, text in (("env", info.env_lines()),
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
    for name in ("stack.json", "env"):
        (state_dir / name).unlink(missing_ok=True)
