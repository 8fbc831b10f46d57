"""The management API through the ASGI app, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from service.errors import StoreUnavailable
from service.retry import Backoff, submit_backoff
from service.runtime import Runtime
from service.store import encode_cursor
from tests.conftest import ALICE, BOB, auth, error_code, until

FAST = " sandbox:duration=0.05"


async def wait_for_status(
    client: httpx.AsyncClient, task_id: str, statuses: set[str], wait: float = 10.0
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        response = await client.get(f"/v1/tasks/{task_id}", headers=auth())
        task: dict[str, Any] = response.json()
        if task["status"] in statuses:
            return task
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"task stayed {task['status']}: {task}")
        await asyncio.sleep(0.02)


async def track(client: httpx.AsyncClient, token: str = ALICE, **body: Any) -> dict[str, Any]:
    response = await client.post(
        "/v1/tasks/track", json={"provider": "evolink", **body}, headers=auth(token)
    )
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


# --- submitting -----------------------------------------------------------------------------


async def test_submit_returns_202_then_completes_through_the_sandbox(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/v1/tasks",
        json={
            "provider": "evolink",
            "prompt": "a lighthouse at dawn" + FAST,
            "size": "3:2",
            "quality": "low",
            "metadata": {"order": 42},
        },
        headers=auth(),
    )
    assert response.status_code == 202, response.text
    task = response.json()
    assert task["id"].startswith("tsk_")
    assert task["status"] == "queued"
    assert task["origin"] == "submitted"
    assert task["metadata"] == {"order": 42}
    assert task["request"]["size"] == "3:2"
    assert task["images"] == [] and task["error"] is None and task["completed_at"] is None

    done = await wait_for_status(client, task["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded"
    assert done["progress"] == 100
    assert done["provider_task_id"]
    assert done["images"] and done["images"][0]["url"].startswith("http")
    assert done["completed_at"] is not None
    assert done["last_update_source"] == "callback"

    events = (await client.get(f"/v1/tasks/{task['id']}/events", headers=auth())).json()["data"]
    types = [event["type"] for event in events]
    assert types[0] == "task.submitted"
    assert types[-1] == "task.succeeded"
    assert [event["sequence"] for event in events] == sorted(e["sequence"] for e in events)
    assert events[-1]["data"]["status"] == "succeeded"


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"prompt": "x"}, {"provider"}),
        ({"provider": "evolink"}, {"prompt"}),
        ({"provider": "nope", "prompt": "x"}, {"provider"}),
        ({"provider": "evolink", "prompt": ""}, {"prompt"}),
        ({"provider": "evolink", "prompt": "x", "size": "16:9"}, {"size"}),
        ({"provider": "evolink", "prompt": "x", "quality": "ultra"}, {"quality"}),
        ({"provider": "evolink", "prompt": "x", "n": 0}, {"n"}),
        ({"provider": "evolink", "prompt": "x", "n": 11}, {"n"}),
        ({"provider": "evolink", "prompt": "x", "image_urls": ["ftp://a/b.png"]}, {"image_urls"}),
        # What the provider could not fetch: no host, a space, a broken host, a control char.
        ({"provider": "evolink", "prompt": "x", "image_urls": ["http://"]}, {"image_urls"}),
        ({"provider": "evolink", "prompt": "x", "image_urls": ["http:///a.png"]}, {"image_urls"}),
        (
            {"provider": "evolink", "prompt": "x", "image_urls": ["http://a b/c.png"]},
            {"image_urls"},
        ),
        ({"provider": "evolink", "prompt": "x", "image_urls": ["http://[oops/a"]}, {"image_urls"}),
        ({"provider": "evolink", "prompt": "x", "image_urls": ["https://a/\x01"]}, {"image_urls"}),
        ({"provider": "evolink", "prompt": "x", "metadata": [1, 2]}, {"metadata"}),
        ({"provider": "evolink", "prompt": "x", "colour": "red"}, {"colour"}),
        ({"provider": "evolink", "prompt": 5, "n": "many"}, {"prompt", "n"}),
        # A JSON number, not what lax validation would take as one (true as 1, "2" as 2).
        ({"provider": "evolink", "prompt": "x", "n": True}, {"n"}),
        ({"provider": "evolink", "prompt": "x", "n": "2"}, {"n"}),
        ({"provider": "evolink", "prompt": "x", "n": 1.5}, {"n"}),
    ],
)
async def test_invalid_bodies_are_400_naming_each_field(
    client: httpx.AsyncClient, body: dict[str, Any], fields: set[str]
) -> None:
    response = await client.post("/v1/tasks", json=body, headers=auth())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "validation_failed"
    named = {detail["field"].split(".")[0] for detail in error["details"]}
    assert fields <= named, error
    for field in fields:
        assert field in error["message"]


@pytest.mark.parametrize("provider_task_id", [".", ".."])
async def test_a_dot_segment_is_no_provider_task_id(
    client: httpx.AsyncClient, provider_task_id: str
) -> None:
    """It would make a status query another path of the provider's API (".." from
    /v1/tasks/{id}: /v1), asked with TaskRelay's key and its answer quoted back."""
    tracked = await client.post(
        "/v1/tasks/track",
        json={"provider": "evolink", "provider_task_id": provider_task_id},
        headers=auth(),
    )
    assert tracked.status_code == 400, tracked.text
    assert tracked.json()["error"]["details"][0]["field"] == "provider_task_id"
    task = await track(client)
    patched = await client.patch(
        f"/v1/tasks/{task['id']}", json={"provider_task_id": provider_task_id}, headers=auth()
    )
    assert patched.status_code == 400, patched.text
    (detail,) = patched.json()["error"]["details"]
    assert detail["field"] == "provider_task_id"
    assert "cannot be a provider task id" in detail["message"]
    # Nothing was stored: the one task, still without a provider task id.
    listed = (await client.get("/v1/tasks", headers=auth())).json()["data"]
    assert [(item["id"], item["provider_task_id"]) for item in listed] == [(task["id"], None)]


