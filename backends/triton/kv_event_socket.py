"""The engine side of the KV-event transport: a Unix socket each Python-backend model instance
serves, which the sidecar beside Triton reads.

Why a Unix socket: the model runs inside Triton's Python stub, a process the sidecar does not
start and cannot call except through Triton, whose metrics page (how the sidecar reads load) only
carries gauges, sampled. Events must arrive in order, all of them, within milliseconds: a stream
socket gives order and backpressure, the file's mode (0600, in a directory only Triton and the
sidecar share: the pod's `emptyDir`, the stack's state directory) keeps other users out, and no
port is opened. A shared-memory ring would save a copy per event, which is not where the time goes.

Each connection gets the engine's `KvEventLog` snapshot, then every batch, as length-prefixed
`SubscribeResponse` frames (`services.common.kv_event_codec`), and a heartbeat after each
`HEARTBEAT_S` of silence. A reader that falls too far behind is disconnected (it reconnects and
starts again from a snapshot), so the engine's dispatcher never waits for the sidecar: it only
appends to a bounded queue. Threads: one accepting, one per connection (at most
`MAX_CONNECTIONS`: the sidecar, and a restarted sidecar while the old connection closes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Sequence

from services.common.kv_event_codec import HEARTBEAT, HEARTBEAT_S, frame
from services.common.kv_events import KvEvent, KvEventLog

__all__ = ["KV_EVENTS_DIR_ENV", "KvEventPublisher", "events_directory", "events_directory_for",
           "in_shared_temp", "is_private_directory", "private_directory", "socket_path"]

KV_EVENTS_DIR_ENV = "INFERMESH_KV_EVENTS_DIR"
MAX_CONNECTIONS = 4
SEND_TIMEOUT_S = 5.0  # a reader that takes no bytes for this long is dropped
_TEMP_PREFIX = "infermesh-kv-"


def events_directory() -> pathlib.Path | None:
    """Where this Triton's models serve their events (the launcher sets it; unset: nowhere)."""
    configured = os.environ.get(KV_EVENTS_DIR_ENV)
    return pathlib.Path(configured) if configured else None


def events_directory_for(workdir: pathlib.Path) -> pathlib.Path:
    """The directory a Triton working in `workdir` serves events in: INFERMESH_KV_EVENTS_DIR
    when set (a pod's shared volume), else `workdir/kv`, or a short folder under the system's
    temporary directory named after it when that path is long (a socket's path holds at most
    107 bytes, and a version's model name takes up to ~50)."""
    configured = events_directory()
    if configured is not None:
        return configured
    directory = workdir.resolve() / "kv"
    if len(str(directory)) <= 48:
        return directory
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    return pathlib.Path(tempfile.gettempdir()) / f"{_TEMP_PREFIX}{digest}"


def in_shared_temp(directory: pathlib.Path) -> bool:
    """Whether `directory` is one of `events_directory_for`'s short folders in the system's
    temporary directory (a predictable name where every local user may create one)."""
    return (directory.parent == pathlib.Path(tempfile.gettempdir())
            and directory.name.startswith(_TEMP_PREFIX))


def private_directory(directory: pathlib.Path) -> pathlib.Path:
    """`directory`, made 0700 if absent; PermissionError if it is not a directory this user owns
    that no one else may enter. A short folder under /tmp has a name anyone can predict: another
    local user who made it first could serve forged events on our sockets' paths."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not is_private_directory(directory):
        raise PermissionError(
            f"the KV events directory {directory} must be a directory (not a link) owned by "
            f"uid {os.getuid()} with mode 0700; remove it or set {KV_EVENTS_DIR_ENV}")
    return directory


def is_private_directory(directory: pathlib.Path) -> bool:
    """Whether `directory` is a real directory of this user's that no one else may use."""
    try:
        status = directory.lstat()
    except FileNotFoundError:
        return False
    return (stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid()
            and stat.S_IMODE(status.st_mode) & 0o077 == 0)


def socket_path(directory: pathlib.Path, model: str) -> pathlib.Path:
    """Where a model's events are served (one instance per model: `instance_group` count 1)."""
    return directory / f"{model}.sock"


class KvEventPublisher:
    """One model instance's KV events: the log the dispatcher publishes to, and its socket."""

    def __init__(self, model: str, directory: pathlib.Path | None, max_queued: int = 1024):
        """`directory` None (no INFERMESH_KV_EVENTS_DIR): events are kept, never served."""
        self.log = KvEventLog(max_queued)
        self._model = model
        self._path: pathlib.Path | None = None
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.serving_error = ""  # why the socket could not be served ("" when it is, or unasked)
        if directory is None:
            return
        path = socket_path(directory, model)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a previous instance's (a crashed stub leaves its socket file)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_mask = os.umask(0o177)  # created 0600: no window in which others may connect
        try:
            listener.bind(str(path))
            listener.listen(MAX_CONNECTIONS)
        except OSError as exc:  # the engine serves on without: routing falls back for it
            listener.close()
            self.serving_error = f"KV events not served at {path}: {exc}"
            return
        finally:
            os.umask(old_mask)
        self._path, self._listener = path, listener
        threading.Thread(target=self._accept, name=f"kv-events-{model}", daemon=True).start()

    def publish(self, events: Sequence[KvEvent]) -> None:
        """The dispatcher's events since its last call, as one batch (nothing when empty)."""
        self.log.publish(events, time.time_ns())

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while (listener := self._listener) is not None:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                if len(self._connections) >= MAX_CONNECTIONS:
                    connection.close()
                    continue
                self._connections.add(connection)
            threading.Thread(target=self._serve, args=(connection,),
                             name=f"kv-events-{self._model}-reader", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        subscription = self.log.subscribe()
        connection.settimeout(SEND_TIMEOUT_S)
        try:
            while self._listener is not None:
                items = subscription.take(HEARTBEAT_S)
                if items is None:  # fell behind: it reconnects and starts from a snapshot
                    return
                payload = b"".join(frame(self._model, item) for item in items) or HEARTBEAT
                connection.sendall(payload)
        except OSError:  # the reader left, or took nothing for SEND_TIMEOUT_S
            return
        finally:
            self.log.unsubscribe(subscription)
            with self._lock:
                self._connections.discard(connection)
            connection.close()
