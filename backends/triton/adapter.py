"""The gateway's side of Triton: one streamed generation over `ModelStreamInfer`, speaking the
TensorRT-LLM `ensemble` tensor interface (`text_input`, `max_tokens`, `stream`, sampling inputs →
`text_output`, `num_input_tokens`, `num_output_tokens`).

One gRPC stream per generation, so cancelling it (client Cancel, disconnect, deadline) cancels
exactly that Triton request, which frees its KV-cache slot. The stream is read until Triton ends
it: closing early is what leaves Triton unable to unload a model (ENVIRONMENT.md, Trap 4).
Channels are long-lived, one per replica endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
from tritonclient.grpc import aio as triton_aio
from tritonclient.grpc import service_pb2

from services.common import errors, telemetry, tls
from services.common.logprobs import TokenLogprob, TopLogprob

OUTPUTS = ("text_output", "num_input_tokens", "num_output_tokens")
# Asked for only with `return_log_probs`: each response's tokens' log probabilities (TensorRT-LLM's
# `output_log_probs`), their bytes, and the top ones' (flattened, the same number per token).
LOGPROB_OUTPUTS = ("output_log_probs", "output_tokens", "top_log_probs", "top_log_prob_tokens")
# tritonclient's own channel settings: no message size limit, its keepalive defaults.
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.keepalive_time_ms", 2**31 - 1),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 2),
)
# The liveness probe input our Python-backend engines declare, and the words they refuse with
# once their engine stopped (backends/triton/decoupled_model.py).
PROBE_INPUT = "infermesh_probe"
ENGINE_STOPPED = "engine stopped"
# The words they refuse a request with that they cannot run (a prompt that never fits): the
# client's INVALID_ARGUMENT, not the mesh's INTERNAL.
REQUEST_REFUSED = "request refused: "


def engine_process_gone(message: str) -> bool:
    """Whether a Triton error says the model's engine no longer runs — the Python backend's stub
    crashed, or our engine's dispatcher ended: every request to that model fails until it is
    reloaded, so it is the replica's failure, not the request's."""
    return ((message.startswith("Stub process") and "is not healthy" in message)
            or message.startswith(ENGINE_STOPPED))


@dataclass(frozen=True)
class EngineRequest:
    """What one generation asks of the engine; None means "the engine's default"."""

    triton_model_name: str
    request_id: str
    prompt: str
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()
    bad_words: tuple[str, ...] = ()
    cache_salt: str = ""  # sent only when set: only engines with a prefix cache declare it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ascending by id
    top_logprobs: int | None = None  # None: no log probabilities; 0..20 top ones per token
    # Structured output, in TensorRT-LLM's terms (services/common/structured_output.py):
    # "json" or "json_schema" (with the schema's text as the guide); "" for free text.
    guided_decoding_guide_type: str = ""
    guided_decoding_guide: str = ""
    # Ask for `output_ids` (engines that can continue a generation declare it), and continue a
    # generation after these ids (`continue_ids`, mid-stream failover): `max_tokens` then counts
    # the new tokens only.
    return_output_ids: bool = False
    continue_ids: tuple[int, ...] = ()


@dataclass
class EngineChunk:
    """One response: the new text, and the running counts the engine reports."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    final: bool
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens this response adds, when asked
    token_ids: tuple[int, ...] = ()  # generated since the last chunk (when asked for)


@dataclass
class _Tensors:
    inputs: list[triton_aio.InferInput] = field(default_factory=list)

    def add(self, name: str, datatype: str, value: np.ndarray) -> None:
        tensor = triton_aio.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        self.inputs.append(tensor)


# Optional scalar inputs, by their Triton datatype and raw (little-endian) layout.
_SCALARS = (
    ("temperature", "FP32", "<f"),
    ("top_p", "FP32", "<f"),
    ("top_k", "INT32", "<i"),
    ("seed", "UINT64", "<Q"),
    ("min_tokens", "INT32", "<i"),
    ("repetition_penalty", "FP32", "<f"),
    ("presence_penalty", "FP32", "<f"),
    ("frequency_penalty", "FP32", "<f"),
)
_TRUE = b"\x01"


def _bytes_element(value: bytes) -> bytes:
    """A BYTES tensor element in Triton's raw encoding: its 4-byte length, then it."""
    return struct.pack("<I", len(value)) + value


