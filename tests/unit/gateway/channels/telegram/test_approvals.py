"""The approval buttons' data and the answers to a tap."""

from __future__ import annotations

import uuid

import pytest

from dexorder.gateway.channels.telegram.approvals import (
    CALLBACK_DATA_LIMIT,
    approval_keyboard,
    outcome_html,
    parse_review_callback,
    review_callback,
)
from dexorder.gateway.pure import protocol


def test_button_data_carries_the_review_and_the_answer_within_64_bytes() -> None:
    request_id = uuid.uuid4().hex
    approve, reject = review_callback(request_id, True), review_callback(request_id, False)
    assert approve == f"review:{request_id}:1"
    assert reject == f"review:{request_id}:0"
    assert len(approve.encode()) <= CALLBACK_DATA_LIMIT
    assert parse_review_callback(approve) == (request_id, True)
    assert parse_review_callback(reject) == (request_id, False)


def test_an_id_too_long_for_a_button_gets_no_buttons() -> None:
    long_id = "x" * 60
    assert review_callback(long_id, True) is None
    assert approval_keyboard(long_id) is None
    keyboard = approval_keyboard("a" * 32)
    assert keyboard is not None
    assert [b.text for b in keyboard.inline_keyboard[0]] == ["✅ Approve", "❌ Reject"]


@pytest.mark.parametrize(
    "data", [None, "", "review", "review::1", "review:abc:2", "other:abc:1", "review:abc"]
)
def test_data_that_is_not_ours_is_not_parsed(data: str | None) -> None:
    assert parse_review_callback(data) is None


def test_the_answer_to_a_tap_says_what_happened() -> None:
    approved = protocol.ApprovalResultFrame(
        request_id="r", decision="approved", message="marked approved <b>; nothing was traded"
    )
    assert outcome_html(
        [protocol.StatusFrame(stage=protocol.Stage.READY, message=""), approved]
    ) == (
        "✅ Approved. marked approved &lt;b&gt;; nothing was traded",
        "decided",
    )
    rejected = approved.model_copy(update={"decision": "rejected", "message": "kept as a draft"})
    assert outcome_html([rejected]) == ("❌ Rejected. kept as a draft", "decided")
    again = protocol.ErrorFrame(
        code=protocol.ErrorCode.APPROVAL_INVALID,
        message="this review was already answered (approved)",
    )
    assert outcome_html([again]) == (
        "Your answer was not recorded: this review was already answered (approved).",
        "refused",
    )
    down = protocol.ErrorFrame(code=protocol.ErrorCode.AGENT_UNAVAILABLE, message="asleep")
    text, outcome = outcome_html([down])
    assert outcome == "failed"
    assert "tap the button again" in text
    assert outcome_html([])[1] == "failed"
