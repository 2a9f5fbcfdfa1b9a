"""The blob store contract, run against both stores: the local directory and an S3-compatible
bucket (moto's server; marked integration, since it starts a process)."""

import dataclasses
import hashlib
import math
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import pytest

from services.common import errors
from services.common.net import free_port
from services.registry.blobs import BlobStore, LocalBlobStore, file_digest
from services.registry.s3_blobs import S3BlobStore, S3Location
from tests.s3_server import s3_server  # noqa: F401  (a fixture)


@dataclasses.dataclass
class StoreCase:
    store: BlobStore
    staging: pathlib.Path  # where unfinished uploads wait (the local root, or the pod's staging)
    tamper: Callable[[str, bytes], None]  # replaces a stored blob's bytes behind the store's back
    granularity_s: float  # of the store's modification times (S3's LastModified: one second)


def _local(tmp_path: pathlib.Path) -> StoreCase:
    store = LocalBlobStore(tmp_path / "store")

    def tamper(digest: str, data: bytes) -> None:
        path = store.verified_path(digest)
        path.chmod(0o644)
        path.write_bytes(data)

    return StoreCase(store, tmp_path / "store", tamper, 0.01)


def _s3(tmp_path: pathlib.Path, server: Any) -> StoreCase:
    client = server.client()
    location = S3Location(bucket=server.new_bucket(), prefix="mesh/")
    store = S3BlobStore(location, tmp_path / "staging", client=client)

    def tamper(digest: str, data: bytes) -> None:
        client.put_object(Bucket=location.bucket, Key=f"mesh/sha256/{digest[7:]}", Body=data)

    return StoreCase(store, tmp_path / "staging", tamper, 1.0)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def case(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> StoreCase:
    if request.param == "local":
        return _local(tmp_path)
    return _s3(tmp_path, request.getfixturevalue("s3_server"))


def put(store: BlobStore, data: bytes) -> str:
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    store.write(digest, len(data), [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)])
    return digest


def boundary(case: StoreCase) -> float:
    """A cutoff after everything stored so far, in the store's time granularity, once passed:
    what is stored from now on is not older than it."""
    cutoff = (math.floor(time.time() / case.granularity_s) + 1) * case.granularity_s
    time.sleep(cutoff - time.time() + 0.05)  # and past a coarse file-system clock
    return cutoff


def test_put_verify_and_tamper(case: StoreCase):
    data = b"x" * 3_000_000
    digest = put(case.store, data)
    assert case.store.exists(digest) and case.store.uploaded_size(digest) == len(data)
    assert b"".join(case.store.read(digest)) == data
    case.tamper(digest, b"y" * 3_000_000)
    with pytest.raises(errors.Internal):
        b"".join(case.store.read(digest))
    if isinstance(case.store, LocalBlobStore):
        with pytest.raises(errors.Internal):
            case.store.verified_path(digest)
    with pytest.raises(errors.NotFound):
        b"".join(case.store.read("sha256:" + "0" * 64))


def test_put_file_stores_a_local_file(tmp_path: pathlib.Path):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"x" * 3_000_000)
    store = LocalBlobStore(tmp_path / "store")
    digest = store.put_file(source)
    assert digest == file_digest(source)[0] and store.verified_path(digest).exists()


def test_resumable_upload_and_mismatch(case: StoreCase):
    store = case.store
    data = b"abcdefgh" * 1000
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    size = len(data)
    store.write(digest, size, [data[:3000]])
    assert not store.exists(digest) and store.uploaded_size(digest) == 3000
    with pytest.raises(errors.FailedPrecondition):
        store.write(digest, size, [data[3000:]], offset=0)
    store.write(digest, size, [data[3000:]], offset=3000)
    assert store.exists(digest) and store.uploaded_size(digest) == size
    assert b"".join(store.read(digest)) == data
    store.write(digest, size, [b"ignored"], offset=0)  # already there: nothing to do
    bad = "sha256:" + "0" * 64
    with pytest.raises(errors.InvalidArgument):
        store.write(bad, size, [data])
    assert not store.exists(bad) and store.uploaded_size(bad) == 0
    with pytest.raises(errors.InvalidArgument):
        store.write("sha256:" + "b" * 64, 10, [b"x" * 11])  # past the announced size
    with pytest.raises(errors.InvalidArgument):
        store.write("md5:abc", 1, [b"x"])
    empty = put(store, b"")
    assert store.exists(empty) and b"".join(store.read(empty)) == b""
    assert list((case.staging / "incoming").iterdir()) == []


