import os
import pathlib

import pytest

from services.common import errors
from services.registry.blobs import LocalBlobStore, file_digest


def test_put_verify_and_tamper(tmp_path: pathlib.Path):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"x" * 3_000_000)
    store = LocalBlobStore(tmp_path / "store")
    digest = store.put_file(source)
    assert digest == file_digest(source)[0] and store.exists(digest)
    assert b"".join(store.read(digest)) == source.read_bytes()
    path = store.verified_path(digest)
    path.chmod(0o644)
    path.write_bytes(b"y" * 3_000_000)
    with pytest.raises(errors.Internal):
        store.verified_path(digest)
    with pytest.raises(errors.Internal):
        b"".join(store.read(digest))


def test_resumable_upload_and_mismatch(tmp_path: pathlib.Path):
    data = b"abcdefgh" * 1000
    source = tmp_path / "f"
    source.write_bytes(data)
    digest, size = file_digest(source)
    store = LocalBlobStore(tmp_path / "store")
    store.write(digest, size, [data[:3000]])
    assert not store.exists(digest) and store.uploaded_size(digest) == 3000
    with pytest.raises(errors.FailedPrecondition):
        store.write(digest, size, [data[3000:]], offset=0)
    store.write(digest, size, [data[3000:]], offset=3000)
    assert store.exists(digest)
    bad = "sha256:" + "0" * 64
    with pytest.raises(errors.InvalidArgument):
        store.write(bad, size, [data])
    assert not store.exists(bad) and store.uploaded_size(bad) == 0
    with pytest.raises(errors.InvalidArgument):
        store.write("md5:abc", 1, [b"x"])


def test_collect_deletes_only_old_unpinned_blobs_and_abandoned_uploads(tmp_path: pathlib.Path):
    store = LocalBlobStore(tmp_path / "store")
    digests = {}
    for name in ("pinned", "orphan", "young-orphan"):
        source = tmp_path / name
        source.write_bytes(name.encode() * 1000)
        digests[name] = store.put_file(source)
    store.write("sha256:" + "a" * 64, 10_000, [b"x" * 100])  # an upload that never finished
    long_ago = 1_000_000.0
    for name in ("pinned", "orphan"):
        os.utime(store.verified_path(digests[name]), (long_ago, long_ago))
    for partial in (tmp_path / "store" / "incoming").iterdir():
        os.utime(partial, (long_ago, long_ago))
    cutoff = long_ago + 10
    pinned = {digests["pinned"]}.__contains__

    dry = store.collect(pinned, cutoff, dry_run=True)
    assert (dry.deleted, dry.abandoned_uploads, dry.kept) == ([digests["orphan"]], 1, 2)
    assert store.exists(digests["orphan"])  # a dry run deletes nothing
    # Registration touches what it pins: a touched orphan is spared, as if just uploaded.
    assert store.touch(digests["orphan"])
    spared = store.collect(pinned, cutoff, dry_run=False)
    assert (spared.deleted, spared.abandoned_uploads, spared.freed_bytes) == ([], 1, 100)
    os.utime(store.verified_path(digests["orphan"]), (long_ago, long_ago))
    done = store.collect(pinned, cutoff, dry_run=False)
    assert (done.deleted, done.abandoned_uploads) == ([digests["orphan"]], 0)
    assert done.freed_bytes == len(b"orphan") * 1000
    assert not store.exists(digests["orphan"]) and not store.touch(digests["orphan"])
    assert store.exists(digests["pinned"]) and store.exists(digests["young-orphan"])
    assert list((tmp_path / "store" / "incoming").iterdir()) == []
