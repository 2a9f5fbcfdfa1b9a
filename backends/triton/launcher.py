"""Starts the tritonserver bundled in the nvidia-pytriton wheel on loopback; stops it without leaks.

Two things make the bundled server work on a CPU machine (docs: ENVIRONMENT.md): the Python-backend
stub takes its `sys.path` from the first `python3` on `PATH`, so this interpreter's `bin/` goes
first (the venv must be made from the system Python the stub links), and the stub finds its CUDA
runtime stubs only through `LD_LIBRARY_PATH`. A server that is killed, or crashes, leaves its stub
processes running and their shared-memory regions in /dev/shm; `stop()` always cleans both up.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from backends.triton.control import read_token, restriction_flags
from backends.triton.kv_event_socket import (
    KV_EVENTS_DIR_ENV,
    events_directory_for,
    in_shared_temp,
    is_private_directory,
    private_directory,
)
from services.common.net import LOOPBACK, free_port
from services.common.processes import pid_alive
from services.common.tls import TlsMode, TlsSettings

__all__ = ["DEFAULT_MODEL_REPOSITORY", "TritonPorts", "TritonServer", "TritonStartError",
           "kill_leftovers", "main", "stub_pids"]

DEFAULT_MODEL_REPOSITORY = pathlib.Path(__file__).parent / "model_repository"


def _pytriton_dir() -> pathlib.Path:
    # find_spec, not import: importing pytriton costs ~0.5 s and only its files are needed.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("nvidia-pytriton is not installed: it carries the tritonserver binary")
    return pathlib.Path(spec.submodule_search_locations[0])


_PYTRITON_DIR = _pytriton_dir()
_TRITON_DIR = _PYTRITON_DIR / "tritonserver"
_TRITON_BINARY = _TRITON_DIR / "bin" / "tritonserver"
_TRITON_LIBS = _PYTRITON_DIR.parent / "nvidia_pytriton.libs"
_PYTHON_BACKEND_FILES = (
    _TRITON_DIR / "backends" / "python" / "libtriton_python.so",
    _TRITON_DIR / "backends" / "python" / "triton_python_backend_utils.py",
    _TRITON_DIR / "python_backend_stubs" / "3.11" / "triton_python_backend_stub",
)
_SHM_DIR = pathlib.Path("/dev/shm")
_SHM_PREFIX = "triton_python_backend_shm_region_"


class TritonStartError(RuntimeError):
    """Triton exited or did not become ready in time; the message ends with its log tail."""


@dataclass(frozen=True)
class TritonPorts:
    grpc: int
    http: int
    metrics: int

    @classmethod
    def free(cls) -> TritonPorts:
        return cls(grpc=free_port(), http=free_port(), metrics=free_port())


def stub_pids(workdir: pathlib.Path, model: str | None = None) -> list[int]:
    """The Python-backend stub processes of the server working in `workdir` (each server runs its
    own copy of the stub binary, which is how they are told apart from other servers', even once
    re-parented to init); only `model`'s when given (its model.py is on the stub's argv)."""
    binary = str(_stub_binary(workdir.resolve()))
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "exe") != binary:
                    continue
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                if model is None or any(a.endswith(f"/{model}/1/model.py") for a in argv):
                    pids.append(int(entry.name))
    return pids


def kill_leftovers(workdir: pathlib.Path) -> list[int]:
    """SIGKILLs what a server working in `workdir` left running when its launcher was killed
    (the tritonserver, which holds the ports, and its stubs); returns the pids killed. For a
    supervisor about to start a launcher again on the same ports and work directory. Their
    shared-memory regions (1 MiB each) stay: which ones were theirs is not known here, and
    another server's may be seconds old with no stub naming it yet."""
    marker = f"--backend-directory={workdir.resolve() / 'backends'}".encode()
    pids = set(stub_pids(workdir))
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes().split(b"\0"):
                    pids.add(int(entry.name))
    _kill_and_wait(sorted(pids))
    return sorted(pids)


def _stub_binary(workdir: pathlib.Path) -> pathlib.Path:
    return workdir / "backends" / "python" / _PYTHON_BACKEND_FILES[-1].name


