"""The part of our Python-backend models' shared code that is pure logic: which outputs a
response carries. Outside Triton's stub there is no `triton_python_backend_utils`, so a minimal
stand-in records what the code builds."""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest


class _Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self.name, self.array = name, array


class _Response:
    def __init__(self, output_tensors, error=None):
        self.output_tensors = output_tensors


@pytest.fixture
def decoupled_model(monkeypatch):
    stand_in = types.ModuleType("triton_python_backend_utils")
    stand_in.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    stand_in.Tensor = _Tensor
    stand_in.InferenceResponse = _Response
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in)
    monkeypatch.delitem(sys.modules, "backends.triton.decoupled_model", raising=False)
    yield importlib.import_module("backends.triton.decoupled_model")
    sys.modules.pop("backends.triton.decoupled_model", None)


@pytest.mark.parametrize("requested", [
    {"text_output", "num_input_tokens", "num_output_tokens"},  # what the gateway asks for
    {"text_output"},
    {"text_output", "num_input_tokens", "num_output_tokens", "first_token_time_ns",
     "kv_cache_reused_blocks"},
    set(),
])
def test_a_response_carries_only_the_requested_outputs(decoupled_model, requested):
    """Triton 2.51's stub frees an unrequested output's array without the GIL and crashes
    later: the engines must never build one."""
    pending = decoupled_model.Pending(request=None, sender=None, stream=True, prefix="",
                                      outputs=frozenset(requested), num_input_tokens=7,
                                      num_output_tokens=3)
    tensors = {t.name: t.array for t in decoupled_model.response(pending, "Paris").output_tensors}
    assert set(tensors) == requested
    if "text_output" in requested:
        assert tensors["text_output"].tolist() == [[b"Paris"]]
    if "num_input_tokens" in requested:
        assert tensors["num_input_tokens"].shape == (1, 1)
        assert tensors["num_input_tokens"].item() == 7
