"""`meshctl registry push` of a Hugging Face model directory against the real registry service
(in this process, its real `setup`, a real etcd): the derived manifest printed and registered,
a re-push that uploads nothing, and a directory the engine could not serve refused before
anything is uploaded or registered."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import pathlib
import sys
import uuid

import grpc
import numpy as np
import pytest
from safetensors.numpy import save_file

from services.registry.client import RegistryClient, load_push_source
from tests.integration.registries import in_process_registry
from tests.unit.test_registry_hf_source import hf_dir

pytestmark = pytest.mark.integration

MESHCTL = pathlib.Path(sys.executable).parent / "meshctl"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


class CallCounter(grpc.aio.ServerInterceptor):
    """Counts the registry's RPCs by method name: what a push really sent."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    async def intercept_service(self, continuation, handler_call_details):
        self.calls[handler_call_details.method.rsplit("/", 1)[-1]] += 1
        return await continuation(handler_call_details)


class Registry:
    def __init__(self, endpoint: str, admin_key: str, calls: CallCounter, blob_dir: pathlib.Path):
        self.endpoint, self.admin_key, self.counter, self.blob_dir = (
            endpoint, admin_key, calls, blob_dir)

    def client(self) -> RegistryClient:
        return RegistryClient(self.endpoint, self.admin_key)

    async def meshctl(self, *args: str) -> tuple[int, str, str]:
        """`meshctl registry push …` in a child process (this loop keeps serving meanwhile)."""
        env = dict(os.environ, INFERMESH_STATE_DIR=str(self.blob_dir.parent / "no-stack"))
        child = await asyncio.create_subprocess_exec(
            str(MESHCTL), "registry", "push", *args, "--registry", self.endpoint,
            "--api-key", self.admin_key, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(120):
            out, err = await child.communicate()
        return child.returncode, out.decode(), err.decode()


@pytest.fixture
async def registry(etcd_server, tmp_path: pathlib.Path):
    counter = CallCounter()
    async with in_process_registry(etcd_server.endpoint, tmp_path / "blobs",
                                   interceptors=[counter]) as running:
        yield Registry(running.endpoint, running.admin_key, counter, tmp_path / "blobs")


def blobs_in(directory: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in directory.rglob("*") if p.is_file()] if directory.exists() else []


async def test_a_derived_push_is_printed_registered_and_a_re_push_uploads_nothing(
        registry, tmp_path):
    name = f"hf-{uuid.uuid4().hex[:8]}"
    index = {"weight_map": {"a": SHARDS[0], "b": SHARDS[1]}}
    directory = hf_dir(tmp_path / "model", weights=SHARDS, index=index,
                       generation={"max_new_tokens": 32})
    code, out, err = await registry.meshctl(str(directory), "--name", name)
    assert code == 0, err
    printed, _, result = out.rpartition("}\n")
    manifest = json.loads(printed + "}")  # the derived manifest first, then the outcome
    assert manifest["name"] == name and manifest["engine"]["kind"] == "torch"
    assert result.startswith(f"{name}@sha256:") and result.strip().endswith("registered")
    version_id = result.split("@", 1)[1].split()[0]
    files = 3 + len(SHARDS) + 4  # config, generation config, index, shards, tokenizer files
    assert registry.counter.calls["UploadBlob"] == files
    async with registry.client() as admin:
        registered = await admin.version(f"{name}@{version_id}")
        assert [w.name for w in registered.manifest.weights] == [
            "config.json", "generation_config.json", "model.safetensors.index.json", *SHARDS]

        registry.counter.calls.clear()
        again = await admin.push(await asyncio.to_thread(load_push_source, str(directory), name))
        assert (again.version_id, again.created) == (version_id, False)
        assert registry.counter.calls["UploadBlob"] == 0  # every blob was already there
        assert registry.counter.calls["GetBlobStatus"] == files

        save_file({"layer1.weight": np.ones((64, 1024), np.float32)}, directory / SHARDS[1])
        changed = await admin.push(await asyncio.to_thread(load_push_source, str(directory),
                                                           name))
        assert changed.created and changed.version_id != version_id
        assert registry.counter.calls["UploadBlob"] == 1  # only the shard that changed


async def test_a_missing_shard_is_refused_before_anything_is_uploaded_or_registered(
        registry, tmp_path):
    name = f"hf-{uuid.uuid4().hex[:8]}"
    index = {"weight_map": {"a": SHARDS[0], "b": SHARDS[1]}}
    directory = hf_dir(tmp_path / "model", weights=SHARDS[:1], index=index)
    code, out, err = await registry.meshctl(str(directory), "--name", name)
    assert code == 3 and out == ""  # INVALID_ARGUMENT (meshctl.exits)
    assert f"INVALID_ARGUMENT: {SHARDS[1]}: model.safetensors.index.json lists {SHARDS[1]}" in err
    assert registry.counter.calls == {}  # not one call: nothing uploaded, nothing registered
    assert blobs_in(registry.blob_dir) == []
    async with registry.client() as admin:
        assert name not in [m.name for m in await admin.models()]


async def test_an_unknown_architecture_is_refused_before_anything_is_uploaded(
        registry, tmp_path):
    directory = hf_dir(tmp_path / "model", config={
        "architectures": ["FancyNetForCausalLM"], "model_type": "fancynet",
        "max_position_embeddings": 2048})
    code, out, err = await registry.meshctl(str(directory))
    assert code == 3 and out == ""  # INVALID_ARGUMENT (meshctl.exits)
    assert "INVALID_ARGUMENT: config.json:" in err and "FancyNetForCausalLM" in err
    assert registry.counter.calls == {} and blobs_in(registry.blob_dir) == []
