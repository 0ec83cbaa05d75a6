"""The operator names itself without asking for a user name: the images run as a numeric user
with no passwd entry, where getpass.getuser() raises (the first real pod crashed on it)."""

from __future__ import annotations

import getpass
import os
import socket

import pytest

from dexorder.operator.__main__ import operator_identity


def test_the_identity_is_the_pod_and_process_even_with_no_user_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_passwd_entry() -> str:
        raise KeyError("getpwuid(): uid not found: 10001")

    monkeypatch.setattr(getpass, "getuser", no_passwd_entry)
    assert operator_identity() == f"{socket.gethostname()}/{os.getpid()}"
