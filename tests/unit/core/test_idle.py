import datetime as dt

from dexorder.core.idle import idle_deadline_passed, last_activity
from dexorder.core.useragent import Sizing

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
FIFTEEN = Sizing(memory="1", cpu="1", storage="1", idle_timeout=dt.timedelta(minutes=15))
NEVER = Sizing(memory="1", cpu="1", storage="1", idle_timeout=None)


def body(activity: str | None, created: str = "2026-11-24T00:00:00Z") -> dict[str, object]:
    annotations = {"dexorder.ai/last-activity": activity} if activity else {}
    return {"metadata": {"annotations": annotations, "creationTimestamp": created}}


def test_activity_within_the_timeout_keeps_the_agent() -> None:
    assert not idle_deadline_passed(body("2026-11-24T11:50:00Z"), FIFTEEN, NOW)


def test_activity_older_than_the_timeout_suspends() -> None:
    assert idle_deadline_passed(body("2026-11-24T11:40:00Z"), FIFTEEN, NOW)


def test_no_activity_counts_from_creation() -> None:
    assert idle_deadline_passed(body(None), FIFTEEN, NOW)
    assert not idle_deadline_passed(body(None, created="2026-11-24T11:59:00Z"), FIFTEEN, NOW)


def test_never_idle_tier() -> None:
    assert not idle_deadline_passed(body("2020-01-01T00:00:00Z"), NEVER, NOW)


def test_junk_annotation_is_ignored() -> None:
    assert last_activity(body("yesterday")) is None
    assert last_activity(body("2026-11-24T11:40:00+01:00")) == dt.datetime(
        2026, 11, 24, 10, 40, tzinfo=dt.UTC
    )
