"""Who is talking: verify a user's JWT, with keys from a JWKS URL or a dev-only secret.

Accepted: RS256, ES256 and EdDSA signatures from keys the JWKS publishes, with ``exp``,
``nbf``, ``iss`` and ``aud`` checked under a small leeway. Refused: ``alg: none``, any
HMAC algorithm presented against asymmetric keys, and symmetric keys in a JWKS. HS256 works
only when a shared secret is configured explicitly, and then it is the only algorithm.

The token itself is never logged, nor put into an error message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import aiohttp
import jwt
from jwt.types import Options

from dexorder.core.naming import user_id_problem
from dexorder.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

#: Signature algorithms accepted from a JWKS.
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})
DEV_ALGORITHM = "HS256"
#: A longer token is refused before parsing: nothing legitimate is this large.
MAX_TOKEN_BYTES = 16 * 1024
MAX_JWKS_BYTES = 1024 * 1024


class AuthFailure(StrEnum):
    """Why a token was refused; stable codes for logs, metrics and close reasons."""

    MISSING_TOKEN = "missing_token"
    MALFORMED = "malformed_token"
    ALGORITHM_REFUSED = "algorithm_refused"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "token_expired"
    NOT_YET_VALID = "token_not_yet_valid"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    MISSING_CLAIM = "missing_claim"
    # Not the user's fault: the identity provider's keys could not be fetched.
    KEYS_UNAVAILABLE = "keys_unavailable"


class AuthError(Exception):
    """A refused token. ``reason`` is a stable code; the message never quotes the token."""

    def __init__(self, reason: AuthFailure, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def is_server_fault(self) -> bool:
        """True when the gateway, not the token, is at fault (answer 503, not 401)."""
        return self.reason is AuthFailure.KEYS_UNAVAILABLE


@dataclass(frozen=True)
class Identity:
    """A verified user. ``user`` is the token's ``sub``."""

    user: str
    claims: Mapping[str, Any]

    @property
    def email(self) -> str | None:
        email = self.claims.get("email")
        return email if isinstance(email, str) else None


class JwksError(Exception):
    """The JWKS URL could not be read, or did not hold a JWKS document."""


@dataclass(frozen=True)
class VerificationKey:
    """A public key from the JWKS and the one algorithm it may verify."""

    kid: str | None
    algorithm: str
    key: Any


def _algorithm_for(jwk: Mapping[str, Any]) -> str | None:
    declared = jwk.get("alg")
    if declared is not None:
        return declared if declared in ASYMMETRIC_ALGORITHMS else None
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        return "RS256"
    if kty == "EC" and crv == "P-256":
        return "ES256"
    if kty == "OKP" and crv == "Ed25519":
        return "EdDSA"
    return None


