"""Generates the Python code for `protos/` (run by `make proto`; the output is never edited)."""

from __future__ import annotations

import argparse
import pathlib
import sys

from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[2] / "protos"
PACKAGE = pathlib.PurePosixPath("infermesh/v1")


def proto_files() -> list[pathlib.Path]:
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


def generate(out: pathlib.Path) -> None:
    """Writes `<out>/infermesh/v1/*_pb2*.py` (and `.pyi`) for every proto file."""
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in (out / "infermesh", out / PACKAGE):
        (package / "__init__.py").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=PROTO_ROOT.parent)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