def test_collect_deletes_only_old_unpinned_blobs_and_abandoned_uploads(case: StoreCase):
    store = case.store
    digests = {name: put(store, name.encode() * 1000) for name in ("pinned", "orphan")}
    store.write("sha256:" + "a" * 64, 10_000, [b"x" * 100])  # an upload that never finished
    cutoff = boundary(case)
    digests["young-orphan"] = put(store, b"young-orphan" * 1000)
    pinned = {digests["pinned"]}.__contains__

    dry = store.collect(pinned, cutoff, dry_run=True)
    assert (dry.deleted, dry.abandoned_uploads, dry.kept) == ([digests["orphan"]], 1, 2)
    assert store.exists(digests["orphan"])  # a dry run deletes nothing
    # Registration touches what it pins: a touched orphan is spared, as if just uploaded.
    assert store.touch(digests["orphan"])
    spared = store.collect(pinned, cutoff, dry_run=False)
    assert (spared.deleted, spared.abandoned_uploads, spared.freed_bytes) == ([], 1, 100)
    later = boundary(case)
    assert store.touch(digests["young-orphan"])
    done = store.collect(pinned, later, dry_run=False)
    assert (done.deleted, done.abandoned_uploads, done.kept) == ([digests["orphan"]], 0, 2)
    assert done.freed_bytes == len(b"orphan") * 1000
    assert not store.exists(digests["orphan"]) and not store.touch(digests["orphan"])
    assert store.exists(digests["pinned"]) and store.exists(digests["young-orphan"])
    assert b"".join(store.read(digests["young-orphan"])) == b"young-orphan" * 1000
    assert list((case.staging / "incoming").iterdir()) == []


@pytest.mark.integration
def test_s3_a_blob_one_pod_stored_is_every_pods_and_uploads_stay_in_their_pod(
    tmp_path: pathlib.Path, s3_server,  # noqa: F811
):
    """Two registry pods share the bucket, not their staging: a finished blob (large enough for
    a multipart upload) is visible through both; an upload interrupted on one pod starts again
    from 0 on the other."""
    location = S3Location(bucket=s3_server.new_bucket())
    one = S3BlobStore(location, tmp_path / "one", client=s3_server.client())
    other = S3BlobStore(location, tmp_path / "other", client=s3_server.client())
    data = os.urandom((64 << 20) + 123)
    digest = put(one, data)
    assert other.exists(digest) and other.uploaded_size(digest) == len(data)
    assert other.touch(digest)
    assert hashlib.sha256(b"".join(other.read(digest))).hexdigest() == digest[7:]
    assert list((tmp_path / "one" / "sha256").iterdir()) == []  # nothing kept once in the bucket
    partial = b"resume me" * 100
    partial_digest = f"sha256:{hashlib.sha256(partial).hexdigest()}"
    one.write(partial_digest, len(partial), [partial[:300]])
    assert (one.uploaded_size(partial_digest), other.uploaded_size(partial_digest)) == (300, 0)
    other.write(partial_digest, len(partial), [partial])
    assert one.exists(partial_digest)


def test_a_read_from_an_offset_reads_only_the_rest(case: StoreCase):
    """A resumed download seeks (or GETs a range): the prefix is not read, so it is not verified
    either (the reader holds it and verifies the whole blob); from 0 a corrupt blob is refused."""
    data = os.urandom(3_000_000)
    digest = put(case.store, data)
    for offset in (1, 1 << 20, 2_999_999, len(data), len(data) + 5):
        assert b"".join(case.store.read(digest, offset)) == data[offset:]
    tampered = bytes([data[0] ^ 1]) + data[1:]
    case.tamper(digest, tampered)
    with pytest.raises(errors.Internal):
        b"".join(case.store.read(digest))
    assert b"".join(case.store.read(digest, 1)) == data[1:]  # the changed byte is not read
    with pytest.raises(errors.InvalidArgument) as negative:
        b"".join(case.store.read(digest, -1))
    assert negative.value.field == "offset"
    with pytest.raises(errors.NotFound):
        b"".join(case.store.read("sha256:" + "0" * 64, 10))