def parse_jwks(document: Any) -> dict[str | None, VerificationKey]:
    """The usable signing keys of a JWKS document, by ``kid``.

    Symmetric (``oct``) keys, encryption keys and keys for other algorithms are left out:
    an HMAC key published in a JWKS would let anyone who reads it sign tokens.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise JwksError("a JWKS document is an object with a 'keys' list")
    keys: dict[str | None, VerificationKey] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, Mapping) or jwk.get("use", "sig") != "sig":
            continue
        algorithm = _algorithm_for(jwk)
        kid = jwk.get("kid")
        if algorithm is None or not (kid is None or isinstance(kid, str)):
            continue
        try:
            key = jwt.PyJWK(dict(jwk), algorithm=algorithm).key
        except jwt.PyJWTError as error:
            log.warning("skipping unusable JWKS key kid=%r: %s", kid, error)
            continue
        keys[kid] = VerificationKey(kid=kid, algorithm=algorithm, key=key)
    return keys


JwksFetcher = Callable[[], Awaitable[Any]]


def aiohttp_jwks_fetcher(
    session: aiohttp.ClientSession, url: str, *, timeout_seconds: float = 5.0
) -> JwksFetcher:
    """A fetcher that GETs ``url`` with ``session``; the caller owns the session."""

    async def fetch() -> Any:
        try:
            async with session.get(
                url,
                timeout=aiohttp.ClientTimeout(total=timeout_seconds),
                headers={"Accept": "application/json"},
            ) as response:
                if response.status != 200:
                    raise JwksError(f"GET {url} answered {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body.extend(chunk)
                    if len(body) > MAX_JWKS_BYTES:
                        raise JwksError(f"GET {url}: larger than {MAX_JWKS_BYTES} bytes")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise JwksError(f"GET {url} failed: {error!r}") from error
        try:
            return json.loads(body)
        except ValueError as error:
            raise JwksError(f"GET {url}: not JSON") from error

    return fetch


class KeySource(Protocol):
    async def key_for(self, kid: str | None, algorithm: str) -> VerificationKey: ...


class JwksKeySource:
    """The JWKS, cached; an unknown ``kid`` refetches it at most once per interval.

    Every fetch, whether it succeeds or not, waits ``min_refetch_seconds`` after the last
    attempt, so neither junk tokens nor a down identity provider cause a fetch storm.
    When a refresh fails, the keys already known keep working.

    A token with an unknown ``kid`` that arrives inside that interval waits for its end, and
    then one fetch serves every token waiting: so a flood of junk ``kid`` s, which spends
    the fetch, cannot lock out a key the provider has just published (its tokens wait at
    most ``min_refetch_seconds``, not until the flood stops).
    """

    def __init__(
        self,
        fetch: JwksFetcher,
        *,
        min_refetch_seconds: float,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._fetch = fetch
        self._sleep = sleep
        self._min_refetch = min_refetch_seconds
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._keys: dict[str | None, VerificationKey] | None = None
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        # Counts finished fetch attempts: a task that waited for the lock sees whether one
        # finished meanwhile, and then looks again instead of fetching again.
        self._attempts_done = 0
        self._lock = asyncio.Lock()
        self.fetch_count = 0

    async def key_for(self, kid: str | None, algorithm: str) -> VerificationKey:
        fetched = False
        if self._keys is None or self._clock() - self._fetched_at >= self._cache_seconds:
            fetched = await self._refresh()
        key = self._lookup(kid)
        if key is None and not fetched:
            # No keys at all: the provider is down, and waiting would not make it answer.
            await self._refresh(wait_for_window=self._keys is not None)
            key = self._lookup(kid)
        if key is None:
            if self._keys is None:
                raise AuthError(AuthFailure.KEYS_UNAVAILABLE, "the signing keys cannot be fetched")
            # The kid is the sender's text: quote a bounded part of it.
            raise AuthError(AuthFailure.UNKNOWN_KEY, f"no signing key with kid {kid!r:.80}")
        if key.algorithm != algorithm:
            raise AuthError(
                AuthFailure.ALGORITHM_REFUSED,
                f"key {kid!r} verifies {key.algorithm}, the token says {algorithm}",
            )
        return key

    def _lookup(self, kid: str | None) -> VerificationKey | None:
        if self._keys is None:
            return None
        if kid is None and len(self._keys) == 1:
            # A provider with a single key may leave out `kid`.
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _refresh(self, *, wait_for_window: bool = False) -> bool:
        """Fetch the JWKS unless the interval forbids it; True when a fetch attempt ended
        during this call (this task's, or another's it waited for)."""
        done_before = self._attempts_done
        async with self._lock:
            if self._attempts_done != done_before:
                return True  # another task fetched while this one waited
            remaining = self._min_refetch - (self._clock() - self._attempted_at)
            if remaining > 0:
                if not wait_for_window:
                    return False
                # Holding the lock: the tokens queued behind it find the fetch made, above.
                await self._sleep(remaining)
            self._attempted_at = self._clock()
            self.fetch_count += 1
            try:
                keys = parse_jwks(await self._fetch())
            except JwksError as error:
                log.warning(
                    "JWKS refresh failed, keeping %s known keys: %s", len(self._keys or {}), error
                )
                return True
            finally:
                self._attempts_done += 1
            self._keys = keys
            self._fetched_at = self._clock()
            log.info("JWKS refreshed: %d signing keys", len(keys))
            return True


_FAILURES: tuple[tuple[type[jwt.PyJWTError], AuthFailure], ...] = (
    (jwt.ExpiredSignatureError, AuthFailure.EXPIRED),
    (jwt.ImmatureSignatureError, AuthFailure.NOT_YET_VALID),
    (jwt.InvalidIssuerError, AuthFailure.WRONG_ISSUER),
    (jwt.InvalidAudienceError, AuthFailure.WRONG_AUDIENCE),
    (jwt.MissingRequiredClaimError, AuthFailure.MISSING_CLAIM),
    (jwt.InvalidSignatureError, AuthFailure.BAD_SIGNATURE),
    (jwt.InvalidAlgorithmError, AuthFailure.ALGORITHM_REFUSED),
    (jwt.InvalidKeyError, AuthFailure.ALGORITHM_REFUSED),
)


def _failure_for(error: jwt.PyJWTError) -> AuthFailure:
    for kind, failure in _FAILURES:
        if isinstance(error, kind):
            return failure
    return AuthFailure.MALFORMED


class TokenVerifier:
    """Turns a bearer token into an ``Identity``, or raises ``AuthError``."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: float,
        keys: KeySource | None = None,
        hs256_secret: str | None = None,
    ) -> None:
        if (keys is None) == (hs256_secret is None):
            raise ValueError("give exactly one of a key source or a dev HS256 secret")
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._keys = keys
        self._secret = hs256_secret

    @classmethod
    def from_settings(
        cls, settings: GatewaySettings, session: aiohttp.ClientSession
    ) -> TokenVerifier:
        keys: KeySource | None = None
        secret = None
        if settings.dev_hs256_secret is not None:
            secret = settings.dev_hs256_secret.get_secret_value()
            log.warning("JWTs are verified with a shared HS256 secret: development only")
        elif settings.jwks_url is not None:
            keys = JwksKeySource(
                aiohttp_jwks_fetcher(session, settings.jwks_url),
                min_refetch_seconds=settings.jwks_min_refetch_seconds,
                cache_seconds=settings.jwks_cache_seconds,
            )
        return cls(
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            leeway_seconds=settings.jwt_leeway_seconds,
            keys=keys,
            hs256_secret=secret,
        )

    @property
    def accepted_algorithms(self) -> frozenset[str]:
        return frozenset({DEV_ALGORITHM}) if self._secret is not None else ASYMMETRIC_ALGORITHMS

    async def verify(self, token: str | None) -> Identity:
        try:
            identity = await self._verify(token)
        except AuthError as error:
            log.info("token refused: %s", error.reason.value)
            raise
        return identity

    async def _verify(self, token: str | None) -> Identity:
        if not token:
            raise AuthError(AuthFailure.MISSING_TOKEN, "no token was presented")
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError(AuthFailure.MALFORMED, f"token longer than {MAX_TOKEN_BYTES} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise AuthError(AuthFailure.MALFORMED, "not a JWS compact token") from error
        algorithm = header.get("alg")
        kid = header.get("kid")
        if not isinstance(algorithm, str):
            raise AuthError(AuthFailure.MALFORMED, "the token header has no 'alg'")
        if algorithm not in self.accepted_algorithms:
            raise AuthError(AuthFailure.ALGORITHM_REFUSED, self._refusal(algorithm))
        key: Any
        if self._secret is not None:
            key = self._secret.encode()
        else:
            assert self._keys is not None
            key = (await self._keys.key_for(kid, algorithm)).key
        options: Options = {
            "require": ["exp", "sub", "iss", "aud"],
            "enforce_minimum_key_length": True,
        }
        try:
            claims = jwt.decode(
                token,
                key,
                # Fixed by the key (or the dev secret), never taken from the token alone.
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=options,
            )
        except jwt.PyJWTError as error:
            raise AuthError(_failure_for(error), str(error)) from error
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip():
            raise AuthError(AuthFailure.MISSING_CLAIM, "'sub' must be a non-empty string")
        problem = user_id_problem(subject)
        if problem is not None:
            raise AuthError(AuthFailure.MISSING_CLAIM, f"'sub' is no user id: {problem}")
        return Identity(user=subject, claims=claims)

    def _refusal(self, algorithm: str) -> str:
        if algorithm.lower() == "none":
            return "unsigned tokens (alg none) are refused"
        if algorithm.startswith("HS") and self._secret is None:
            return f"{algorithm} is refused: the keys are asymmetric"
        return (
            f"{algorithm} is not accepted (accepted: {', '.join(sorted(self.accepted_algorithms))})"
        )
