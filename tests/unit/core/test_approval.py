"""The approval id: issued with the key, for one review and one strategy, and nothing else."""

from __future__ import annotations

import pytest

from dexorder.core.approval import issue_approval_id, verified_review_id

KEY = "the-agents-bearer-token"
REVIEW = "0123456789abcdef0123456789abcdef"


def test_an_issued_id_names_its_review() -> None:
    approval = issue_approval_id(KEY, REVIEW, "trend")
    assert approval.startswith(REVIEW + ".")
    assert verified_review_id(KEY, approval, "trend") == REVIEW


@pytest.mark.parametrize(
    ("key", "strategy"),
    [("another key", "trend"), (KEY, "trend2"), (KEY, "Trend"), ("", "trend")],
)
def test_an_id_does_not_verify_with_another_key_or_strategy(key: str, strategy: str) -> None:
    assert verified_review_id(key, issue_approval_id(KEY, REVIEW, "trend"), strategy) is None


@pytest.mark.parametrize("review_id", ["", "x" * 32, REVIEW + "\n", REVIEW.upper(), "../etc"])
def test_a_malformed_review_id_is_refused(review_id: str) -> None:
    with pytest.raises(ValueError, match="32 lowercase hex digits"):
        issue_approval_id(KEY, review_id, "trend")
