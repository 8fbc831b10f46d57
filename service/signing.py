"""Callback tokens: the proof a provider's callback carries, since no provider signs its own.

A token is an itsdangerous-signed, timestamped value naming the task and its provider
(HMAC-SHA256, URL-safe). It goes into the callback URL TaskRelay hands out:
``{public_url}/callbacks/{provider}/{token}``. Verification is pure: no I/O.

Key rotation: new tokens are signed with ``TASKRELAY_SECRET_KEY``; tokens signed with any key in
``TASKRELAY_SECRET_KEY_FALLBACKS`` still verify until they expire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from itsdangerous import BadData, BadSignature, URLSafeTimedSerializer
from itsdangerous.encoding import base64_decode, base64_encode

from service.errors import CallbackProviderMismatch, CallbackTokenExpired, CallbackTokenInvalid

SALT = "taskrelay.callback.v1"
VERIFIED_CACHE = 65_536  # tokens remembered after verifying (~200 bytes each)
EXPIRED = "This callback URL has expired; the task can still be refreshed by polling."
# How far ahead of this replica's clock another replica's may be when it signs a token.
CLOCK_SKEW = 300.0


@dataclass(frozen=True)
class CallbackClaim:
    task_id: str
    provider: str


NOT_ISSUED = (
    "This callback URL's token is not valid: it was not issued by this TaskRelay or was altered."
)


class CallbackSigner:
    def __init__(self, secret_key: str, fallbacks: Sequence[str] = (), *, max_age: float) -> None:
        # itsdangerous signs with the last key and accepts all of them.
        self._serializer = URLSafeTimedSerializer(
            [*fallbacks, secret_key],
            salt=SALT,
            signer_kwargs={"digest_method": hashlib.sha256},
        )
        self.max_age = max_age
        self._verified: OrderedDict[str, tuple[str, str, float]] = OrderedDict()

    def token(self, task_id: str, provider: str) -> str:
        value = self._serializer.dumps([task_id, provider])
        return value if isinstance(value, str) else value.decode("ascii")

    def callback_url(self, public_url: str, task_id: str, provider: str) -> str:
        return f"{public_url}/callbacks/{provider}/{self.token(task_id, provider)}"

    def verify(self, token: str, provider: str) -> CallbackClaim:
        """The task a token names, or a typed error; checks signature, age and provider.

        Tokens that verified are remembered (a bounded LRU of ``VERIFIED_CACHE`` entries, with
        the time they were signed), so a task's later callbacks skip the HMAC and decoding; the
        age is still checked on every use, against itsdangerous's own clock."""
        known = self._verified.get(token)
        if known is None:
            known = self._verify_signature(token)
            self._verified[token] = known
            if len(self._verified) > VERIFIED_CACHE:
                self._verified.popitem(last=False)
        else:
            self._verified.move_to_end(token)
            if time.time() - known[2] > round(self.max_age):
                del self._verified[token]
                raise CallbackTokenExpired(EXPIRED)
        task_id, token_provider, _signed_at = known
        if token_provider != provider:
            raise CallbackProviderMismatch(
                f"This callback URL was issued for provider {token_provider!r}, not {provider!r}."
            )
        return CallbackClaim(task_id=task_id, provider=token_provider)

    def _verify_signature(self, token: str) -> tuple[str, str, float]:
        # The signature's base64 must be spelt as it was issued: the last of its 43 characters
        # carries 2 unused bits, and a decoder ignores them, so four spellings would verify.
        _, _, signature = token.rpartition(".")
        try:
            canonical = base64_encode(base64_decode(signature)).decode("ascii") == signature
        except (BadData, ValueError):
            canonical = False
        if not canonical:
            raise CallbackTokenInvalid(NOT_ISSUED)
        try:
            # The age is checked here, not by itsdangerous, which refuses a token signed even a
            # second "in the future": one signed by a replica whose clock is a little ahead.
            payload, signed_at = self._serializer.loads(token, return_timestamp=True)
        except BadSignature as exc:
            raise CallbackTokenInvalid(NOT_ISSUED) from exc
        if (
            not isinstance(payload, list)
            or len(payload) != 2
            or not all(isinstance(item, str) for item in payload)
        ):
            raise CallbackTokenInvalid("This callback URL's token has an unexpected payload.")
        signed = signed_at.timestamp()
        age = time.time() - signed
        if age > round(self.max_age):
            raise CallbackTokenExpired(EXPIRED)
        if age < -CLOCK_SKEW:
            raise CallbackTokenInvalid(
                "This callback URL's token was signed in the future: the clock of the TaskRelay "
                f"that issued it is more than {CLOCK_SKEW:g} s ahead; synchronise the replicas' "
                "clocks (NTP)."
            )
        return payload[0], payload[1], signed


# --- Standard Webhooks (https://www.standardwebhooks.com) -------------------------------------

WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105  (a format prefix, not a secret)


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 24 random bytes."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode("ascii")


def webhook_signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed by the secret's bytes."""
    key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def webhook_headers(
    signing_secrets: Sequence[str], message_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers; during a secret rotation both secrets sign
    (space-separated signatures), so receivers holding either one accept the delivery."""
    signatures = " ".join(
        webhook_signature(secret, message_id, timestamp, body) for secret in signing_secrets
    )
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures,
    }
