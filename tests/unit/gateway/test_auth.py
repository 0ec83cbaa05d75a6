"""JWT verification and the JWKS cache, with in-memory keys and a fake fetch and clock.

The same cases run against a real JWKS server in tests/integration/gateway/test_auth_jwks.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from dexorder.devenv.jwks import LocalJwksIssuer, generate_key
from dexorder.gateway.auth import (
    AuthError,
    AuthFailure,
    JwksError,
    JwksKeySource,
    TokenVerifier,
    parse_jwks,
)

ISSUER = "https://id.example.com/"
AUDIENCE = "dexorder"
DEV_SECRET = "a-development-secret-of-32-chars!"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Time passes at once: what a waiting token would wait, recorded."""
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class FakeJwksEndpoint:
    """Serves an issuer's JWKS from memory, counting fetches; can be made to fail."""

    def __init__(self, issuer: LocalJwksIssuer) -> None:
        self.issuer = issuer
        self.fetches = 0
        self.failing = False

    async def __call__(self) -> Any:
        self.fetches += 1
        await asyncio.sleep(0)
        if self.failing:
            raise JwksError("identity provider is down")
        return self.issuer.jwks()


def make_source(
    issuer: LocalJwksIssuer, clock: FakeClock | None = None
) -> tuple[FakeJwksEndpoint, JwksKeySource]:
    endpoint = FakeJwksEndpoint(issuer)
    clock = clock or FakeClock()
    source = JwksKeySource(
        endpoint, min_refetch_seconds=30, cache_seconds=600, clock=clock, sleep=clock.sleep
    )
    return endpoint, source


@pytest.fixture(scope="module")
def issuer() -> LocalJwksIssuer:
    issuer = LocalJwksIssuer(issuer=ISSUER, audience=AUDIENCE)
    issuer.add_key("ES256", kid="ec-1")
    issuer.add_key("EdDSA", kid="ed-1")
    return issuer


@pytest.fixture
def verifier(issuer: LocalJwksIssuer) -> TokenVerifier:
    return TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, leeway_seconds=30, keys=make_source(issuer)[1]
    )


async def refused(verifier: TokenVerifier, token: str | None) -> AuthFailure:
    with pytest.raises(AuthError) as error:
        await verifier.verify(token)
    return error.value.reason


@pytest.mark.parametrize("kid", ["current", "ec-1", "ed-1"])
async def test_each_signature_algorithm_is_accepted(
    issuer: LocalJwksIssuer, verifier: TokenVerifier, kid: str
) -> None:
    key = issuer.current if kid == "current" else issuer.key(kid)
    token = issuer.mint("alice", key=key, extra={"email": "alice@example.com"})

    identity = await verifier.verify(token)

    assert identity.user == "alice"
    assert identity.email == "alice@example.com"
    assert identity.claims["aud"] == AUDIENCE


async def test_expiry_is_checked_with_leeway(
    issuer: LocalJwksIssuer, verifier: TokenVerifier
) -> None:
    assert (await verifier.verify(issuer.mint(expires_in=-10))).user == "user-1"
    assert await refused(verifier, issuer.mint(expires_in=-120)) is AuthFailure.EXPIRED


async def test_not_before_is_checked_with_leeway(
    issuer: LocalJwksIssuer, verifier: TokenVerifier
) -> None:
    assert (await verifier.verify(issuer.mint(not_before=10))).user == "user-1"
    assert await refused(verifier, issuer.mint(not_before=120)) is AuthFailure.NOT_YET_VALID


async def test_issuer_and_audience_must_match(
    issuer: LocalJwksIssuer, verifier: TokenVerifier
) -> None:
    assert (
        await refused(verifier, issuer.mint(extra={"iss": "https://evil.example.com/"}))
        is AuthFailure.WRONG_ISSUER
    )
    assert (
        await refused(verifier, issuer.mint(extra={"aud": "someone-else"}))
        is AuthFailure.WRONG_AUDIENCE
    )
    several = issuer.mint(extra={"aud": ["someone-else", AUDIENCE]})
    assert (await verifier.verify(several)).user == "user-1"


@pytest.mark.parametrize("claim", ["exp", "sub", "iss", "aud"])
async def test_required_claims(
    issuer: LocalJwksIssuer, verifier: TokenVerifier, claim: str
) -> None:
    assert await refused(verifier, issuer.mint(omit=[claim])) is AuthFailure.MISSING_CLAIM


async def test_an_empty_subject_is_refused(
    issuer: LocalJwksIssuer, verifier: TokenVerifier
) -> None:
    assert await refused(verifier, issuer.mint(subject=" ")) is AuthFailure.MISSING_CLAIM


@pytest.mark.parametrize("subject", ["alice\nadmin", "x" * 254])
async def test_a_subject_that_cannot_name_a_user_is_refused(
    issuer: LocalJwksIssuer, verifier: TokenVerifier, subject: str
) -> None:
    assert await refused(verifier, issuer.mint(subject=subject)) is AuthFailure.MISSING_CLAIM


