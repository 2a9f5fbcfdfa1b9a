"""The embedded stack's private CA: made fresh at every `stack up`, one certificate per kind.

Each certificate names its kind (`<kind>.infermesh`, the mesh identity `services.common.tls`
reads, which every client of a mesh service checks whatever address it dialled). Only the
gateway's also names the loopback addresses (`127.0.0.1`, `localhost`): it is the one server
its clients (the SDK, meshctl, HTTP clients) verify by address, so no other process of the
stack can pose as it and collect API keys. Each certificate is good only for what its kind
does, as in Kubernetes (deploy/k8s/base/certificates.yaml): Triton serves and never calls, so
the engine code inside it cannot use its certificate as an etcd client; the operator's meshctl
calls and never serves. The CA's key signs the set and is dropped: nothing can be issued
later, and nothing on disk can mint another identity.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
import shutil

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deploy.local.state import CertificateFiles, files_for
from services.common.tls import OPERATOR, identity

VALIDITY = datetime.timedelta(days=30)
# Every process of the stack, the operator's meshctl, and the two servers that are not ours.
KINDS = ("gateway", "registry", "ratelimit", "scheduler", "auditor", "sidecar", "operator",
         "triton", "etcd")
DIALLED_BY_ADDRESS = "gateway"
SERVES_ONLY = ("triton",)
# etcd keeps client auth, as in Kubernetes: its own HTTP gateway dials its gRPC server with it.
CALLS_ONLY = (OPERATOR,)


def _usages(kind: str) -> list[x509.ObjectIdentifier]:
    serve, call = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    if kind in SERVES_ONLY:
        return [serve]
    if kind in CALLS_ONLY:
        return [call]
    return [serve, call]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: pathlib.Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def make_mesh_certificates(directory: pathlib.Path, kinds: tuple[str, ...] = KINDS,
                           ca_name: str = "infermesh embedded stack CA"
                           ) -> dict[str, CertificateFiles]:
    """A new CA and one key and certificate per kind in `directory` (replacing what was
    there; owner-only files); returns each kind's files."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256()))
    _write(directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    issued = {}
    for kind in kinds:
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(identity(kind))]
        if kind == DIALLED_BY_ADDRESS:
            names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = (
            x509.CertificateBuilder().subject_name(_name(identity(kind)))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(_usages(kind)), critical=False)
            .sign(ca_key, hashes.SHA256()))
        files = files_for(directory, kind)
        _write(files.cert, cert.public_bytes(serialization.Encoding.PEM))
        _write(files.key, key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
        issued[kind] = files
    return issued