def _kill_and_wait(pids: Sequence[int], timeout_s: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def _shm_regions() -> set[str]:
    return {path.name for path in _SHM_DIR.glob(_SHM_PREFIX + "*")}


def _shm_regions_in_use() -> set[str]:
    """Regions named on a live process's command line: each stub is started with its region's
    name, so a region another server created meanwhile is recognised and left alone."""
    in_use: set[str] = set()
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            in_use.update(a.decode() for a in args if a.startswith(_SHM_PREFIX.encode()))
    return in_use


class TritonServer:
    """One tritonserver child process with its own work directory, ports and loaded models.

    Synchronous on purpose: pytest fixtures and the launcher CLI use it directly; async callers
    run `wait_ready`/`stop` in a thread.
    """

    def __init__(
        self,
        workdir: pathlib.Path,
        ports: TritonPorts,
        model_repository: pathlib.Path = DEFAULT_MODEL_REPOSITORY,
        models: Sequence[str] | None = None,
        log_to_file: bool = True,
        exit_timeout_s: int = 10,
        bind_address: str = LOOPBACK,
        tls_settings: TlsSettings | None = None,
        control_token: str | None = None,
        kv_events_dir: pathlib.Path | None = None,
    ):
        """`models` None loads every model folder in the repository; `log_to_file` False inherits
        stdout/stderr (for the CLI, whose own output is already captured). `tls_settings` in
        mutual mode: gRPC over TLS that requires a client certificate from the mesh's CA, and
        HTTP (plaintext in Triton, with model control) on loopback only; None or
        plaintext-development: plaintext everywhere. `control_token`: model control (and
        Triton's other control protocols) only for calls carrying it (`control.py`); required
        with mutual TLS, where every mesh certificate reaches the gRPC port."""
        self.workdir = workdir.resolve()  # /proc/PID/exe shows resolved paths
        self.ports = ports
        self.bind_address = bind_address  # 0.0.0.0 in a pod: the gateway dials the pod's IP
        self.model_repository = model_repository.resolve()
        self.models = (
            sorted(p.name for p in model_repository.iterdir() if (p / "config.pbtxt").is_file())
            if models is None
            else list(models)
        )
        self.log_path = self.workdir / "tritonserver.log" if log_to_file else None
        self.exit_timeout_s = exit_timeout_s
        self.tls_settings = tls_settings
        self.control_token = control_token
        # Where its models serve their KV events (backends/triton/kv_event_socket.py): the
        # sidecar beside it reads them there.
        self.kv_events_dir = kv_events_dir or events_directory_for(self.workdir)
        self._process: subprocess.Popen[bytes] | None = None
        self._shm_before: set[str] = set()

    @property
    def grpc_address(self) -> str:
        return f"{LOOPBACK}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.metrics}/metrics"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _mutual_tls(self) -> bool:
        return (self.tls_settings is not None
                and self.tls_settings.mode is TlsMode.MUTUAL)

    def _tls_flags(self) -> list[str]:
        if not self._mutual_tls():
            return []
        assert self.tls_settings is not None
        files = {"--grpc-server-cert": self.tls_settings.cert_file,
                 "--grpc-server-key": self.tls_settings.key_file,
                 "--grpc-root-cert": self.tls_settings.ca_file}
        missing = [flag for flag, path in files.items() if path is None]
        if missing:
            raise TritonStartError(f"mutual TLS needs INFERMESH_TLS_CA_FILE, _CERT_FILE and "
                                   f"_KEY_FILE (no file for {', '.join(missing)})")
        if self.control_token is None:
            raise TritonStartError("mutual TLS needs a control token (--control-token-file): "
                                   "without one any mesh certificate could load models")
        return ["--grpc-use-ssl=true", "--grpc-use-ssl-mutual=true",
                *(f"{flag}={path}" for flag, path in files.items())]

    def argv(self) -> list[str]:
        # Triton's HTTP front has no TLS: with mutual TLS it answers only inside the host or
        # pod (readiness, the sidecar's neighbours), never the network.
        http_address = LOOPBACK if self._mutual_tls() else self.bind_address
        return [
            str(_TRITON_BINARY),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.workdir / 'backends'}",
            f"--grpc-address={self.bind_address}",
            f"--grpc-port={self.ports.grpc}",
            f"--http-address={http_address}",
            f"--http-port={self.ports.http}",
            f"--metrics-address={self.bind_address}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            # Ready means "answering": one model that failed to load must not take the replica's
            # other models out of routing (the sidecar checks each model's own state).
            "--strict-readiness=false",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self.models),
            *self._tls_flags(),
            *([] if self.control_token is None else restriction_flags(self.control_token)),
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # Not resolved: the venv's bin/ (where python3 is a symlink) is what the stub must see.
        venv_bin = os.path.dirname(sys.executable)
        env["PATH"] = os.pathsep.join(p for p in (venv_bin, env.get("PATH")) if p)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(_TRITON_LIBS), env.get("LD_LIBRARY_PATH")) if p
        )
        env[KV_EVENTS_DIR_ENV] = str(self.kv_events_dir)
        return env

    def start(self) -> None:
        """Launches tritonserver; returns at once (see `wait_ready`)."""
        if self._process is not None:
            raise RuntimeError("this TritonServer was already started")
        _stub_binary(self.workdir).parent.mkdir(parents=True, exist_ok=True)
        if in_shared_temp(self.kv_events_dir):  # refused if another user made it or may enter
            private_directory(self.kv_events_dir)
        else:
            self.kv_events_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for source in _PYTHON_BACKEND_FILES:
            shutil.copy2(source, _stub_binary(self.workdir).parent / source.name)
        self._shm_before = _shm_regions()
        with contextlib.ExitStack() as stack:  # the child keeps its own copy of the log's fd
            log = stack.enter_context(open(self.log_path, "ab")) if self.log_path else None
            self._process = subprocess.Popen(
                self.argv(),
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log is not None else None,
                start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop it in order
            )

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as response:
                return response.status == 200
        except OSError:  # refused, reset, timed out, or not ready yet (HTTP 400)
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Polls HTTP readiness (every model loaded); raises TritonStartError after stopping it."""
        if self._process is None:
            raise RuntimeError("start() the server first")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self.stop()
                raise TritonStartError(
                    f"tritonserver exited with {self._process.returncode}\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.1)
        self.stop()
        raise TritonStartError(f"tritonserver not ready after {timeout_s}s\n{self.log_tail()}")

    def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after `grace_s`; then kills its stubs and removes its shm regions.

        Leftover stubs (re-parented to init, deaf to SIGTERM) are SIGKILLed. The regions removed
        are those that appeared since `start()` and that no live process names. The grace
        defaults to Triton's exit timeout plus a little, so a clean unload always gets its
        chance. Returns Triton's exit code.
        """
        if self._process is None:
            return None
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(self.exit_timeout_s + 5 if grace_s is None else grace_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        # Stubs outlive a killed or crashed server.
        _kill_and_wait(stub_pids(self.workdir))
        for name in _shm_regions() - self._shm_before - _shm_regions_in_use():
            with contextlib.suppress(FileNotFoundError):
                (_SHM_DIR / name).unlink()
        if in_shared_temp(self.kv_events_dir) and is_private_directory(self.kv_events_dir):
            # The short folder made for a long workdir's sockets: nothing else uses it.
            shutil.rmtree(self.kv_events_dir, ignore_errors=True)
        return self._process.returncode

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None:
            return "(log not captured: see this process's output)"
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> TritonServer:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs Triton in the foreground until SIGTERM/SIGINT, then stops it cleanly and exits 0."""
    parser = argparse.ArgumentParser(prog="python -m backends.triton.launcher", description=__doc__)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--address", default=LOOPBACK,
                        help="where Triton listens (all three ports)")
    parser.add_argument("--model-repository", type=pathlib.Path, default=DEFAULT_MODEL_REPOSITORY)
    parser.add_argument("--workdir", type=pathlib.Path, help="default: a new temporary directory")
    parser.add_argument(
        "--load-model", action="append", dest="models", help="repeatable; default: every model"
    )
    parser.add_argument(
        "--log-to-stdout", action="store_true", help="default: <workdir>/tritonserver.log"
    )
    parser.add_argument(
        "--control-token-file", type=pathlib.Path,
        help="this replica's model-control token (python -m backends.triton.control FILE); "
        "required with mutual TLS")
    args = parser.parse_args(argv)
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="infermesh-triton-"))
    server = TritonServer(
        workdir,
        TritonPorts(args.grpc_port, args.http_port, args.metrics_port),
        model_repository=args.model_repository,
        models=args.models,
        log_to_file=not args.log_to_stdout,
        bind_address=args.address,
        tls_settings=TlsSettings(),  # INFERMESH_TLS_*: mutual unless told plaintext-development
        control_token=read_token(args.control_token_file) if args.control_token_file else None,
    )
    # A plain flag: a signal handler that takes a lock (threading.Event) can deadlock.
    stop_signals: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: stop_signals.append(received))
    server.start()
    try:
        while not stop_signals:
            if not server.running():  # died on its own: report it, never mask it
                print(f"tritonserver exited on its own:\n{server.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
