"""`AsyncClient`: the inference API over one grpc.aio channel, with retries, deadlines and one
multiplexed `GenerateStream` for every streamed generation."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import grpc

from infermesh_client import __version__, _proto
from infermesh_client._admin import AsyncAdmin, AsyncAudit, AsyncRegistry, ServiceCalls
from infermesh_client._calls import Deadline, Metadata, call_with_retries, serialize
from infermesh_client._codec import (
    GenerationArgs,
    MessageLike,
    from_final,
    from_response,
    generation_args,
    model_info,
)
from infermesh_client._config import Endpoint, resolve
from infermesh_client._errors import Cancelled, DeadlineExceeded, InfermeshError
from infermesh_client._errors import (
    from_final as error_from_final,
)
from infermesh_client._multiplex import StreamMultiplexer
from infermesh_client._retry import RetryPolicy
from infermesh_client._types import Delta, Generation, ModelInfo

_METHOD = f"/{_proto.INFERENCE_SERVICE}/"
# How long past a streamed generation's deadline the client waits for the gateway's own Final
# (finish_reason deadline) before it cancels the generation and raises by itself.
DEADLINE_GRACE_S = 1.0
STREAM_MAX_AGE = "stream_max_age"  # the gateway's reason for refusing a Start on an old call


class AsyncClient:
    """The inference API for asyncio code. One client holds one channel (one HTTP/2
    connection) to the gateway and one `GenerateStream` that all of its `stream()` calls
    share; create it once and reuse it, and close it (`async with`, or `await client.close()`).
    The admin surface is `admin` (tenants, keys), `registry` (versions, rollouts) and `audit`
    (queries), with the same errors and retries; the registry and the auditor get a channel
    of their own when first used.

    `target`, `api_key`, `tls` and `root_certificates` default to INFERMESH_GATEWAY,
    INFERMESH_API_KEY, INFERMESH_TLS and INFERMESH_TLS_CA_FILE, then the local stack's env file
    (see `infermesh_client._config`); `registry_target` and `auditor_target` (for `registry`
    and `audit`) to INFERMESH_REGISTRY and INFERMESH_AUDITOR, then the env file, with the CA
    and client certificate (INFERMESH_TLS_CERT_FILE/_KEY_FILE, which those internal services
    ask for) of their own source. Each endpoint is resolved when first used, so a client of the
    registry or the auditor alone needs no gateway. `certificate_chain` and `private_key` (PEM)
    are a client certificate given directly; like `root_certificates`, they win over the files.
    `timeout`: the default deadline of every call, in seconds (None: the gateway's default for
    generations, 10 s for other calls).
    """

    def __init__(
        self, target: Optional[str] = None, api_key: Optional[str] = None, *,
        tls: Optional[bool] = None, root_certificates: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None, private_key: Optional[bytes] = None,
        timeout: Optional[float] = None, retry: RetryPolicy = RetryPolicy(),
        channel_options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        registry_target: Optional[str] = None, auditor_target: Optional[str] = None,
    ):
        self._api_key = api_key
        self._tls_argument = tls
        # Each endpoint is resolved when first used: a client of the registry alone (an admin
        # tool) needs no gateway.
        self._targets = {"gateway": target, "registry": registry_target,
                         "auditor": auditor_target}
        self._endpoints: dict[str, Endpoint] = {}
        self._client_tls = (root_certificates, private_key, certificate_chain)
        self._timeout = timeout
        self._retry = retry
        self._options = (("grpc.primary_user_agent", f"infermesh-client-python/{__version__}"),
                         *channel_options)
        self._interceptors = list(interceptors)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._mux: Optional[StreamMultiplexer] = None
        self._closed = False
        self._inference = ServiceCalls(self, "gateway", _proto.INFERENCE_SERVICE)
        # Tenants and keys (`admin.tenants`, `admin.keys`) are served by the gateway.
        self.admin = AsyncAdmin(ServiceCalls(self, "gateway", "infermesh.v1.TenantAdmin"))
        self.registry = AsyncRegistry(ServiceCalls(self, "registry", "infermesh.v1.Registry"))
        self.audit = AsyncAudit(ServiceCalls(self, "auditor", "infermesh.v1.Auditor"))

    # -- the channels ------------------------------------------------------------------------

    def _service_channel(self, service: str) -> tuple[grpc.aio.Channel, Metadata]:
        """The channel to `service` (gateway, registry, auditor), opened on first use, and the
        metadata that carries the key that came with its endpoint."""
        if self._closed:
            raise RuntimeError("the client is closed")
        endpoint = self._endpoint(service)
        if service not in self._channels:
            if endpoint.tls:
                credentials = grpc.ssl_channel_credentials(*endpoint.tls_material(
                    *self._client_tls))
                self._channels[service] = grpc.aio.secure_channel(
                    endpoint.target, credentials,
                    options=(*self._options, *_server_identity(service)),
                    interceptors=self._interceptors)
            else:
                self._channels[service] = grpc.aio.insecure_channel(
                    endpoint.target, options=self._options, interceptors=self._interceptors)
        return self._channels[service], _authorization(endpoint)

    def _endpoint(self, service: str) -> Endpoint:
        if service not in self._endpoints:
            self._endpoints[service] = resolve(self._targets[service], self._api_key,
                                               self._tls_argument, service=service)
        return self._endpoints[service]

    @property
    def target(self) -> str:
        """The gateway's host:port (ConfigurationError when none is given or found)."""
        return self._endpoint("gateway").target

    def _open_channel(self) -> grpc.aio.Channel:
        return self._service_channel("gateway")[0]

    def _unary(self, name: str, response: Any) -> Any:
        return self._open_channel().unary_unary(
            _METHOD + name, request_serializer=serialize,
            response_deserializer=response.FromString)

    def _multiplexer(self) -> StreamMultiplexer:
        if self._mux is None:
            method = self._open_channel().stream_stream(
                _METHOD + "GenerateStream", request_serializer=serialize,
                response_deserializer=_proto.ServerFrame.FromString)
            metadata = self._service_channel("gateway")[1]
            self._mux = StreamMultiplexer(lambda frames: method(frames, metadata=metadata))
        return self._mux

    async def close(self) -> None:
        """Cancels every running streamed generation and closes the channel."""
        if self._closed:
            return
        self._closed = True
        if self._mux is not None:
            await self._mux.close()
        for channel in self._channels.values():
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- generations -------------------------------------------------------------------------

    async def generate(
        self, model: str, prompt: Optional[str] = None, *,
        messages: Optional[Iterable[MessageLike]] = None, max_tokens: Optional[int] = None,
        temperature: Optional[float] = None, top_p: Optional[float] = None,
        top_k: Optional[int] = None, seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None, min_tokens: Optional[int] = None,
        timeout: Optional[float] = None, user: str = "", priority: str = "",
        request_id: Optional[str] = None, idempotency_key: Optional[str] = None,
        retry: Optional[RetryPolicy] = None,
    ) -> Generation:
        """One whole generation (the unary `Generate`). `timeout` (seconds) is both the
        request's deadline and the gRPC deadline, across retries. Raises an `InfermeshError`."""
        args = generation_args(
            model, prompt, messages, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, min_tokens=min_tokens, user=user,
            priority=priority, request_id=request_id, idempotency_key=idempotency_key)
        call = self._unary("Generate", _proto.GenerateResponse)
        metadata = self._service_channel("gateway")[1]
        reply = await call_with_retries(
            lambda remaining: call(args.request(remaining), timeout=remaining,
                                   metadata=metadata),
            Deadline(self._timeout if timeout is None else timeout), retry or self._retry,
            args.request_id)
        return from_response(reply)

    def stream(
        self, model: str, prompt: Optional[str] = None, *,
        messages: Optional[Iterable[MessageLike]] = None, max_tokens: Optional[int] = None,
        temperature: Optional[float] = None, top_p: Optional[float] = None,
        top_k: Optional[int] = None, seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None, min_tokens: Optional[int] = None,
        timeout: Optional[float] = None, user: str = "", priority: str = "",
        request_id: Optional[str] = None, idempotency_key: Optional[str] = None,
        retry: Optional[RetryPolicy] = None,
    ) -> AsyncGenerationStream:
        """A streamed generation on the client's shared `GenerateStream`: an async iterator of
        `Delta`s, the last of which carries the `Generation`. Use it in `async with`, so that
        leaving early cancels the generation on the server."""
        args = generation_args(
            model, prompt, messages, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, min_tokens=min_tokens, user=user,
            priority=priority, request_id=request_id, idempotency_key=idempotency_key)
        return AsyncGenerationStream(self, args, self._timeout if timeout is None else timeout,
                                     retry or self._retry)

    # -- models ------------------------------------------------------------------------------

    async def models(self, *, timeout: Optional[float] = None) -> list[ModelInfo]:
        """Every model this gateway serves now."""
        reply = await self._inference.unary("ListModels", _proto.ListModelsRequest(), timeout)
        return [model_info(m) for m in reply.models]

    async def model(self, name: str, *, timeout: Optional[float] = None) -> ModelInfo:
        """One model (NotFound when the gateway serves none of that name)."""
        reply = await self._inference.unary("GetModel", _proto.GetModelRequest(name=name),
                                            timeout)
        return model_info(reply)


