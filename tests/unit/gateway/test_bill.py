"""A message's bill over its attempts (a second one after the agent was lost)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from dexorder.gateway.conversation import _Bill
from dexorder.gateway.harness import Harness
from dexorder.gateway.llm.adapter import Usage
from dexorder.gateway.turns import TurnFinished


@dataclass
class _Spent:
    """Stands in for a Harness: only what it spent matters to the bill."""

    model: str
    usage: Usage

    def spent(self) -> tuple[str, Usage]:
        return self.model, self.usage


def bill(*attempts: _Spent) -> _Bill:
    return _Bill(attempts=cast("list[Harness]", list(attempts)))


def test_a_retry_that_finishes_is_billed_the_attempt_before_it_too() -> None:
    lost = _Spent("m", Usage(100, 20, 120))  # streamed, then the agent was gone
    finished = TurnFinished(model="m", usage=Usage(110, 30, 140), route=None)
    billed = bill(lost, _Spent("m", finished.usage)).with_earlier_attempts(finished)
    assert billed.usage == Usage(210, 50, 260)
    assert bill(_Spent("m", finished.usage)).with_earlier_attempts(finished) is finished


def test_an_unfinished_message_is_billed_every_attempt_under_the_last_model() -> None:
    assert bill(_Spent("a", Usage(1, 2, 3)), _Spent("", Usage(4, 0, 4))).spent() == (
        "a",
        Usage(5, 2, 7),
    )
