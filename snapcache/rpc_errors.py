"""The one table from domain errors to gRPC: codes, `google.rpc.Status`, `ErrorInfo`, `BadRequest`.

Servicers raise `snapcache.errors` exceptions; `ErrorInterceptor` turns them into rich statuses,
so no servicer picks a status code by hand. An exception nobody named becomes INTERNAL with
reason INTERNAL, is logged with its traceback, and never leaks its text to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from snapcache import errors

log = logging.getLogger(__name__)

_CODES: dict[type[errors.SnapcacheError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


def code_for(error: errors.SnapcacheError) -> grpc.StatusCode:
    """The gRPC code of a domain error (its nearest mapped base class)."""
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(error: errors.SnapcacheError) -> status_pb2.Status:
    """A `google.rpc.Status` with ErrorInfo (BadRequest for field violations, RetryInfo for retryable ones).

    An error whose metadata says `retry_after_seconds` also carries a `google.rpc.RetryInfo`, the
    standard way to tell a client when to try again.
    """
    code = code_for(error)
    status = status_pb2.Status(code=code.value[0], message=error.message)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=errors.ERROR_DOMAIN, metadata=dict(error.metadata)
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status.details.append(detail)
    if isinstance(error, errors.InvalidArgument) and error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        status.details.append(detail)
    retry_after = error.metadata.get("retry_after_seconds")
    if retry_after:
        retry_info = error_details_pb2.RetryInfo()
        retry_info.retry_delay.FromNanoseconds(int(float(retry_after) * 1e9))
        detail = any_pb2.Any()
        detail.Pack(retry_info)
        status.details.append(detail)
    return status


def retry_delay(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay of a failed call in seconds, when the server gave one."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def internal_status() -> status_pb2.Status:
    """The status of an unexpected failure: no internals leak to the client."""
    status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; see the server log")
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=errors.ERROR_DOMAIN))
    status.details.append(detail)
    return status


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, errors.SnapcacheError):
        context.abort_with_status(rpc_status.to_status(to_status(exc)))
    log.exception("unhandled error in %s", method, exc_info=exc)
    context.abort_with_status(rpc_status.to_status(internal_status()))


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps domain errors raised by handlers to rich gRPC statuses."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return inner_uu(request, context)
                except Exception as exc:
                    if _is_abort(exc, context):
                        raise
                    _abort(context, exc, method)
                    raise  # unreachable: abort raises

            wrapped: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            return wrapped
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from inner_us(request, context)
                except Exception as exc:
                    if _is_abort(exc, context):
                        raise
                    _abort(context, exc, method)
                    raise

            streaming: grpc.RpcMethodHandler[Any, Any] = grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            return streaming
        return handler  # type: ignore[no-any-return]


class AioErrorInterceptor(grpc.aio.ServerInterceptor):
    """`ErrorInterceptor` for grpc.aio servers (unary-unary handlers, the only kind they serve)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # type: ignore[no-any-return]
        inner = handler.unary_unary
        method = handler_call_details.method

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise
            except errors.SnapcacheError as exc:
                status = rpc_status.to_status(to_status(exc))
            except Exception as exc:
                log.exception("unhandled error in %s", method, exc_info=exc)
                status = rpc_status.to_status(internal_status())
            await context.abort(status.code, status.details, status.trailing_metadata)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _is_abort(exc: Exception, context: grpc.ServicerContext) -> bool:
    # context.abort() raises a bare Exception after setting the code; let it through unchanged.
    # ServicerContext.code() exists at run time (grpcio >= 1.38) but not in every stub release
    code: Callable[[], object] = getattr(context, "code")  # noqa: B009
    return type(exc) is Exception and code() is not None


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo of a failed call, for clients (CLI, matcher, tests)."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """The BadRequest field violations of a failed call as (field, description) pairs."""
    status = rpc_status.from_call(error)
    if status is None:
        return []
    found: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.extend((v.field, v.description) for v in bad_request.field_violations)
    return found
