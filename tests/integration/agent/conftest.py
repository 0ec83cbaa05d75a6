"""One real agent process shared by the agent suite (starts cost), stopped with its data."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dexorder.devenv.agent import AgentProcess


@pytest.fixture(scope="session")
def agent() -> Iterator[AgentProcess]:
    with AgentProcess(user_id="auth0|alice") as process:
        yield process
