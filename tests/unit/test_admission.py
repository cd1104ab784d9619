"""Admission's count and its refusal, through the error table (the servers are tested in
tests/integration/test_backpressure.py)."""

from __future__ import annotations

import threading

import grpc
import pytest
from google.rpc import error_details_pb2

from snapcache.admission import OVERLOADED, Admission
from snapcache.errors import ERROR_DOMAIN
from snapcache.rpc_admission import PUSHBACK_KEY, hard_ceiling, never_refused, refusal_status
from snapcache.rpc_errors import code_for, to_status


def test_the_count_admits_up_to_the_limit_and_counts_refusals() -> None:
    admission = Admission(2)
    assert [admission.try_enter() for _ in range(4)] == [True, True, False, False]
    assert (admission.running, admission.refused) == (2, 2)
    admission.leave()
    assert admission.try_enter()
    admission.leave()
    admission.leave()
    assert admission.running == 0
    with pytest.raises(RuntimeError):
        admission.leave()


def test_many_threads_never_exceed_the_limit() -> None:
    admission = Admission(3)
    peak = [0]
    lock = threading.Lock()

    def work() -> None:
        for _ in range(2000):
            if admission.try_enter():
                with lock:
                    peak[0] = max(peak[0], admission.running)
                admission.leave()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert admission.running == 0
    assert 1 <= peak[0] <= 3


@pytest.mark.parametrize("bad", [0, -1])
def test_a_limit_below_one_is_refused(bad: int) -> None:
    with pytest.raises(ValueError):
        Admission(bad)


@pytest.mark.parametrize(("fraction", "delay"), [(0.0, 0.1), (0.5, 0.2), (0.999, 0.2998)])
def test_the_delay_is_jittered_around_the_base(fraction: float, delay: float) -> None:
    admission = Admission(1, retry_after_seconds=0.2, random_fraction=lambda: fraction)
    assert admission.retry_delay() == pytest.approx(delay)


def test_the_refusal_is_resource_exhausted_with_error_info_and_retry_info() -> None:
    admission = Admission(7, random_fraction=lambda: 0.25)
    error = admission.refusal()
    assert code_for(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = to_status(error)
    info = error_details_pb2.ErrorInfo()
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain, info.metadata["limit"]) == (OVERLOADED, ERROR_DOMAIN, "7")
    assert any(d.Unpack(retry) for d in status.details[1:])
    assert retry.retry_delay.ToNanoseconds() == 150_000_000  # 0.2 s * (0.5 + 0.25)


def test_the_grpc_refusal_carries_the_same_delay_as_pushback() -> None:
    admission = Admission(1, random_fraction=lambda: 0.0)
    status = refusal_status(admission)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(status.trailing_metadata)
    assert trailers[PUSHBACK_KEY] == "100"
    assert "grpc-status-details-bin" in trailers


def test_health_and_reflection_are_never_refused_and_the_ceiling_is_above_the_limit() -> None:
    assert never_refused("/grpc.health.v1.Health/Check")
    assert never_refused("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert never_refused("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert not never_refused("/snapcache.v1.MatcherService/MatchImageCaches")
    assert hard_ceiling(256, 8) > 256 + 8
