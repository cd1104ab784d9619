"""Authentication and authorization at the gRPC edge, for both server models.

The interceptors read what a call presents (the ``authorization: Bearer`` header, the names of a
client certificate the TLS layer verified) and ask `snapcache.access.AccessPolicy`; a refusal is
answered through the one error table (`snapcache.rpc_errors.to_status`), so it is
``UNAUTHENTICATED`` or ``PERMISSION_DENIED`` with an ErrorInfo reason like any other error. The
check runs inside the handler, where the call's TLS peer is known, and before the servicer sees
the request. Methods of exempt services (health, reflection by default) are not wrapped at all.

A token only the Kubernetes API can check (`snapcache.token_review`) is a blocking HTTP call the
first time it is seen: the thread-pool server makes it on the call's thread; the grpc.aio server
makes it on a thread of the loop's default executor, so the loop keeps answering other calls.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import grpc
from grpc_status import rpc_status

from snapcache import errors
from snapcache.access import AccessPolicy, Caller, ReviewNeeded
from snapcache.rpc_errors import to_status
from snapcache.rpc_observer import principal_user

log = logging.getLogger(__name__)

_BEARER = "bearer "
_NAME_KEYS = ("x509_common_name", "x509_subject_alternative_name")


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer`` header; "" for a malformed one, None for none."""
    for key, value in metadata or ():
        if key != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if text[: len(_BEARER)].lower() != _BEARER:
            return ""
        return text[len(_BEARER) :].strip()
    return None


def certificate_names(auth_context: dict[str, list[bytes]]) -> tuple[str, ...]:
    """Common name then subject alternative names of the verified client certificate, if any."""
    names: list[str] = []
    for key in _NAME_KEYS:
        for value in auth_context.get(key, ()):
            name = value.decode(errors="replace")
            if name not in names:
                names.append(name)
    return tuple(names)


def _caller(metadata: Any, context: Any, *, read_certificate: bool) -> Caller:
    token = bearer_token(metadata)
    names: tuple[str, ...] = ()
    if token is None and read_certificate:
        names = certificate_names(context.auth_context())
    return Caller(token=token, certificate_names=names)


def _log_refusal(method: str, error: errors.SnapcacheError) -> None:
    log.info("refused %s: %s %s", method, type(error).__name__, error.reason)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls `AccessPolicy` does not allow (thread-pool servers)."""

    def __init__(self, policy: AccessPolicy, *, client_certificates: bool) -> None:
        self._policy = policy
        self._certificates = client_certificates

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._policy.is_exempt(method):
            return handler  # type: ignore[no-any-return]
        metadata = handler_call_details.invocation_metadata

        def check(context: grpc.ServicerContext) -> None:
            caller = _caller(metadata, context, read_certificate=self._certificates)
            try:
                principal = self._policy.authorize(method, caller)
            except errors.SnapcacheError as exc:
                _log_refusal(method, exc)
                context.abort_with_status(rpc_status.to_status(to_status(exc)))
            if principal is not None:
                principal_user.set(principal.user)  # for the request's log line

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                check(context)
                return inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                check(context)
                yield from inner_us(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                check(context)
                return inner_su(requests, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
        inner_ss = handler.stream_stream

        def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            check(context)
            yield from inner_ss(requests, context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """`AuthInterceptor` for grpc.aio servers."""

    def __init__(self, policy: AccessPolicy, *, client_certificates: bool) -> None:
        self._policy = policy
        self._certificates = client_certificates

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._policy.is_exempt(method):
            return handler  # type: ignore[no-any-return]
        metadata = handler_call_details.invocation_metadata

        async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            caller = _caller(metadata, context, read_certificate=self._certificates)
            try:
                try:
                    principal = self._policy.authorize(method, caller, remote=False)
                except ReviewNeeded:  # a blocking call to the Kubernetes API: off the event loop
                    principal = await asyncio.to_thread(self._policy.authorize, method, caller)
            except errors.SnapcacheError as exc:
                _log_refusal(method, exc)
                status = rpc_status.to_status(to_status(exc))
                await context.abort(status.code, status.details, status.trailing_metadata)
            if principal is not None:
                principal_user.set(principal.user)  # for the request's log line

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await check(context)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
        kind = next(k for k in ("unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
        inner = getattr(handler, kind)
        if inspect.isasyncgenfunction(inner):

            async def streaming(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                await check(context)
                async for response in inner(request, context):
                    yield response

            wrapped: Callable[..., Any] = streaming
        else:  # a coroutine writing with context.write (the aio health servicer's Watch)

            async def writing(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await check(context)
                return await inner(request, context)

            wrapped = writing
        build = getattr(grpc, f"{kind}_rpc_method_handler")
        return build(wrapped, **kwargs)  # type: ignore[no-any-return]
