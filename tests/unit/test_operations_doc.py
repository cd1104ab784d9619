"""docs/operations.md against the code: the metrics and health names it tells operators to use exist.

A metric renamed in code, or added without a word in the guide, fails here instead of leaving an
alert that never fires.
"""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.cache_registry.database import Database, make_engine, migrate
from services.cache_registry.metrics import RegistryMetrics
from services.cache_registry.servicer import SERVICE_NAME as REGISTRY_SERVICE
from services.extender.metrics import ExtenderMetrics
from services.matcher.index_sync import SyncStatus
from services.matcher.metrics import MatcherMetrics
from services.matcher.server import FEED_HEALTH_NAME
from services.matcher.servicer import SERVICE_NAME as MATCHER_SERVICE
from services.operator.cache_feed import FeedStatus
from services.operator.metrics import OperatorMetrics

GUIDE = Path(__file__).parents[2] / "docs" / "operations.md"


def exposed(registry: CollectorRegistry) -> set[str]:
    """Sample names in the exposition (``_total`` included), without the ``_created`` timestamps.

    A histogram counts as its family's name: the guide names it once, not its ``_bucket``,
    ``_sum`` and ``_count`` series.
    """
    names = set()
    for family in registry.collect():
        if family.type == "histogram":
            if family.samples:
                names.add(family.name)
            continue
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                names.add(sample.name)
    return names


def test_guide_names_exactly_the_metrics_that_exist(tmp_path: Path) -> None:
    status = SyncStatus(
        loaded=True,
        live=True,
        cache_count=1,
        ready_count=1,
        revision=1,
        staleness_seconds=0.0,
        last_full_sync_time=0.0,
        full_syncs=1,
        last_error="",
    )
    extender = ExtenderMetrics(node_cache_synced=lambda: True, node_cache_size=lambda: 1)
    extender.request("filter", 200)  # labelled counters show only once a child exists
    extender.fail_open("UNAVAILABLE")
    feed = FeedStatus(synced=True, live=True, revision=1, staleness_seconds=0.0, reloads=1)
    operator = OperatorMetrics(feed=lambda: feed, sizes=dict, ready=lambda: True)
    matcher = MatcherMetrics(lambda: status, lambda: 0)
    matcher.rpc.finished("MatcherService/MatchImageCaches", "OK", 0.001)
    engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    migrate(engine)
    registry = RegistryMetrics(database=Database(engine), zones=("a",))
    registry.rpc.finished("CacheRegistryService/GetImageCache", "NOT_FOUND", 0.001)
    registry.build_finished("succeeded", 1.0, 10)
    extender.request("prioritize", 200, 0.001)
    metrics = (
        exposed(matcher.registry)
        | exposed(registry.registry)
        | exposed(extender.registry)
        | exposed(operator.registry)
    )
    named = set()
    for name in re.findall(r"\bsnapcache_[a-z_]*[a-z]", GUIDE.read_text()):
        family = re.sub(r"_(bucket|sum|count)$", "", name)  # a histogram's series, in a query
        named.add(family if family != name and family in metrics else name)
    assert named - metrics == set(), "the guide names metrics that do not exist"
    assert metrics - named == set(), "metrics the guide does not explain"


def test_guide_names_the_real_health_services() -> None:
    guide = GUIDE.read_text()
    for service in (REGISTRY_SERVICE, MATCHER_SERVICE, FEED_HEALTH_NAME):
        assert f'{{"service": "{service}"}}' in guide
