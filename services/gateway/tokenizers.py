"""Each model version's own tokenizer in the gateway: exact prompt token counts, real chat prompts.

A version's manifest names its tokenizer: `whitespace` (the reference engine) or `huggingface`,
whose files (tokenizer.json, tokenizer_config.json, chat_template.jinja) it pins by digest. The
gateway fetches those files from the registry by digest into its blob cache (verified), counts
tokens with the `tokenizers`
library (the Rust tokenizer transformers wraps, without importing torch) and renders `messages`
with the model's chat template in a sandboxed Jinja environment set up as transformers sets up
its own, so the engine receives exactly the prompt the model was trained on and the count the
gateway checks limits with is the count the engine reports.

Loading is a download, file I/O and parsing: `TokenizerStore.refresh()` does it off the event
loop whenever the catalog changes, retrying while the registry cannot be reached; `get()` only
looks up what is loaded and answers UNAVAILABLE (retry soon) for a version whose tokenizer is
still loading.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from collections.abc import Iterable
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.sandbox
from prometheus_client import Counter
from tokenizers import Tokenizer

from backends.triton.weights import files_key, materialize_files
from services.common import errors
from services.common.kv_blocks import word_token_ids
from services.common.logs import get_logger
from services.gateway.requests import ChatTurn
from services.registry.blob_cache import BlobCache
from services.registry.manifest import ModelVersion

__all__ = ["HuggingFaceTokenizer", "PromptTokenizer", "TokenizerStore", "WhitespaceTokenizer"]

log = get_logger(__name__)
LOADS = Counter("infermesh_gateway_tokenizer_loads_total",
                "Tokenizers loaded from the registry's blobs, by outcome.", ["outcome"])
RETRY_AFTER_S = 0.5
FETCH_RETRY_S = (0.5, 10.0)  # first and longest delay between tries to fetch a tokenizer's files
FAILED_RETRY_S = 60.0  # a tokenizer that could not be loaded is tried again after this
# The reference engine's made-up vocabulary: a word's id is its xxh32 as a positive int32
# (services/common/kv_blocks.py `word_token_ids`, the ids its KV blocks are hashed over and the
# ids its outputs carry), so every id below 2^31 is one and logit_bias takes any of them.
REFERENCE_VOCAB_SIZE = 2**31


class PromptTokenizer(Protocol):
    def count(self, text: str) -> int:
        """Tokens the engine will see for `text` as its prompt."""
        ...

    def token_ids(self, text: str) -> list[int]:
        """The ids of those tokens (what the engine's KV-cache blocks are hashed over)."""
        ...

    def render(self, messages: tuple[ChatTurn, ...]) -> str:
        """The prompt for a chat, ending where the assistant's reply starts."""
        ...

    @property
    def vocab_size(self) -> int:
        """Token ids run 0..vocab_size-1 (logit_bias is checked against it)."""
        ...


class WhitespaceTokenizer:
    """The reference engine's tokenizer: whitespace-separated words; a plain chat rendering."""

    vocab_size = REFERENCE_VOCAB_SIZE

    def count(self, text: str) -> int:
        return len(text.split())

    def token_ids(self, text: str) -> list[int]:
        return word_token_ids(text.split())

    def render(self, messages: tuple[ChatTurn, ...]) -> str:
        return "".join(f"{turn.role}: {turn.content}\n" for turn in messages) + "assistant:"


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False)