async def test_alg_none_is_refused(issuer: LocalJwksIssuer, verifier: TokenVerifier) -> None:
    assert await refused(verifier, issuer.mint_unsigned()) is AuthFailure.ALGORITHM_REFUSED


async def test_hmac_signed_with_the_public_key_is_refused(
    issuer: LocalJwksIssuer, verifier: TokenVerifier
) -> None:
    forged = issuer.mint_hmac(issuer.current.public_pem(), kid=issuer.current.kid)

    with pytest.raises(AuthError) as error:
        await verifier.verify(forged)

    assert error.value.reason is AuthFailure.ALGORITHM_REFUSED
    assert "asymmetric" in error.value.detail


async def test_a_key_used_for_another_algorithm_is_refused(
    issuer: LocalJwksIssuer, verifier: TokenVerifier
) -> None:
    # Signed with the EC key but naming the RSA key's kid: the header says ES256.
    token = issuer.mint(key=issuer.key("ec-1"), kid=issuer.current.kid)

    assert await refused(verifier, token) is AuthFailure.ALGORITHM_REFUSED


async def test_a_signature_by_an_unpublished_key_is_refused(
    issuer: LocalJwksIssuer, verifier: TokenVerifier
) -> None:
    impostor = generate_key("RS256", kid=issuer.current.kid)

    assert await refused(verifier, issuer.mint(key=impostor)) is AuthFailure.BAD_SIGNATURE


async def test_an_unknown_kid_is_refused(issuer: LocalJwksIssuer, verifier: TokenVerifier) -> None:
    assert await refused(verifier, issuer.mint(kid="nobody")) is AuthFailure.UNKNOWN_KEY


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, AuthFailure.MISSING_TOKEN),
        ("", AuthFailure.MISSING_TOKEN),
        ("not-a-jwt", AuthFailure.MALFORMED),
        ("a.b.c", AuthFailure.MALFORMED),
        ("x" * 20_000, AuthFailure.MALFORMED),
    ],
)
async def test_malformed_tokens(
    verifier: TokenVerifier, token: str | None, reason: AuthFailure
) -> None:
    assert await refused(verifier, token) is reason


async def test_the_token_is_never_logged_nor_quoted(
    issuer: LocalJwksIssuer, verifier: TokenVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = issuer.mint(extra={"aud": "someone-else"})

    with pytest.raises(AuthError) as error:
        await verifier.verify(token)

    signature = token.rsplit(".", 1)[1]
    assert signature not in str(error.value)
    assert token not in caplog.text
    assert signature not in caplog.text
    assert "wrong_audience" in caplog.text


async def test_dev_secret_accepts_hs256_only(issuer: LocalJwksIssuer) -> None:
    dev = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway_seconds=0, hs256_secret=DEV_SECRET)

    identity = await dev.verify(issuer.mint_hmac(DEV_SECRET.encode(), "dev-user"))

    assert identity.user == "dev-user"
    assert await refused(dev, issuer.mint()) is AuthFailure.ALGORITHM_REFUSED
    assert await refused(dev, issuer.mint_unsigned()) is AuthFailure.ALGORITHM_REFUSED
    wrong_secret = issuer.mint_hmac(b"another-secret-of-thirty-two-chars!")
    assert await refused(dev, wrong_secret) is AuthFailure.BAD_SIGNATURE


def test_a_verifier_needs_exactly_one_key_source(issuer: LocalJwksIssuer) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway_seconds=0)
    with pytest.raises(ValueError, match="exactly one"):
        TokenVerifier(
            issuer=ISSUER,
            audience=AUDIENCE,
            leeway_seconds=0,
            keys=make_source(issuer)[1],
            hs256_secret=DEV_SECRET,
        )


def test_parse_jwks_keeps_only_asymmetric_signing_keys(issuer: LocalJwksIssuer) -> None:
    document = issuer.jwks()
    rsa_jwk = issuer.current.public_jwk()
    document["keys"] += [
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {**rsa_jwk, "kid": "for-encryption", "use": "enc"},
        {**rsa_jwk, "kid": "rs512", "alg": "RS512"},
        {name: value for name, value in rsa_jwk.items() if name != "alg"} | {"kid": "no-alg"},
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},
        "not a key",
    ]

    keys = parse_jwks(document)

    assert set(keys) == {issuer.current.kid, "ec-1", "ed-1", "no-alg"}
    assert keys["no-alg"].algorithm == "RS256"
    assert keys["ec-1"].algorithm == "ES256"
    assert keys["ed-1"].algorithm == "EdDSA"


@pytest.mark.parametrize("document", [[], {"keys": "x"}, {"kids": []}, None])
def test_parse_jwks_refuses_what_is_not_a_jwks(document: object) -> None:
    with pytest.raises(JwksError):
        parse_jwks(document)


async def test_keys_are_fetched_once_and_cached() -> None:
    issuer, clock = LocalJwksIssuer(issuer=ISSUER, audience=AUDIENCE), FakeClock()
    endpoint, source = make_source(issuer, clock)

    for _ in range(5):
        await source.key_for(issuer.current.kid, "RS256")

    assert endpoint.fetches == 1


