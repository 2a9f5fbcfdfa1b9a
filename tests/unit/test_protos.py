"""Generated protobuf code must match the .proto files (it is never edited by hand)."""

import pathlib
import subprocess

from services.common.protogen import PACKAGE, PROTO_ROOT, generate


def test_generated_code_is_current(tmp_path: pathlib.Path) -> None:
    generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / PACKAGE).glob("*_pb2*.py*")}
    on_disk = {p.name: p.read_bytes() for p in (PROTO_ROOT.parent / PACKAGE).glob("*_pb2*.py*")}
    assert fresh, "protoc generated nothing"
    stale = sorted(name for name in fresh.keys() | on_disk.keys()
                   if fresh.get(name) != on_disk.get(name))
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


REPO = PROTO_ROOT.parent
BUF = REPO / "tools" / "node_modules" / ".bin" / "buf"
ENCODE_WITH_GENERATED_JS = """
import { create, toBinary } from "@bufbuild/protobuf";
import { GenerateRequestSchema } from "./infermesh/v1/inference_pb.js";
const request = create(GenerateRequestSchema, {
  model: "demo-chat", input: { case: "prompt", value: "Hello" }, params: { maxTokens: 16 },
});
process.stdout.write(Buffer.from(toBinary(GenerateRequestSchema, request)).toString("hex"));
"""


def test_buf_generate_gives_another_language_the_same_wire_format(tmp_path: pathlib.Path) -> None:
    """`buf generate` with buf.gen.yaml (protoc-gen-es: JavaScript and TypeScript) makes code whose
    encoded GenerateRequest the Python stubs read back field for field."""
    from infermesh.v1 import inference_pb2

    assert BUF.exists(), f"{BUF} is missing: `make install` installs buf from tools/package.json"
    subprocess.run([str(BUF), "generate", "-o", str(tmp_path)], cwd=REPO, check=True, timeout=120)
    generated = tmp_path / "gen" / "es"
    assert sorted(p.name for p in (generated / "infermesh" / "v1").glob("*_pb.d.ts")) == sorted(
        f"{p.stem}_pb.d.ts" for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    (generated / "package.json").write_text('{"type": "module"}')
    (generated / "node_modules").symlink_to(BUF.parent.parent)
    (generated / "encode.js").write_text(ENCODE_WITH_GENERATED_JS)
    encoded = subprocess.run(["node", "encode.js"], cwd=generated, check=True, timeout=60,
                             capture_output=True, text=True).stdout
    request = inference_pb2.GenerateRequest.FromString(bytes.fromhex(encoded))
    assert (request.model, request.prompt, request.params.max_tokens) == ("demo-chat", "Hello", 16)
