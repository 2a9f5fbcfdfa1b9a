"""The real torch engine's KV events, in process: its cache's own block hashes are the ones the
gateway computes from the same chat with the version's tokenizer (real model, real tokenizer)."""

from __future__ import annotations

import time

import pytest

from backends.triton.torch_engine import Generation, Sampling, TorchEngine, TorchEngineConfig
from backends.triton.weights import cache_root, default_model_dir
from services.common.kv_events import AllBlocksCleared, BlockStored, HeldBlocks
from services.gateway.requests import ChatTurn, GenerationRequest, SamplingRequest
from services.gateway.tokenizers import HuggingFaceTokenizer
from services.gateway.validation import Limits, prepare_prompt

pytestmark = pytest.mark.integration

PAGE = 16
SYSTEM = ("You are a careful assistant for a shipping company. Answer in one short sentence, "
          "name the port you mean, and never guess a schedule you were not given. ")


@pytest.fixture(scope="module")
def engine():
    model_dir = default_model_dir(cache_root())
    engine = TorchEngine(model_dir, model_dir, TorchEngineConfig(
        num_blocks=24, page_size=PAGE, max_batch_tokens=256, threads=1))
    engine.start()
    yield engine, HuggingFaceTokenizer(model_dir)
    engine.stop()


def run(engine: TorchEngine, generation: Generation, timeout_s: float = 60.0) -> None:
    engine.submit(generation)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(d.finish_reason is not None for d in engine.poll(0.1)):
            return
    raise AssertionError(f"{generation.request_id} did not finish in {timeout_s} s")


def test_the_gateways_chat_block_hashes_are_the_torch_engines_and_eviction_is_reported(engine):
    engine, tokenizer = engine
    held = HeldBlocks()
    first = engine.kv_events()
    assert first[0] == AllBlocksCleared()
    held.apply(first)
    chat = (ChatTurn("system", SYSTEM * 2), ChatTurn("user", "Where does the ferry leave from?"))
    # What the gateway sends with the route: rendered and hashed as its pipeline does.
    prepared = prepare_prompt(
        GenerationRequest(request_id="r1", model="m", messages=chat, sampling=SamplingRequest()),
        Limits(), tokenizer, PAGE)
    gateway_hashes = list(prepared.kv_block_hashes)
    assert len(gateway_hashes) >= 4 and prepared.kv_block_tokens == PAGE
    run(engine, Generation("chat-1", prepared.text, max_tokens=4))
    events = engine.kv_events()
    held.apply(events)
    assert set(gateway_hashes) <= held.hashes  # the engine holds exactly these blocks
    assert any(isinstance(e, BlockStored) and e.parent_block_hash is None
               and e.block_hashes[0] == gateway_hashes[0] for e in events)
    # Other long prompts fill the 24-block cache: the chat's blocks are evicted, and said so.
    for n in range(3):
        run(engine, Generation(f"other-{n}", f"{n} unrelated words to fill the cache " * 30,
                               max_tokens=2))
        held.apply(engine.kv_events())
    assert not set(gateway_hashes) & held.hashes
    processor = engine._manager.batch_processor  # the cache's own ledger
    [allocator] = processor.cache.cache_allocators.values()
    assert held.hashes == set(allocator.ledger.hash_to_block)


def test_isolated_tenants_with_the_same_prompt_never_share_the_torch_engines_blocks(engine):
    """Review finding (issue 19): transformers' prefix sharing outlives requests, so an isolated
    tenant's salt must partition it: each salt's blocks are its own chain, rooted at the salt,
    computed and stored anew (not found in another salt's), and exactly the hashes the gateway
    sends with that tenant's route (so precise routing agrees with the engine)."""
    engine, tokenizer = engine
    prompt = SYSTEM * 2 + "Which port is the ferry's?"
    held = HeldBlocks()
    held.apply(engine.kv_events())
    per_salt = {}
    for salt in ("", "tenant-a", "tenant-b"):  # the unsalted chain first: there to be found
        prepared = prepare_prompt(
            GenerationRequest(request_id="r", model="m", prompt=prompt, sampling=SamplingRequest()),
            Limits(), tokenizer, PAGE, salt)
        hashes = per_salt[salt] = list(prepared.kv_block_hashes)
        run(engine, Generation(f"salted-{salt}", prompt, max_tokens=2, cache_salt=salt,
                               sampling=Sampling(min_tokens=2)))  # an EOS first keeps none
        events = engine.kv_events()
        held.apply(events)
        stored = {h for e in events if isinstance(e, BlockStored) for h in e.block_hashes}
        assert set(hashes) <= stored & held.hashes  # its own blocks, computed, held now
    unsalted, a, b = per_salt.values()
    assert len(a) >= 4 and not set(a) & set(b) and not set(a) & set(unsalted)
    [allocator] = engine._manager.batch_processor.cache.cache_allocators.values()
    assert held.hashes == set(allocator.ledger.hash_to_block)
