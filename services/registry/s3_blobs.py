"""The registry's blob store in an S3-compatible bucket, which every registry pod shares.

The same contract as `LocalBlobStore` (see `blobs.py`): a blob is visible only once its bytes
verified against its digest, every read from byte 0 verifies them again (a read from a later
offset is a ranged GET of only the rest), and garbage collection deletes unpinned blobs last
used before the grace period. In the bucket:

    <prefix>sha256/<hex>     verified blobs
    <prefix>touched/<hex>    an empty marker `touch` writes; a blob's age is the newer of the
                             two objects' LastModified

An upload in progress is staged in this pod's own directory (a `LocalBlobStore`: resumable from
its current size, verified when complete) and put into the bucket whole only after it verified,
so nothing unverified is ever in the bucket and a half-done upload is never visible to the other
pods. `touch` writes the blob's marker, one small PUT whatever the blob's size (a copy of the
blob onto itself would renew its own LastModified, but copies every byte of a multi-GB blob
inside registration's deadline): registration and collection keep the local store's semantics.
Blocking network calls: call every method from a worker thread (the registry does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import pathlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from services.common import errors
from services.registry.blobs import (
    CHUNK,
    DIGEST,
    Collected,
    LocalBlobStore,
    check_offset,
    parse_digest,
)

MISSING = {"404", "NoSuchKey", "NotFound"}
# Parts of the managed upload of a verified blob: S3 allows 10,000 parts, so 64 MiB parts reach
# 640 GiB; the registry's own limit is larger only on paper (max_blob_bytes), and a single object
# can be 5 TiB.
TRANSFER = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20,
                          max_concurrency=4)


@dataclasses.dataclass(frozen=True)
class S3Location:
    """Where the blobs live. Credentials are not here: boto3's standard chain finds them
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a web identity token, an instance profile)."""

    bucket: str
    prefix: str = ""  # keys are <prefix>sha256/<hex>; lets one bucket hold several meshes
    endpoint_url: str = ""  # empty: AWS S3; otherwise MinIO, Ceph RGW, or another S3 API
    region: str = ""  # empty: the standard chain's (AWS_REGION, AWS_DEFAULT_REGION, config)
    timeout_s: float = 10.0  # connect and read deadline of one S3 call (retried by botocore)
    max_attempts: int = 3  # botocore's standard retry mode, throttling and 5xx included


def make_client(location: S3Location) -> Any:
    """An S3 client for `location` (thread-safe; one per store)."""
    config = botocore.config.Config(
        connect_timeout=location.timeout_s, read_timeout=location.timeout_s,
        retries={"mode": "standard", "max_attempts": location.max_attempts},
        # Self-hosted S3 APIs rarely have wildcard DNS for virtual-hosted bucket names.
        s3={"addressing_style": "path" if location.endpoint_url else "auto"},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=location.endpoint_url or None, region_name=location.region or None,
        config=config)


class S3BlobStore:
    """Blobs in a bucket, uploads staged in `staging_root`. Blocking: call from a worker thread."""

    def __init__(self, location: S3Location, staging_root: pathlib.Path, client: Any = None):
        self.location = location
        self._client = client if client is not None else make_client(location)
        self._staging = LocalBlobStore(staging_root)

    def _key(self, digest: str) -> str:
        return f"{self.location.prefix}sha256/{parse_digest(digest)}"

    def _marker(self, digest: str) -> str:
        return f"{self.location.prefix}touched/{parse_digest(digest)}"

    def _head(self, digest: str) -> dict[str, Any] | None:
        return self._head_key(self._key(digest))

    def _head_key(self, key: str) -> dict[str, Any] | None:
        with self._translated(f"HEAD {key}"):
            try:
                return self._client.head_object(Bucket=self.location.bucket, Key=key)
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in MISSING:
                    return None
                raise

    def exists(self, digest: str) -> bool:
        return self._head(digest) is not None

    def touch(self, digest: str) -> bool:
        """Writes the blob's (empty) marker, so garbage collection spares the blob for a grace
        period; False when the blob is not in the bucket. The marker goes first and the blob is
        looked up after it: a collection that deletes the blob after this check re-read the
        marker before it was written, the same window the local store has between its re-stat
        and its unlink. The blob itself is never rewritten, so this costs the same at any size."""
        marker = self._marker(digest)
        with self._translated(f"PUT {marker}"):
            self._client.put_object(Bucket=self.location.bucket, Key=marker, Body=b"")
        if self._head(digest) is None:
            self._delete_key(marker)
            return False
        return True

    def collect(self, pinned: Callable[[str], bool], older_than: float,
                dry_run: bool) -> Collected:
        """Deletes objects for which `pinned(digest)` is false, and this pod's unfinished
        uploads, both only when last modified before `older_than` (unix seconds). Other pods'
        unfinished uploads are theirs (and go with their pods' staging volumes)."""
        deleted: list[str] = []
        freed = kept = 0
        # Markers are listed before the blobs: one written after this listing is seen by the
        # re-read before the delete.
        touched = {name: listed["LastModified"].timestamp()
                   for name, listed in self._listed("touched/")}
        for name, listed in self._listed("sha256/"):
            digest = f"sha256:{name}"
            age = max(listed["LastModified"].timestamp(), touched.pop(name, 0.0))
            if not DIGEST.match(digest) or pinned(digest) or age >= older_than:
                kept += 1
                continue
            if not dry_run and not self._delete_if_older(digest, older_than):
                kept += 1  # touched (registered) since it was listed
                continue
            deleted.append(digest)
            freed += int(listed["Size"])
        if not dry_run:  # markers whose blob was gone when listed (deleted with it normally)
            for name, when in touched.items():
                marker = f"{self.location.prefix}touched/{name}"
                if when < older_than and _age(self._head_key(marker)) < older_than:
                    self._delete_key(marker)
        staged = self._staging.collect(lambda _: False, older_than, dry_run)
        return Collected(deleted, freed + staged.freed_bytes,
                         staged.abandoned_uploads + len(staged.deleted), kept)

    def _listed(self, folder: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(name after `<prefix><folder>`, the listing's entry) of every object there."""
        prefix = f"{self.location.prefix}{folder}"
        with self._translated(f"list {prefix}"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=prefix)
            for page in pages:
                for listed in page.get("Contents", []):
                    yield listed["Key"][len(prefix):], listed

    def _delete_if_older(self, digest: str, older_than: float) -> bool:
        """Deletes the blob, then its marker, if the newer of the two is still older than
        `older_than`, both re-read right before."""
        head = self._head(digest)
        if head is None:
            return False
        marker = self._marker(digest)
        if max(_age(head), _age(self._head_key(marker))) >= older_than:
            return False
        self._delete_key(self._key(digest))
        self._delete_key(marker)
        return True

    def _delete_key(self, key: str) -> None:
        with self._translated(f"DELETE {key}"):
            self._client.delete_object(Bucket=self.location.bucket, Key=key)

    def uploaded_size(self, digest: str) -> int:
        """The blob's size when it is in the bucket; otherwise how many bytes of an interrupted
        upload this pod holds (an upload resumed through another pod starts again from 0)."""
        head = self._head(digest)
        if head is not None:
            return int(head["ContentLength"])
        return self._staging.uploaded_size(digest)

    def write(self, digest: str, size: int, chunks: Iterable[bytes], offset: int = 0) -> None:
        """Appends `chunks` at `offset` of the staged upload; when `size` bytes are in and
        verify, puts the blob into the bucket. A digest or size mismatch discards the upload."""
        if self.exists(digest):
            return
        self._staging.write(digest, size, chunks, offset)
        if self._staging.exists(digest):  # complete: now, or left by a put that failed
            self._publish(digest)

    def _publish(self, digest: str) -> None:
        # Verified again right before the put: a staged blob may have waited since a failed put.
        path = self._staging.verified_path(digest)
        key = self._key(digest)
        with self._translated(f"PUT {key}"):
            self._client.upload_file(str(path), self.location.bucket, key, Config=TRANSFER)
        path.unlink(missing_ok=True)

    def read(self, digest: str, offset: int = 0) -> Iterator[bytes]:
        """The blob's bytes from `offset`: a ranged GET of only those (none at or past the
        end). From 0 they are verified as they are read: Internal at the end if they do not
        hash to the digest."""
        check_offset(offset)
        key = self._key(digest)
        ranged = {"Range": f"bytes={offset}-"} if offset else {}
        with self._translated(f"GET {key}"):
            try:
                body = self._client.get_object(
                    Bucket=self.location.bucket, Key=key, **ranged)["Body"]
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in MISSING:
                    raise errors.NotFound(f"blob {digest} is not in the store") from exc
                if _code(exc) in {"416", "InvalidRange"}:
                    return  # the offset is at (or past) the end: nothing left
                raise
        hasher = hashlib.sha256() if offset == 0 else None
        try:
            with self._translated(f"GET {key}"):
                for chunk in body.iter_chunks(CHUNK):
                    if hasher is not None:
                        hasher.update(chunk)
                    yield chunk
        finally:
            body.close()
        if hasher is not None and f"sha256:{hasher.hexdigest()}" != digest:
            raise errors.Internal(f"blob {digest} is corrupt in the bucket; refusing it")

    @contextlib.contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """S3 failures as the mesh's errors: denied access is the registry's misconfiguration
        (Internal); anything else (unreachable, throttled past the retries) is Unavailable."""
        where = f"s3://{self.location.bucket}"
        try:
            yield
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in {"403", "AccessDenied", "InvalidAccessKeyId",
                              "SignatureDoesNotMatch", "NoSuchBucket"}:
                raise errors.Internal(f"blob store {where}: {what}: {exc}") from exc
            raise errors.Unavailable(f"blob store {where}: {what}: {exc}",
                                     retry_after_s=1.0) from exc
        except botocore.exceptions.NoCredentialsError as exc:
            raise errors.Internal(f"blob store {where}: {what}: {exc} (set the standard AWS "
                                  "credential variables)") from exc
        except (botocore.exceptions.BotoCoreError, boto3.exceptions.Boto3Error) as exc:
            raise errors.Unavailable(f"blob store {where}: {what}: {exc}",
                                     retry_after_s=1.0) from exc


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _age(head: dict[str, Any] | None) -> float:
    """An object's LastModified in unix seconds; 0 (older than anything) when it is absent."""
    return head["LastModified"].timestamp() if head is not None else 0.0
