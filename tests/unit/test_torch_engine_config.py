"""The torch engine's dtype "auto": bfloat16 only on a CPU that computes it natively."""

from __future__ import annotations

import pytest
import torch

from backends.triton.torch_engine import TorchEngineConfig

KV = {"num_blocks": 8, "page_size": 16, "max_batch_tokens": 64}


@pytest.mark.parametrize(("capabilities", "expected"), [
    ({"avx512_bf16": True, "amx_bf16": False}, "bfloat16"),
    ({"avx512_bf16": False, "amx_bf16": True}, "bfloat16"),
    ({"avx512_bf16": False, "amx_bf16": False, "avx512_f": True}, "float32"),
    ({}, "float32"),  # a CPU torch reports no x86 flags for (e.g. ARM)
])
def test_auto_picks_bfloat16_where_the_cpu_has_it(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert TorchEngineConfig(**KV, dtype="auto", device="cpu").resolved_dtype == expected


def test_auto_keeps_float32_on_a_gpu_and_explicit_dtypes_stay(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert TorchEngineConfig(**KV, dtype="auto", device="cuda").resolved_dtype == "float32"
    assert TorchEngineConfig(**KV, dtype="float32", device="cpu").resolved_dtype == "float32"
    assert TorchEngineConfig(**KV, dtype="float16", device="cpu").resolved_dtype == "float16"


def test_an_unknown_dtype_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="auto"):
        TorchEngineConfig(**KV, dtype="fp4")
