"""Idle detection: when an agent has gone unused longer than its timeout.

The gateway records activity in an annotation (when a turn starts, while it runs, and
when it ends); the operator's interval timer asks these functions, and suspends only if
the annotation is still the value it judged (a JSON patch ``test``). (kopf's own ``idle=`` timers restart on any patch, the operator's
status writes included, so they cannot measure user inactivity.)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from dexorder.core.useragent import LAST_ACTIVITY_ANNOTATION, Sizing


def last_activity(body: Mapping[str, Any]) -> dt.datetime | None:
    """The gateway's last recorded activity, or None if it never wrote one (or wrote junk)."""
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(LAST_ACTIVITY_ANNOTATION)
    if not raw:
        return None
    try:
        moment = dt.datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def idle_deadline_passed(body: Mapping[str, Any], sizing: Sizing, now: dt.datetime) -> bool:
    """True when the agent has been idle longer than its timeout (never for no timeout)."""
    if sizing.idle_timeout is None:
        return False
    since = last_activity(body)
    if since is None:
        created = (body.get("metadata") or {}).get("creationTimestamp")
        if not created:
            return False
        since = dt.datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    return now - since > sizing.idle_timeout