def build_request(request: EngineRequest) -> service_pb2.ModelInferRequest:
    """The request as TensorRT-LLM tensors, batch of one (a `dims: [1]` input is `[1, 1]`), in
    Triton's raw encoding: byte for byte what tritonclient's `InferInput`s make of numpy
    arrays, at a sixth of the cost (docs/benchmarks.md, "The gateway's own cost")."""
    message = service_pb2.ModelInferRequest(model_name=request.triton_model_name,
                                            id=request.request_id)
    raw = message.raw_input_contents

    def add(name: str, datatype: str, content: bytes, count: int = 1) -> None:
        message.inputs.add(name=name, datatype=datatype, shape=(1, count))
        raw.append(content)

    add("text_input", "BYTES", _bytes_element(request.prompt.encode()))
    add("max_tokens", "INT32", struct.pack("<i", request.max_tokens))
    add("stream", "BOOL", _TRUE)
    for name, datatype, layout in _SCALARS:
        value = getattr(request, name)
        if value is not None:
            add(name, datatype, struct.pack(layout, value))
    for name, words in (("stop_words", request.stop), ("bad_words", request.bad_words)):
        if words:
            add(name, "BYTES", b"".join(_bytes_element(w.encode()) for w in words), len(words))
    if request.logit_bias:
        count = len(request.logit_bias)
        add("logit_bias_token_ids", "INT32",
            struct.pack(f"<{count}i", *(t for t, _ in request.logit_bias)), count)
        add("logit_bias_values", "FP32",
            struct.pack(f"<{count}f", *(b for _, b in request.logit_bias)), count)
    if request.cache_salt:
        add("cache_salt", "BYTES", _bytes_element(request.cache_salt.encode()))
    if request.guided_decoding_guide_type:
        add("guided_decoding_guide_type", "BYTES",
            _bytes_element(request.guided_decoding_guide_type.encode()))
        add("guided_decoding_guide", "BYTES",
            _bytes_element(request.guided_decoding_guide.encode()))
    if request.continue_ids:
        add("continue_ids", "INT32",
            struct.pack(f"<{len(request.continue_ids)}i", *request.continue_ids),
            len(request.continue_ids))
    add("return_num_input_tokens", "BOOL", _TRUE)
    add("return_num_output_tokens", "BOOL", _TRUE)
    outputs = OUTPUTS
    if request.top_logprobs is not None:
        add("return_log_probs", "BOOL", _TRUE)
        add("num_top_log_probs", "INT32", struct.pack("<i", request.top_logprobs))
        outputs += LOGPROB_OUTPUTS
    for name in outputs:
        message.outputs.add(name=name)
    if request.return_output_ids:
        message.outputs.add(name="output_ids")
    return message


# How a token count is laid out in Triton's raw encoding, by the output's datatype: our engines
# send INT32 (TensorRT-LLM's ensemble too), and the counts read the same in any of these.
_COUNT_FORMATS = {datatype: struct.Struct(layout) for datatype, layout in (
    ("INT32", "<i"), ("INT64", "<q"), ("UINT32", "<I"), ("UINT64", "<Q"))}


def _count(tensor: service_pb2.ModelInferResponse.InferOutputTensor, content: bytes) -> int:
    """The count in `content`; 0 when the response carries none (an empty final answer)."""
    if not content:
        return 0
    layout = _COUNT_FORMATS.get(tensor.datatype)
    if layout is None or len(content) < layout.size:
        raise errors.Internal(f"the engine's {tensor.name} is {tensor.datatype} of "
                              f"{len(content)} bytes, not one integer")
    return layout.unpack_from(content)[0]


def _bytes_elements(content: bytes) -> list[bytes]:
    pieces, offset = [], 0
    while offset + 4 <= len(content):
        (length,) = struct.unpack_from("<I", content, offset)
        pieces.append(content[offset + 4:offset + 4 + length])
        offset += 4 + length
    return pieces


