"""Hostile and bad input, through the real app on SQLite and PostgreSQL.

Each test says what a hostile request gets (the exact status and error code) and that nothing
else happened: the database is compared row for row before and after. What other files already
cover is not repeated here: forged, altered and expired callback tokens and the other
provider's path (test_callbacks.py), missing and wrong API tokens and other clients' tasks
(test_api_tasks.py), subscriber URL checks (test_netguard.py, test_events.py). This file adds
the per-client rate limit, bodies no parser or column can take, tokens that are signed but
wrong, every management route with another client's ids, SQL and header injection, and the
SSRF cases left: moving a subscription inside, and redirects.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa
from itsdangerous import URLSafeTimedSerializer
from sqlmodel import SQLModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.errors import RateLimited, SettingsError
from service.models import TaskOrigin
from service.openapi import build_openapi
from service.ratelimit import ClientRateLimiter, TokenBucket
from service.runtime import Runtime
from service.signing import SALT
from service.store import MAX_BODY_SIZE
from service.web import decode_json
from tests.conftest import (
    ALICE,
    BOB,
    SECRET,
    TABLES,
    auth,
    error_code,
    make_settings,
    serving,
)

INTERNAL_HOOK = "http://127.0.0.1:9/hooks/internal"
PUBLIC_HOOK = "http://127.0.0.1:9/hooks/public"  # 127.0.0.0/8 is allowed in these tests


class Receiver:
    """Subscriber endpoints behind the dispatcher's transport seam: /hooks/public answers a
    redirect to /hooks/internal; every request is recorded by path."""

    def __init__(self) -> None:
        self.received: dict[str, int] = defaultdict(int)

        async def hook(request: Request) -> Response:
            name = request.path_params["name"]
            self.received[name] += 1
            if name == "public":
                return Response(status_code=307, headers={"Location": INTERNAL_HOOK})
            return Response(status_code=200)

        self.app = Starlette(routes=[Route("/hooks/{name}", hook, methods=["POST"])])


@dataclass
class Relay:
    app: Starlette
    runtime: Runtime
    client: httpx.AsyncClient
    receiver: Receiver

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table, in key order: compared before and after a request."""
        tables = SQLModel.metadata.tables
        with self.runtime.engine.connect() as connection:
            return {
                name: [
                    tuple(row)
                    for row in connection.execute(
                        sa.select(tables[name]).order_by(*tables[name].primary_key.columns)
                    )
                ]
                for name in TABLES
            }

    async def track(self, token: str = ALICE, **body: Any) -> dict[str, Any]:
        response = await self.client.post(
            "/v1/tasks/track", json={"provider": "evolink", **body}, headers=auth(token)
        )
        assert response.status_code == 201, response.text
        task: dict[str, Any] = response.json()
        return task

    async def subscribe(self, token: str = ALICE, **body: Any) -> dict[str, Any]:
        response = await self.client.post(
            "/v1/subscriptions", json={"url": PUBLIC_HOOK, **body}, headers=auth(token)
        )
        assert response.status_code == 201, response.text
        subscription: dict[str, Any] = response.json()
        return subscription


@contextlib.asynccontextmanager
async def running(database_url: str, tmp_path: Path, **overrides: str) -> AsyncIterator[Relay]:
    settings = make_settings(
        database_url,
        tmp_path,
        TASKRELAY_SCHEDULER="false",  # no background writes between two snapshots
        TASKRELAY_DISPATCHER="false",
        TASKRELAY_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        **overrides,
    )
    receiver = Receiver()
    async with serving(settings, webhook_app=receiver.app) as (app, client):
        yield Relay(app, app.state.runtime, client, receiver)


@pytest.fixture
async def relay(database_url: str, tmp_path: Path) -> AsyncIterator[Relay]:
    async with running(database_url, tmp_path) as value:
        yield value