async def test_value_a_provider_cannot_take_is_400_before_anything_is_sent(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    response = await client.post(
        "/v1/tasks",
        json={"provider": "apiinone", "prompt": "x", "quality": "low"},
        headers=auth(),
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "unsupported_by_provider"
    assert "apiinone" in error["message"]
    assert error["details"][0]["accepted"]
    listed = (await client.get("/v1/tasks", headers=auth())).json()["data"]
    assert listed == []


async def test_metadata_size_is_capped(client: httpx.AsyncClient) -> None:
    body = {"provider": "evolink", "prompt": "x", "metadata": {"blob": "x" * 20_000}}
    response = await client.post("/v1/tasks", json=body, headers=auth())
    assert response.status_code == 400
    assert response.json()["error"]["details"][0]["field"] == "metadata"


async def test_metadata_size_counts_utf8_bytes(client: httpx.AsyncClient) -> None:
    fits = {"note": "\u00e9" * 7000}  # 14,011 bytes as compact UTF-8 JSON; the limit is 16,384
    task = await track(client, metadata=fits)
    assert task["metadata"] == fits
    patched = await client.patch(
        f"/v1/tasks/{task['id']}", json={"metadata": {"n": "\u00e8" * 7000}}, headers=auth()
    )
    assert patched.status_code == 200, patched.text
    too_big = await client.post(
        "/v1/tasks/track",
        json={"provider": "evolink", "metadata": {"note": "\u00e9" * 9000}},
        headers=auth(),
    )
    assert too_big.status_code == 400
    assert "metadata is 18011 bytes" in too_big.json()["error"]["message"]


async def test_the_answer_that_writes_metadata_shows_it_as_every_later_read_does(
    client: httpx.AsyncClient,
) -> None:
    """On PostgreSQL ``jsonb`` orders keys its own way and writes 1e20 out in full: the
    create and PATCH answers showed the request's own order and spelling, and every later
    read (GET, events, webhooks) another. Now they show what is stored, on both databases."""

    def shown(response: httpx.Response, *path: Any) -> str:
        value = response.json()
        for key in path:
            value = value[key]
        return json.dumps(value)

    metadata = {"zeta": 1, "a": {"yy": 1, "b": 2}, "big": 1e20}
    created = await client.post(
        "/v1/tasks/track", json={"provider": "evolink", "metadata": metadata}, headers=auth()
    )
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    read = await client.get(f"/v1/tasks/{task_id}", headers=auth())
    events = await client.get(f"/v1/tasks/{task_id}/events", headers=auth())
    assert shown(created, "metadata") == shown(read, "metadata")
    assert shown(read, "metadata") == shown(events, "data", 0, "data", "metadata")
    patched = await client.patch(
        f"/v1/tasks/{task_id}", json={"metadata": {"yy": [1], "b": 1e21}}, headers=auth()
    )
    assert patched.status_code == 200, patched.text
    read = await client.get(f"/v1/tasks/{task_id}", headers=auth())
    assert shown(patched, "metadata") == shown(read, "metadata")


async def test_unconfigured_provider_is_refused_clearly(
    client: httpx.AsyncClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    adapter = runtime.adapters["openai"]
    monkeypatch.setattr(adapter, "settings", replace(adapter.settings, api_key=None))
    response = await client.post(
        "/v1/tasks", json={"provider": "openai", "prompt": "x"}, headers=auth()
    )
    assert response.status_code == 400
    assert error_code(response) == "provider_not_configured"
    assert "TASKRELAY_OPENAI_API_KEY" in response.json()["error"]["message"]


# --- idempotency ----------------------------------------------------------------------------


async def test_same_idempotency_key_returns_the_same_task_and_submits_once(
    client: httpx.AsyncClient, app: Any
) -> None:
    body = {"provider": "gptimage15", "prompt": "one cat" + FAST}
    headers = {**auth(), "Idempotency-Key": "order-7"}
    first = await client.post("/v1/tasks", json=body, headers=headers)
    second = await client.post("/v1/tasks", json=body, headers=headers)
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]
    await app.state.runtime.submitter.idle()
    submitted = [t for t in app.state.sandbox.tasks.values() if t.provider == "gptimage15"]
    assert len(submitted) == 1


async def test_concurrent_requests_with_one_key_make_one_task(
    client: httpx.AsyncClient, app: Any
) -> None:
    body = {"provider": "evolink", "prompt": "race" + FAST}
    headers = {**auth(), "Idempotency-Key": "same-key"}
    responses = await asyncio.gather(
        *(client.post("/v1/tasks", json=body, headers=headers) for _ in range(6))
    )
    assert {r.status_code for r in responses} <= {200, 202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.status_code == 202 for r in responses) == 1
    await app.state.runtime.submitter.idle()
    assert len([t for t in app.state.sandbox.tasks.values() if t.provider == "evolink"]) == 1


async def test_idempotency_key_reused_with_another_body_is_422(client: httpx.AsyncClient) -> None:
    headers = {**auth(), "Idempotency-Key": "k1"}
    first = await client.post(
        "/v1/tasks", json={"provider": "evolink", "prompt": "a" + FAST}, headers=headers
    )
    assert first.status_code == 202
    second = await client.post(
        "/v1/tasks", json={"provider": "evolink", "prompt": "b" + FAST}, headers=headers
    )
    assert second.status_code == 422
    assert error_code(second) == "idempotency_key_reused"


async def test_idempotency_keys_are_per_client(client: httpx.AsyncClient) -> None:
    body = {"provider": "evolink", "prompt": "a" + FAST}
    a = await client.post("/v1/tasks", json=body, headers={**auth(ALICE), "Idempotency-Key": "k"})
    b = await client.post("/v1/tasks", json=body, headers={**auth(BOB), "Idempotency-Key": "k"})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


# --- tracking -------------------------------------------------------------------------------


async def test_track_returns_a_callback_url_for_the_provider(client: httpx.AsyncClient) -> None:
    task = await track(client, provider_task_id="task-unified-1", metadata={"job": "x"})
    assert task["origin"] == "tracked"
    assert task["provider_task_id"] == "task-unified-1"
    assert task["callback_url"].startswith("http://127.0.0.1:8000/callbacks/evolink/")
    assert len(task["callback_url"]) < 2048
    again = await client.post(
        "/v1/tasks/track",
        json={"provider": "evolink", "provider_task_id": "task-unified-1"},
        headers=auth(),
    )
    assert again.status_code == 409
    assert again.json()["error"]["details"]["task_id"] == task["id"]


async def test_provider_task_id_can_arrive_later_by_patch(client: httpx.AsyncClient) -> None:
    task = await track(client)
    assert task["provider_task_id"] is None
    patched = await client.patch(
        f"/v1/tasks/{task['id']}", json={"provider_task_id": "up-1"}, headers=auth()
    )
    assert patched.status_code == 200
    assert patched.json()["provider_task_id"] == "up-1"
    same = await client.patch(
        f"/v1/tasks/{task['id']}", json={"provider_task_id": "up-1"}, headers=auth()
    )
    assert same.status_code == 200
    conflict = await client.patch(
        f"/v1/tasks/{task['id']}", json={"provider_task_id": "up-2"}, headers=auth()
    )
    assert conflict.status_code == 409
    meta = await client.patch(
        f"/v1/tasks/{task['id']}", json={"metadata": {"a": 1}}, headers=auth()
    )
    assert meta.json()["metadata"] == {"a": 1}
    empty = await client.patch(f"/v1/tasks/{task['id']}", json={}, headers=auth())
    assert empty.status_code == 400


async def test_provider_task_id_of_a_submitted_task_cannot_be_set(
    client: httpx.AsyncClient,
) -> None:
    body = {"provider": "evolink", "prompt": "a cat" + FAST, "metadata": {"a": 1}}
    task = (await client.post("/v1/tasks", json=body, headers=auth())).json()
    for patch in [{"provider_task_id": "bogus-id"}, {"provider_task_id": "x", "metadata": {}}]:
        refused = await client.patch(f"/v1/tasks/{task['id']}", json=patch, headers=auth())
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "provider_task_id_not_settable"
        assert "POST /v1/tasks/track" in error["message"]
    meta = await client.patch(
        f"/v1/tasks/{task['id']}", json={"metadata": {"b": 2}}, headers=auth()
    )
    assert meta.status_code == 200
    # The provider's own id still arrives, and its callbacks with it.
    done = await wait_for_status(client, task["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded"
    assert done["provider_task_id"] not in (None, "bogus-id", "x")
    assert done["metadata"] == {"b": 2}
    # The task as it is, sent back with a change (a read-modify-write client): its own id
    # again is no change, so the rest goes through.
    same = {"provider_task_id": done["provider_task_id"], "metadata": {"c": 3}}
    resent = await client.patch(f"/v1/tasks/{task['id']}", json=same, headers=auth())
    assert resent.status_code == 200, resent.text
    assert resent.json()["metadata"] == {"c": 3}


async def test_a_client_cannot_track_another_clients_provider_task(
    client: httpx.AsyncClient,
) -> None:
    """TaskRelay asks providers with its own key, whoever asks: a provider task another client
    holds (tracked or submitted) cannot be tracked, or set by PATCH, to read its results."""
    theirs = await client.post(
        "/v1/tasks/track",
        json={"provider": "evolink", "provider_task_id": "p-bob"},
        headers=auth(BOB),
    )
    assert theirs.status_code == 201
    body = {"provider": "evolink", "provider_task_id": "p-bob"}
    refused = await client.post("/v1/tasks/track", json=body, headers=auth())
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "tracked_by_another_client"
    mine = await client.post("/v1/tasks/track", json={"provider": "evolink"}, headers=auth())
    patched = await client.patch(
        f"/v1/tasks/{mine.json()['id']}", json={"provider_task_id": "p-bob"}, headers=auth()
    )
    assert patched.status_code == 409
    assert patched.json()["error"]["code"] == "tracked_by_another_client"
    # Another provider's task of the same id is another task.
    other = {"provider": "gptimage15", "provider_task_id": "p-bob"}
    assert (await client.post("/v1/tasks/track", json=other, headers=auth())).status_code == 201


async def test_a_provider_that_reports_nothing_back_cannot_be_tracked(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/v1/tasks/track", json={"provider": "openai", "provider_task_id": "x"}, headers=auth()
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "provider_not_trackable"
    assert "'openai'" in error["message"] and "POST /v1/tasks" in error["message"]
    assert error["details"][0]["field"] == "provider"
    assert (await client.get("/v1/tasks", headers=auth())).json()["data"] == []


# --- ownership and auth ---------------------------------------------------------------------


async def test_clients_see_only_their_own_tasks(client: httpx.AsyncClient) -> None:
    mine = await track(client, ALICE)
    theirs = await track(client, BOB)
    assert (await client.get(f"/v1/tasks/{mine['id']}", headers=auth(ALICE))).status_code == 200
    for method, path, body in [
        ("GET", f"/v1/tasks/{theirs['id']}", None),
        ("GET", f"/v1/tasks/{theirs['id']}/events", None),
        ("GET", f"/v1/tasks/{theirs['id']}/callbacks", None),
        ("PATCH", f"/v1/tasks/{theirs['id']}", {"metadata": {"stolen": True}}),
    ]:
        response = await client.request(method, path, json=body, headers=auth(ALICE))
        assert response.status_code == 404, (method, path)
        assert error_code(response) == "not_found"
    ids = {t["id"] for t in (await client.get("/v1/tasks", headers=auth(ALICE))).json()["data"]}
    assert ids == {mine["id"]}
    untouched = await client.get(f"/v1/tasks/{theirs['id']}", headers=auth(BOB))
    assert untouched.json()["metadata"] == {}


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_token"),
        ({"Authorization": "Bearer wrong-token-123"}, "invalid_token"),
        ({"Authorization": f"Basic {ALICE}"}, "invalid_token"),
        ({"Authorization": "Bearer "}, "invalid_token"),
    ],
)
async def test_management_endpoints_need_a_valid_token(
    client: httpx.AsyncClient, headers: dict[str, str], code: str
) -> None:
    for method, path in [
        ("GET", "/v1/tasks"),
        ("POST", "/v1/tasks"),
        ("POST", "/v1/tasks/track"),
        ("GET", "/v1/tasks/tsk_x"),
        ("GET", "/v1/tasks/tsk_x/events"),
    ]:
        response = await client.request(method, path, json={}, headers=headers)
        assert response.status_code == 401, (method, path)
        assert error_code(response) == code
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


# --- bodies -----------------------------------------------------------------------------------


async def test_non_json_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/tasks",
        content=b"provider=evolink",
        headers={**auth(), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b"\xff\xfe{}", "invalid_encoding"),
        (b"[" * 100 + b"]" * 100, "invalid_json"),
    ],
)
async def test_malformed_json_is_400(client: httpx.AsyncClient, content: bytes, code: str) -> None:
    response = await client.post(
        "/v1/tasks", content=content, headers={**auth(), "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert error_code(response) == code


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    big = json.dumps({"provider": "evolink", "prompt": "x" * (1024 * 1024 + 10)})
    response = await client.post(
        "/v1/tasks", content=big, headers={**auth(), "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert error_code(response) == "payload_too_large"

    async def chunks() -> Any:  # no Content-Length: the limit applies while streaming
        for _ in range(20):
            yield b"x" * 65536

    streamed = await client.post(
        "/v1/tasks", content=chunks(), headers={**auth(), "Content-Type": "application/json"}
    )
    assert streamed.status_code == 413


# --- listing ----------------------------------------------------------------------------------


async def test_list_filters(client: httpx.AsyncClient, runtime: Runtime) -> None:
    a = await track(client, provider="evolink")
    b = await track(client, provider="grsai")
    await track(client, BOB, provider="grsai")
    from service.lifecycle import TaskUpdate
    from service.models import TaskStatus, UpdateSource

    runtime.store.apply_update(a["id"], TaskUpdate(status=TaskStatus.running), UpdateSource.poll)

    async def ids(query: str) -> list[str]:
        response = await client.get(f"/v1/tasks?{query}", headers=auth())
        assert response.status_code == 200, response.text
        return [task["id"] for task in response.json()["data"]]

    assert await ids("") == [b["id"], a["id"]]  # newest first
    assert await ids("provider=grsai") == [b["id"]]
    assert await ids("status=running") == [a["id"]]
    assert await ids("status=queued,running") == [b["id"], a["id"]]
    assert await ids("status=running&status=queued") == [b["id"], a["id"]]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert await ids(f"created_after={httpx.QueryParams({'x': future})['x']}") == []
    assert await ids(f"created_before={past.replace('+', '%2B')}") == []
    assert len(await ids(f"created_after={past.replace('+', '%2B')}")) == 2
    # A range: both bounds at once.
    window = f"created_after={past.replace('+', '%2B')}&created_before={future.replace('+', '%2B')}"
    assert await ids(window) == [b["id"], a["id"]]


@pytest.mark.parametrize(
    ("after", "before"),
    [
        ("2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z"),  # swapped
        ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),  # empty
        ("2026-01-01T06:00:00+05:00", "2026-01-01T01:00:00Z"),  # swapped once in UTC
    ],
)
async def test_a_task_list_range_that_holds_no_time_is_400(
    client: httpx.AsyncClient, after: str, before: str
) -> None:
    response = await client.get(
        "/v1/tasks", params={"created_after": after, "created_before": before}, headers=auth()
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "created_before must be later than created_after" in error["message"]
    assert error["details"] == [
        {"field": "created_before", "message": "must be later than created_after"}
    ]


@pytest.mark.parametrize(
    "query",
    [
        "status=done",
        "provider=acme",
        "limit=0",
        "limit=201",
        "limit=ten",
        # What int() takes but is no whole number as written.
        "limit=1_0",
        "limit=%205",
        "limit=5%20",
        "limit=%D9%A5",
        "limit=%2B5",
        "limit=05.0",
        "cursor=%%%",
        "cursor=eyJ4IjoxfQ",
        pytest.param(
            "cursor=" + base64.urlsafe_b64encode(b'{"before": true}').decode(), id="bool-cursor"
        ),
        pytest.param("cursor=" + base64.urlsafe_b64encode(b"[" * 5000).decode(), id="deep-cursor"),
        "created_after=yesterday",
        "colour=red",
    ],
)
async def test_bad_list_queries_are_400(client: httpx.AsyncClient, query: str) -> None:
    response = await client.get(f"/v1/tasks?{query}", headers=auth())
    assert response.status_code == 400, query
    assert response.json()["error"]["details"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("provider", "evolink"),
        ("created_after", "2026-01-01T00:00:00Z"),
        ("created_before", "2026-01-01T00:00:00Z"),
        ("limit", "5"),
        ("cursor", encode_cursor(10)),
    ],
)
async def test_a_single_valued_list_parameter_given_twice_is_400(
    client: httpx.AsyncClient, name: str, value: str
) -> None:
    response = await client.get("/v1/tasks", params=[(name, value), (name, value)], headers=auth())
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert name in error["message"]
    assert error["details"] == [{"field": name, "message": "given more than once"}]


async def test_cursor_pagination_stays_correct_while_tasks_are_written(
    client: httpx.AsyncClient,
) -> None:
    original = [(await track(client))["id"] for _ in range(11)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = "limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = (await client.get(f"/v1/tasks?{query}", headers=auth())).json()
        seen.extend(task["id"] for task in page["data"])
        pages += 1
        # Other writers keep inserting while this client pages.
        await asyncio.gather(*(track(client) for _ in range(2)))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(original))  # newest first, none skipped, none repeated
    assert pages == 4


# --- health, docs, errors ---------------------------------------------------------------------


async def test_health_readiness_and_openapi(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    document = (await client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    for path in [
        "/v1/tasks",
        "/v1/tasks/track",
        "/v1/tasks/{task_id}",
        "/callbacks/{provider}/{token}",
    ]:
        assert path in document["paths"]
    assert "TaskCreate" in document["components"]["schemas"]
    create_schema = document["components"]["schemas"]["TaskCreate"]
    assert create_schema["additionalProperties"] is False
    assert set(create_schema["required"]) == {"provider", "prompt"}


async def test_unknown_routes_and_methods_answer_json(client: httpx.AsyncClient) -> None:
    missing = await client.get("/v2/nothing")
    assert missing.status_code == 404 and error_code(missing) == "not_found"
    wrong = await client.delete("/v1/tasks", headers=auth())
    assert wrong.status_code == 405 and error_code(wrong) == "method_not_allowed"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v1/tasks", {"GET", "HEAD", "POST"}),
        ("PUT", "/v1/tasks/tsk_x", {"GET", "HEAD", "PATCH"}),
        ("PUT", "/v1/subscriptions", {"GET", "HEAD", "POST"}),
        ("PUT", "/v1/subscriptions/sub_x", {"GET", "HEAD", "PATCH", "DELETE"}),
        ("PUT", "/v1/tasks/track", {"POST"}),
    ],
)
async def test_a_405_names_every_method_the_path_takes(
    client: httpx.AsyncClient, method: str, path: str, allowed: set[str]
) -> None:
    """Allow lists all the path's methods, not only those of one of its endpoints."""
    wrong = await client.request(method, path, headers=auth())
    assert wrong.status_code == 405
    assert {m.strip() for m in wrong.headers["allow"].split(",")} == allowed


async def test_every_path_answers_a_method_it_does_not_take_with_a_405(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    """Whatever the route order: GET /v1/tasks/track is not a lookup of a task named
    "track" (a 404), nor PUT a callback URL something other than a 405."""
    checked = 0
    for route in app.routes:
        if not isinstance(route, Route) or route.methods is None:
            continue  # the mounted sandbox
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        for method in {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - route.methods:
            wrong = await client.request(method, path, headers=auth())
            assert wrong.status_code == 405, (method, path, wrong.text)
            assert {m.strip() for m in wrong.headers["allow"].split(",")} == route.methods
            checked += 1
    assert checked > 50


async def test_unexpected_errors_are_500_json_without_a_traceback(
    client: httpx.AsyncClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(runtime.store, "get_task", explode)
    response = await client.get("/v1/tasks/tsk_x", headers=auth())
    assert response.status_code == 500
    assert error_code(response) == "internal_error"
    assert "secret internal detail" not in response.text
    assert "Traceback" not in response.text


async def test_database_down_is_503_and_not_ready(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    from service.db import make_engine

    dead = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    working = runtime.store.engine
    runtime.store.engine = dead
    runtime.engine = dead
    try:
        response = await client.post(
            "/v1/tasks/track", json={"provider": "evolink"}, headers=auth()
        )
        assert response.status_code == 503
        assert error_code(response) == "store_unavailable"
        ready = await client.get("/readyz")
        assert ready.status_code == 503
    finally:
        runtime.store.engine = working
        runtime.engine = working
        dead.dispose()
    assert (await client.get("/readyz")).status_code == 200


async def test_a_submission_whose_reply_was_lost_still_completes_by_callback(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider accepted the task but its reply never arrived (a read timeout): the task
    row existed before the request left, so the provider's callback still finds it, and the
    submission is not sent twice."""
    from service.errors import UpstreamUnavailable

    adapter = app.state.runtime.adapters["evolink"]
    real_submit = adapter.submit

    async def reply_lost(*args: Any, **kwargs: Any) -> Any:
        await real_submit(*args, **kwargs)
        raise UpstreamUnavailable(
            "evolink timed out: ReadTimeout", provider="evolink", ambiguous=True
        )

    monkeypatch.setattr(adapter, "submit", reply_lost)
    monkeypatch.setattr(app.state.runtime.submitter, "backoff", submit_backoff(0.01, 4))
    response = await client.post(
        "/v1/tasks", json={"provider": "evolink", "prompt": "lost reply" + FAST}, headers=auth()
    )
    task = response.json()
    await wait_for_status(client, task["id"], {"succeeded", "failed"})
    await app.state.runtime.submitter.idle()  # any resend would have happened by now
    done = (await client.get(f"/v1/tasks/{task['id']}", headers=auth())).json()
    assert done["status"] == "succeeded"
    assert done["provider_task_id"]  # learned from the callback, not the lost reply
    assert done["submit_attempts"] == 1
    assert len([t for t in app.state.sandbox.tasks.values() if t.provider == "evolink"]) == 1


async def test_no_resend_once_the_task_has_been_settled(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider answered 503 but had in fact taken the task; its callback settles the task
    during the backoff, so the retry is not sent."""
    from service.errors import UpstreamUnavailable

    adapter = app.state.runtime.adapters["evolink"]
    real_submit = adapter.submit

    async def accepted_then_503(*args: Any, **kwargs: Any) -> Any:
        await real_submit(*args, **kwargs)
        raise UpstreamUnavailable("evolink answered HTTP 503", provider="evolink")

    monkeypatch.setattr(adapter, "submit", accepted_then_503)
    monkeypatch.setattr(app.state.runtime.submitter, "backoff", submit_backoff(0.5, 4))
    response = await client.post(
        "/v1/tasks", json={"provider": "evolink", "prompt": "settled" + FAST}, headers=auth()
    )
    task = response.json()
    await app.state.runtime.submitter.idle()
    done = (await client.get(f"/v1/tasks/{task['id']}", headers=auth())).json()
    assert done["status"] == "succeeded"
    assert done["submit_attempts"] == 1


def first_attempt_503(monkeypatch: pytest.MonkeyPatch, adapter: Any) -> list[int]:
    """The provider answers the first submission 503 (certainly not taken) and takes the
    rest; the list returned grows by one per attempt."""
    from service.errors import UpstreamUnavailable

    real_submit = adapter.submit
    calls: list[int] = []

    async def submit(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise UpstreamUnavailable("evolink answered HTTP 503", provider="evolink")
        return await real_submit(*args, **kwargs)

    monkeypatch.setattr(adapter, "submit", submit)
    return calls


def backoff_until_woken(
    monkeypatch: pytest.MonkeyPatch, runtime: Runtime, backoff: Backoff
) -> tuple[list[int], asyncio.Event]:
    """The provider answers the first EvoLink submission 503 (:func:`first_attempt_503`) and
    the submitter's ``backoff`` waits until the event returned is set (never, for a process
    stopped first): the provider's calls, and that event."""
    calls = first_attempt_503(monkeypatch, runtime.adapters["evolink"])
    wake = asyncio.Event()

    async def until_woken(seconds: float) -> None:
        await wake.wait()

    monkeypatch.setattr(runtime.submitter, "sleep", until_woken)
    monkeypatch.setattr(runtime.submitter, "backoff", backoff)
    return calls, wake


async def sent_as_attempt_2(client: httpx.AsyncClient, task_id: str, calls: list[int]) -> None:
    """The task succeeded on its second attempt, the provider called twice in all."""
    await wait_for_status(client, task_id, {"succeeded", "failed"})
    done = (await client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
    assert done["status"] == "succeeded" and done["submit_attempts"] == 2
    assert len(calls) == 2


async def submit_until_retry_planned(
    client: httpx.AsyncClient, runtime: Runtime, prompt: str
) -> str:
    """Submit an EvoLink task and wait until its first attempt failed and the retry is
    planned in the database (whenever it is due); the task's id."""
    response = await client.post(
        "/v1/tasks", json={"provider": "evolink", "prompt": prompt + FAST}, headers=auth()
    )
    task_id: str = response.json()["id"]
    far = datetime.now(UTC) + timedelta(hours=1)
    for _ in range(500):
        found = runtime.store.due_submit_retries(far)
        if found:
            assert found == [(task_id, 1)]
            return task_id
        await asyncio.sleep(0.01)
    raise AssertionError(f"no retry of {task_id} was planned")


async def test_a_retry_whose_process_stopped_during_the_backoff_is_sent_by_the_next_sweep(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider answered 503 and the retry was waiting out its backoff when the process
    stopped (a deploy, or a crash): the retry was written into the task row first, so the
    next process's start-up sweep sends it once due, exactly once, as attempt 2."""
    runtime = app.state.runtime
    submitter = runtime.submitter
    # Never woken: the process is stopped before the backoff ends.
    calls, _wake = backoff_until_woken(monkeypatch, runtime, submit_backoff(10.0, 4))
    task_id = await submit_until_retry_planned(client, runtime, "retry")
    await submitter.stop(grace=0)  # cuts the backoff off: nothing in memory survives it
    assert not submitter._running

    # Not yet due: the next process's start-up leaves it alone (the backoff is 5 to 10 s).
    assert await submitter.resume() == 0
    real_clock = runtime.store.clock
    monkeypatch.setattr(runtime.store, "clock", lambda: real_clock() + timedelta(seconds=11))
    assert await submitter.resume() == 1  # a start-up once it is due
    await wait_for_status(client, task_id, {"succeeded", "failed"})
    await submitter.idle()
    done = (await client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
    assert done["status"] == "succeeded"
    assert done["submit_attempts"] == 2
    assert runtime.store.due_submit_retries(datetime.now(UTC) + timedelta(hours=1)) == []
    assert len(calls) == 2
    assert len([t for t in app.state.sandbox.tasks.values() if t.provider == "evolink"]) == 1


async def test_a_retry_planned_before_the_attempts_were_lowered_is_not_sent_again(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry planned by a process that allowed 4 attempts, found due by one that allows 1
    (TASKRELAY_SUBMIT_ATTEMPTS lowered in a deploy): the new limit applies; the task fails
    without another request to the provider, and says why."""
    runtime = app.state.runtime
    submitter = runtime.submitter
    calls, _wake = backoff_until_woken(monkeypatch, runtime, submit_backoff(10.0, 4))
    task_id = await submit_until_retry_planned(client, runtime, "lowered")
    await submitter.stop(grace=0)

    monkeypatch.setattr(submitter, "backoff", submit_backoff(10.0, 1))  # the next process's
    real_clock = runtime.store.clock
    monkeypatch.setattr(runtime.store, "clock", lambda: real_clock() + timedelta(seconds=11))
    assert await submitter.resume() == 1
    await submitter.idle()
    task = (await client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
    assert task["status"] == "failed" and task["submit_attempts"] == 1
    assert task["error"]["code"] == "submit_attempts_exhausted"
    assert "TASKRELAY_SUBMIT_ATTEMPTS is 1" in task["error"]["message"]
    assert len(calls) == 1
    assert runtime.store.due_submit_retries(datetime.now(UTC) + timedelta(hours=1)) == []
    failed = runtime.metrics.counter("submissions_total", provider="evolink", outcome="failed")
    assert failed == 1


# A first backoff of 30 to 60 minutes (no provider asks for that long: the caps are a minute).
HOUR_BACKOFF = Backoff(base=3600.0, factor=4.0, cap=7200.0, max_attempts=4)


async def stop_during_backoff(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch, *, backoff: Backoff
) -> tuple[str, list[int], asyncio.Event]:
    """An EvoLink submission answered 503 whose planned retry waits out ``backoff`` until the
    event returned is set: its task id, and the provider's calls."""
    runtime = app.state.runtime
    calls, wake = backoff_until_woken(monkeypatch, runtime, backoff)
    task_id = await submit_until_retry_planned(client, runtime, "stopped")
    return task_id, calls, wake


async def test_stopping_cuts_off_a_planned_backoff_that_ends_after_the_grace(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deploy stops the process while a retry written in the task row waits out a backoff
    (30 to 60 minutes) longer than the shutdown's grace (10 minutes here): stop() cuts it off
    at once instead of holding the shutdown for the grace; the next process sends it."""
    runtime = app.state.runtime
    task_id, calls, _wake = await stop_during_backoff(
        client, app, monkeypatch, backoff=HOUR_BACKOFF
    )
    # Bounded only so that a regression fails instead of hanging for the grace.
    await asyncio.wait_for(runtime.submitter.stop(grace=600), timeout=30)
    assert not runtime.submitter._running and len(calls) == 1
    far = datetime.now(UTC) + timedelta(hours=2)
    assert runtime.store.due_submit_retries(far) == [(task_id, 1)]
    task = (await client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
    assert task["status"] == "queued" and task["submit_attempts"] == 1


async def test_stopping_waits_for_a_backoff_that_ends_within_the_grace(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planned retry whose backoff (5 to 10 s) ends within the grace (an hour) is waited
    for and sent, as a submission in flight: cutting it off would leave it to a sweep that
    finds it only once it is 10 s overdue."""
    runtime = app.state.runtime
    task_id, calls, wake = await stop_during_backoff(
        client, app, monkeypatch, backoff=submit_backoff(10.0, 4)
    )
    await _stopped_only_once_woken(runtime.submitter, wake)
    await sent_as_attempt_2(client, task_id, calls)


async def test_stopping_waits_for_a_backoff_the_database_could_not_record(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the retry could not be written (database unavailable), the wait is all there is
    of it: however long its backoff (30 to 60 minutes), it gets the grace of a submission in
    flight, and a retry woken within it is sent."""
    from service.errors import StoreUnavailable

    runtime = app.state.runtime
    submitter = runtime.submitter
    calls, wake = backoff_until_woken(monkeypatch, runtime, HOUR_BACKOFF)

    def unavailable(*args: Any, **kwargs: Any) -> bool:
        raise StoreUnavailable("the database is unavailable")

    monkeypatch.setattr(runtime.store, "plan_submit_retry", unavailable)
    response = await client.post(
        "/v1/tasks", json={"provider": "evolink", "prompt": "unplanned" + FAST}, headers=auth()
    )
    task_id = response.json()["id"]
    for _ in range(500):
        if calls:
            break
        await asyncio.sleep(0.01)
    assert len(calls) == 1 and submitter._running  # the 503; now in its backoff
    await _stopped_only_once_woken(submitter, wake, grace=3 * 3600)
    await sent_as_attempt_2(client, task_id, calls)


async def _stopped_only_once_woken(
    submitter: Any, wake: asyncio.Event, *, grace: float = 3600
) -> None:
    """stop() waits for the job in its backoff (not done however often the loop turns) and
    returns once the backoff is woken and the retry sent."""
    stopping = asyncio.create_task(submitter.stop(grace=grace))
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    assert not stopping.done()  # waiting for it, not cutting it off
    wake.set()
    await asyncio.wait_for(stopping, timeout=30)


async def test_a_retry_is_sent_once_when_its_process_and_a_sweep_both_find_it_due(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica's sweep finds a retry overdue while the process that planned it wakes
    up to send it: the compare-and-set on the attempt count lets exactly one of them send."""
    import service.submitter

    runtime = app.state.runtime
    submitter = runtime.submitter
    calls, wake = backoff_until_woken(monkeypatch, runtime, submit_backoff(0.05, 4))
    task_id = await submit_until_retry_planned(client, runtime, "both")
    await asyncio.sleep(0.1)  # overdue now
    # "Another replica": a second Submitter on the same database, sweeping.
    other = service.submitter.Submitter(
        runtime.store,
        runtime.adapters,
        runtime.signer,
        submitter.files,
        public_url=submitter.public_url,
        backoff=submit_backoff(0.05, 4),
    )
    assert await other.resume(created_before=runtime.store.clock()) == 1  # the sweep's look
    wake.set()  # both now go for attempt 2; neither has made it yet
    await asyncio.gather(submitter.idle(), other.idle())
    await wait_for_status(client, task_id, {"succeeded", "failed"})
    done = (await client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
    assert done["status"] == "succeeded"
    assert done["submit_attempts"] == 2
    assert len(calls) == 2  # the 503, then one retry
    assert len([t for t in app.state.sandbox.tasks.values() if t.provider == "evolink"]) == 1


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
async def test_json_constants_python_accepts_are_refused(
    client: httpx.AsyncClient, constant: bytes
) -> None:
    body = b'{"provider": "evolink", "metadata": {"x": ' + constant + b"}}"
    response = await client.post(
        "/v1/tasks/track", content=body, headers={**auth(), "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert error_code(response) == "invalid_json"
    listed = await client.get("/v1/tasks", headers=auth())
    assert listed.status_code == 200 and listed.json()["data"] == []


@pytest.mark.parametrize(
    "query",
    ["created_after=0001-01-01T00:00:00%2B05:00", "created_before=9999-12-31T23:00:00-05:00"],
)
async def test_timestamps_that_do_not_exist_in_utc_are_400(
    client: httpx.AsyncClient, query: str
) -> None:
    response = await client.get(f"/v1/tasks?{query}", headers=auth())
    assert response.status_code == 400


async def test_an_accepted_submission_is_recorded_through_a_brief_database_outage(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.errors import StoreUnavailable
    from service.models import UpdateSource

    runtime = app.state.runtime
    real_apply = runtime.store.apply_update
    failures = {"left": 3}

    def flaky_apply(task_id: str, update: Any, source: Any, **kwargs: Any) -> Any:
        if source is UpdateSource.submit and failures["left"]:
            failures["left"] -= 1
            raise StoreUnavailable("database restarting")
        return real_apply(task_id, update, source, **kwargs)

    async def no_wait(seconds: float) -> None:
        return None

    monkeypatch.setattr(runtime.store, "apply_update", flaky_apply)
    monkeypatch.setattr(runtime.submitter, "sleep", no_wait)
    response = await client.post(
        "/v1/tasks",
        json={"provider": "gptimage15", "prompt": "outage sandbox:duration=5"},
        headers=auth(),
    )
    await runtime.submitter.idle()
    task = (await client.get(f"/v1/tasks/{response.json()['id']}", headers=auth())).json()
    assert failures["left"] == 0
    assert task["provider_task_id"]  # the provider's answer was not lost
    assert task["submit_attempts"] == 1  # and nothing was sent twice


async def test_a_submission_another_replica_left_unsent_is_sent_by_the_sweep(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica answered 202 and died before sending: the task row is there, unsent. Every
    process's periodic sweep finds such tasks once they are older than the grace (younger ones
    are most likely being sent right now), and the compare-and-set sends each exactly once."""
    import service.submitter
    from service.models import TaskOrigin

    runtime = app.state.runtime
    orphan = runtime.store.create_task(
        owner="alice",
        provider="evolink",
        origin=TaskOrigin.submitted,
        request={"provider": "evolink", "prompt": "orphan" + FAST},
        metadata={},
    ).task
    assert await runtime.submitter._sweep() == 0
    await runtime.submitter.idle()
    young = (await client.get(f"/v1/tasks/{orphan['id']}", headers=auth())).json()
    assert young["submit_attempts"] == 0  # too young: its own replica may be sending it

    monkeypatch.setattr(service.submitter, "SWEEP_GRACE", timedelta(0))
    await asyncio.gather(runtime.submitter._sweep(), runtime.submitter._sweep())
    await wait_for_status(client, orphan["id"], {"succeeded", "failed"})
    await runtime.submitter.idle()
    done = (await client.get(f"/v1/tasks/{orphan['id']}", headers=auth())).json()
    assert done["status"] == "succeeded"
    assert done["submit_attempts"] == 1
    assert len([t for t in app.state.sandbox.tasks.values() if t.provider == "evolink"]) == 1


async def test_a_submission_the_database_outage_stops_is_a_warning_not_an_error(
    app: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage logs no error line (README, "When the database fails"), and the submission
    sweep takes up what it stopped: it was an error (found by the metrics and logs hunt)."""
    submitter = app.state.runtime.submitter

    def gone(task_id: str) -> Any:
        raise StoreUnavailable("gone", details={"reason": "OperationalError"})

    monkeypatch.setattr(submitter.store, "find_task", gone)
    with caplog.at_level(logging.INFO, logger="service.submitter"):
        await submitter._submit("tsk_AAAAAAAAAAAAAAAAAAAAAA", 0)
    (record,) = [r for r in caplog.records if "stopped" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "the database is unavailable" in record.getMessage()


async def cut_off_by_the_shutdown(client: httpx.AsyncClient, app: Any, provider: str) -> str:
    """Submit a task the sandbox takes 30 s to answer, and stop the submitter (grace 0) once
    the request is at the provider: the shutdown cuts the submission off. The task's id."""
    runtime = app.state.runtime
    response = await client.post(
        "/v1/tasks",
        json={"provider": provider, "prompt": "slow sandbox:duration=30"},
        headers=auth(),
    )
    task_id: str = response.json()["id"]
    sandbox = app.state.sandbox
    await until(lambda: [t for t in sandbox.tasks.values() if t.provider == provider])
    await asyncio.wait_for(runtime.submitter.stop(grace=0), timeout=30)
    assert not runtime.submitter._running
    return task_id


async def test_a_submission_the_shutdown_cuts_off_fails_when_nothing_could_bring_its_answer(
    client: httpx.AsyncClient, app: Any
) -> None:
    """OpenAI's answer is the image, and no callback or status query can bring it later:
    cut off by a shutdown, the task fails at once, saying why, instead of sitting queued
    until its deadline; it is not sent again, by this process or the next."""
    runtime = app.state.runtime
    task_id = await cut_off_by_the_shutdown(client, app, "openai")
    task = (await client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
    assert task["status"] == "failed" and task["submit_attempts"] == 1
    assert task["error"]["code"] == "submission_interrupted"
    assert "may have made (and billed) the image" in task["error"]["message"]
    assert runtime.metrics.counter("submissions_total", provider="openai", outcome="failed") == 1
    assert await runtime.submitter.resume() == 0


async def test_a_submission_the_shutdown_cuts_off_waits_for_the_providers_callback(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EvoLink calls back: cut off by a shutdown, the submission is not sent again (the
    provider may have it) and the task stays queued for the callback, counted unconfirmed."""
    runtime = app.state.runtime
    adapter = runtime.submitter.adapters["evolink"]
    sent = adapter.submit

    async def answered_late(*args: Any, **kwargs: Any) -> Any:
        await sent(*args, **kwargs)  # at the provider (the sandbox has it) ...
        await asyncio.sleep(3600)  # ... and its answer is slow to come back

    monkeypatch.setattr(adapter, "submit", answered_late)
    task_id = await cut_off_by_the_shutdown(client, app, "evolink")
    task = (await client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
    assert task["status"] == "queued" and task["submit_attempts"] == 1
    unconfirmed = runtime.metrics.counter(
        "submissions_total", provider="evolink", outcome="unconfirmed"
    )
    assert unconfirmed == 1
    assert await runtime.submitter.resume() == 0


async def test_a_cut_off_submission_leaves_a_task_that_expired_meanwhile_expired(
    client: httpx.AsyncClient, app: Any
) -> None:
    """The deadline passed while OpenAI was still generating: the task expired. The
    shutdown's cut-off then records nothing over it (only the provider's own final word may
    move an expired task)."""
    runtime = app.state.runtime
    response = await client.post(
        "/v1/tasks",
        json={"provider": "openai", "prompt": "slow sandbox:duration=30"},
        headers=auth(),
    )
    task_id = response.json()["id"]
    sandbox = app.state.sandbox
    await until(lambda: [t for t in sandbox.tasks.values() if t.provider == "openai"])
    runtime.store.expire_task(task_id, "No final answer before the deadline.")
    await asyncio.wait_for(runtime.submitter.stop(grace=0), timeout=30)
    task = (await client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
    assert task["status"] == "expired" and task["error"]["code"] == "deadline_exceeded"
    events = (await client.get(f"/v1/tasks/{task_id}/events", headers=auth())).json()["data"]
    assert [e["type"] for e in events] == ["task.submitted", "task.expired"]


async def test_a_shutdown_while_an_attempt_is_counted_takes_the_count_back(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut off while the attempt was being counted (its write still running on a thread):
    nothing was sent, so the count is taken back once written, and the next process sends
    the task as unsent, once."""
    runtime = app.state.runtime
    store = runtime.store
    entered, release = threading.Event(), threading.Event()
    mark = store.mark_submit_attempt

    def slow_mark(task_id: str, attempt: int) -> bool:
        entered.set()
        release.wait(30)
        return mark(task_id, attempt)

    monkeypatch.setattr(store, "mark_submit_attempt", slow_mark)
    response = await client.post(
        "/v1/tasks", json={"provider": "evolink", "prompt": "counted" + FAST}, headers=auth()
    )
    task_id = response.json()["id"]
    await until(entered.is_set)
    stopping = asyncio.create_task(runtime.submitter.stop(grace=0))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not stopping.done()  # waiting for the write, not leaving it running
    release.set()
    await asyncio.wait_for(stopping, timeout=30)
    task = (await client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
    assert task["status"] == "queued" and task["submit_attempts"] == 0
    assert not [t for t in app.state.sandbox.tasks.values() if t.provider == "evolink"]
    monkeypatch.setattr(store, "mark_submit_attempt", mark)
    assert await runtime.submitter.resume() == 1  # the next process's start-up
    await wait_for_status(client, task_id, {"succeeded", "failed"})
    done = (await client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
    assert done["status"] == "succeeded" and done["submit_attempts"] == 1