class HuggingFaceTokenizer:
    """A tokenizer.json plus the chat template, from one directory of verified files."""

    def __init__(self, directory: pathlib.Path):
        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config = json.loads((directory / "tokenizer_config.json").read_text())
        template_file = directory / "chat_template.jinja"
        source = (template_file.read_text() if template_file.exists()
                  else config.get("chat_template"))
        if not source:
            raise errors.Internal(f"the tokenizer in {directory} has no chat template")
        # As transformers renders chat templates: sandboxed, trimmed blocks, loop controls.
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        self._template = environment.from_string(source)
        self._special = {
            key: config[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token")
            if isinstance(config.get(key), str)
        }

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text).ids)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_ids(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def render(self, messages: tuple[ChatTurn, ...]) -> str:
        try:
            return self._template.render(
                messages=[{"role": turn.role, "content": turn.content} for turn in messages],
                add_generation_prompt=True, **self._special,
            )
        except jinja2.exceptions.TemplateError as exc:  # the template refuses this chat
            raise errors.InvalidArgument("messages", str(exc)) from exc


class TokenizerStore:
    """Every known version's tokenizer, loaded in the background and shared by equal files."""

    def __init__(self, blobs: BlobCache, cache_dir: pathlib.Path):
        self._blobs = blobs
        self._cache_dir = cache_dir
        self._whitespace = WhitespaceTokenizer()
        self._loaded: dict[str, HuggingFaceTokenizer] = {}  # by the tokenizer files' digests
        self._failed: dict[str, tuple[str, float]] = {}  # why it could not be loaded, and when
        self._loading: dict[str, asyncio.Task[None]] = {}

    def get(self, version: ModelVersion) -> PromptTokenizer:
        """The version's tokenizer; UNAVAILABLE while it loads, INTERNAL if it cannot be."""
        if version.tokenizer == "whitespace":
            return self._whitespace
        if version.tokenizer != "huggingface":
            raise errors.Internal(f"the model's tokenizer {version.tokenizer!r} is unknown")
        key = files_key(version.tokenizer_files)
        tokenizer = self._loaded.get(key)
        if tokenizer is not None:
            return tokenizer
        failed = self._failed.get(key)
        if failed is not None:
            if time.monotonic() - failed[1] < FAILED_RETRY_S:
                raise errors.Internal(f"the tokenizer of {version.version_id} cannot be loaded: "
                                      f"{failed[0]}")
            del self._failed[key]  # a disk or cache that was full may have room now: retry
            self.refresh([version])
        raise errors.Unavailable(f"the tokenizer of {version.version_id} is loading",
                                 retry_after_s=RETRY_AFTER_S)

    def refresh(self, versions: Iterable[ModelVersion]) -> None:
        """Starts loading, in the background, every tokenizer not loaded or loading yet.

        Called from the event loop (the catalog's change callback); never blocks it.
        """
        for version in versions:
            if version.tokenizer != "huggingface":
                continue
            key = files_key(version.tokenizer_files)
            if key in self._loaded or key in self._failed or key in self._loading:
                continue
            task = asyncio.get_running_loop().create_task(
                self._load(key, version), name=f"tokenizer {version.version_id}"
            )
            self._loading[key] = task

    async def _fetch(self, key: str, version: ModelVersion) -> None:
        """The tokenizer files into the blob cache; retried while the registry cannot serve
        them (not up yet, restarting), so a gateway that started first still gets them."""
        delay_s = FETCH_RETRY_S[0]
        while True:
            try:
                await self._blobs.ensure(version.tokenizer_files, pin=f"tokenizer {key}")
                return
            except (errors.Unavailable, errors.DeadlineExceeded) as exc:
                log.warning("tokenizer_fetch_retry", version=version.version_id, error=str(exc),
                            retry_in_s=delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, FETCH_RETRY_S[1])

    async def _load(self, key: str, version: ModelVersion) -> None:
        try:
            await self._fetch(key, version)
            self._loaded[key] = await asyncio.to_thread(self._read, version)
            LOADS.labels("ok").inc()
            log.info("tokenizer_loaded", version=version.version_id)
        except Exception as exc:  # a missing or corrupt blob, a bad template: the version fails
            self._failed[key] = (str(exc), time.monotonic())
            LOADS.labels("failed").inc()
            log.error("tokenizer_load_failed", version=version.version_id, error=repr(exc))
        finally:
            self._blobs.unpin(f"tokenizer {key}")  # loaded, it lives in memory
            self._loading.pop(key, None)

    def _read(self, version: ModelVersion) -> HuggingFaceTokenizer:
        return HuggingFaceTokenizer(
            materialize_files(self._blobs.store, version.tokenizer_files, self._cache_dir))

    async def close(self) -> None:
        tasks = list(self._loading.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
