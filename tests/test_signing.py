"""Callback tokens: signing, tampering, expiry, provider binding, key rotation."""

from __future__ import annotations

import time

import pytest

from service.errors import CallbackProviderMismatch, CallbackTokenExpired, CallbackTokenInvalid
from service.signing import CallbackSigner
from tests.conftest import altered

KEY = "k" * 32
WEEK = 7 * 86400.0


def signer(
    key: str = KEY, fallbacks: tuple[str, ...] = (), max_age: float = WEEK
) -> CallbackSigner:
    return CallbackSigner(key, fallbacks, max_age=max_age)


def test_token_round_trip() -> None:
    token = signer().token("tsk_abc", "evolink")
    claim = signer().verify(token, "evolink")
    assert claim.task_id == "tsk_abc"
    assert claim.provider == "evolink"


def test_callback_url_is_url_safe_and_well_under_evolinks_limit() -> None:
    url = signer().callback_url("https://relay.example.com", "tsk_" + "x" * 22, "gptimage15")
    assert url.startswith("https://relay.example.com/callbacks/gptimage15/")
    assert len(url) < 300  # EvoLink accepts up to 2048 characters
    token = url.rsplit("/", 1)[1]
    assert all(ch.isalnum() or ch in "-_." for ch in token)


def test_tampered_token_is_rejected() -> None:
    token = signer().token("tsk_abc", "evolink")
    payload, timestamp, signature = token.split(".")
    middle = "A" if signature[10] != "A" else "B"  # the last character partly holds padding
    tampered = f"{payload}.{timestamp}.{signature[:10]}{middle}{signature[11:]}"
    with pytest.raises(CallbackTokenInvalid):
        signer().verify(tampered, "evolink")
    # A payload swapped for another task's keeps the old signature: rejected too.
    other = signer().token("tsk_other", "evolink").split(".")[0]
    with pytest.raises(CallbackTokenInvalid):
        signer().verify(f"{other}.{timestamp}.{signature}", "evolink")


@pytest.mark.parametrize("task_id", ["tsk_abc", "tsk_def", "tsk_ghi"])
def test_no_other_spelling_of_the_signatures_last_character_verifies(task_id: str) -> None:
    """Its 2 unused bits let four spellings decode alike, and a base64 decoder takes them
    all: three altered tokens verified. Only the one issued does now."""
    token = signer().token(task_id, "evolink")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    verified = []
    for char in alphabet:
        spelling = token[:-1] + char
        try:
            signer().verify(spelling, "evolink")
        except CallbackTokenInvalid:
            continue
        verified.append(spelling)
    assert verified == [token]


def test_forged_token_with_another_key_is_rejected() -> None:
    forged = signer(key="attacker-key-" + "z" * 20).token("tsk_abc", "evolink")
    with pytest.raises(CallbackTokenInvalid):
        signer().verify(forged, "evolink")


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "tsk_abc", "." * 5, "%00"])
def test_garbage_is_rejected(garbage: str) -> None:
    with pytest.raises(CallbackTokenInvalid):
        signer().verify(garbage, "evolink")


def test_wrong_provider_is_forbidden() -> None:
    token = signer().token("tsk_abc", "evolink")
    with pytest.raises(CallbackProviderMismatch):
        signer().verify(token, "grsai")


def test_expired_token_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    issued = signer(max_age=3600).token("tsk_abc", "evolink")
    later = time.time() + 3601
    monkeypatch.setattr("itsdangerous.timed.time.time", lambda: later)
    with pytest.raises(CallbackTokenExpired):
        signer(max_age=3600).verify(issued, "evolink")


def test_a_token_from_a_replica_whose_clock_is_a_little_ahead_verifies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = time.time()
    monkeypatch.setattr("itsdangerous.timed.time.time", lambda: now + 2)
    ahead = signer().token("tsk_abc", "evolink")  # signed 2 s "in the future"
    monkeypatch.setattr("itsdangerous.timed.time.time", lambda: now + 290)
    far_ahead = signer().token("tsk_far", "evolink")  # nearly the 5 minutes allowed
    monkeypatch.setattr("itsdangerous.timed.time.time", lambda: now + 600)
    too_far = signer().token("tsk_bad", "evolink")  # 10 minutes ahead
    monkeypatch.undo()
    assert signer().verify(ahead, "evolink").task_id == "tsk_abc"
    assert signer().verify(far_ahead, "evolink").task_id == "tsk_far"
    with pytest.raises(CallbackTokenInvalid, match="clock"):
        signer().verify(too_far, "evolink")


def test_old_key_still_verifies_during_rotation() -> None:
    old_token = signer(key="old-key-" + "o" * 24).token("tsk_abc", "evolink")
    rotated = signer(key="new-key-" + "n" * 24, fallbacks=("old-key-" + "o" * 24,))
    assert rotated.verify(old_token, "evolink").task_id == "tsk_abc"
    # New tokens are signed with the new key: the old deployment would not accept them.
    new_token = rotated.token("tsk_abc", "evolink")
    with pytest.raises(CallbackTokenInvalid):
        signer(key="old-key-" + "o" * 24).verify(new_token, "evolink")


# --- the cache of verified tokens ------------------------------------------------------------


def test_a_remembered_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = signer(max_age=3600)
    issued = verifier.token("tsk_abc", "evolink")
    assert verifier.verify(issued, "evolink").task_id == "tsk_abc"  # now remembered
    later = time.time() + 3601
    monkeypatch.setattr("itsdangerous.timed.time.time", lambda: later)
    with pytest.raises(CallbackTokenExpired):
        verifier.verify(issued, "evolink")
    with pytest.raises(CallbackTokenExpired):  # and forgotten: the signature path says so too
        verifier.verify(issued, "evolink")


def test_a_remembered_token_is_still_bound_to_its_provider() -> None:
    verifier = signer()
    issued = verifier.token("tsk_abc", "evolink")
    verifier.verify(issued, "evolink")
    with pytest.raises(CallbackProviderMismatch):
        verifier.verify(issued, "grsai")


def test_only_valid_tokens_are_remembered_and_the_memory_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("service.signing.VERIFIED_CACHE", 3)
    verifier = signer()
    tokens = [verifier.token(f"tsk_{n}", "evolink") for n in range(5)]
    for token in tokens:
        verifier.verify(token, "evolink")
    assert list(verifier._verified) == tokens[-3:]
    with pytest.raises(CallbackTokenInvalid):
        verifier.verify(altered(tokens[0], -2), "evolink")
    assert len(verifier._verified) == 3
    # The oldest ones were forgotten, not refused: they verify again by signature.
    assert verifier.verify(tokens[0], "evolink").task_id == "tsk_0"
