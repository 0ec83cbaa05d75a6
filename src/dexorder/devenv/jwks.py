"""A local identity provider for tests and the demo: signing keys, a JWKS, and tokens.

``LocalJwksIssuer`` holds RSA, EC (P-256) and Ed25519 keys, serves the public ones at
``/.well-known/jwks.json`` from an aiohttp server on loopback, and mints tokens with any
claims, ``kid`` or algorithm, including the malicious ones the gateway must refuse.
Keys can be rotated, and every JWKS request is counted, so tests can see refetches.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from dexorder.devenv.process import LOOPBACK

Algorithm = Literal["RS256", "ES256", "EdDSA"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
JWKS_PATH = "/.well-known/jwks.json"
DEFAULT_ISSUER = "https://dexorder.invalid/dev-issuer"
DEFAULT_AUDIENCE = "dexorder-gateway"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_segment(value: Mapping[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


@dataclass(frozen=True)
class IssuerKey:
    """A signing key; its public half is what the JWKS publishes."""

    kid: str
    algorithm: Algorithm
    private_key: PrivateKey

    def public_jwk(self) -> dict[str, Any]:
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def generate_key(algorithm: Algorithm = "RS256", kid: str | None = None) -> IssuerKey:
    private_key: PrivateKey
    if algorithm == "RS256":
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm == "ES256":
        private_key = ec.generate_private_key(ec.SECP256R1())
    else:
        private_key = ed25519.Ed25519PrivateKey.generate()
    return IssuerKey(kid or f"{algorithm.lower()}-{secrets.token_hex(4)}", algorithm, private_key)


class LocalJwksIssuer:
    """Keys, a JWKS endpoint on loopback, and a token mint."""

    def __init__(
        self,
        *,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        algorithm: Algorithm = "RS256",
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self._published: dict[str, IssuerKey] = {}
        self.current = self.add_key(algorithm)
        self.fetch_count = 0
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    # --- keys -------------------------------------------------------------------------
    @property
    def keys(self) -> tuple[IssuerKey, ...]:
        return tuple(self._published.values())

    def add_key(self, algorithm: Algorithm = "RS256", kid: str | None = None) -> IssuerKey:
        """Generate and publish a key; it does not become the signing key."""
        key = generate_key(algorithm, kid)
        self._published[key.kid] = key
        return key

    def rotate(self, algorithm: Algorithm | None = None, *, retire_old: bool = False) -> IssuerKey:
        """Publish a new key and sign with it from now on; optionally withdraw the old one."""
        old = self.current
        self.current = self.add_key(algorithm or old.algorithm)
        if retire_old:
            self.retire(old.kid)
        return self.current

    def retire(self, kid: str) -> None:
        """Stop publishing a key."""
        self._published.pop(kid, None)

    def key(self, kid: str) -> IssuerKey:
        return self._published[kid]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self._published.values()]}

    # --- tokens -----------------------------------------------------------------------
    def claims(
        self,
        subject: str = "user-1",
        *,
        expires_in: float = 300,
        not_before: float | None = None,
        extra: Mapping[str, Any] | None = None,
        omit: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Standard claims for ``subject``; ``extra`` overrides any of them."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": now,
            "exp": now + int(expires_in),
        }
        if not_before is not None:
            claims["nbf"] = now + int(not_before)
        claims.update(extra or {})
        for name in omit:
            claims.pop(name, None)
        return claims

    def mint(
        self,
        subject: str = "user-1",
        *,
        key: IssuerKey | None = None,
        kid: str | None = None,
        include_kid: bool = True,
        headers: Mapping[str, Any] | None = None,
        expires_in: float = 300,
        not_before: float | None = None,
        extra: Mapping[str, Any] | None = None,
        omit: Iterable[str] = (),
    ) -> str:
        """A token signed with ``key`` (the current key by default).

        ``kid`` overrides the header's key id, e.g. to name a key that does not exist;
        ``include_kid=False`` leaves it out.
        """
        signer = key or self.current
        header: dict[str, Any] = {"kid": kid or signer.kid} if include_kid else {}
        header.update(headers or {})
        payload = self.claims(
            subject, expires_in=expires_in, not_before=not_before, extra=extra, omit=omit
        )
        return jwt.encode(payload, signer.private_key, algorithm=signer.algorithm, headers=header)

    def mint_unsigned(self, subject: str = "user-1", **claims: Any) -> str:
        """An ``alg: none`` token, which no verifier may accept."""
        header = {"alg": "none", "typ": "JWT"}
        payload = self.claims(subject, extra=claims)
        return f"{_json_segment(header)}.{_json_segment(payload)}."

    def mint_hmac(
        self,
        secret: bytes,
        subject: str = "user-1",
        *,
        kid: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """An HS256 token signed with ``secret``, built by hand.

        PyJWT refuses to use a public key as an HMAC secret, which is exactly the forgery
        (HS/RS confusion) a verifier must refuse: sign with ``key.public_pem()``.
        """
        header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
        if kid is not None:
            header["kid"] = kid
        signing_input = (
            f"{_json_segment(header)}.{_json_segment(self.claims(subject, extra=extra))}"
        )
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(signature)}"

    # --- the JWKS server --------------------------------------------------------------
    @property
    def jwks_url(self) -> str:
        if self._url is None:
            raise RuntimeError("the JWKS server is not running; call start() first")
        return self._url

    async def _serve_jwks(self, request: web.Request) -> web.Response:
        self.fetch_count += 1
        return web.json_response(self.jwks(), headers={"Cache-Control": "max-age=60"})

    async def start(self, host: str = LOOPBACK, port: int = 0) -> str:
        """Serve the JWKS; returns its URL. Port 0 picks a free one without a race."""
        app = web.Application()
        app.router.add_get(JWKS_PATH, self._serve_jwks)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        self._url = f"http://{bound_host}:{bound_port}{JWKS_PATH}"
        return self._url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._url = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
