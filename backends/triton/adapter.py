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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
from tritonclient.grpc import InferenceServerException
from tritonclient.grpc import aio as triton_aio

from services.common import errors

OUTPUTS = ("text_output", "num_input_tokens", "num_output_tokens")
# The liveness probe input our Python-backend engines declare, and the words they refuse with
# once their engine stopped (backends/triton/decoupled_model.py).
PROBE_INPUT = "infermesh_probe"
ENGINE_STOPPED = "engine stopped"


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


@dataclass
class EngineChunk:
    """One response: the new text, and the running counts the engine reports."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    final: bool


@dataclass
class _Tensors:
    inputs: list[triton_aio.InferInput] = field(default_factory=list)

    def add(self, name: str, datatype: str, value: np.ndarray) -> None:
        tensor = triton_aio.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        self.inputs.append(tensor)


def build_inputs(request: EngineRequest) -> list[triton_aio.InferInput]:
    """The request as TensorRT-LLM tensors: batch of one, so a `dims: [1]` input is `[1, 1]`."""
    tensors = _Tensors()
    tensors.add("text_input", "BYTES", np.array([[request.prompt.encode()]], dtype=np.object_))
    tensors.add("max_tokens", "INT32", np.array([[request.max_tokens]], dtype=np.int32))
    tensors.add("stream", "BOOL", np.array([[True]], dtype=bool))
    scalars = (
        ("temperature", "FP32", np.float32, request.temperature),
        ("top_p", "FP32", np.float32, request.top_p),
        ("top_k", "INT32", np.int32, request.top_k),
        ("seed", "UINT64", np.uint64, request.seed),
        ("min_tokens", "INT32", np.int32, request.min_tokens),
        ("repetition_penalty", "FP32", np.float32, request.repetition_penalty),
        ("presence_penalty", "FP32", np.float32, request.presence_penalty),
        ("frequency_penalty", "FP32", np.float32, request.frequency_penalty),
    )
    for name, datatype, dtype, value in scalars:
        if value is not None:
            tensors.add(name, datatype, np.array([[value]], dtype=dtype))
    for name, words in (("stop_words", request.stop), ("bad_words", request.bad_words)):
        if words:
            tensors.add(name, "BYTES", np.array([[w.encode() for w in words]], dtype=np.object_))
    if request.cache_salt:
        tensors.add("cache_salt", "BYTES", np.array([[request.cache_salt.encode()]],
                                                    dtype=np.object_))
    for name in ("return_num_input_tokens", "return_num_output_tokens"):
        tensors.add(name, "BOOL", np.array([[True]], dtype=bool))
    return tensors.inputs


def _scalar(result: triton_aio.InferResult, name: str) -> int:
    value = result.as_numpy(name)
    return int(value.reshape(-1)[0]) if value is not None and value.size else 0


def _text(result: triton_aio.InferResult) -> str:
    value = result.as_numpy("text_output")
    if value is None or not value.size:
        return ""
    raw = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in value.reshape(-1))
    return raw.decode("utf-8", errors="replace")


def _is_final(result: triton_aio.InferResult) -> bool:
    parameter = result.get_response().parameters.get("triton_final_response")
    return bool(parameter is not None and parameter.bool_param)


class TritonAdapter:
    """Streams generations from Triton replicas; holds one client per endpoint."""

    def __init__(self) -> None:
        self._clients: dict[str, triton_aio.InferenceServerClient] = {}

    def client(self, endpoint: str) -> triton_aio.InferenceServerClient:
        client = self._clients.get(endpoint)
        if client is None:
            client = triton_aio.InferenceServerClient(endpoint)
            self._clients[endpoint] = client
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        self._clients.clear()

    async def generate(self, endpoint: str, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Yields chunks until the engine's final response.

        Raises `errors.Unavailable` when the replica cannot be reached (safe to retry elsewhere
        before the first chunk) and `errors.Internal` when the engine reports an error. Cancelling
        the caller cancels the Triton request.
        """
        inputs = build_inputs(request)
        outputs = [triton_aio.InferRequestedOutput(name) for name in OUTPUTS]

        async def one_request():
            yield {
                "model_name": request.triton_model_name,
                "inputs": inputs,
                "outputs": outputs,
                "request_id": request.request_id,
            }

        responses = self.client(endpoint).stream_infer(one_request())
        last: EngineChunk | None = None
        engine_error: errors.MeshError | None = None
        finished = False
        try:
            async for result, error in responses:
                if error is not None:  # the engine's final answer; read on until the stream ends
                    engine_error = (
                        errors.Unavailable(f"replica {endpoint}: {error.message()}",
                                           retry_after_s=1.0)
                        if engine_process_gone(error.message())
                        else errors.Internal(f"engine error: {error.message()}"))
                    finished = True
                    continue
                chunk = EngineChunk(
                    text=_text(result),
                    prompt_tokens=_scalar(result, "num_input_tokens"),
                    completion_tokens=_scalar(result, "num_output_tokens"),
                    final=_is_final(result),
                )
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
        except InferenceServerException as exc:
            raise errors.Unavailable(f"replica {endpoint}: {exc.message()}") from exc
        finally:
            if not finished:
                responses.cancel()


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
