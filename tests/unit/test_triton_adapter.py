"""What the adapter makes of Triton's answers, without a server."""

import struct

import numpy as np
import pytest
from tritonclient.grpc import aio as triton_aio
from tritonclient.grpc import service_pb2
from tritonclient.grpc._infer_result import InferResult
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import serialize_byte_tensor

from backends.triton.adapter import (
    OUTPUTS,
    EngineRequest,
    build_request,
    engine_failure,
    engine_process_gone,
    read_chunk,
)
from services.common import errors


@pytest.mark.parametrize("message, gone", [
    ("Stub process 'smollm2_0_0' is not healthy.", True),  # Triton 2.51's Python backend
    ("Stub process 'reference_0_0' is not healthy.", True),
    ("engine stopped (torch engine)", True),  # our dispatcher ended: the process lives on
    ("the torch engine failed: prompt too long", False),  # about the request, not the replica
    ("the prompt is not healthy", False),  # an engine's own words never count
    ("", False),
])
def test_only_a_dead_engine_process_is_the_replicas_failure(message, gone):
    assert engine_process_gone(message) is gone


@pytest.mark.parametrize("message, code", [
    ("engine stopped (reference engine)", "UNAVAILABLE"),  # the replica's: retry elsewhere
    ("request refused: the prompt needs 9 KV blocks of 4 tokens; the cache holds at most "
     "kv_cache_blocks=3", "INVALID_ARGUMENT"),  # the request's: the client must change it
    ("request refused: top_p must be in (0, 1], got 1.5", "INVALID_ARGUMENT"),
    ("request refused: guided_decoding_guide cannot be compiled: Invalid type: strin",
     "INVALID_ARGUMENT"),
    ("the torch engine failed: CUDA out of memory", "INTERNAL"),  # the engine's own fault
])
def test_an_engine_error_response_is_the_replicas_the_requests_or_the_engines(message, code):
    error = engine_failure("127.0.0.1:1", message)
    assert error.code == code
    if code == "INVALID_ARGUMENT":  # the field the engine named, else the prompt
        field = ("top_p" if "top_p" in message else
                 "response_format" if "guided" in message else "prompt")
        assert error.field == field and message.split(": ", 1)[1] in error.message


def _tritonclient_request(request: EngineRequest) -> service_pb2.ModelInferRequest:
    """What tritonclient makes of the same tensors as numpy arrays (the encoding's oracle)."""
    arrays = [("text_input", "BYTES", np.array([[request.prompt.encode()]], dtype=np.object_)),
              ("max_tokens", "INT32", np.array([[request.max_tokens]], dtype=np.int32)),
              ("stream", "BOOL", np.array([[True]], dtype=bool))]
    for name, datatype, dtype in (("temperature", "FP32", np.float32),
                                  ("top_p", "FP32", np.float32), ("top_k", "INT32", np.int32),
                                  ("seed", "UINT64", np.uint64),
                                  ("min_tokens", "INT32", np.int32),
                                  ("repetition_penalty", "FP32", np.float32),
                                  ("presence_penalty", "FP32", np.float32),
                                  ("frequency_penalty", "FP32", np.float32)):
        if getattr(request, name) is not None:
            arrays.append((name, datatype, np.array([[getattr(request, name)]], dtype=dtype)))
    for name, words in (("stop_words", request.stop), ("bad_words", request.bad_words)):
        if words:
            arrays.append((name, "BYTES", np.array([[w.encode() for w in words]],
                                                   dtype=np.object_)))
    if request.logit_bias:
        arrays.append(("logit_bias_token_ids", "INT32",
                       np.array([[t for t, _ in request.logit_bias]], dtype=np.int32)))
        arrays.append(("logit_bias_values", "FP32",
                       np.array([[b for _, b in request.logit_bias]], dtype=np.float32)))
    if request.cache_salt:
        arrays.append(("cache_salt", "BYTES", np.array([[request.cache_salt.encode()]],
                                                       dtype=np.object_)))
    if request.guided_decoding_guide_type:
        for name in ("guided_decoding_guide_type", "guided_decoding_guide"):
            arrays.append((name, "BYTES", np.array([[getattr(request, name).encode()]],
                                                   dtype=np.object_)))
    for name in ("return_num_input_tokens", "return_num_output_tokens"):
        arrays.append((name, "BOOL", np.array([[True]], dtype=bool)))
    inputs = []
    for name, datatype, value in arrays:
        tensor = triton_aio.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return _get_inference_request(
        model_name=request.triton_model_name, inputs=inputs, model_version="",
        request_id=request.request_id,
        outputs=[triton_aio.InferRequestedOutput(name) for name in OUTPUTS], sequence_id=0,
        sequence_start=False, sequence_end=False, priority=0, timeout=None, parameters=None)


