"""`Client`: the blocking API, an `AsyncClient` run on an event loop in a thread of its own, so
both behave the same (one channel, one shared `GenerateStream`, the same retries)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from typing import Any, Optional, TypeVar, Union

import grpc

from infermesh_client._async_client import AsyncClient, AsyncGenerationStream
from infermesh_client._codec import MessageLike
from infermesh_client._retry import RetryPolicy
from infermesh_client._sync_admin import Admin, Audit, Registry
from infermesh_client._types import Delta, Generation, ModelInfo

T = TypeVar("T")


class _LoopThread:
    """An event loop running in a daemon thread; `run` blocks the caller until a coroutine
    finishes there. Closing stops the loop and joins the thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever,
                                        name="infermesh-client", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coroutine.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        self.loop.close()


class Client:
    """The inference API for blocking code; see `AsyncClient` for the arguments. Safe to share
    between threads: every call runs on the client's own loop."""

    def __init__(
        self, target: Optional[str] = None, api_key: Optional[str] = None, *,
        tls: Optional[bool] = None, root_certificates: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None, private_key: Optional[bytes] = None,
        timeout: Optional[float] = None, retry: RetryPolicy = RetryPolicy(),
        channel_options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        registry_target: Optional[str] = None, auditor_target: Optional[str] = None,
    ):
        self._async = AsyncClient(
            target, api_key, tls=tls, root_certificates=root_certificates,
            certificate_chain=certificate_chain, private_key=private_key, timeout=timeout,
            retry=retry, channel_options=channel_options, interceptors=interceptors,
            registry_target=registry_target, auditor_target=auditor_target)
        self._loop = _LoopThread()
        self.admin = Admin(self._loop, self._async.admin)
        self.registry = Registry(self._loop, self._async.registry)
        self.audit = Audit(self._loop, self._async.audit)

    @property
    def target(self) -> str:
        """The gateway's host:port (ConfigurationError when none is given or found)."""
        return self._async.target

    def close(self) -> None:
        """Cancels every running streamed generation and closes the channel."""
        with contextlib.suppress(RuntimeError):  # closed already
            self._loop.run(self._async.close())
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def generate(
        self, model: str, prompt: Optional[str] = None, *,
        messages: Optional[Iterable[MessageLike]] = None, max_tokens: Optional[int] = None,
        temperature: Optional[float] = None, top_p: Optional[float] = None,
        top_k: Optional[int] = None, seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None, min_tokens: Optional[int] = None,
        timeout: Optional[float] = None, user: str = "", priority: str = "",
        request_id: Optional[str] = None, idempotency_key: Optional[str] = None,
        retry: Optional[RetryPolicy] = None,
    ) -> Generation:
        """See `AsyncClient.generate`."""
        return self._loop.run(self._async.generate(
            model, prompt, messages=messages, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, min_tokens=min_tokens,
            timeout=timeout, user=user, priority=priority, request_id=request_id,
            idempotency_key=idempotency_key, retry=retry))

    def stream(
        self, model: str, prompt: Optional[str] = None, *,
        messages: Optional[Iterable[MessageLike]] = None, max_tokens: Optional[int] = None,
        temperature: Optional[float] = None, top_p: Optional[float] = None,
        top_k: Optional[int] = None, seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None, min_tokens: Optional[int] = None,
        timeout: Optional[float] = None, user: str = "", priority: str = "",
        request_id: Optional[str] = None, idempotency_key: Optional[str] = None,
        retry: Optional[RetryPolicy] = None,
    ) -> GenerationStream:
        """See `AsyncClient.stream`; use it in `with`."""
        stream = self._async.stream(
            model, prompt, messages=messages, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, min_tokens=min_tokens,
            timeout=timeout, user=user, priority=priority, request_id=request_id,
            idempotency_key=idempotency_key, retry=retry)
        return GenerationStream(self._loop, stream)

    def models(self, *, timeout: Optional[float] = None) -> list[ModelInfo]:
        """See `AsyncClient.models`."""
        return self._loop.run(self._async.models(timeout=timeout))

    def model(self, name: str, *, timeout: Optional[float] = None) -> ModelInfo:
        """See `AsyncClient.model`."""
        return self._loop.run(self._async.model(name, timeout=timeout))


class GenerationStream:
    """A streamed generation for blocking code; see `AsyncGenerationStream`."""

    def __init__(self, loop: _LoopThread, stream: AsyncGenerationStream):
        self._loop = loop
        self._stream = stream
        self.request_id = stream.request_id

    @property
    def result(self) -> Optional[Generation]:
        return self._stream.result

    def __enter__(self) -> GenerationStream:
        self._loop.run(self._stream.__aenter__())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        try:
            return self._loop.run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def cancel(self) -> None:
        self._loop.run(self._stream.cancel())

    def close(self) -> None:
        # RuntimeError: the client is closed; its stream, and this generation, are gone.
        with contextlib.suppress(RuntimeError):
            self._loop.run(self._stream.aclose())

    def until_done(self) -> Generation:
        return self._loop.run(self._stream.until_done())
