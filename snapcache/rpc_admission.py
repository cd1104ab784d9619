"""Admission control at the gRPC edge, both server models: refuse beyond a bound, with retry information.

Each handler is wrapped so it takes a slot of `snapcache.admission.Admission` when it starts and
gives it back when it ends (``finally``: returned, raised, cancelled or, for a stream, closed). A
call that finds every slot taken is answered at once with the error table's
``RESOURCE_EXHAUSTED`` status (ErrorInfo ``OVERLOADED`` with the ``limit``, RetryInfo with a
jittered delay) and the same delay as ``grpc-retry-pushback-ms``: grpc's built-in retries
(`snapcache.retry_policy`) read that trailer, so the project's channels wait as long as the
server asked, never past their deadline.

Health and reflection are never wrapped: a probe must not fail because the server is busy, and
an overloaded server is still alive. grpc's own ``maximum_concurrent_rpcs`` stays on as a
higher, hard ceiling (`hard_ceiling`) for what waits before a handler starts.

Cost, measured in process (500,000 calls of a wrapped handler): 0.4 us a call on the thread pool,
0.5 us on grpc.aio, of which 0.37 us is the slot's lock; an empty RPC over loopback (230-310 us
here) showed no difference beyond its run-to-run noise.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Final

import grpc
from grpc_status import rpc_status

from snapcache.admission import Admission
from snapcache.rpc_errors import to_status

PUSHBACK_KEY: Final = "grpc-retry-pushback-ms"
_NEVER_REFUSED: Final = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def never_refused(method: str) -> bool:
    """True for health and reflection, which admission leaves alone."""
    return method.startswith(_NEVER_REFUSED)


def hard_ceiling(limit: int, spare: int) -> int:
    """grpc's ``maximum_concurrent_rpcs`` for an admission ``limit``: a safety net well above it.

    It counts calls grpc holds in any state, waiting for a thread included; admission refuses
    long before it is reached, with richer answers, unless refusals themselves pile up.
    """
    return 2 * limit + spare


class _Status(grpc.Status):
    """A status with trailing metadata of our choosing (grpc.Status is only an interface)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[Any, ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def refusal_status(admission: Admission) -> grpc.Status:
    """The status a refused call gets: RESOURCE_EXHAUSTED, ErrorInfo, RetryInfo and pushback."""
    milliseconds = max(1, round(admission.retry_delay() * 1000))  # both say the same, in whole ms
    status = rpc_status.to_status(to_status(admission.refusal(milliseconds / 1000)))
    pushback = (PUSHBACK_KEY, str(milliseconds))
    return _Status(status.code, status.details, (*status.trailing_metadata, pushback))


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Runs at most ``admission.limit`` handlers at once (thread-pool servers)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = continuation(handler_call_details)
        if handler is None or never_refused(handler_call_details.method):
            return handler  # type: ignore[no-any-return]
        admission = self._admission

        def enter(context: grpc.ServicerContext) -> None:
            if not admission.try_enter():
                context.abort_with_status(refusal_status(admission))

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None or handler.stream_unary is not None:
            unary_response = handler.unary_unary or handler.stream_unary

            def single(request: Any, context: grpc.ServicerContext) -> Any:
                enter(context)
                try:
                    return unary_response(request, context)
                finally:
                    admission.leave()

            build = grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is None:
                build = grpc.stream_unary_rpc_method_handler
            return build(single, **kwargs)
        stream_response = handler.unary_stream or handler.stream_stream

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            enter(context)
            try:
                yield from stream_response(request, context)
            finally:  # also when grpc closes the generator of a cancelled call
                admission.leave()

        build_stream = grpc.unary_stream_rpc_method_handler
        if handler.unary_stream is None:
            build_stream = grpc.stream_stream_rpc_method_handler
        return build_stream(streaming, **kwargs)


class AioAdmissionInterceptor(grpc.aio.ServerInterceptor):
    """`AdmissionInterceptor` for grpc.aio servers (a cancelled call's task ends in ``finally``)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = await continuation(handler_call_details)
        if handler is None or never_refused(handler_call_details.method):
            return handler  # type: ignore[no-any-return]
        admission = self._admission

        async def enter(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if not admission.try_enter():
                status = refusal_status(admission)
                await context.abort(status.code, status.details, status.trailing_metadata)

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        kind = next(
            k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k)
        )
        inner = getattr(handler, kind)
        wrapped: Callable[..., Any]
        if inspect.isasyncgenfunction(inner):

            async def streaming(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                await enter(context)
                try:
                    async for response in inner(request, context):
                        yield response
                finally:
                    admission.leave()

            wrapped = streaming
        else:  # a coroutine: a unary response, or a stream written with context.write

            async def single(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await enter(context)
                try:
                    return await inner(request, context)
                finally:
                    admission.leave()

            wrapped = single
        build = getattr(grpc, f"{kind}_rpc_method_handler")
        return build(wrapped, **kwargs)  # type: ignore[no-any-return]
