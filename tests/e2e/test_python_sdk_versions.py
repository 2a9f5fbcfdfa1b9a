"""The SDK on the oldest and the newest Python it supports (3.9 and 3.13): its wheel, built once,
installs into a venv of each with the dependency ranges it declares; its unit tests pass there,
and two examples (a batch of generations, an admin task) run against the real stack."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from deploy.local.stack import StackInfo

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]
SUPPORTED = ("3.9", "3.13")  # sdk/python/pyproject.toml: requires-python and the classifiers
# The tools the SDK's unit tests need there: the newest releases that still run on 3.9.
TEST_TOOLS = ("pytest==8.4.2", "pytest-asyncio==1.2.0", "googleapis-common-protos==1.72.0")


def interpreter(version: str) -> str | None:
    """A working Python `version`: pyenv's newest build of it (machines of this project's kind
    carry pyenv's 3.9 and 3.13 beside the system 3.11), else `pythonX.Y` on PATH (which may be
    a pyenv shim that refuses to run an unselected version, so each is tried)."""
    pyenv = pathlib.Path(os.environ.get("PYENV_ROOT", pathlib.Path.home() / ".pyenv"))
    # Final releases only (3.13.0, not 3.13.0rc1 or 3.13t), newest first.
    releases = [path for path in pyenv.glob(f"versions/{version}.*/bin/python{version}")
                if re.fullmatch(rf"{re.escape(version)}\.\d+", path.parts[-3])]
    builds = sorted(releases, key=lambda path: int(path.parts[-3].rsplit(".", 1)[1]),
                    reverse=True)
    for candidate in [*map(str, builds), shutil.which(f"python{version}")]:
        if candidate and subprocess.run([candidate, "-c", "import venv"], capture_output=True,
                                        timeout=30).returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT / "sdk" / "python")], check=True, timeout=120)
    [built] = out.glob("infermesh_client-*.whl")
    with zipfile.ZipFile(built) as archive:
        metadata = archive.read(next(name for name in archive.namelist()
                                     if name.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Python: >=3.9" in metadata.splitlines()
    for version in SUPPORTED:
        assert f"Classifier: Programming Language :: Python :: {version}" in metadata
    return built


@pytest.mark.parametrize("version", SUPPORTED)
def test_the_sdk_on_python(version: str, wheel: pathlib.Path, stack: StackInfo,
                           tmp_path: pathlib.Path):
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine (not on PATH as python{version}, not "
                    "in pyenv's versions/): the SDK is still linted under its 3.9 floor (ruff)")
    # This process's environment (pip's registry settings) without its Python path or mesh.
    clean = {name: value for name, value in os.environ.items()
             if name not in ("PYTHONPATH", "PYTHONHOME") and not name.startswith("INFERMESH_")}
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], env=clean, check=True, timeout=60)
    venv_python = str(venv / "bin" / "python")
    subprocess.run([venv_python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    str(wheel), *TEST_TOOLS], env=clean, check=True, timeout=300)

    def run(*args: str, env: dict[str, str] = clean) -> str:
        ran = subprocess.run([venv_python, *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        return ran.stdout + ran.stderr

    where = run("-c", "import sys, infermesh_client; "
                      "print('%d.%d' % sys.version_info[:2], infermesh_client.__file__)").split()
    assert where[0] == version and where[1].startswith(str(venv))
    unit = run("-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
               "tests/unit/test_python_sdk_unit.py")
    assert " passed" in unit and "failed" not in unit

    env = {**clean, "INFERMESH_GATEWAY": stack.gateway, "INFERMESH_API_KEY": stack.api_key,
           "INFERMESH_MODEL": stack.reference_model,
           "INFERMESH_REGISTRY": stack.endpoints["registry"],
           "INFERMESH_AUDITOR": stack.endpoints["auditor"], **stack.operator_env()}
    batch = run("examples/batch_prompts.py", "--concurrency", "3", env=env)
    assert "0 failed" in batch
    rollout = run("examples/admin_tasks.py", "rollout", stack.reference_model, env=env)
    assert " production " in rollout.splitlines()[0]