def _floats(content: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(content) // 4}f", content[: len(content) // 4 * 4]))


def read_chunk(response: service_pb2.ModelInferResponse) -> EngineChunk:
    """One streamed response: its text (every BYTES element, concatenated), the counts, the
    token ids and the log probabilities when they were asked for."""
    text, prompt_tokens, completion_tokens, token_ids = b"", 0, 0, ()
    logprob_columns: dict[str, bytes] = {}
    for tensor, content in zip(response.outputs, response.raw_output_contents, strict=False):
        if tensor.name == "text_output":
            text = b"".join(_bytes_elements(content))
        elif tensor.name == "num_input_tokens":
            prompt_tokens = _count(tensor, content)
        elif tensor.name == "num_output_tokens":
            completion_tokens = _count(tensor, content)
        elif tensor.name in LOGPROB_OUTPUTS:
            logprob_columns[tensor.name] = content
        elif tensor.name == "output_ids":
            token_ids = _token_ids(tensor, content)
    final = response.parameters.get("triton_final_response")
    return EngineChunk(text=text.decode("utf-8", errors="replace"), prompt_tokens=prompt_tokens,
                       completion_tokens=completion_tokens,
                       final=bool(final is not None and final.bool_param),
                       logprobs=_logprobs(logprob_columns), token_ids=token_ids)


def _token_ids(tensor: service_pb2.ModelInferResponse.InferOutputTensor,
               content: bytes) -> tuple[int, ...]:
    """`output_ids`: INT32 (ours, TensorRT-LLM's) or any integer layout of `_COUNT_FORMATS`."""
    layout = _COUNT_FORMATS.get(tensor.datatype)
    if layout is None or len(content) % layout.size:
        raise errors.Internal(f"the engine's output_ids is {tensor.datatype} of {len(content)} "
                              f"bytes, not integers")
    return tuple(value for (value,) in layout.iter_unpack(content))


def _logprobs(columns: dict[str, bytes]) -> tuple[TokenLogprob, ...]:
    """The four log-probability outputs as one entry per token; INTERNAL when they disagree."""
    if not columns:
        return ()
    logprobs = _floats(columns.get("output_log_probs", b""))
    tokens = _bytes_elements(columns.get("output_tokens", b""))
    top_logprobs = _floats(columns.get("top_log_probs", b""))
    top_tokens = _bytes_elements(columns.get("top_log_prob_tokens", b""))
    count = len(logprobs)
    if len(tokens) != count or len(top_tokens) != len(top_logprobs) or (
            count and len(top_logprobs) % count) or (not count and top_logprobs):
        raise errors.Internal("the engine's log probabilities do not pair up with its tokens")
    per = len(top_logprobs) // count if count else 0
    return tuple(
        TokenLogprob(
            tokens[i].decode("utf-8", errors="replace"), tokens[i], logprobs[i],
            tuple(TopLogprob(top_tokens[j].decode("utf-8", errors="replace"), top_tokens[j],
                             top_logprobs[j]) for j in range(i * per, (i + 1) * per)))
        for i in range(count))


def triton_client(endpoint: str, mesh_tls: tls.MeshTls | None
                  ) -> triton_aio.InferenceServerClient:
    """tritonclient's client of the Triton at `endpoint` (the sidecar's control calls): mutual
    TLS checking the server is `triton.infermesh`, with this process's certificate; plaintext
    in development."""
    if mesh_tls is None:
        return triton_aio.InferenceServerClient(endpoint)
    return triton_aio.InferenceServerClient(
        endpoint, creds=mesh_tls.channel_credentials(),
        channel_args=[*CHANNEL_OPTIONS, *tls.channel_options("triton", mesh_tls)])


# Triton's streaming method. A generation sends one request on it, so the gateway calls it as
# unary-stream: the wire is the same HTTP/2 stream (headers, one message, half-close), but
# grpc.aio sends all three in one batch, where a stream-stream call costs a task to start it and
# three writes (docs/decisions.md, "The gateway's own cost").
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


class TritonAdapter:
    """Streams generations from Triton replicas; holds one channel per endpoint."""

    def __init__(self, mesh_tls: tls.MeshTls | None) -> None:
        """`mesh_tls`: this process's certificate and the mesh's CA (None: plaintext)."""
        self._mesh_tls = mesh_tls
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stream_infer: dict[str, grpc.aio.UnaryStreamMultiCallable] = {}

    def _stream_infer_at(self, endpoint: str) -> grpc.aio.UnaryStreamMultiCallable:
        method = self._stream_infer.get(endpoint)
        if method is None:
            channel = tls.channel(endpoint, "triton", self._mesh_tls, CHANNEL_OPTIONS)
            self._channels[endpoint] = channel
            method = self._stream_infer[endpoint] = channel.unary_stream(
                STREAM_INFER,
                request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        return method

    async def close(self) -> None:
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()
        self._stream_infer.clear()

    async def generate(self, endpoint: str, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Yields chunks until the engine's final response.

        Raises `errors.Unavailable` when the replica cannot be reached (safe to retry elsewhere
        before the first chunk) and `errors.Internal` when the engine reports an error. Cancelling
        the caller cancels the Triton request.
        """
        # The generation's engine span goes to Triton as `traceparent` (None: tracing is off).
        call = self._stream_infer_at(endpoint)(build_request(request),
                                               metadata=telemetry.outgoing_metadata())
        last: EngineChunk | None = None
        engine_error: errors.MeshError | None = None
        finished = False
        try:
            async for response in call:
                if response.error_message:  # the engine's final answer; read on to the end
                    message = response.error_message
                    engine_error = engine_failure(endpoint, message)
                    finished = True
                    continue
                chunk = read_chunk(response.infer_response)
                if chunk.final:
                    # Hold the final chunk until Triton ends the stream, so the stream is always
                    # drained even when the caller stops reading at the final chunk.
                    last, finished = chunk, True
                else:
                    yield chunk
            if engine_error is not None:
                raise engine_error
            if last is None:
                raise errors.Unavailable("the engine ended the stream without a final response")
            yield last
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, endpoint) from exc
        finally:
            if not finished:
                call.cancel()


# The request fields an engine names first when it refuses one of them ("top_p must be in ...");
# any other refusal is about the prompt (the KV cache or the context window cannot hold it).
_REFUSABLE_FIELDS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                     "logit_bias", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "top_logprobs")
# Engine inputs that are a request field under another name.
_FIELD_OF_INPUT = {"guided_decoding_guide": "response_format",
                   "guided_decoding_guide_type": "response_format"}


def _refused_field(reason: str) -> str:
    first = reason.split(" ", 1)[0]
    if first in _FIELD_OF_INPUT:
        return _FIELD_OF_INPUT[first]
    return first if first in _REFUSABLE_FIELDS else "prompt"


def engine_failure(endpoint: str, message: str) -> errors.MeshError:
    """What an engine's error response means: the replica's failure (Unavailable: retry
    elsewhere), a request the engine cannot run (InvalidArgument: the client's to fix), or the
    engine's own fault (Internal)."""
    if engine_process_gone(message):
        return errors.Unavailable(f"replica {endpoint}: {message}", retry_after_s=1.0)
    if message.startswith(REQUEST_REFUSED):
        reason = message[len(REQUEST_REFUSED):]
        return errors.InvalidArgument.relayed(
            _refused_field(reason), f"the engine cannot run this request: {reason}")
    return errors.Internal(f"engine error: {message}")


def _rpc_error(exc: grpc.aio.AioRpcError, endpoint: str) -> errors.MeshError:
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
        return errors.Unavailable(f"replica {endpoint} is unreachable: {exc.details()}",
                                  retry_after_s=1.0)
    return errors.Internal(f"replica {endpoint}: {exc.code().name}: {exc.details()}")


async def probe_engine(
    client: triton_aio.InferenceServerClient, model: str, timeout_s: float
) -> str | None:
    """Asks `model`'s engine process whether it is alive (`execute()` answers a probe at once,
    without generating); None when it answered, else Triton's error message. Raises TimeoutError
    past `timeout_s`."""
    tensors = _Tensors()
    tensors.add("text_input", "BYTES", np.array([[b""]], dtype=np.object_))
    tensors.add("max_tokens", "INT32", np.array([[1]], dtype=np.int32))
    tensors.add(PROBE_INPUT, "BOOL", np.array([[True]], dtype=bool))

    async def one_request():
        yield {"model_name": model, "inputs": tensors.inputs, "request_id": "infermesh-probe"}

    failure: str | None = None
    responses = client.stream_infer(one_request())
    ended = False
    try:
        async with asyncio.timeout(timeout_s):
            async for _result, error in responses:  # read to the stream's end (Trap 4)
                if error is not None:
                    failure = error.message()
        ended = True
    finally:
        if not ended:
            responses.cancel()
    return failure
