"""The callback endpoint, with EvoLink's callback shape (its task object, PROVIDERS.md §4)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx
import pytest

from service.providers.parsing import CallbackParseError, depth_ok, parse_json_body
from service.runtime import Runtime
from service.schemas import CallbackPage
from tests.conftest import ALICE, BOB, auth, error_code


def evolink_body(status: str, progress: int = 0, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "created": 1757156493,
        "id": "task-unified-1757156493-imcg5zqt",
        "model": "gpt-image-1.5",
        "object": "image.generation.task",
        "progress": progress,
        "status": status,
        "type": "image",
        **extra,
    }
    return body


DONE = evolink_body("completed", 100, results=["https://files.evolink.example/a.png"])


async def tracked(client: httpx.AsyncClient, provider: str = "evolink") -> tuple[str, str]:
    response = await client.post("/v1/tasks/track", json={"provider": provider}, headers=auth())
    task = response.json()
    path = httpx.URL(task["callback_url"]).path
    return task["id"], path


async def get(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    result: dict[str, Any] = (await client.get(f"/v1/tasks/{task_id}", headers=auth())).json()
    return result


async def events(client: httpx.AsyncClient, task_id: str) -> list[str]:
    data = (await client.get(f"/v1/tasks/{task_id}/events", headers=auth())).json()["data"]
    return [event["type"] for event in data]


async def receipts(client: httpx.AsyncClient, task_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = (
        await client.get(f"/v1/tasks/{task_id}/callbacks", headers=auth())
    ).json()["data"]
    return data


async def test_callback_completes_a_task_and_learns_its_provider_id(
    client: httpx.AsyncClient,
) -> None:
    task_id, path = await tracked(client)
    response = await client.post(path, json=DONE)
    assert response.status_code == 200
    assert response.json() == {
        "received": True,
        "task_id": task_id,
        "status": "succeeded",
        "outcome": "applied",
    }
    task = await get(client, task_id)
    assert task["status"] == "succeeded"
    assert task["progress"] == 100
    assert task["provider_task_id"] == DONE["id"]
    assert task["images"] == [{"url": "https://files.evolink.example/a.png"}]
    assert task["last_update_source"] == "callback"
    assert task["provider_status"] == "completed"
    assert await events(client, task_id) == ["task.submitted", "task.succeeded"]
    (receipt,) = await receipts(client, task_id)
    assert receipt["outcome"] == "applied"
    assert json.loads(receipt["body"]) == DONE


async def test_a_callback_cannot_give_a_task_another_clients_provider_task(
    client: httpx.AsyncClient,
) -> None:
    """A client holds its tracked task's callback URL, and can post to it: naming a provider
    task another client holds there would hand that client's results to this one (TaskRelay
    asks providers with its own keys). Refused as tracking it is; the body kept for audit."""
    bobs = await client.post(
        "/v1/tasks/track",
        json={"provider": "evolink", "provider_task_id": "p-bob"},
        headers=auth(BOB),
    )
    assert bobs.status_code == 201
    task_id, path = await tracked(client)
    response = await client.post(path, json=evolink_body("processing", 10, id="p-bob"))
    assert response.status_code == 409
    assert error_code(response) == "tracked_by_another_client"
    task = await get(client, task_id)
    assert task["provider_task_id"] is None and task["status"] == "queued"
    (receipt,) = await receipts(client, task_id)
    assert receipt["outcome"] == "rejected"
    # The client's own provider task is still learned from a callback.
    response = await client.post(path, json=evolink_body("processing", 10, id="p-alice"))
    assert response.status_code == 200
    assert (await get(client, task_id))["provider_task_id"] == "p-alice"


async def test_two_clients_callbacks_racing_for_one_provider_task_give_it_to_one(
    client: httpx.AsyncClient,
) -> None:
    """Both at once, in one batch of the writer or in two: exactly one task gets it."""
    alices, alice_path = await tracked(client)
    bobs = (
        await client.post("/v1/tasks/track", json={"provider": "evolink"}, headers=auth(BOB))
    ).json()
    bob_path = httpx.URL(bobs["callback_url"]).path
    body = evolink_body("processing", 10, id="p-contested")
    answers = await asyncio.gather(
        client.post(alice_path, json=body), client.post(bob_path, json=body)
    )
    assert sorted(answer.status_code for answer in answers) == [200, 409], answers
    holders = [
        (await get(client, alices))["provider_task_id"],
        (await client.get(f"/v1/tasks/{bobs['id']}", headers=auth(BOB))).json()["provider_task_id"],
    ]
    assert sorted(holders, key=str) == sorted([None, "p-contested"], key=str)


@pytest.mark.parametrize("levels", [65, 5000])
async def test_a_callback_nested_too_deep_is_a_clear_400(
    client: httpx.AsyncClient, levels: int
) -> None:
    """At most 64 levels, as for the management API; the message says so, not how the
    parser ran out of stack. The body is kept for audit."""
    task_id, path = await tracked(client)
    deep = "[" * levels + "]" * levels
    body = json.dumps(evolink_body("processing", 10)).replace('"type"', f'"deep": {deep}, "type"')
    response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert error_code(response) == "callback_unparseable"
    message = response.json()["error"]["message"]
    assert "nested deeper than 64 levels" in message and "recursion" not in message
    assert [r["outcome"] for r in await receipts(client, task_id)] == ["rejected"]
    api = await client.post(
        "/v1/tasks", content=deep, headers={**auth(), "Content-Type": "application/json"}
    )
    assert api.status_code == 400 and "nested deeper than 64 levels" in api.text


def test_the_nesting_limit_counts_the_innermost_value_as_the_management_api_does() -> None:
    """64 levels of objects and arrays at most, the innermost value a level of its own: 64
    brackets around a number are too deep, 63 are not, however few brackets the body has
    besides (the check skips its walk only for bodies that cannot reach the limit)."""
    with pytest.raises(CallbackParseError, match="nested deeper than 64 levels"):
        parse_json_body(b"[" * 64 + b"1" + b"]" * 64)
    assert depth_ok(parse_json_body(b"[" * 63 + b"1" + b"]" * 63), 64)
    with pytest.raises(CallbackParseError, match="nested deeper than 64 levels"):
        parse_json_body(b'{"a":' * 64 + b"1" + b"}" * 64)


async def test_duplicate_and_out_of_order_callbacks_change_nothing(
    client: httpx.AsyncClient,
) -> None:
    task_id, path = await tracked(client)
    assert (await client.post(path, json=evolink_body("processing", 40))).json()[
        "outcome"
    ] == "applied"
    assert (await client.post(path, json=evolink_body("processing", 40))).json()[
        "outcome"
    ] == "unchanged"
    assert (await client.post(path, json=evolink_body("processing", 20))).json()[
        "outcome"
    ] == "unchanged"
    assert (await get(client, task_id))["progress"] == 40
    assert (await client.post(path, json=DONE)).json()["outcome"] == "applied"
    before = await get(client, task_id)
    for late in (
        DONE,
        evolink_body("processing", 70),
        evolink_body("failed", error={"message": "x"}),
    ):
        response = await client.post(path, json=late)
        assert response.status_code == 200  # acknowledged, so the provider stops retrying
        assert response.json()["outcome"] == "terminal"
        assert response.json()["status"] == "succeeded"
    after = await get(client, task_id)
    assert after == before
    assert await events(client, task_id) == ["task.submitted", "task.progress", "task.succeeded"]
    outcomes = [r["outcome"] for r in await receipts(client, task_id)]
    assert outcomes == [
        "applied",
        "unchanged",
        "unchanged",
        "applied",
        "terminal",
        "terminal",
        "terminal",
    ]


async def test_failure_keeps_the_providers_reason(client: httpx.AsyncClient) -> None:
    task_id, path = await tracked(client)
    body = evolink_body(
        "failed",
        0,
        error={"code": "content_policy", "message": "Content policy violation detected"},
    )
    assert (await client.post(path, json=body)).status_code == 200
    task = await get(client, task_id)
    assert task["status"] == "failed"
    assert task["error"]["code"] == "content_policy_violation"
    assert "Content policy" in task["error"]["message"]


async def test_expired_task_still_takes_a_late_success(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    task_id, path = await tracked(client)
    runtime.store.expire_task(task_id, "no answer in time")
    assert (await get(client, task_id))["status"] == "expired"
    response = await client.post(path, json=DONE)
    assert response.json()["outcome"] == "applied"
    task = await get(client, task_id)
    assert task["status"] == "succeeded"
    assert task["error"] is None
    assert await events(client, task_id) == ["task.submitted", "task.expired", "task.succeeded"]


async def test_unknown_status_is_recorded_without_breaking_anything(
    client: httpx.AsyncClient,
) -> None:
    task_id, path = await tracked(client)
    response = await client.post(path, json=evolink_body("warming_up", 5))
    assert response.status_code == 200
    task = await get(client, task_id)
    assert task["status"] in {"queued", "running"}
    assert task["provider_status"] == "warming_up"


# --- tokens -----------------------------------------------------------------------------------


async def assert_untouched(client: httpx.AsyncClient, task_id: str) -> None:
    task = await get(client, task_id)
    assert task["status"] == "queued"
    assert await receipts(client, task_id) == []


async def test_forged_and_tampered_tokens_are_401_and_change_nothing(
    client: httpx.AsyncClient,
) -> None:
    task_id, path = await tracked(client)
    token = path.rsplit("/", 1)[1]
    payload, timestamp, signature = token.split(".")
    # Alter a middle character: the last one of a 32-byte HMAC in base64 partly holds
    # padding bits, so changing it may decode to the very same signature.
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    from service.signing import CallbackSigner

    forged = CallbackSigner("an-attackers-own-key-0123456789", max_age=3600).token(
        task_id, "evolink"
    )
    for bad in (f"{payload}.{timestamp}.{flipped}", forged, "tsk_guess", "x" * 300):
        response = await client.post(f"/callbacks/evolink/{bad}", json=DONE)
        assert response.status_code == 401, bad
        assert error_code(response) == "callback_token_invalid"
    await assert_untouched(client, task_id)


async def test_expired_token_is_401(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id, path = await tracked(client)
    later = time.time() + 8 * 86400  # the default lifetime is 7 days
    monkeypatch.setattr("itsdangerous.timed.time.time", lambda: later)
    response = await client.post(path, json=DONE)
    assert response.status_code == 401
    assert error_code(response) == "callback_token_expired"
    monkeypatch.undo()
    await assert_untouched(client, task_id)


async def test_wrong_provider_is_403_and_unknown_provider_404(client: httpx.AsyncClient) -> None:
    task_id, path = await tracked(client)
    token = path.rsplit("/", 1)[1]
    wrong = await client.post(
        f"/callbacks/grsai/{token}", json={"code": 0, "data": {"status": "succeeded"}}
    )
    assert wrong.status_code == 403
    assert error_code(wrong) == "callback_provider_mismatch"
    unknown = await client.post(f"/callbacks/acme/{token}", json=DONE)
    assert unknown.status_code == 404
    await assert_untouched(client, task_id)


# --- bodies -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"not json at all", "application/json"),
        (b"", "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b"[1, 2, 3]", "application/json"),
        (b'{"no_status_anywhere": true}', "application/json"),
        (b"[" * 5000 + b"]" * 5000, "application/json"),
        (b"status=completed", "application/x-www-form-urlencoded"),
    ],
)
async def test_malformed_bodies_are_400_and_kept_for_audit(
    client: httpx.AsyncClient, content: bytes, content_type: str
) -> None:
    task_id, path = await tracked(client)
    response = await client.post(path, content=content, headers={"Content-Type": content_type})
    assert response.status_code == 400
    assert error_code(response) == "callback_unparseable"
    assert (await get(client, task_id))["status"] == "queued"
    (receipt,) = await receipts(client, task_id)
    assert receipt["outcome"] == "rejected"
    assert receipt["error"]
    assert receipt["body_size"] == len(content)
    if receipt["body_encoding"] == "base64":
        assert base64.b64decode(receipt["body"]) == content
    else:
        assert receipt["body"].encode() == content
    assert receipt["content_type"] == content_type


async def test_oversized_callback_is_413_with_a_capped_receipt(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    task_id, path = await tracked(client)
    huge = b'{"status": "completed", "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    response = await client.post(path, content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert (await get(client, task_id))["status"] == "queued"
    (receipt,) = await receipts(client, task_id)
    assert receipt["outcome"] == "rejected"
    assert receipt["body_truncated"] is True
    assert len(receipt["body"]) == runtime.settings.callback_audit_bytes


async def test_provider_task_id_mismatch_is_409_and_changes_nothing(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/v1/tasks/track",
        json={"provider": "evolink", "provider_task_id": "task-unified-REAL"},
        headers=auth(ALICE),
    )
    task = response.json()
    path = httpx.URL(task["callback_url"]).path
    reply = await client.post(path, json=DONE)  # names task-unified-1757156493-imcg5zqt
    assert reply.status_code == 409
    assert error_code(reply) == "provider_task_id_mismatch"
    assert (await get(client, task["id"]))["status"] == "queued"
    (receipt,) = await receipts(client, task["id"])
    assert receipt["outcome"] == "rejected"


async def test_callback_is_503_not_2xx_when_it_cannot_be_stored(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    task_id, path = await tracked(client)
    from service.db import make_engine

    dead = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    working = runtime.store.engine
    runtime.store.engine = dead
    try:
        response = await client.post(path, json=DONE)
        assert response.status_code == 503
        assert error_code(response) == "store_unavailable"
    finally:
        runtime.store.engine = working
        dead.dispose()
    assert (await get(client, task_id))["status"] == "queued"
    # The provider retries; now it lands.
    assert (await client.post(path, json=DONE)).status_code == 200
    assert (await get(client, task_id))["status"] == "succeeded"


async def test_nan_in_a_callback_is_a_400_not_a_stored_value(client: httpx.AsyncClient) -> None:
    task_id, path = await tracked(client)
    body = b'{"id": "t1", "status": "processing", "progress": NaN}'
    response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert (await get(client, task_id))["status"] == "queued"


async def test_a_very_long_status_word_is_kept_cut_to_fit(client: httpx.AsyncClient) -> None:
    task_id, path = await tracked(client)
    response = await client.post(path, json=evolink_body("x" * 500, 5))
    assert response.status_code == 200
    task = await get(client, task_id)
    assert task["provider_status"] == "x" * 64
    # The same callback again is a duplicate, as with a short status word: nothing changes.
    again = await client.post(path, json=evolink_body("x" * 500, 5))
    assert again.json()["outcome"] == "unchanged"
    assert (await get(client, task_id))["updated_at"] == task["updated_at"]


async def test_an_absurd_duration_hint_is_taken_as_a_year(client: httpx.AsyncClient) -> None:
    """EvoLink's estimated_time of 2e12 s (an epoch in milliseconds, say) would overflow the
    date of the expected finish; it is bounded, so the callback and its batch still land."""
    task_id, path = await tracked(client)
    other_id, other_path = await tracked(client)
    huge = evolink_body("processing", 10, task_info={"estimated_time": 2e12})
    other = {**evolink_body("processing", 50), "id": "task-unified-other"}
    answers = await asyncio.gather(
        client.post(path, json=huge), client.post(other_path, json=other)
    )
    assert [answer.status_code for answer in answers] == [200, 200]
    assert (await get(client, task_id))["progress"] == 10
    assert (await get(client, other_id))["progress"] == 50
    assert [r["outcome"] for r in await receipts(client, task_id)] == ["applied"]


async def test_a_provider_task_id_too_long_to_store_is_400_and_kept_for_audit(
    client: httpx.AsyncClient,
) -> None:
    task_id, path = await tracked(client)
    response = await client.post(path, json={**evolink_body("processing", 5), "id": "p" * 300})
    assert response.status_code == 400
    assert error_code(response) == "provider_task_id_too_long"
    assert (await get(client, task_id))["provider_task_id"] is None
    kept = await receipts(client, task_id)
    assert [r["outcome"] for r in kept] == ["rejected"]
    assert "longer than 255" in kept[0]["error"]


async def test_a_provider_task_id_of_another_task_is_409_not_500(
    client: httpx.AsyncClient,
) -> None:
    first = await client.post(
        "/v1/tasks/track",
        json={"provider": "evolink", "provider_task_id": DONE["id"]},
        headers=auth(ALICE),
    )
    assert first.status_code == 201
    task_id, path = await tracked(client)  # a second task of the same client
    response = await client.post(path, json=DONE)  # names the first task's provider id
    assert response.status_code == 409
    assert error_code(response) == "provider_task_id_taken"
    assert (await get(client, task_id))["status"] == "queued"
    # Kept for audit, as every refused callback is (the refusal rolled its receipt back).
    (kept,) = await receipts(client, task_id)
    assert kept["outcome"] == "rejected"
    assert "already belongs to another of the client's tasks" in kept["error"]


async def test_a_tasks_callbacks_come_in_pages_oldest_first(client: httpx.AsyncClient) -> None:
    """Anyone holding the callback URL can add receipts (each kept for audit, rejected ones
    too): the list is paged, never read all at once, and each page follows the one before."""
    task_id, path = await tracked(client)
    for progress in range(1, 6):
        answer = await client.post(path, json=evolink_body("processing", progress))
        assert answer.status_code == 200
    assert (await client.post(path, content=b"not json")).status_code == 400
    url = f"/v1/tasks/{task_id}/callbacks"
    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await client.get(url, params=params, headers=auth())).json()
        assert len(page["data"]) <= 2
        seen += page["data"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert [r["outcome"] for r in seen] == ["applied"] * 5 + ["rejected"]
    progress = [json.loads(r["body"])["progress"] for r in seen[:5]]
    assert progress == [1, 2, 3, 4, 5]
    everything = (await client.get(url, headers=auth())).json()
    assert everything["data"] == seen and everything["next_cursor"] is None  # 100 by default
    CallbackPage.model_validate(everything)  # as the OpenAPI document says


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=1&limit=2", "limit"),
        ("cursor=nonsense", "cursor"),
        ("page=2", "page"),
    ],
)
async def test_a_bad_callbacks_query_is_a_400_naming_it(
    client: httpx.AsyncClient, query: str, field: str
) -> None:
    task_id, _path = await tracked(client)
    response = await client.get(f"/v1/tasks/{task_id}/callbacks?{query}", headers=auth())
    assert response.status_code == 400, response.text
    assert response.json()["error"]["details"][0]["field"] == field


async def test_a_cursor_of_the_task_list_is_not_one_of_the_callbacks_list(
    client: httpx.AsyncClient,
) -> None:
    """The task list pages newest first ("before" a key), the callbacks oldest first ("after"
    one): a cursor of one list given to the other is refused, not read the wrong way."""
    task_id, _path = await tracked(client)
    await tracked(client)
    tasks = (await client.get("/v1/tasks", params={"limit": "1"}, headers=auth())).json()
    assert tasks["next_cursor"] is not None
    response = await client.get(
        f"/v1/tasks/{task_id}/callbacks", params={"cursor": tasks["next_cursor"]}, headers=auth()
    )
    assert response.status_code == 400
    assert error_code(response) == "validation_failed"


async def test_lists_that_take_no_query_parameters_refuse_them(client: httpx.AsyncClient) -> None:
    task_id, _path = await tracked(client)
    for path in (f"/v1/tasks/{task_id}/events", "/v1/subscriptions"):
        response = await client.get(f"{path}?limit=10", headers=auth())
        assert response.status_code == 400, path
        assert response.json()["error"]["details"][0]["field"] == "limit"