@pytest.mark.integration
def test_s3_a_resume_is_a_ranged_get_of_the_rest(tmp_path: pathlib.Path, s3_server):  # noqa: F811
    """The bucket sends only the bytes after the offset (no re-download of the prefix)."""
    client = s3_server.client()
    store = S3BlobStore(S3Location(bucket=s3_server.new_bucket()), tmp_path, client=client)
    data = os.urandom(3_000_000)
    digest = put(store, data)
    sent: list[int] = []
    client.meta.events.register(
        "after-call.s3.GetObject",
        lambda parsed, **_: sent.append(parsed.get("ContentLength", -1)))
    assert b"".join(store.read(digest, 2_500_000)) == data[2_500_000:]
    assert b"".join(store.read(digest, len(data))) == b""
    assert b"".join(store.read(digest)) == data
    assert sent == [500_000, -1, len(data)]  # the read at the end: refused range, no body


@pytest.mark.integration
def test_s3_touch_writes_a_marker_and_leaves_the_blob_alone(
    tmp_path: pathlib.Path, s3_server,  # noqa: F811
):
    """Touching costs one small PUT whatever the blob's size: the blob is not rewritten (ETag
    and LastModified unchanged), its marker is; collection ages a blob by the newer of the two,
    so a touched blob outlives a grace that would delete it untouched, and the marker goes with
    the blob."""
    client = s3_server.client()
    location = S3Location(bucket=s3_server.new_bucket(), prefix="mesh/")
    store = S3BlobStore(location, tmp_path, client=client)
    case = StoreCase(store, tmp_path, lambda *_: None, 1.0)
    digest = put(store, os.urandom(2_000_000))
    blob_key, marker_key = f"mesh/sha256/{digest[7:]}", f"mesh/touched/{digest[7:]}"
    before = client.head_object(Bucket=location.bucket, Key=blob_key)
    cutoff = boundary(case)
    assert store.touch(digest)
    after = client.head_object(Bucket=location.bucket, Key=blob_key)
    assert (after["ETag"], after["LastModified"]) == (before["ETag"], before["LastModified"])
    assert client.head_object(Bucket=location.bucket, Key=marker_key)["ContentLength"] == 0
    unpinned = set().__contains__
    assert store.collect(unpinned, cutoff, dry_run=True).deleted == []
    spared = store.collect(unpinned, cutoff, dry_run=False)
    assert (spared.deleted, spared.kept) == ([], 1) and store.exists(digest)
    later = boundary(case)
    done = store.collect(unpinned, later, dry_run=False)
    assert done.deleted == [digest] and not store.exists(digest)
    listed = client.list_objects_v2(Bucket=location.bucket, Prefix="mesh/")
    assert listed.get("Contents", []) == []  # the marker went with the blob
    assert not store.touch(digest)  # gone: registration fails clearly, and leaves no marker
    assert client.list_objects_v2(Bucket=location.bucket, Prefix="mesh/").get("Contents", []) == []
    client.put_object(Bucket=location.bucket, Key=marker_key, Body=b"")  # a touch's leftover
    store.collect(unpinned, boundary(case), dry_run=False)
    assert client.list_objects_v2(Bucket=location.bucket, Prefix="mesh/").get("Contents", []) == []


def test_s3_failures_are_mesh_errors(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    """An unreachable endpoint is Unavailable (retry); missing credentials are the registry's
    misconfiguration (Internal), named as such."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    location = S3Location(bucket="blobs", endpoint_url=f"http://127.0.0.1:{free_port()}",
                          region="us-east-1", timeout_s=0.5, max_attempts=1)
    with pytest.raises(errors.Internal, match="credential"):
        S3BlobStore(location, tmp_path / "staging").exists("sha256:" + "0" * 64)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "something")
    store = S3BlobStore(location, tmp_path / "staging")
    with pytest.raises(errors.Unavailable) as unreachable:
        store.exists("sha256:" + "0" * 64)
    assert unreachable.value.retry_after_s == 1.0 and "s3://blobs" in unreachable.value.message
    with pytest.raises(errors.Unavailable):
        b"".join(store.read("sha256:" + "0" * 64))
