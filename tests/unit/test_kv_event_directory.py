"""The KV-event sockets' directory: a predictable folder under /tmp is used only if it is this
user's and no one else's (review finding, issue 19: another local user could pre-create it and
serve forged events on our sockets' paths)."""

from __future__ import annotations

import os
import pathlib

import pytest

from backends.triton import kv_event_socket
from backends.triton.kv_event_socket import (
    events_directory_for,
    in_shared_temp,
    is_private_directory,
    private_directory,
    socket_path,
)
from backends.triton.kv_feed import KvMirrors
from services.common.kv_events import KvEventLog


@pytest.fixture
def temp_root(tmp_path, monkeypatch) -> pathlib.Path:
    monkeypatch.delenv(kv_event_socket.KV_EVENTS_DIR_ENV, raising=False)
    monkeypatch.setattr(kv_event_socket.tempfile, "gettempdir", lambda: str(tmp_path))
    return tmp_path


def long_workdir(root: pathlib.Path) -> pathlib.Path:
    return root / ("w" * 60)


def test_a_long_workdirs_folder_is_made_private_and_one_others_may_enter_is_refused(temp_root):
    directory = events_directory_for(long_workdir(temp_root))
    assert in_shared_temp(directory)
    assert private_directory(directory) == directory and is_private_directory(directory)
    assert oct(directory.stat().st_mode & 0o777) == oct(0o700)
    directory.chmod(0o755)  # as if someone else's, or made with a looser umask
    with pytest.raises(PermissionError, match="mode 0700"):
        private_directory(directory)
    assert not is_private_directory(directory)  # and the launcher's stop leaves it alone


def test_a_folder_owned_by_another_user_or_a_link_is_refused(temp_root, monkeypatch):
    directory = events_directory_for(long_workdir(temp_root))
    private_directory(directory)
    other = os.getuid() + 1
    with monkeypatch.context() as patched:
        patched.setattr(kv_event_socket.os, "getuid", lambda: other)
        with pytest.raises(PermissionError, match="owned by"):
            private_directory(directory)
    target = temp_root / "elsewhere"
    target.mkdir(mode=0o700)
    directory.rmdir()
    directory.symlink_to(target)
    with pytest.raises(PermissionError, match="not a link"):
        private_directory(directory)


async def test_the_sidecar_reads_no_socket_in_a_folder_others_may_enter(temp_root):
    directory = events_directory_for(long_workdir(temp_root))
    directory.mkdir(mode=0o700)
    directory.chmod(0o777)
    mirrors = KvMirrors(directory)
    mirrors.logs["m"] = KvEventLog()
    assert await mirrors._read("m", socket_path(directory, "m")) == "unsafe_directory"
    directory.chmod(0o700)  # ours alone: it tries (and finds no engine there yet)
    assert await mirrors._read("m", socket_path(directory, "m")) == "connect"
