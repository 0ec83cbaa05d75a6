"""The per-user socket cap: the gateway's setting, which a tier may raise, never lower."""

from __future__ import annotations

from pathlib import Path

from dexorder.core.tiers import parse_tier_catalog
from dexorder.gateway.channels.websocket import socket_cap

REPO = Path(__file__).parents[4]


def test_a_tier_may_raise_the_cap_but_not_lower_it() -> None:
    catalog = parse_tier_catalog((REPO / "config" / "tiers.yaml").read_text())
    free = catalog.tiers["free"]
    assert free.max_sockets_per_user is None
    assert socket_cap(5, free) == 5
    assert socket_cap(5, free.model_copy(update={"max_sockets_per_user": 20})) == 20
    assert socket_cap(5, free.model_copy(update={"max_sockets_per_user": 2})) == 5


def test_the_catalog_reads_a_tiers_socket_cap() -> None:
    text = (REPO / "config" / "tiers.yaml").read_text()
    raised = text.replace(
        "    model_groups: [fast]\n", "    model_groups: [fast]\n    max_sockets_per_user: 12\n", 1
    )
    assert parse_tier_catalog(raised).tiers["free"].max_sockets_per_user == 12
