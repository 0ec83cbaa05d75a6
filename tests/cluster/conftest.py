"""The real single-node cluster (devenv/node.py), one per test module: it starts in a few
seconds once built, and a module that checks what `stop` leaves behind needs none alive."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dexorder.devenv.node import NodeCluster


@pytest.fixture(scope="module")
def node() -> Iterator[NodeCluster]:
    with NodeCluster() as cluster:
        yield cluster
