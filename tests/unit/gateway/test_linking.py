"""Link codes: their shape, normalisation, hashing, and the wrong-code limiter's arithmetic."""

from __future__ import annotations

import re

import pytest

from dexorder.gateway.linking import (
    CODE_ALPHABET,
    CODE_LENGTH,
    MemoryAttemptLimiter,
    display_code,
    hash_code,
    new_code,
    normalize_code,
)


def test_codes_use_the_unambiguous_alphabet_and_differ() -> None:
    codes = {new_code() for _ in range(500)}
    assert len(codes) == 500
    for code in codes:
        assert len(code) == CODE_LENGTH
        assert set(code) <= set(CODE_ALPHABET)
    assert not set("01ILOU") & set(CODE_ALPHABET)


def test_codes_are_shown_in_two_halves() -> None:
    assert display_code("ABCDEFGHJK") == "ABCDE-FGHJK"


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("ABCDE-FGHJK", "ABCDEFGHJK"),
        ("abcde fghjk", "ABCDEFGHJK"),
        ("  abcdefghjk ", "ABCDEFGHJK"),
        ("ABCDE_FGHJK", "ABCDEFGHJK"),
        ("ABCDE-FGHJ", None),  # too short
        ("ABCDE-FGHJKL", None),  # too long
        ("ABCDE-FGHJ0", None),  # 0 is not in the alphabet
        ("", None),
        ("<script>", None),
    ],
)
def test_typed_codes_are_normalised(typed: str, expected: str | None) -> None:
    assert normalize_code(typed) == expected


def test_only_a_sha256_is_kept() -> None:
    digest = hash_code("ABCDEFGHJK")
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == hash_code("ABCDEFGHJK")
    assert digest != hash_code("ABCDEFGHJM")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_limiter_locks_out_after_max_failures_until_the_window_passes() -> None:
    clock = Clock()
    limiter = MemoryAttemptLimiter(max_failures=3, window_seconds=60, clock=clock)
    for _ in range(2):
        await limiter.failed("telegram:1")
        clock.now += 1
    assert await limiter.retry_after("telegram:1") is None
    await limiter.failed("telegram:1")
    wait = await limiter.retry_after("telegram:1")
    assert wait == pytest.approx(58.0)
    assert await limiter.retry_after("telegram:2") is None  # per account
    clock.now += 58.5
    assert await limiter.retry_after("telegram:1") is None  # the first failure aged out
