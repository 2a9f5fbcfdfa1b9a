"""Generated protobuf code must match the .proto files (it is never edited by hand)."""

import pathlib

from services.common.protogen import PACKAGE, PROTO_ROOT, generate


def test_generated_code_is_current(tmp_path: pathlib.Path) -> None:
    generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / PACKAGE).glob("*_pb2*.py*")}
    on_disk = {p.name: p.read_bytes() for p in (PROTO_ROOT.parent / PACKAGE).glob("*_pb2*.py*")}
    assert fresh, "protoc generated nothing"
    stale = sorted(name for name in fresh.keys() | on_disk.keys()
                   if fresh.get(name) != on_disk.get(name))
    assert not stale, f"generated code is stale, run `make proto`: {stale}"
