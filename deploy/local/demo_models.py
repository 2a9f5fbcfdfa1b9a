"""The embedded stack's two demo models and the Triton model repository that serves them.

- `demo-chat`: SmolLM2-135M-Instruct on the torch engine, a real model. Its manifest pins the
  weights (the GGUF file) and the tokenizer files by digest; `prepare` puts them into the stack's
  blob store (converting the GGUF once per machine). The replica's sidecar fetches them from the
  registry and renders the version's Triton model when placement gives it the version.
- `demo-reference`: the reference engine, whose text is made up but whose serving costs are
  modelled; the routing and overload benchmarks and the walking-skeleton tests use it.
"""

from __future__ import annotations

import pathlib

from google.protobuf import json_format

from backends.triton.weights import ModelFiles, cache_root, publish_default_model
from infermesh.v1 import registry_pb2
from services.registry.blobs import LocalBlobStore

__all__ = ["DEMO_MODEL", "REFERENCE_MODEL", "manifest_dict", "prepare", "reference_manifest",
           "torch_manifest"]

DEMO_MODEL = "demo-chat"
REFERENCE_MODEL = "demo-reference"


def reference_manifest() -> registry_pb2.ModelManifest:
    return registry_pb2.ModelManifest(
        name=REFERENCE_MODEL,
        description="The reference engine: deterministic text with simulated serving costs.",
        tokenizer="whitespace",
        engine=registry_pb2.EngineConfig(kind="reference", context_window=4096,
                                         max_output_tokens=1024, max_batch_size=8),
        sampling=registry_pb2.SamplingDefaults(max_tokens=64, temperature=0.7, top_p=0.95),
        cost_per_1k_input_tokens=0.0001,
        cost_per_1k_output_tokens=0.0002,
    )


def _file_refs(refs: list[dict]) -> list[registry_pb2.FileRef]:
    return [json_format.ParseDict(ref, registry_pb2.FileRef()) for ref in refs]


def torch_manifest(files: ModelFiles) -> registry_pb2.ModelManifest:
    """SmolLM2-135M-Instruct on the torch engine. The KV cache holds 128 blocks of 32 tokens
    (~190 MB in float32, half in bfloat16): a 2048-token context fits twice, eight short chats
    many times. `dtype` "auto": bfloat16 where the CPU has it natively (~2x the tokens/s, the
    same greedy demo answers; docs/decisions.md), float32 elsewhere."""
    return registry_pb2.ModelManifest(
        name=DEMO_MODEL,
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) on the torch engine.",
        tokenizer="huggingface",
        engine=registry_pb2.EngineConfig(
            kind="torch", context_window=2048, max_output_tokens=512, max_batch_size=8,
            num_blocks=128, page_size=32, max_batch_tokens=256, dtype="auto",
        ),
        sampling=registry_pb2.SamplingDefaults(max_tokens=128, temperature=0.0, top_p=1.0),
        cost_per_1k_input_tokens=0.0001,
        cost_per_1k_output_tokens=0.0002,
        weights=_file_refs(files.weights),
        tokenizer_files=_file_refs(files.tokenizer_files),
    )  # fmt: skip


def manifest_dict(manifest: registry_pb2.ModelManifest) -> dict:
    return json_format.MessageToDict(manifest, preserving_proto_field_name=True)


def prepare(blob_dir: pathlib.Path) -> list[registry_pb2.ModelManifest]:
    """Puts the demo model's files into the stack registry's blob store; returns the manifests
    to register, the real model first. Blocking (file I/O, a first-time GGUF conversion)."""
    files = publish_default_model(LocalBlobStore(blob_dir), cache_root())
    return [torch_manifest(files), reference_manifest()]