def _server_identity(service: str) -> tuple[tuple[str, str], ...]:
    """The public gateway is checked by the address dialled; the registry and the auditor are
    mesh services, whose certificates name their identity (`registry.infermesh`) and no
    address (a pod's or a loopback port's is not stable)."""
    if service == "gateway":
        return ()
    return (("grpc.ssl_target_name_override", f"{service}.infermesh"),)


def _authorization(endpoint: Endpoint) -> Metadata:
    return (("authorization", f"Bearer {endpoint.api_key}"),) if endpoint.api_key else ()


def _forget(mux_ref: weakref.ReferenceType[StreamMultiplexer], loop: asyncio.AbstractEventLoop,
            request_id: str) -> None:
    """A stream dropped without closing: cancel it on the server from the loop's thread."""
    mux = mux_ref()
    if mux is not None and not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(mux.cancel, request_id, forget=True)


class AsyncGenerationStream:
    """One streamed generation. Iterate it for `Delta`s; `result` holds the `Generation` once
    the last delta arrived. `async with` (or `aclose()`) cancels it on the server when it has
    not finished; `cancel()` asks the server to stop and keeps iterating up to its Final."""

    def __init__(self, client: AsyncClient, args: GenerationArgs, timeout: Optional[float],
                 retry: RetryPolicy):
        self._client = client
        self._args = args
        self._deadline = Deadline(timeout)
        self._retry = retry
        self._queue: Optional[asyncio.Queue[Any]] = None
        self._pieces: list[str] = []
        self._model_version = ""
        self._attempt = 1
        self._waited = 0.0
        self._done = False
        self._finalizer: Optional[weakref.finalize] = None
        self.result: Optional[Generation] = None
        self.request_id = args.request_id

    def _send_start(self) -> None:
        mux = self._client._multiplexer()
        self._queue = mux.start(self._args.request(self._deadline.remaining()))
        if self._finalizer is None:
            self._finalizer = weakref.finalize(
                self, _forget, weakref.ref(mux), asyncio.get_running_loop(), self.request_id)

    async def __aenter__(self) -> AsyncGenerationStream:
        if self._queue is None:
            self._send_start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        if self._queue is None:
            self._send_start()
        while True:
            item = await self._next()
            if isinstance(item, InfermeshError):
                self._finish()
                raise item
            kind = item.WhichOneof("frame")
            if kind == "accepted":
                self._model_version = item.accepted.model_version
            elif kind == "tokens":
                self._pieces.append(item.tokens.text)
                return Delta(item.tokens.text)
            elif kind == "final":
                self._client._multiplexer().finished(self.request_id)
                delta = await self._on_final(item.final)
                if delta is not None:
                    return delta

    async def _on_final(self, final: Any) -> Optional[Delta]:
        """The Delta that ends the stream, None after sending a retry, or raises."""
        generation = from_final(final, "".join(self._pieces), self._model_version)
        if generation.finish_reason not in ("error", "deadline"):
            self._finish()
            self.result = generation
            return Delta("", generation)
        error = error_from_final(final, generation)
        if error.reason == STREAM_MAX_AGE:  # this call takes no more Starts: a new one will
            self._client._multiplexer().retire()
        if not self._pieces:  # nothing was sent yet: a refusal, maybe worth retrying
            delay = self._retry.delay(error, self._attempt, self._waited,
                                      self._deadline.remaining())
            if delay is not None:
                await asyncio.sleep(delay)
                self._attempt, self._waited = self._attempt + 1, self._waited + delay
                self._send_start()
                return None
        self._finish()
        raise error

    async def _next(self) -> Any:
        """The next frame or error, or DeadlineExceeded once the deadline (plus a grace for
        the gateway's own Final) has passed."""
        assert self._queue is not None
        remaining = self._deadline.remaining()
        if remaining is None or not self._queue.empty():
            return await self._queue.get()
        getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({getter}, timeout=max(remaining + DEADLINE_GRACE_S, 0))
        if getter in done:
            return getter.result()
        getter.cancel()
        self._client._multiplexer().cancel(self.request_id, forget=True)
        return DeadlineExceeded("the call's deadline passed", request_id=self.request_id)

    def _finish(self) -> None:
        self._done = True
        if self._finalizer is not None:
            self._finalizer.detach()

    async def cancel(self) -> None:
        """Asks the server to stop; iteration goes on up to the Final (finish_reason
        "cancelled") with what was generated so far."""
        if not self._done and self._queue is not None:
            self._client._multiplexer().cancel(self.request_id, forget=False)

    async def aclose(self) -> None:
        """Leaves the stream; a generation still running is cancelled on the server."""
        if self._done:
            return
        self._finish()
        if self._queue is not None and self._client._mux is not None:
            self._client._mux.cancel(self.request_id, forget=True)

    async def until_done(self) -> Generation:
        """Reads the rest of the stream and returns the `Generation`."""
        async for _ in self:
            pass
        if self.result is None:
            raise Cancelled("the stream was closed before it finished", request_id=self.request_id)
        return self.result
