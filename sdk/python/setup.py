"""Build hook for infermesh-client: compiles the API's .proto files at build time.

protoc (from grpcio-tools, a build requirement only) writes descriptor sets into
`infermesh_client/_proto/`; the client loads them into a private descriptor pool at import
(`infermesh_client/_proto/__init__.py`). The sources are the repository's `../../protos` in a
checkout, or the copy an sdist carries in `protos/`. Nothing generated is committed.
"""

from __future__ import annotations

import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = pathlib.Path(__file__).resolve().parent
REPO_PROTOS = HERE.parent.parent / "protos"  # a checkout of the repository
OWN_PROTOS = HERE / "protos"  # the client's own protos, and the API's copy inside an sdist
PUBLIC_API = ("infermesh/v1/inference.proto",)
# What an admin uses (TenantAdmin on the gateway, the registry, the auditor's queries).
ADMIN_API = ("infermesh/v1/tenants.proto", "infermesh/v1/registry.proto",
             "infermesh/v1/auditor.proto")
API_FILES = PUBLIC_API + ADMIN_API
# descriptor set → the files compiled into it (with their imports)
DESCRIPTOR_SETS = {
    "inference.binpb": PUBLIC_API,
    "admin.binpb": ADMIN_API,
    "rpc_status.binpb": ("infermesh_client/rpc_status.proto",),
}
PROTO_PACKAGE = pathlib.PurePosixPath("infermesh_client/_proto")


def api_root() -> pathlib.Path:
    for root in (REPO_PROTOS, OWN_PROTOS):
        if all((root / name).is_file() for name in API_FILES):
            return root
    raise SystemExit(f"infermesh-client: {PUBLIC_API[0]} is in neither {REPO_PROTOS} nor "
                     f"{OWN_PROTOS}; build from the repository or from an sdist")


def compile_descriptor_sets(out: pathlib.Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    roots = list(dict.fromkeys((api_root(), OWN_PROTOS, well_known)))
    out.mkdir(parents=True, exist_ok=True)
    for name, sources in DESCRIPTOR_SETS.items():
        args = ["protoc", *(f"-I{root}" for root in roots), "--include_imports",
                f"--descriptor_set_out={out / name}", *sources]
        if protoc.main(args) != 0:
            raise SystemExit(f"infermesh-client: protoc failed on {', '.join(sources)}")


class BuildPyWithProtos(build_py):
    """Also writes the descriptor sets: into the build tree for a wheel, beside the sources for
    an editable install (re-run it when the protos change; `make install` does)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            compile_descriptor_sets(HERE / "src" / PROTO_PACKAGE)
        else:
            compile_descriptor_sets(pathlib.Path(self.build_lib) / PROTO_PACKAGE)


class SdistWithProtos(sdist):
    """Carries the API's .proto files, so a wheel builds from the sdist alone."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        root = api_root()
        for name in API_FILES:
            target = pathlib.Path(base_dir) / "protos" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, target)


setup(cmdclass={"build_py": BuildPyWithProtos, "sdist": SdistWithProtos})
