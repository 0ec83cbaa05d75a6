"""The chart on the real node, as ops install it: the three images built from this tree and
`helm install`ed (devenv/node_chart.py), then every test of tests/cluster/chart_suite.py, the
same bodies the kind suite runs.

The gateway's PostgreSQL and the scripted model (the fake LLM) run on the host, listening on
the node's bridge address, where pods reach them; nothing leaves the machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dexorder.devenv import images
from dexorder.devenv.fixtures_helm import Helm
from dexorder.devenv.node import NodeCluster
from dexorder.devenv.node_chart import NodeChart, installed_chart
from tests.cluster.chart_suite import ChartSuite

# Building the images (from buildah's layer cache after the first time) and installing them.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

TAG = "cluster"


@pytest.fixture(scope="module")
def installed(node: NodeCluster, helm: Helm) -> Iterator[NodeChart]:
    with installed_chart(node, helm, images.build_images(tag=TAG), TAG) as chart:
        yield chart


class TestChartOnTheRealNode(ChartSuite):
    pass