@pytest.mark.parametrize("request_", [
    EngineRequest("reference-0123", "r1", "Say one word.", 1),
    EngineRequest("smollm2-abcd", "r-2", "naïve ☃ prompt\n", 64, temperature=0.7, top_p=0.95,
                  top_k=40, seed=2**64 - 1, min_tokens=3, repetition_penalty=1.1,
                  presence_penalty=-0.5, frequency_penalty=0.25, stop=("\n\n", "END"),
                  bad_words=("x",), cache_salt="tenant-a",
                  logit_bias=((7, -100.0), (1234, 2.5))),
    EngineRequest("smollm2-abcd", "r3", "JSON please", 8, guided_decoding_guide_type="json_schema",
                  guided_decoding_guide='{"type":"object"}'),
])
def test_the_request_is_byte_for_byte_what_tritonclient_encodes(request_):
    assert (build_request(request_).SerializeToString()
            == _tritonclient_request(request_).SerializeToString())


@pytest.mark.parametrize("pieces, final", [
    ([b"Hello"], False), ([b"Hel", "l\u00f6".encode()], True), ([], True),
    ([b"\xe2\x98"], False),  # half a character: replaced, as tritonclient's bytes decode
])
def test_a_response_reads_as_tritonclient_reads_it(pieces, final):
    response = service_pb2.ModelInferResponse(model_name="m", id="r")
    for name, datatype, shape, content in (
            ("text_output", "BYTES", [1, len(pieces)],
             serialize_byte_tensor(np.array(pieces, dtype=np.object_)).item() if pieces
             else b""),
            ("num_input_tokens", "INT32", [1, 1], np.array([7], dtype=np.int32).tobytes()),
            ("num_output_tokens", "INT32", [1, 1], np.array([3], dtype=np.int32).tobytes())):
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(content)
    response.parameters["triton_final_response"].bool_param = final
    chunk = read_chunk(response)
    result = InferResult(response)
    expected = result.as_numpy("text_output")
    assert chunk.text == b"".join(expected.reshape(-1)).decode("utf-8", errors="replace")
    assert (chunk.prompt_tokens, chunk.completion_tokens, chunk.final) == (7, 3, final)


@pytest.mark.parametrize("datatype, layout", [("INT32", "<i"), ("INT64", "<q"), ("UINT32", "<I")])
def test_token_counts_read_by_their_datatype(datatype, layout):
    response = service_pb2.ModelInferResponse()
    response.outputs.add(name="num_output_tokens", datatype=datatype, shape=[1, 1])
    response.raw_output_contents.append(struct.pack(layout, 70_000))
    assert read_chunk(response).completion_tokens == 70_000


def test_a_count_of_a_datatype_nobody_sends_is_the_engines_fault():
    response = service_pb2.ModelInferResponse()
    response.outputs.add(name="num_input_tokens", datatype="FP32", shape=[1, 1])
    response.raw_output_contents.append(struct.pack("<f", 3.0))
    with pytest.raises(errors.Internal, match="num_input_tokens is FP32"):
        read_chunk(response)


def _logprob_response(tokens: list[bytes], logprobs: list[float], top_tokens: list[bytes],
                      top_logprobs: list[float]) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse()
    for name, datatype, values in (
            ("output_log_probs", "FP32", np.array([logprobs], dtype=np.float32)),
            ("output_tokens", "BYTES", np.array([tokens], dtype=np.object_)),
            ("top_log_probs", "FP32", np.array([top_logprobs], dtype=np.float32)),
            ("top_log_prob_tokens", "BYTES", np.array([top_tokens], dtype=np.object_))):
        response.outputs.add(name=name, datatype=datatype, shape=list(values.shape))
        response.raw_output_contents.append(
            (serialize_byte_tensor(values).item() if values.size else b"")
            if datatype == "BYTES" else values.tobytes())
    return response


def test_log_probabilities_are_read_token_by_token_with_their_top_ones():
    request = build_request(EngineRequest("m", "r", "p", 4, top_logprobs=2))
    assert {o.name for o in request.outputs} >= {"output_log_probs", "top_log_prob_tokens"}
    chunk = read_chunk(_logprob_response(
        [b" Paris", b"\xe2\x98"], [-0.25, -1.5], [b" Paris", b" Lyon", b"\xe2\x98", b"."],
        [-0.25, -2.0, -1.5, -1.75]))
    first, second = chunk.logprobs
    assert (first.token, first.token_bytes, first.logprob) == (" Paris", b" Paris", -0.25)
    assert [(t.token, t.logprob) for t in first.top] == [(" Paris", -0.25), (" Lyon", -2.0)]
    assert second.token == "\ufffd" and second.token_bytes == b"\xe2\x98"
    assert [t.token for t in second.top] == ["\ufffd", "."]
    assert read_chunk(_logprob_response([], [], [], [])).logprobs == ()
    with pytest.raises(errors.Internal):  # three top entries for two tokens
        read_chunk(_logprob_response([b"a", b"b"], [-1.0, -1.0], [b"a", b"b", b"c"],
                                     [-1.0, -1.0, -1.0]))
    assert "return_log_probs" not in {i.name for i in build_request(
        EngineRequest("m", "r", "p", 4)).inputs}