async def test_an_unknown_kid_refetches_at_most_once_per_interval() -> None:
    issuer, clock = LocalJwksIssuer(issuer=ISSUER, audience=AUDIENCE), FakeClock()
    endpoint, source = make_source(issuer, clock)
    await source.key_for(issuer.current.kid, "RS256")
    clock.now += 31

    for _ in range(3):
        with pytest.raises(AuthError) as error:
            await source.key_for("junk", "RS256")
        assert error.value.reason is AuthFailure.UNKNOWN_KEY
    # The first fetched at once; each later one waited out the interval, then fetched.
    assert endpoint.fetches == 4
    assert clock.slept == [30.0, 30.0]


async def test_a_kid_flood_does_not_lock_out_a_freshly_rotated_key() -> None:
    """Junk kids spend the fetch; a token signed with a key published just after waits for
    the interval's end (at most min_refetch_seconds), and one fetch serves every waiter."""
    issuer, clock = LocalJwksIssuer(issuer=ISSUER, audience=AUDIENCE), FakeClock()
    endpoint, source = make_source(issuer, clock)
    await source.key_for(issuer.current.kid, "RS256")
    clock.now += 31
    with pytest.raises(AuthError):
        await source.key_for("junk-0", "RS256")  # spends this interval's fetch
    assert endpoint.fetches == 2
    rotated = issuer.rotate()
    clock.now += 10

    lookups = [source.key_for(f"junk-{n}", "RS256") for n in range(1, 20)]
    lookups.insert(7, source.key_for(rotated.kid, "RS256"))
    results = await asyncio.gather(*lookups, return_exceptions=True)

    assert results[7] == await source.key_for(rotated.kid, "RS256")
    refused = [r for r in results if isinstance(r, AuthError)]
    assert len(refused) == 19
    assert all(r.reason is AuthFailure.UNKNOWN_KEY for r in refused)
    assert endpoint.fetches == 3  # one fetch for all twenty waiters
    assert clock.slept == [20.0]  # waited for the window's end, no longer


async def test_concurrent_unknown_kids_share_one_fetch() -> None:
    issuer, clock = LocalJwksIssuer(issuer=ISSUER, audience=AUDIENCE), FakeClock()
    endpoint, source = make_source(issuer, clock)
    await source.key_for(issuer.current.kid, "RS256")
    clock.now += 60
    rotated = issuer.rotate()

    keys = await asyncio.gather(*(source.key_for(rotated.kid, "RS256") for _ in range(20)))

    assert {key.kid for key in keys} == {rotated.kid}
    assert endpoint.fetches == 2


async def test_the_cache_expires_so_withdrawn_keys_stop_working() -> None:
    issuer, clock = LocalJwksIssuer(issuer=ISSUER, audience=AUDIENCE), FakeClock()
    endpoint, source = make_source(issuer, clock)
    old = issuer.current
    await source.key_for(old.kid, "RS256")
    issuer.rotate(retire_old=True)

    clock.now += 599
    assert (await source.key_for(old.kid, "RS256")).kid == old.kid
    clock.now += 1
    with pytest.raises(AuthError) as error:
        await source.key_for(old.kid, "RS256")

    assert error.value.reason is AuthFailure.UNKNOWN_KEY
    assert endpoint.fetches == 2


async def test_a_failed_refresh_keeps_the_known_keys() -> None:
    issuer, clock = LocalJwksIssuer(issuer=ISSUER, audience=AUDIENCE), FakeClock()
    endpoint, source = make_source(issuer, clock)
    await source.key_for(issuer.current.kid, "RS256")
    endpoint.failing = True
    clock.now += 700

    assert (await source.key_for(issuer.current.kid, "RS256")).kid == issuer.current.kid
    assert endpoint.fetches == 2


async def test_keys_unavailable_is_the_servers_fault_and_not_retried_at_once() -> None:
    issuer, clock = LocalJwksIssuer(issuer=ISSUER, audience=AUDIENCE), FakeClock()
    endpoint, source = make_source(issuer, clock)
    endpoint.failing = True

    for _ in range(3):
        with pytest.raises(AuthError) as error:
            await source.key_for(issuer.current.kid, "RS256")
        assert error.value.reason is AuthFailure.KEYS_UNAVAILABLE
        assert error.value.is_server_fault
    assert endpoint.fetches == 1

    endpoint.failing = False
    clock.now += 30
    assert (await source.key_for(issuer.current.kid, "RS256")).kid == issuer.current.kid


async def test_a_token_without_kid_uses_the_only_key() -> None:
    issuer, clock = LocalJwksIssuer(issuer=ISSUER, audience=AUDIENCE), FakeClock()
    _, source = make_source(issuer, clock)
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway_seconds=0, keys=source)

    assert (await verifier.verify(issuer.mint(include_kid=False))).user == "user-1"

    issuer.add_key("RS256")
    clock.now += 700
    with pytest.raises(AuthError) as error:
        await verifier.verify(issuer.mint(include_kid=False))
    assert error.value.reason is AuthFailure.UNKNOWN_KEY
