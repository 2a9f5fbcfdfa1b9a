"""Signed checkpoints (RFC 6962's signed tree heads): what the auditor vouches for, and when.

A checkpoint says "the log's first `size` records have Merkle root `root`, record `size` has
chain hash `head`, records before `first` were dropped by retention, at time `at`", signed with
the auditor's ed25519 key. The signed bytes are the text `Checkpoint.note()`:

    infermesh-audit-checkpoint/v1
    size 1200
    root <64 hex>
    head <64 hex>
    first 1
    at 1764500000123

Checkpoints are written into the log itself (each segment's `.ckpt` file, see `store.py`) and the
latest one is published to etcd (`CHECKPOINT_KEY`), where someone who can rewrite the auditor's
disk cannot also rewrite it. The ckpt line carries two unsigned hints besides: the Merkle
`frontier` at that size (its root must equal the signed root, so it cannot lie) and the byte
`offset` of the end of record `size` in its segment, so a restart replays only what follows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.auditor import merkle
from services.common import etcd
from services.common.files import fsync_directory

NOTE_HEADER = "infermesh-audit-checkpoint/v1"
CHECKPOINT_KEY = etcd.ROOT + "audit/checkpoint"
PUBLIC_KEYS_PREFIX = etcd.ROOT + "audit/keys/"
SCHEMA = 1


class BadCheckpoint(ValueError):
    """A checkpoint line or record that does not parse, or whose signature does not verify."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 8 bytes of SHA-256 of its raw form."""
    return hashlib.sha256(public_raw(public_key)).hexdigest()[:16]


def public_raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_hex(value: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(value))
    except ValueError as exc:
        raise BadCheckpoint(f"not an ed25519 public key in hex: {exc}") from None


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    size: int
    root: bytes
    head: str  # chain hash of record `size` (records.GENESIS_HASH when size is 0)
    first: int  # first sequence still kept (1 until retention drops a segment)
    at: int  # Unix ms
    key_id: str = ""
    signature: bytes = b""
    # Unsigned hints, only in the log's own ckpt lines:
    frontier: tuple[bytes, ...] = ()
    offset: int = 0

    def note(self) -> bytes:
        """The exact bytes that are signed."""
        return (
            f"{NOTE_HEADER}\nsize {self.size}\nroot {self.root.hex()}\nhead {self.head}\n"
            f"first {self.first}\nat {self.at}\n"
        ).encode("ascii")

    def signed_by(self, keys: Mapping[str, Ed25519PublicKey]) -> bool:
        key = keys.get(self.key_id)
        if key is None:
            return False
        try:
            key.verify(self.signature, self.note())
        except InvalidSignature:
            return False
        return True

    def frontier_state(self) -> merkle.Frontier:
        """The Merkle frontier this checkpoint carries, checked against its (signed) root."""
        try:
            frontier = merkle.Frontier(self.size, self.frontier)
        except ValueError as exc:
            raise BadCheckpoint(f"checkpoint at size {self.size}: {exc}") from None
        if frontier.root() != self.root:
            raise BadCheckpoint(f"checkpoint at size {self.size}: frontier does not give its root")
        return frontier

    def to_record(self, *, with_hints: bool) -> dict[str, Any]:
        record: dict[str, Any] = {
            "schema": SCHEMA, "size": self.size, "root": self.root.hex(), "head": self.head,
            "first": self.first, "at": self.at, "key_id": self.key_id,
            "signature": self.signature.hex(),
        }
        if with_hints:
            record["frontier"] = [h.hex() for h in self.frontier]
            record["offset"] = self.offset
        return record

    def to_line(self) -> bytes:
        return (json.dumps(self.to_record(with_hints=True), separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_record(cls, value: Any) -> Checkpoint:
        try:
            checkpoint = cls(
                size=_non_negative(value["size"]), root=_digest(value["root"]),
                head=_digest(value["head"]).hex(), first=_non_negative(value["first"]),
                at=_non_negative(value["at"]), key_id=str(value["key_id"]),
                signature=bytes.fromhex(value["signature"]),
                frontier=tuple(_digest(h) for h in value.get("frontier", ())),
                offset=_non_negative(value.get("offset", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadCheckpoint(f"malformed checkpoint: {exc!r}") from None
        return checkpoint

    @classmethod
    def from_line(cls, line: bytes) -> Checkpoint:
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise BadCheckpoint(f"not JSON ({exc})") from None
        return cls.from_record(value)


def _non_negative(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


def _digest(value: Any) -> bytes:
    digest = bytes.fromhex(value)
    if len(digest) != merkle.HASH_SIZE:
        raise ValueError(f"{value!r} is not a 32-byte hash")
    return digest


class Signer:
    """The auditor's signing key. Kept in a file readable by the auditor alone (0600); in
    production that file is a mounted secret, not the data directory's disk."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private_key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    @classmethod
    def load_or_create(cls, path: pathlib.Path) -> Signer:
        """Loads the PEM key at `path`, or creates one there (atomically, mode 0600)."""
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an ed25519 private key")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
        fsync_directory(path.parent)
        return cls(key)

    def sign(self, checkpoint: Checkpoint) -> Checkpoint:
        return dataclasses.replace(
            checkpoint, key_id=self.key_id, signature=self._private_key.sign(checkpoint.note())
        )

    def public_record(self) -> dict[str, Any]:
        """What is published to etcd (and written beside the log) so anyone can verify."""
        return {"schema": SCHEMA, "key_id": self.key_id,
                "public_key": public_raw(self.public_key).hex()}


def parse_public_record(raw: bytes | str) -> tuple[str, Ed25519PublicKey]:
    """(key id, key) from a `Signer.public_record()` JSON; BadCheckpoint if it does not hold."""
    try:
        value = json.loads(raw)
        key = public_key_from_hex(value["public_key"])
        name = value["key_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadCheckpoint(f"malformed public key record: {exc!r}") from None
    if key_id(key) != name:
        raise BadCheckpoint(f"public key record names key {name} but holds {key_id(key)}")
    return name, key


def keyring(records: Iterable[bytes | str]) -> dict[str, Ed25519PublicKey]:
    return dict(parse_public_record(raw) for raw in records)
