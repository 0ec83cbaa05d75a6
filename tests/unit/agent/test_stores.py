"""The stores behind the tools, on a real SQLite file in a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dexorder.agent.errors import InvalidInput, NotFound, OwnerMismatch
from dexorder.agent.memory import fts_query
from dexorder.agent.state import AgentState
from dexorder.agent.strategies import ApprovalRefused
from dexorder.core.approval import issue_approval_id

KEY = "the-agents-bearer-token"
REVIEW = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def state(tmp_path: Path) -> Iterator[AgentState]:
    opened = AgentState.open("alice", tmp_path)
    yield opened
    opened.close()


def test_fts_query_quotes_every_word_so_no_syntax_can_break_it() -> None:
    assert fts_query('ETH "breakout" OR -NEAR(x') == '"eth" OR "breakout" OR "or" OR "near" OR "x"'
    with pytest.raises(InvalidInput, match="no words"):
        fts_query("!!! ---")


def test_recall_ranks_the_best_match_first_and_forget_removes(state: AgentState) -> None:
    weak = state.memory.remember("The user mentioned bitcoin once.", ["misc"])
    strong = state.memory.remember("Bitcoin bitcoin: the user trades bitcoin weekly.", ["btc"])
    state.memory.remember("Prefers tea to coffee.", None)
    found = state.memory.recall("bitcoin", 5)
    assert [memory["id"] for memory in found] == [strong["id"], weak["id"]]
    assert found[0]["score"] > found[1]["score"]
    assert state.memory.recall("btc", 5)[0]["id"] == strong["id"]  # tags are searched too

    state.memory.forget(strong["id"])
    assert [memory["id"] for memory in state.memory.recall("bitcoin", 5)] == [weak["id"]]
    with pytest.raises(NotFound, match=f"no memory with id {strong['id']}"):
        state.memory.forget(strong["id"])


def test_memory_limits(state: AgentState) -> None:
    with pytest.raises(InvalidInput, match="limit is 65,536 bytes"):
        state.memory.remember("x" * 70_000, None)
    with pytest.raises(InvalidInput, match="at most 20 tags"):
        state.memory.remember("ok", [f"t{i}" for i in range(21)])
    with pytest.raises(InvalidInput, match="text is empty"):
        state.memory.remember("   ", None)
    with pytest.raises(InvalidInput, match="k must be between 1 and 50"):
        state.memory.recall("x", 0)


def test_preferences_validate_each_key(state: AgentState) -> None:
    assert state.preferences.get().risk_profile == "moderate"
    assert state.preferences.set("language", "pt-BR").language == "pt-BR"
    assert (
        state.preferences.set("preferred_model", "claude-sonnet").preferred_model == "claude-sonnet"
    )
    assert state.preferences.set("preferred_model", None).preferred_model is None
    for key, value, message in [
        ("language", "not a language", "invalid value for language"),
        ("risk_profile", "yolo", "'conservative', 'moderate' or 'aggressive'"),
        ("reply_style", "verbose", "'concise' or 'detailed'"),
        ("colour", "blue", "unknown preference 'colour'"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            state.preferences.set(key, value)
    assert state.preferences.get().language == "pt-BR"


def test_history_pages_backwards_oldest_first(state: AgentState) -> None:
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(7)
    ]
    state.history.append("s-1", turns)
    state.history.append("other", [{"role": "user", "content": "elsewhere"}])
    page = state.history.page("s-1", limit=3)
    assert [turn["content"] for turn in page["turns"]] == ["turn 4", "turn 5", "turn 6"]
    older = state.history.page("s-1", limit=3, before_id=page["next_before_id"])
    assert [turn["content"] for turn in older["turns"]] == ["turn 1", "turn 2", "turn 3"]
    oldest = state.history.page("s-1", limit=3, before_id=older["next_before_id"])
    assert [turn["content"] for turn in oldest["turns"]] == ["turn 0"]
    assert oldest["next_before_id"] is None


def test_a_batch_with_one_bad_turn_stores_none(state: AgentState) -> None:
    with pytest.raises(InvalidInput, match=r"turns\[1\]\.role"):
        state.history.append(
            "s", [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]
        )
    assert state.history.page("s")["turns"] == []


def test_a_volume_of_another_user_is_refused(tmp_path: Path) -> None:
    AgentState.open("alice", tmp_path).close()
    with pytest.raises(OwnerMismatch, match="belongs to user 'alice', not 'bob'"):
        AgentState.open("bob", tmp_path)


DEFINITION = {
    "entry": {"all": [{"left": {"price": "close"}, "op": "gt", "right": {"value": 1}}]},
    "exit": {"all": [{"left": {"price": "close"}, "op": "lt", "right": {"value": 1}}]},
}


def test_saving_a_strategy_again_resets_its_approval(state: AgentState) -> None:
    state.strategies.save("trend", DEFINITION)
    approval = issue_approval_id(KEY, REVIEW, "trend")
    assert state.strategies.approve("trend", approval, approval_key=KEY)["status"] == "approved"
    assert state.strategies.counts() == (1, 1)
    state.strategies.save("trend", DEFINITION)
    assert state.strategies.list_all()[0]["status"] == "draft"
    missing = issue_approval_id(KEY, REVIEW.replace("0", "1"), "missing")
    with pytest.raises(NotFound, match="save it before approving"):
        state.strategies.approve("missing", missing, approval_key=KEY)


def flip_last_digit(text: str) -> str:
    return text[:-1] + ("1" if text[-1] == "0" else "0")


@pytest.mark.parametrize(
    "forged",
    [
        "",
        REVIEW,  # the review id the model was shown, alone
        issue_approval_id("a guessed key", REVIEW, "trend"),
        issue_approval_id(KEY, REVIEW, "another strategy"),
        flip_last_digit(issue_approval_id(KEY, REVIEW, "trend")),
        issue_approval_id(KEY, REVIEW, "trend").upper(),
        issue_approval_id(KEY, REVIEW, "trend") + "\n",
    ],
)
def test_an_approval_without_the_review_workflows_id_is_refused(
    state: AgentState, forged: str
) -> None:
    state.strategies.save("trend", DEFINITION)
    with pytest.raises(ApprovalRefused, match="only the user can approve"):
        state.strategies.approve("trend", forged, approval_key=KEY)
    assert state.strategies.counts() == (1, 0)


def test_an_approval_id_is_used_once(state: AgentState) -> None:
    state.strategies.save("trend", DEFINITION)
    approval = issue_approval_id(KEY, REVIEW, "trend")
    first = state.strategies.approve("trend", approval, approval_key=KEY)
    # The workflow retrying its last step is answered as before, changing nothing.
    assert state.strategies.approve("trend", approval, approval_key=KEY) == first
    # Saved again (a new definition), the old approval no longer approves it.
    state.strategies.save("trend", DEFINITION)
    with pytest.raises(ApprovalRefused, match="used already"):
        state.strategies.approve("trend", approval, approval_key=KEY)
    assert state.strategies.counts() == (1, 0)
