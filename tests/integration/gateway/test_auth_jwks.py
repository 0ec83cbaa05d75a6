"""Every authentication case against a real JWKS server on loopback, over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.process import free_port
from dexorder.gateway.auth import AuthError, AuthFailure, TokenVerifier
from dexorder.gateway.settings import GatewaySettings

ISSUER = "https://id.dexorder.test/"
AUDIENCE = "dexorder-gateway"
MIN_REFETCH_SECONDS = 1.0


@pytest.fixture
async def issuer() -> AsyncIterator[LocalJwksIssuer]:
    async with LocalJwksIssuer(issuer=ISSUER, audience=AUDIENCE) as issuer:
        yield issuer


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


VerifierFactory = Callable[..., TokenVerifier]


@pytest.fixture
def make_verifier(issuer: LocalJwksIssuer, http: aiohttp.ClientSession) -> VerifierFactory:
    def make(jwks_url: str | None = None, **overrides: Any) -> TokenVerifier:
        settings = GatewaySettings.from_values(
            {
                "database_url": "postgresql://127.0.0.1/unused",
                "jwks_url": jwks_url or issuer.jwks_url,
                "jwt_issuer": ISSUER,
                "jwt_audience": AUDIENCE,
                "jwt_leeway_seconds": 5,
                "jwks_min_refetch_seconds": MIN_REFETCH_SECONDS,
                **overrides,
            }
        )
        return TokenVerifier.from_settings(settings, http)

    return make


async def refusal(verifier: TokenVerifier, token: str) -> AuthFailure:
    with pytest.raises(AuthError) as error:
        await verifier.verify(token)
    return error.value.reason


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
async def test_a_valid_token_names_the_user(
    issuer: LocalJwksIssuer, make_verifier: VerifierFactory, algorithm: Any
) -> None:
    key = issuer.rotate(algorithm)

    identity = await make_verifier().verify(issuer.mint("user-42", key=key))

    assert identity.user == "user-42"
    assert issuer.fetch_count == 1


async def test_expired(issuer: LocalJwksIssuer, make_verifier: VerifierFactory) -> None:
    assert await refusal(make_verifier(), issuer.mint(expires_in=-60)) is AuthFailure.EXPIRED


async def test_not_yet_valid(issuer: LocalJwksIssuer, make_verifier: VerifierFactory) -> None:
    token = issuer.mint(not_before=60)

    assert await refusal(make_verifier(), token) is AuthFailure.NOT_YET_VALID


async def test_wrong_audience(issuer: LocalJwksIssuer, make_verifier: VerifierFactory) -> None:
    token = issuer.mint(extra={"aud": "another-service"})

    assert await refusal(make_verifier(), token) is AuthFailure.WRONG_AUDIENCE


async def test_wrong_issuer(issuer: LocalJwksIssuer, make_verifier: VerifierFactory) -> None:
    token = issuer.mint(extra={"iss": "https://evil.example.com/"})

    assert await refusal(make_verifier(), token) is AuthFailure.WRONG_ISSUER


async def test_alg_none(issuer: LocalJwksIssuer, make_verifier: VerifierFactory) -> None:
    verifier = make_verifier()

    assert await refusal(verifier, issuer.mint_unsigned()) is AuthFailure.ALGORITHM_REFUSED
    assert issuer.fetch_count == 0


async def test_hs_rs_confusion(issuer: LocalJwksIssuer, make_verifier: VerifierFactory) -> None:
    # The classic forgery: HS256 "signed" with the RSA public key the JWKS publishes.
    forged = issuer.mint_hmac(issuer.current.public_pem(), kid=issuer.current.kid)

    assert await refusal(make_verifier(), forged) is AuthFailure.ALGORITHM_REFUSED


async def test_unknown_kid(issuer: LocalJwksIssuer, make_verifier: VerifierFactory) -> None:
    verifier = make_verifier()
    await verifier.verify(issuer.mint())

    await asyncio.sleep(MIN_REFETCH_SECONDS)
    assert await refusal(verifier, issuer.mint(kid="no-such-key")) is AuthFailure.UNKNOWN_KEY
    assert issuer.fetch_count == 2


async def test_rotation_is_picked_up_on_the_new_kid(
    issuer: LocalJwksIssuer, make_verifier: VerifierFactory
) -> None:
    verifier = make_verifier()
    old = issuer.current
    assert (await verifier.verify(issuer.mint("before"))).user == "before"
    await asyncio.sleep(MIN_REFETCH_SECONDS)

    issuer.rotate("ES256")

    assert (await verifier.verify(issuer.mint("after"))).user == "after"
    assert (await verifier.verify(issuer.mint("old-key", key=old))).user == "old-key"
    assert issuer.fetch_count == 2


async def test_a_retired_key_stops_working_when_the_cache_expires(
    issuer: LocalJwksIssuer, make_verifier: VerifierFactory
) -> None:
    verifier = make_verifier(jwks_cache_seconds=MIN_REFETCH_SECONDS)
    old = issuer.current
    await verifier.verify(issuer.mint(key=old))

    issuer.rotate(retire_old=True)
    await asyncio.sleep(MIN_REFETCH_SECONDS)

    assert await refusal(verifier, issuer.mint(key=old)) is AuthFailure.UNKNOWN_KEY
    assert (await verifier.verify(issuer.mint())).user == "user-1"


async def test_unknown_kids_refetch_at_most_once_per_interval(
    issuer: LocalJwksIssuer, make_verifier: VerifierFactory
) -> None:
    verifier = make_verifier()
    await verifier.verify(issuer.mint())
    await asyncio.sleep(MIN_REFETCH_SECONDS)

    junk = [issuer.mint(kid=f"junk-{n}") for n in range(50)]
    reasons = await asyncio.gather(*(refusal(verifier, token) for token in junk))

    assert set(reasons) == {AuthFailure.UNKNOWN_KEY}
    assert issuer.fetch_count == 2

    # A real rotation inside the same interval (the junk spent its fetch) is not locked
    # out: its token waits for the interval's end, then one fetch serves it (issue 21).
    rotated = issuer.rotate()
    assert (await verifier.verify(issuer.mint(key=rotated))).user == "user-1"
    assert issuer.fetch_count == 3


async def test_an_unreachable_jwks_is_the_servers_fault(
    issuer: LocalJwksIssuer, make_verifier: VerifierFactory
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"

    with pytest.raises(AuthError) as error:
        await make_verifier(jwks_url=nowhere).verify(issuer.mint())

    assert error.value.reason is AuthFailure.KEYS_UNAVAILABLE
    assert error.value.is_server_fault


async def test_the_dev_secret_verifies_hs256_and_nothing_else(
    issuer: LocalJwksIssuer, http: aiohttp.ClientSession
) -> None:
    secret = "the-development-secret-32-chars!"
    settings = GatewaySettings.from_values(
        {
            "database_url": "postgresql://127.0.0.1/unused",
            "dev_hs256_secret": secret,
            "jwt_issuer": ISSUER,
            "jwt_audience": AUDIENCE,
        }
    )
    verifier = TokenVerifier.from_settings(settings, http)

    assert (await verifier.verify(issuer.mint_hmac(secret.encode(), "dev"))).user == "dev"
    assert await refusal(verifier, issuer.mint()) is AuthFailure.ALGORITHM_REFUSED
    assert issuer.fetch_count == 0
