import pytest

from dexorder.operator.events import EventKey, EventLog, Posted

FAILED = EventKey("uid-1", "Warning", "InvalidSpec", "unknown tier 'gold'")


def test_a_repeated_event_is_the_one_posted_before() -> None:
    log = EventLog()
    assert log.posted("a", FAILED) is None
    log.record("a", FAILED, Posted("a.1", 1))
    assert log.posted("a", FAILED) == Posted("a.1", 1)
    # Another message, agent or object (a new uid under the same name) is another Event.
    assert log.posted("a", EventKey("uid-1", "Warning", "InvalidSpec", "other")) is None
    assert log.posted("b", FAILED) is None
    assert log.posted("a", EventKey("uid-2", *(FAILED.type, FAILED.reason, FAILED.message))) is None
    log.forget("a")
    assert log.posted("a", FAILED) is None


def test_only_the_newest_events_are_kept() -> None:
    log = EventLog(kept=2)
    keys = [EventKey("u", "Normal", "Suspended", str(i)) for i in range(3)]
    for i, key in enumerate(keys):
        log.record("a", key, Posted(f"a.{i}", 1))
    assert log.posted("a", keys[0]) is None
    assert log.posted("a", keys[2]) == Posted("a.2", 1)


def test_an_agent_posts_a_burst_then_one_a_refill() -> None:
    log = EventLog(burst=3, refill_seconds=60)
    assert [log.admit("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert log.admit("b", 0.0)  # each agent has its own
    assert not log.admit("a", 30.0)
    assert log.admit("a", 61.0)
    assert not log.admit("a", 62.0)


def test_an_event_log_needs_room() -> None:
    with pytest.raises(ValueError, match="burst"):
        EventLog(burst=0)
