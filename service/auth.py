"""API client authentication: ``Authorization: Bearer <token>`` against TASKRELAY_API_TOKENS.

Tokens are looked up by their SHA-256 digest, so the lookup time does not depend on how much of
a guessed token matches, and no plain token is kept beyond start-up. A request that
authenticates is then counted against its client's rate limit (service/ratelimit.py); one that
does not never touches any client's budget.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from starlette.requests import Request

from service.errors import Unauthorized
from service.ratelimit import ClientRateLimiter
from service.settings import Secret


class ApiClients:
    def __init__(
        self, tokens: Mapping[str, Secret], *, limiter: ClientRateLimiter | None = None
    ) -> None:
        self._by_digest = {_digest(secret.reveal()): name for name, secret in tokens.items()}
        self.limiter = limiter

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, request: Request) -> str:
        """The name of the API client making ``request``, or :class:`Unauthorized`; or
        :class:`RateLimited` when that client is over its rate limit."""
        header = request.headers.get("authorization")
        if not header:
            raise Unauthorized(
                "This endpoint needs an API token: send 'Authorization: Bearer <token>'.",
                code="missing_token",
            )
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(
                "The Authorization header must be 'Bearer <token>'.", code="invalid_token"
            )
        owner = self._by_digest.get(_digest(token))
        if owner is None:
            raise Unauthorized("The API token is not valid.", code="invalid_token")
        if self.limiter is not None:
            self.limiter.check(owner)
        return owner


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()
