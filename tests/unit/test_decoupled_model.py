"""The parts of our Python-backend models' shared code that are pure logic: which outputs a
response carries, and how a liveness probe is answered. Outside Triton's stub there is no
`triton_python_backend_utils`, so a minimal stand-in records what the code builds and sends."""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest


class _Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class _Response:
    def __init__(self, output_tensors, error=None):
        self.output_tensors, self.error = output_tensors, error


class _Error:
    def __init__(self, message: str):
        self.message = message


class _Sender:
    def __init__(self):
        self.sent: list[tuple[_Response, int]] = []

    def send(self, response: _Response, flags: int = 0) -> None:
        self.sent.append((response, flags))


class _Request:
    """What the code reads of a request: its inputs, its requested outputs, its sender."""

    def __init__(self, inputs: dict, outputs=()):
        self.inputs = {k: _Tensor(k, np.array([[v]], dtype=object if isinstance(v, bytes)
                                              else None)) for k, v in inputs.items()}
        self.outputs, self.sender = list(outputs), _Sender()

    def requested_output_names(self) -> list[str]:
        return self.outputs

    def get_response_sender(self) -> _Sender:
        return self.sender


@pytest.fixture
def decoupled_model(monkeypatch):
    stand_in = types.ModuleType("triton_python_backend_utils")
    stand_in.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    stand_in.Tensor = _Tensor
    stand_in.InferenceResponse = _Response
    stand_in.TritonError = _Error
    stand_in.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in)
    monkeypatch.delitem(sys.modules, "backends.triton.decoupled_model", raising=False)
    yield importlib.import_module("backends.triton.decoupled_model")
    sys.modules.pop("backends.triton.decoupled_model", None)


GATEWAY_OUTPUTS = ("text_output", "num_input_tokens", "num_output_tokens")


@pytest.mark.parametrize("requested", [
    GATEWAY_OUTPUTS,
    ("text_output",),
    (*GATEWAY_OUTPUTS, "first_token_time_ns", "kv_cache_reused_blocks"),
])
def test_a_response_carries_only_the_requested_outputs(decoupled_model, requested):
    """Triton 2.51's stub frees an unrequested output's array without the GIL and crashes
    later: the engines must never build one. (A request that names no outputs reaches the
    model with every output requested: Triton fills them in.)"""
    request = _Request({"text_input": b"Hi", "max_tokens": 4}, outputs=requested)
    prompt, max_tokens, pending = decoupled_model.parse_text_request(request, request.sender)
    assert (prompt, max_tokens) == ("Hi", 4)
    pending.num_input_tokens = 7
    tensors = {t.name: t.array for t in decoupled_model.response(pending, "Paris").output_tensors}
    assert set(tensors) == set(requested)
    assert tensors["text_output"].tolist() == [[b"Paris"]]
    if "num_input_tokens" in requested:
        assert tensors["num_input_tokens"].shape == (1, 1)
        assert tensors["num_input_tokens"].item() == 7


def test_a_probe_is_answered_by_execute_alone_and_says_when_the_engine_stopped(decoupled_model):
    inbox, failures = decoupled_model.Inbox(), []

    def fail(sender, message):
        failures.append(message)
        decoupled_model.send_error(sender, message, "test engine")

    def probe():
        return _Request({"text_input": b"", "max_tokens": 1, decoupled_model.PROBE_INPUT: True})

    alive = probe()
    decoupled_model.enqueue([alive], decoupled_model.parse_text_request, inbox, fail,
                            "test engine")
    [(response, flags)] = alive.sender.sent
    assert flags == 1 and response.error is None and not response.output_tensors
    assert inbox.take(wait=False) == []  # the engine never saw it

    inbox.close()  # the dispatcher ended
    dead, refused = probe(), _Request({"text_input": b"Hi", "max_tokens": 4})
    decoupled_model.enqueue([dead, refused], decoupled_model.parse_text_request, inbox, fail,
                            "test engine")
    assert failures == ["engine stopped (test engine)"] * 2
    assert dead.sender.sent[0][0].error.message == "engine stopped (test engine)"