async def raw_request(
    app: Starlette,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One request as raw ASGI: header bytes exactly as given (no client library checks
    them), the answer's status, raw headers and body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], list(start["headers"]), content


def callback_path(task: dict[str, Any]) -> str:
    return httpx.URL(task["callback_url"]).path


class FrozenClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def freeze_limiter(runtime: Runtime, rate: float, burst: int) -> FrozenClock:
    """Swap in a limiter on a clock that only moves when the test moves it."""
    clock = FrozenClock()
    runtime.clients.limiter = ClientRateLimiter(
        runtime.settings.api_tokens, rate=rate, burst=burst, monotonic=clock
    )
    return clock


# --- rate limiting: the bucket ------------------------------------------------------------------


def test_a_bucket_allows_its_burst_then_names_the_wait_for_the_next_token() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, tokens=3.0, updated=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token every 0.5 s
    assert bucket.take(0.25) == pytest.approx(0.25)  # refused requests take nothing
    assert bucket.take(0.5) == 0.0
    assert bucket.take(100.0) == 0.0  # a long quiet spell refills to the burst, no more
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
    assert bucket.take(99.0) > 0  # a clock that goes backwards refills nothing


def test_the_limiter_keeps_buckets_for_configured_clients_only() -> None:
    clock = FrozenClock()
    limiter = ClientRateLimiter(["alice", "bob"], rate=1.0, burst=2, monotonic=clock)
    limiter.check("alice")
    limiter.check("alice")
    with pytest.raises(RateLimited) as refused:
        limiter.check("alice")
    assert refused.value.status == 429
    assert refused.value.code == "rate_limited"
    assert refused.value.retry_after == pytest.approx(1.0)
    limiter.check("bob")  # one client's bucket is its own
    for _ in range(1000):
        limiter.check("mallory")  # never configured: no bucket is made for it
    assert set(limiter._buckets) == {"alice", "bob"}
    clock.now += 1.0
    limiter.check("alice")
    off = ClientRateLimiter(["alice"], rate=0.0, burst=1, monotonic=clock)
    assert not off.enabled
    for _ in range(1000):
        off.check("alice")


def test_rate_limit_settings_are_validated(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    defaults = make_settings(url, tmp_path)
    assert (defaults.rate_limit, defaults.rate_limit_burst) == (100.0, 200)
    assert make_settings(url, tmp_path, TASKRELAY_RATE_LIMIT="2.5").rate_limit_burst == 5
    assert make_settings(url, tmp_path, TASKRELAY_RATE_LIMIT="0.1").rate_limit_burst == 1
    chosen = make_settings(url, tmp_path, TASKRELAY_RATE_LIMIT="5", TASKRELAY_RATE_LIMIT_BURST="9")
    assert (chosen.rate_limit, chosen.rate_limit_burst) == (5.0, 9)
    assert make_settings(url, tmp_path, TASKRELAY_RATE_LIMIT="0").rate_limit == 0.0
    for variable, value in [
        ("TASKRELAY_RATE_LIMIT", "-1"),
        ("TASKRELAY_RATE_LIMIT", "fast"),
        ("TASKRELAY_RATE_LIMIT", "nan"),
        ("TASKRELAY_RATE_LIMIT", "inf"),
        ("TASKRELAY_RATE_LIMIT_BURST", "0"),
        ("TASKRELAY_RATE_LIMIT_BURST", "1.5"),
    ]:
        with pytest.raises(SettingsError) as refused:
            make_settings(url, tmp_path, **{variable: value})
        assert variable in refused.value.message, value


def test_every_operation_that_takes_a_token_documents_429_and_no_other_does() -> None:
    for path, operations in build_openapi()["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if operation.get("security"):
                assert "rate_limited" in responses["429"]["description"], (method, path)
                assert "Retry-After" in responses["429"]["headers"], (method, path)
            else:
                assert "429" not in responses, (method, path)


# --- rate limiting: through the app -------------------------------------------------------------


async def test_over_the_limit_is_429_with_retry_after_and_does_nothing(
    database_url: str, tmp_path: Path
) -> None:
    # One request per 10 s with bursts of 3: the fourth of four quick requests is refused.
    async with running(
        database_url, tmp_path, TASKRELAY_RATE_LIMIT="0.1", TASKRELAY_RATE_LIMIT_BURST="3"
    ) as relay:
        for _ in range(3):
            await relay.track()
        before = relay.snapshot()
        refused = await relay.client.post(
            "/v1/tasks/track", json={"provider": "evolink"}, headers=auth()
        )
        assert refused.status_code == 429
        assert error_code(refused) == "rate_limited"
        assert "TASKRELAY_RATE_LIMIT" in refused.json()["error"]["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 10
        assert relay.snapshot() == before
        assert len(before["task"]) == 3
        # Another client has a budget of its own.
        assert (await relay.client.get("/v1/tasks", headers=auth(BOB))).status_code == 200


async def test_a_refused_client_gets_in_again_once_its_bucket_refills(relay: Relay) -> None:
    clock = freeze_limiter(relay.runtime, rate=2.0, burst=2)
    for _ in range(2):
        assert (await relay.client.get("/v1/tasks", headers=auth())).status_code == 200
    refused = await relay.client.get("/v1/tasks", headers=auth())
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"  # 0.5 s, rounded up: never too early
    clock.now += 0.5
    assert (await relay.client.get("/v1/tasks", headers=auth())).status_code == 200
    assert (await relay.client.get("/v1/tasks", headers=auth())).status_code == 429


async def test_requests_without_a_valid_token_never_spend_a_clients_budget(relay: Relay) -> None:
    freeze_limiter(relay.runtime, rate=1.0, burst=3)
    for headers in [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Bearer {ALICE}x"},
        {"Authorization": f"Basic {ALICE}"},
        {"Authorization": "Bearer alice"},  # the client's name is not its token
    ]:
        for _ in range(20):
            response = await relay.client.get("/v1/tasks", headers=headers)
            assert response.status_code == 401
    for _ in range(3):  # alice's whole burst is still there
        assert (await relay.client.get("/v1/tasks", headers=auth())).status_code == 200
    assert (await relay.client.get("/v1/tasks", headers=auth())).status_code == 429


async def test_every_management_route_is_limited(relay: Relay) -> None:
    freeze_limiter(relay.runtime, rate=1.0, burst=1)
    assert (await relay.client.get("/v1/tasks", headers=auth())).status_code == 200
    before = relay.snapshot()
    checked = 0
    for path, operations in build_openapi()["paths"].items():
        for method, operation in operations.items():
            if not operation.get("security"):
                continue
            concrete = path.format(task_id="tsk_x", subscription_id="sub_x", delivery_id="dlv_x")
            response = await relay.client.request(method.upper(), concrete, json={}, headers=auth())
            assert response.status_code == 429, (method, path, response.text)
            assert error_code(response) == "rate_limited"
            assert response.headers["Retry-After"] == "1"
            checked += 1
    assert checked >= 20
    assert relay.snapshot() == before


async def test_callbacks_health_and_docs_are_never_limited(relay: Relay) -> None:
    task = await relay.track()
    freeze_limiter(relay.runtime, rate=1.0, burst=1)
    assert (await relay.client.get("/v1/tasks", headers=auth())).status_code == 200
    assert (await relay.client.get("/v1/tasks", headers=auth())).status_code == 429
    body = {"id": "task-unified-1", "status": "processing", "object": "image.generation.task"}
    for progress in range(1, 30):  # the provider's retries must always land
        response = await relay.client.post(callback_path(task), json={**body, "progress": progress})
        assert response.status_code == 200
    for path in ["/healthz", "/readyz", "/openapi.json", "/metrics"]:
        for _ in range(5):
            assert (await relay.client.get(path)).status_code == 200, path


# --- callbacks: bodies ----------------------------------------------------------------------

VALID_CALLBACK = {"id": "task-unified-9", "status": "completed", "progress": 100}


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        # The parser runs out of depth before it reaches the missing ends: too deep it is.
        # More brackets than values a body may hold: refused before the parser runs.
        pytest.param(b"[" * 100_000, "more than 20000 JSON values", id="100k-open-arrays"),
        pytest.param(
            b"[" * 100_000 + b"]" * 100_000,
            "more than 20000 JSON values",
            id="100k-nested-arrays",
        ),
        pytest.param(b'{"a":' * 100_000, "more than 20000 JSON values", id="100k-open-objects"),
        pytest.param(b"[" * 5_000, "nested deeper than 64 levels", id="5k-open-arrays"),
        pytest.param(
            b'{"id": "t", "status": "processing", "a": [' + b",".join([b"[]"] * 100_000) + b"]}",
            "more than 20000 JSON values",
            id="100k-empty-arrays",
        ),
        pytest.param(
            json.dumps(VALID_CALLBACK).encode("utf-16"), "not UTF-8", id="utf-16-with-bom"
        ),
        pytest.param(
            json.dumps(VALID_CALLBACK).encode("utf-16-le"), "not valid JSON", id="utf-16-le"
        ),
        pytest.param(b'{"id": "t", "status": "compl\xe9ted"}', "not UTF-8", id="latin-1-bytes"),
        pytest.param(
            b'{"id": "t", "status": "processing", "progress": 1e999}',
            "out of range",
            id="number-beyond-float",
        ),
        pytest.param(
            b'{"id": "t", "status": "processing", "progress": ' + b"9" * 5000 + b"}",
            "not valid JSON",
            id="5000-digit-integer",
        ),
        pytest.param(b'"completed"', "Unreadable evolink callback", id="a-json-string"),
        pytest.param(b"null", "Unreadable evolink callback", id="json-null"),
    ],
)
async def test_callback_bodies_nothing_can_read_are_400_kept_and_change_nothing(
    relay: Relay, content: bytes, fragment: str
) -> None:
    task = await relay.track()
    before = relay.snapshot()
    response = await relay.client.post(
        callback_path(task), content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert error_code(response) == "callback_unparseable"
    assert fragment in response.json()["error"]["message"]
    after = relay.snapshot()
    assert {name: after[name] for name in ("task", "task_event", "delivery")} == {
        name: before[name] for name in ("task", "task_event", "delivery")
    }
    (receipt,) = (
        await relay.client.get(f"/v1/tasks/{task['id']}/callbacks", headers=auth())
    ).json()["data"]
    assert receipt["outcome"] == "rejected"
    assert receipt["body_size"] == len(content)


async def test_a_callback_whose_text_no_column_takes_is_mended_not_lost(relay: Relay) -> None:
    """A NUL (PostgreSQL text cannot hold one) or an unpaired surrogate (no UTF-8 encoder takes
    one) in a provider's strings: refusing the body would lose the provider's final word for
    good, since it cannot be asked to send it again. The strings are mended (U+FFFD) and the
    update applied; the receipt keeps the bytes as they came."""
    task = await relay.track()
    content = (
        b'{"id": "task-unified-9", "status": "failed", "progress": 30, '
        b'"error": {"message": "moderation\\u0000 flagged \\ud800 it"}, "note\\u0000": "\\udc00"}'
    )
    response = await relay.client.post(
        callback_path(task), content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text
    done = (await relay.client.get(f"/v1/tasks/{task['id']}", headers=auth())).json()
    assert done["status"] == "failed"
    assert done["error"]["message"] == "moderation\ufffd flagged \ufffd it"
    (receipt,) = (
        await relay.client.get(f"/v1/tasks/{task['id']}/callbacks", headers=auth())
    ).json()["data"]
    assert receipt["outcome"] == "applied" and receipt["body"] == content.decode()


async def test_an_oversized_callback_sent_in_chunks_is_413_with_a_capped_receipt(
    relay: Relay,
) -> None:
    task = await relay.track()
    before = relay.snapshot()

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap applies as it flows
        yield b'{"id": "t", "status": "completed", "pad": "'
        for _ in range(40):
            yield b"x" * 65536

    response = await relay.client.post(
        callback_path(task), content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert error_code(response) == "payload_too_large"
    assert relay.snapshot()["task"] == before["task"]
    assert relay.snapshot()["task_event"] == before["task_event"]
    (receipt,) = (
        await relay.client.get(f"/v1/tasks/{task['id']}/callbacks", headers=auth())
    ).json()["data"]
    assert receipt["outcome"] == "rejected"
    assert receipt["body_truncated"] is True
    assert receipt["body_size"] > relay.runtime.settings.max_body_bytes
    assert len(receipt["body"]) == relay.runtime.settings.callback_audit_bytes


@pytest.mark.parametrize("declared", [3_000_000_000, 99_999_999_999_999_999_999])
async def test_an_oversized_callback_declaring_a_huge_length_is_413_with_its_receipt(
    relay: Relay, declared: int
) -> None:
    """The Content-Length of a body over the limit is the sender's to choose: one past any
    column's range is recorded as the largest size the receipt can hold, not a 500 (SQLite's
    integers overflowed) or a 400 (PostgreSQL's column refused it) with no receipt."""
    task = await relay.track()
    body = b'{"pad": "' + b"x" * relay.runtime.settings.max_body_bytes + b'"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % declared)]
    status, _, content = await raw_request(relay.app, "POST", callback_path(task), headers, body)
    assert status == 413, content
    (receipt,) = (
        await relay.client.get(f"/v1/tasks/{task['id']}/callbacks", headers=auth())
    ).json()["data"]
    assert receipt["outcome"] == "rejected"
    assert receipt["body_size"] == min(declared, MAX_BODY_SIZE)


async def test_numbers_too_large_for_a_float_are_no_hint_and_no_image_size(relay: Relay) -> None:
    """JSON integers have no size limit: an estimate or an image size of 400 digits is left
    out (a float of it overflowed, a 500 with no receipt), and the rest of the callback
    counts."""
    task = await relay.track()
    huge = int("9" * 400)
    running = {"id": "t", "status": "processing", "progress": 10}
    response = await relay.client.post(
        callback_path(task), json={**running, "task_info": {"estimated_time": huge}}
    )
    assert response.status_code == 200, response.text
    done = {"id": "t", "status": "completed", "results": [{"url": "https://cdn.example/1.png"}]}
    done["results"][0]["width"] = huge
    response = await relay.client.post(callback_path(task), json=done)
    assert response.status_code == 200, response.text
    stored = (await relay.client.get(f"/v1/tasks/{task['id']}", headers=auth())).json()
    assert stored["status"] == "succeeded"
    assert stored["images"] == [{"url": "https://cdn.example/1.png"}]


async def test_a_forged_token_is_refused_before_its_body_is_read(relay: Relay) -> None:
    task = await relay.track()
    token = callback_path(task).rsplit("/", 1)[1]
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    before = relay.snapshot()
    read = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal read
        for _ in range(10_000):  # 640 MB if anyone read it all
            read += 1
            yield b"[" * 65536

    response = await relay.client.post(
        f"/callbacks/evolink/{forged}", content=endless(), headers={"Content-Type": "a/b"}
    )
    assert response.status_code == 401
    assert error_code(response) == "callback_token_invalid"
    assert read <= 1  # at most the chunk the client had already handed over
    assert relay.snapshot() == before


async def test_a_signed_token_that_names_no_task_is_404_and_creates_nothing(
    relay: Relay,
) -> None:
    before = relay.snapshot()
    token = relay.runtime.signer.token("tsk_never_created", "evolink")
    response = await relay.client.post(f"/callbacks/evolink/{token}", json=VALID_CALLBACK)
    assert response.status_code == 404
    assert error_code(response) == "not_found"
    assert relay.snapshot() == before


@pytest.mark.parametrize(
    "payload",
    [{"task": "tsk_x", "provider": "evolink"}, ["tsk_x"], ["tsk_x", "evolink", "x"], [1, 2], "x"],
)
async def test_a_token_signed_with_our_key_but_not_by_us_is_401(relay: Relay, payload: Any) -> None:
    # What a leaked key could sign: the right signature around a payload we never issue.
    serializer = URLSafeTimedSerializer(
        SECRET, salt=SALT, signer_kwargs={"digest_method": hashlib.sha256}
    )
    token = serializer.dumps(payload)
    before = relay.snapshot()
    response = await relay.client.post(f"/callbacks/evolink/{token}", json=VALID_CALLBACK)
    assert response.status_code == 401
    assert error_code(response) == "callback_token_invalid"
    assert relay.snapshot() == before


# --- callbacks: status words ------------------------------------------------------------------

CALLBACK_SHAPES = {
    "evolink": lambda status: {"id": "e-1", "status": status, "object": "image.generation.task"},
    "grsai": lambda status: {"id": "g-1", "status": status, "results": []},
    "gptimage15": lambda status: {"task_id": "p-1", "status": status},
    "apiinone": lambda status: {"task_id": "a-1", "status": status},
}


@pytest.mark.parametrize("provider", sorted(CALLBACK_SHAPES))
async def test_an_unknown_status_word_is_a_sign_of_life_never_a_verdict(
    relay: Relay, provider: str
) -> None:
    """Providers add words; an unknown one reads as "still working" (service/providers/
    parsing.py): recorded, never final, never a step back."""
    shape = CALLBACK_SHAPES[provider]
    task = await relay.track(provider=provider)
    path = callback_path(task)
    for word in ["warming_up", "ɹǝʌo", "x" * 300, "SUCCEEDED_MAYBE", "done?"]:
        response = await relay.client.post(path, json=shape(word))
        assert response.status_code == 200, (word, response.text)
        assert response.json()["status"] == "running"
    events = (await relay.client.get(f"/v1/tasks/{task['id']}/events", headers=auth())).json()
    assert [event["type"] for event in events["data"]] == ["task.submitted", "task.progress"]
    receipts = (await relay.client.get(f"/v1/tasks/{task['id']}/callbacks", headers=auth())).json()[
        "data"
    ]
    # Each is kept; the first moved the task to running, the others only its provider_status.
    assert len(receipts) == 5
    assert {receipt["outcome"] for receipt in receipts} <= {"applied", "unchanged"}
    final = (await relay.client.get(f"/v1/tasks/{task['id']}", headers=auth())).json()
    assert (final["status"], final["completed_at"], final["images"]) == ("running", None, [])
    assert final["provider_status"] == "done?"


@pytest.mark.parametrize("provider", sorted(CALLBACK_SHAPES))
async def test_a_status_that_is_not_a_word_is_400_kept_and_changes_nothing(
    relay: Relay, provider: str
) -> None:
    task = await relay.track(provider=provider)
    before = relay.snapshot()
    for status in [12345, None, ["completed"], {"value": "completed"}, "", "   ", True]:
        response = await relay.client.post(
            callback_path(task), json=CALLBACK_SHAPES[provider](status)
        )
        assert response.status_code == 400, status
        assert error_code(response) == "callback_unparseable"
    after = relay.snapshot()
    assert after["task"] == before["task"]
    assert after["task_event"] == before["task_event"]
    assert len(after["callback_receipt"]) == len(before["callback_receipt"]) + 7


async def test_callbacks_to_an_openai_task_are_400_whatever_they_say(relay: Relay) -> None:
    # OpenAI tasks can no longer be tracked (POST /v1/tasks/track answers 400), but a database
    # from an earlier release may hold one; a URL signed for it is still a valid token.
    created = relay.runtime.store.create_task(
        owner="alice", provider="openai", origin=TaskOrigin.tracked, request={}, metadata={}
    )
    task_id = created.task["id"]
    path = httpx.URL(relay.runtime.callback_url(task_id, "openai")).path
    before = relay.snapshot()
    response = await relay.client.post(path, json={"status": "completed"})
    assert response.status_code == 400
    assert error_code(response) == "callback_unparseable"
    assert relay.snapshot()["task"] == before["task"]


# --- management API: other clients' ids -------------------------------------------------------


async def test_another_clients_ids_are_404_on_every_route_and_change_nothing(
    relay: Relay,
) -> None:
    subscription = await relay.subscribe(BOB)
    theirs = await relay.track(BOB, provider_task_id="task-unified-bob")
    deliveries = (
        await relay.client.get(
            f"/v1/subscriptions/{subscription['id']}/deliveries", headers=auth(BOB)
        )
    ).json()["data"]
    delivery_id = deliveries[0]["id"]
    await relay.track()  # alice has things of her own
    await relay.subscribe()
    before = relay.snapshot()
    task, sub = theirs["id"], subscription["id"]
    for method, path, body in [
        ("GET", f"/v1/tasks/{task}", None),
        ("PATCH", f"/v1/tasks/{task}", {"metadata": {"stolen": True}}),
        ("POST", f"/v1/tasks/{task}/refresh", None),
        ("GET", f"/v1/tasks/{task}/stream", None),
        ("GET", f"/v1/subscriptions/{sub}", None),
        ("PATCH", f"/v1/subscriptions/{sub}", {"url": PUBLIC_HOOK + "?mine"}),
        ("PATCH", f"/v1/subscriptions/{sub}", {"enabled": False}),
        ("DELETE", f"/v1/subscriptions/{sub}", None),
        ("POST", f"/v1/subscriptions/{sub}/rotate-secret", {"overlap_seconds": 0}),
        ("GET", f"/v1/subscriptions/{sub}/deliveries", None),
        ("POST", f"/v1/subscriptions/{sub}/replay", {"since": "2000-01-01T00:00:00Z"}),
        ("GET", f"/v1/deliveries/{delivery_id}", None),
        ("POST", f"/v1/deliveries/{delivery_id}/retry", None),
    ]:
        response = await relay.client.request(method, path, json=body, headers=auth(ALICE))
        assert response.status_code == 404, (method, path, response.text)
        assert error_code(response) == "not_found"
        assert subscription["secret"] not in response.text
    assert relay.snapshot() == before
    # Alice's list shows none of it either.
    listed = (await relay.client.get("/v1/subscriptions", headers=auth())).json()["data"]
    assert sub not in {row["id"] for row in listed}


# --- management API: injection ---------------------------------------------------------------

SQL_INJECTIONS = [
    "' OR '1'='1",
    "tsk_x' OR owner='bob' --",
    "1; DROP TABLE task; --",
    "x' UNION SELECT secret, secret FROM subscription --",
    '"); DELETE FROM task_event; --',
    "%' OR 1=1 OR id LIKE '%",
]


# Ids no issued id looks like: a NUL (PostgreSQL refuses it in a text value, so it must not
# reach a query at all), and one far longer than any column.
ODD_IDS = ["tsk_\x00", "x" * 5000]


@pytest.mark.parametrize("injection", SQL_INJECTIONS + ODD_IDS)
async def test_sql_in_ids_filters_and_cursors_finds_nothing_and_changes_nothing(
    relay: Relay, injection: str
) -> None:
    await relay.track(BOB)
    await relay.track()
    before = relay.snapshot()
    for method, path in [
        ("GET", "/v1/tasks/{}"),
        ("GET", "/v1/tasks/{}/events"),
        ("GET", "/v1/tasks/{}/callbacks"),
        ("POST", "/v1/tasks/{}/refresh"),
        ("GET", "/v1/subscriptions/{}"),
        ("GET", "/v1/deliveries/{}"),
    ]:
        response = await relay.client.request(
            method, path.format(quote(injection, safe="")), headers=auth()
        )
        assert response.status_code == 404, (path, response.text)
    for name in ["status", "provider", "cursor", "created_after", "limit"]:
        response = await relay.client.get("/v1/tasks", params={name: injection}, headers=auth())
        assert response.status_code == 400, (name, response.text)
        assert error_code(response) == "validation_failed"
    assert relay.snapshot() == before


async def test_sql_in_stored_values_is_kept_verbatim_and_stays_data(relay: Relay) -> None:
    bob = await relay.track(BOB)
    stored: list[dict[str, Any]] = []
    for injection in SQL_INJECTIONS:
        metadata = {injection: injection, "nested": [injection, {injection: 1}]}
        response = await relay.client.post(
            "/v1/tasks/track",
            json={"provider": "evolink", "metadata": metadata, "provider_task_id": injection},
            headers={**auth(), "Idempotency-Key": injection},
        )
        assert response.status_code == 201, response.text
        stored.append(response.json())
        again = await relay.client.post(
            "/v1/tasks/track",
            json={"provider": "evolink", "metadata": metadata, "provider_task_id": injection},
            headers={**auth(), "Idempotency-Key": injection},
        )
        assert again.status_code == 200  # the key is matched as a value, not as SQL
        assert again.json()["id"] == response.json()["id"]
        subscription = await relay.subscribe(description=injection)
        assert subscription["description"] == injection
    for task, injection in zip(stored, SQL_INJECTIONS, strict=True):
        fetched = (await relay.client.get(f"/v1/tasks/{task['id']}", headers=auth())).json()
        assert fetched["metadata"][injection] == injection
        assert fetched["provider_task_id"] == injection
    tables = relay.snapshot()
    assert len(tables["task"]) == len(SQL_INJECTIONS) + 1
    assert len(tables["subscription"]) == len(SQL_INJECTIONS)
    bob.pop("callback_url")
    assert (await relay.client.get(f"/v1/tasks/{bob['id']}", headers=auth(BOB))).json() == bob


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"provider": "evolink", "metadata": {"k": "\\ud800"}}', "unpaired"),
        (b'{"provider": "evolink", "metadata": {"k\\u0000": 1}}', "NUL"),
        (b'{"provider": "evolink", "provider_task_id": "a\\u0000b"}', "NUL"),
        (b'{"provider": "evolink", "metadata": {"k": 1e999}}', "out of range"),
        (b'{"provider": "evolink", "metadata": {"k": -1e400}}', "out of range"),
        (b"[" * 100_000, "more than 20000 JSON values"),
        (b'{"a":' * 100_000, "more than 20000 JSON values"),
        (b"[" * 5_000, "nested deeper than 64 levels"),
        (
            b'{"provider": "evolink", "metadata": {"k": [' + b",".join([b"0"] * 30_000) + b"]}}",
            "more than 20000 JSON values",
        ),
        ('{"provider": "evolink"}'.encode("utf-16"), "not UTF-8"),
        (b'{"provider": "evolink", "metadata": {"k": "caf\xe9"}}', "not UTF-8"),
    ],
)
async def test_request_bodies_no_column_can_hold_are_400_and_store_nothing(
    relay: Relay, content: bytes, fragment: str
) -> None:
    before = relay.snapshot()
    for path in ["/v1/tasks/track", "/v1/tasks"]:
        response = await relay.client.post(
            path, content=content, headers={**auth(), "Content-Type": "application/json"}
        )
        assert response.status_code == 400, (path, response.text)
        assert error_code(response) in {"invalid_json", "invalid_encoding"}
        assert fragment in response.json()["error"]["message"]
    assert relay.snapshot() == before


async def test_commas_and_brackets_inside_strings_are_no_values(relay: Relay) -> None:
    """The cap on a body's values counts brackets and commas, and again without the strings'
    contents before it refuses: a prompt of numbers and a metadata text of CSV are text,
    not values (found in review: such a body within every documented limit was a 400)."""
    prompt = ("Plot these readings as a bar chart: " + ",".join(map(str, range(7000))))[:32_000]
    metadata = {"series": list(range(2500)), "csv": "a,b,[c],{d}\n" * 300}
    response = await relay.client.post(
        "/v1/tasks/track", json={"provider": "evolink", "metadata": metadata}, headers=auth()
    )
    assert response.status_code == 201, response.text
    with_prompt = {"provider": "evolink", "prompt": prompt, "metadata": metadata}
    assert decode_json(json.dumps(with_prompt).encode()) == with_prompt  # POST /v1/tasks's
    task = await relay.track()
    body = {**VALID_CALLBACK, "status": "processing", "note": ",[{" * 10_000}
    callback = await relay.client.post(callback_path(task), json=body)
    assert callback.status_code == 200, callback.text
    refused = await relay.client.post(
        "/v1/tasks",
        json={"provider": "evolink", "prompt": prompt, "metadata": {"k": [[]] * 21_000}},
        headers=auth(),
    )
    assert refused.status_code == 400 and "more than 20000 JSON values" in refused.text


async def test_cursors_beyond_any_row_are_400(relay: Relay) -> None:
    subscription = await relay.subscribe()
    for before_row in [2**63, 10**30]:
        cursor = base64.urlsafe_b64encode(json.dumps({"before": before_row}).encode()).decode()
        for path in ["/v1/tasks", f"/v1/subscriptions/{subscription['id']}/deliveries"]:
            response = await relay.client.get(path, params={"cursor": cursor}, headers=auth())
            assert response.status_code == 400, (path, response.text)
            assert error_code(response) == "validation_failed"
    largest = base64.urlsafe_b64encode(json.dumps({"before": 2**63 - 1}).encode()).decode()
    assert (
        await relay.client.get("/v1/tasks", params={"cursor": largest}, headers=auth())
    ).status_code == 200


def _no_injected_header(headers: list[tuple[bytes, bytes]]) -> Iterator[str]:
    for name, value in headers:
        assert b"\r" not in name + value and b"\n" not in name + value, (name, value)
        assert name.lower() not in {b"set-cookie", b"x-injected"}, name
        assert b"injected" not in value.lower(), (name, value)
        yield name.decode("latin-1")


async def test_crlf_in_request_headers_is_never_reflected_into_the_response(
    relay: Relay,
) -> None:
    """A real HTTP/1.1 server refuses CR/LF in a header; behind a lenient proxy, or over raw
    ASGI as here, nothing of such a value may come back as a header of its own."""
    injected = b"abc\r\nSet-Cookie: injected=1\r\nX-Injected: 1"
    body = json.dumps({"provider": "evolink"}).encode()
    json_type = (b"content-type", b"application/json")
    bearer = (b"authorization", f"Bearer {ALICE}".encode())
    for method, path, headers, content in [
        ("POST", "/v1/tasks/track", [bearer, json_type, (b"idempotency-key", injected)], body),
        ("GET", "/v1/tasks", [bearer, (b"x-request-id", injected)], b""),
        ("GET", "/v1/tasks", [(b"authorization", b"Bearer " + injected)], b""),
        ("GET", "/v1/tasks/tsk_x/stream", [bearer, (b"last-event-id", injected)], b""),
        ("GET", "/v1/nothing-here", [(b"x-request-id", injected)], b""),
    ]:
        status, response_headers, _ = await raw_request(relay.app, method, path, headers, content)
        assert status < 500, (method, path, status)
        names = list(_no_injected_header(response_headers))
        assert names.count("x-request-id") <= 1


@pytest.mark.parametrize(
    "value",
    [
        b"Bearer \xff\xfe\xfd-not-ascii-token",
        b"Bearer " + ALICE.encode() + b"\x00",
        b"Bearer " + b"a" * 100_000,
        b"Bearer\t" + ALICE.encode() + b"\tBearer",
        b"\xe9",
    ],
    ids=["latin-1", "nul-suffix", "100k-token", "tabs", "one-byte"],
)
async def test_odd_authorization_headers_are_401(relay: Relay, value: bytes) -> None:
    status, headers, content = await raw_request(
        relay.app, "GET", "/v1/tasks", [(b"authorization", value)]
    )
    assert status == 401
    assert json.loads(content)["error"]["code"] == "invalid_token"
    assert (b"www-authenticate", b'Bearer realm="taskrelay"') in headers


# --- SSRF: what the URL checks at registration do not cover on their own -----------------------


async def test_a_subscription_cannot_be_moved_to_an_internal_address(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.netguard import AddressPolicy

    subscription = await relay.subscribe()
    monkeypatch.setattr(relay.runtime, "address_policy", AddressPolicy())  # as in production
    before = relay.snapshot()
    for url in [
        "http://127.0.0.1:8000/admin",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:10.0.0.1]/",
        "http://0x7f000001/",
        "http://metadata.google.internal/computeMetadata/v1/",
    ]:
        response = await relay.client.patch(
            f"/v1/subscriptions/{subscription['id']}", json={"url": url}, headers=auth()
        )
        assert response.status_code == 400, url
        assert response.json()["error"]["details"][0]["field"] == "url"
    assert relay.snapshot() == before


async def test_a_subscriber_redirect_is_never_followed(relay: Relay) -> None:
    """A public endpoint that answers 307 to an internal address gets a failed attempt; the
    internal address gets nothing (the dispatcher never follows redirects)."""
    subscription = await relay.subscribe()
    await relay.track()
    assert await relay.runtime.dispatcher.run_until_idle() >= 1
    assert relay.receiver.received["public"] >= 1
    assert relay.receiver.received["internal"] == 0
    (delivery,) = (
        await relay.client.get(f"/v1/subscriptions/{subscription['id']}/deliveries", headers=auth())
    ).json()["data"]
    assert delivery["status"] == "pending"
    assert delivery["last_status_code"] == 307
