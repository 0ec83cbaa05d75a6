"""Prometheus metrics of the operator, served with its liveness probe."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dexorder.core.useragent import Phase, UserAgentStatus

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter(
    "dexorder_operator_reconciles", "UserAgent reconciles by result.", ["result"], registry=REGISTRY
)
RECONCILE_SECONDS = Histogram(
    "dexorder_operator_reconcile_duration_seconds",
    "Time to apply one UserAgent's children and status.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
FAILURES = Counter(
    "dexorder_operator_agent_failures",
    "Agents that entered Failed, by reason.",
    ["reason"],
    registry=REGISTRY,
)
RESYNC_DRIFT = Counter(
    "dexorder_operator_resync_drift",
    "Agents whose children the slow resync found drifted (edits no watch event showed).",
    registry=REGISTRY,
)
SUSPENSIONS = Counter(
    "dexorder_operator_idle_suspensions", "Agents suspended for idleness.", registry=REGISTRY
)


class AgentsCollector(Collector):
    """Agents by phase and tier, counted at scrape time from the operator's index."""

    def __init__(
        self,
        source: Callable[[], Iterable[Mapping[str, Any]]],
        api_requests: Callable[[], int],
        api_requests_by_kind: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self._source = source
        self._api_requests = api_requests
        self._api_requests_by_kind = api_requests_by_kind

    def collect(self) -> Iterable[GaugeMetricFamily]:
        agents = GaugeMetricFamily(
            "dexorder_operator_agents", "UserAgents by phase and tier.", labels=["phase", "tier"]
        )
        tally: Tally[tuple[str, str]] = Tally()
        for body in self._source():
            reported = UserAgentStatus.parse(body.get("status")).phase or Phase.PENDING
            tier = (body.get("spec") or {}).get("tier") or "unknown"
            tally[(reported.value, tier)] += 1
        for (phase, tier), count in sorted(tally.items()):
            agents.add_metric([phase, tier], count)
        yield agents
        requests = GaugeMetricFamily(
            "dexorder_operator_api_requests",
            "Requests made to the Kubernetes API by the reconciler.",
        )
        requests.add_metric([], self._api_requests())
        yield requests
        by_kind = GaugeMetricFamily(
            "dexorder_operator_api_requests_by_kind",
            "Requests made to the Kubernetes API by the reconciler, by verb and resource.",
            labels=["kind"],
        )
        for kind, count in sorted(self._api_requests_by_kind().items()):
            by_kind.add_metric([kind], count)
        yield by_kind
