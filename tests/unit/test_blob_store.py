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
