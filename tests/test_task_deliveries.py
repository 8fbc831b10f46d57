"""GET /v1/tasks/{id}/deliveries: every delivery of a task's events, to its notify_url and to
the client's endpoints, through the real app and database (both, when PostgreSQL is set up);
subscribers are test_events.py's in-process recording app."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from service.models import Delivery, Task, TaskStatus
from service.schemas import DeliveryDetail, DeliveryOut
from service.store import encode_cursor
from tests.conftest import ALICE, BOB, auth, error_code, query_plan, statements_with
from tests.test_events import HOOK, Harness, harnessed

_DELIVERY = Delivery.__table__  # type: ignore[attr-defined]
_TASK = Task.__table__  # type: ignore[attr-defined]


@pytest.fixture
async def harness(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harnessed(database_url, tmp_path) as value:
        yield value


async def task_deliveries(
    harness: Harness, task_id: str, query: str = "", token: str = ALICE
) -> dict[str, Any]:
    """One page of the task's deliveries (asserting a 200)."""
    response = await harness.client.get(
        f"/v1/tasks/{task_id}/deliveries{query}", headers=auth(token)
    )
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


async def every_page(
    harness: Harness, task_id: str, query: str, cursor: str | None = None
) -> list[list[dict[str, Any]]]:
    """Each page of the list from ``cursor`` (None: the first), following next_cursor until
    it is null."""
    pages: list[list[dict[str, Any]]] = []
    while True:
        suffix = f"&cursor={cursor}" if cursor else ""
        page = await task_deliveries(harness, task_id, f"?{query}{suffix}")
        pages.append(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages


def stored_ids_newest_first(harness: Harness, task_id: str) -> list[str]:
    """The ids of the task's deliveries in the database, by key, the largest first."""
    with harness.runtime.store.engine.connect() as connection:
        return list(
            connection.execute(
                sa.select(_DELIVERY.c.id)
                .join(_TASK, _TASK.c.pk == _DELIVERY.c.task_pk)
                .where(_TASK.c.id == task_id)
                .order_by(_DELIVERY.c.pk.desc())
            ).scalars()
        )


async def test_both_subscribers_deliveries_are_listed_newest_first_with_their_target(
    harness: Harness,
) -> None:
    endpoint = await harness.subscribe("endpoint")
    await harness.subscribe("bobs", token=BOB)  # another client's subscriber: never listed
    task_id = await harness.track(notify_url=HOOK.format(name="notify"))
    other = await harness.track()  # the same client's other task: not this task's
    harness.update(task_id, TaskStatus.succeeded)
    harness.update(other, TaskStatus.succeeded)
    await harness.deliver()
    assert len(harness.receiver.received["notify"]) == 2

    page = await task_deliveries(harness, task_id)
    data = page["data"]
    assert page["next_cursor"] is None
    assert [item["id"] for item in data] == stored_ids_newest_first(harness, task_id)
    assert len(data) == 4
    # Newest first: the final event's deliveries, then task.submitted's.
    assert [item["event_type"] for item in data] == ["task.succeeded"] * 2 + ["task.submitted"] * 2
    assert sorted(
        (item["event_type"], item["target"], item["subscription_id"]) for item in data
    ) == [
        ("task.submitted", "endpoint", endpoint["id"]),
        ("task.submitted", "notify_url", None),
        ("task.succeeded", "endpoint", endpoint["id"]),
        ("task.succeeded", "notify_url", None),
    ]
    assert all(item["status"] == "succeeded" and item["delivered_at"] for item in data)
    # Each item's event is the task's own, as its history lists it.
    events = (await harness.client.get(f"/v1/tasks/{task_id}/events", headers=auth())).json()
    event_ids = {event["id"]: event["type"] for event in events["data"]}
    assert {item["event_id"]: item["event_type"] for item in data} == event_ids
    # The notify_url got exactly the events listed for it, under the same ids.
    received = [headers["webhook-id"] for headers, _ in harness.receiver.received["notify"]]
    listed = [item["event_id"] for item in reversed(data) if item["target"] == "notify_url"]
    assert received == listed
    # The same delivery JSON as every other view of a delivery, its subscriber included.
    for item in data:
        detail = (await harness.client.get(f"/v1/deliveries/{item['id']}", headers=auth())).json()
        # Exactly the fields the OpenAPI document's schemas name.
        assert set(detail) == set(DeliveryDetail.model_fields)
        DeliveryDetail.model_validate(detail)
        assert len(detail.pop("attempt_log")) == 1
        assert item == detail
        assert set(item) == set(DeliveryOut.model_fields)
    by_subscription = await harness.client.get(
        f"/v1/subscriptions/{endpoint['id']}/deliveries", headers=auth()
    )
    endpoint_items = [item for item in data if item["target"] == "endpoint"]
    mine = [item for item in by_subscription.json()["data"] if item["event_id"] in event_ids]
    assert endpoint_items == mine


async def test_a_task_without_deliveries_is_an_empty_list(harness: Harness) -> None:
    task_id = await harness.track()  # no notify_url, no endpoint: owes nobody anything
    assert await task_deliveries(harness, task_id) == {"data": [], "next_cursor": None}


async def test_pages_follow_the_cursor_and_stay_correct_while_deliveries_are_added(
    harness: Harness,
) -> None:
    for name in ("one", "two", "three"):
        await harness.subscribe(name)
    task_id = await harness.track(notify_url=HOOK.format(name="notify"))
    harness.update(task_id, TaskStatus.running, 10)
    await harness.deliver()
    everything = (await task_deliveries(harness, task_id, "?limit=200"))["data"]
    assert len(everything) == 8  # two events, four subscribers

    pages = await every_page(harness, task_id, "limit=3")
    assert [len(page) for page in pages] == [3, 3, 2]
    assert [item["id"] for page in pages for item in page] == [item["id"] for item in everything]

    # A new event's deliveries come after the first page was read: the next pages go on
    # from where it ended, without them and without repeating any.
    first = await task_deliveries(harness, task_id, "?limit=3")
    harness.update(task_id, TaskStatus.succeeded)
    rest = await every_page(harness, task_id, "limit=3", first["next_cursor"])
    later = [item["id"] for item in first["data"]] + [item["id"] for page in rest for item in page]
    assert later == [item["id"] for item in everything]
    # A limit exactly the size of the list: one page, no cursor to an empty one.
    whole = await task_deliveries(harness, task_id, "?limit=12")
    assert len(whole["data"]) == 12 and whole["next_cursor"] is None
    assert (await task_deliveries(harness, task_id))["data"] == whole["data"]  # limit: 50


async def test_the_status_filter_pages_too(harness: Harness) -> None:
    endpoint = await harness.subscribe("endpoint")
    harness.receiver.status["notify"] = 500  # the notify_url fails: its deliveries wait
    task_id = await harness.track(notify_url=HOOK.format(name="notify"))
    harness.update(task_id, TaskStatus.succeeded)
    await harness.deliver()

    pending = (await task_deliveries(harness, task_id, "?status=pending"))["data"]
    assert [(item["event_type"], item["target"]) for item in pending] == [
        ("task.succeeded", "notify_url"),  # held behind the first, never attempted yet
        ("task.submitted", "notify_url"),
    ]
    assert [item["attempts"] for item in pending] == [0, 1]
    assert pending[1]["last_status_code"] == 500 and pending[1]["next_attempt_at"]
    succeeded = await every_page(harness, task_id, "status=succeeded&limit=1")
    assert [
        [(item["event_type"], item["subscription_id"]) for item in page] for page in succeeded
    ] == [
        [("task.succeeded", endpoint["id"])],
        [("task.submitted", endpoint["id"])],
    ]
    assert (await task_deliveries(harness, task_id, "?status=dead"))["data"] == []
    assert (await task_deliveries(harness, task_id, "?status=coalesced"))["data"] == []


async def test_a_dead_lettered_notify_url_delivery_found_here_can_be_retried(
    database_url: str, tmp_path: Path
) -> None:
    async with harnessed(database_url, tmp_path, TASKRELAY_DELIVERY_SCHEDULE="0s,5s") as harness:
        harness.receiver.status["notify"] = 503
        task_id = await harness.track(notify_url=HOOK.format(name="notify"))
        await harness.deliver()
        harness.clock.advance(5)
        await harness.deliver()  # the second and last attempt fails too: dead-lettered
        (dead,) = (await task_deliveries(harness, task_id, "?status=dead"))["data"]
        assert (dead["target"], dead["subscription_id"], dead["event_type"]) == (
            "notify_url",
            None,
            "task.submitted",
        )
        assert (dead["attempts"], dead["last_status_code"], dead["next_attempt_at"]) == (
            2,
            503,
            None,
        )

        harness.receiver.status["notify"] = 200  # the receiver is fixed
        retried = await harness.client.post(f"/v1/deliveries/{dead['id']}/retry", headers=auth())
        assert retried.status_code == 202, retried.text
        answer = retried.json()
        assert (answer["id"], answer["status"], answer["attempts"]) == (dead["id"], "pending", 0)
        assert (answer["target"], answer["subscription_id"]) == ("notify_url", None)
        assert answer["event_id"] == dead["event_id"]
        await harness.deliver()

        (done,) = (await task_deliveries(harness, task_id))["data"]
        assert (done["id"], done["status"], done["attempts"]) == (dead["id"], "succeeded", 1)
        assert done["delivered_at"] and done["target"] == "notify_url"
        received = harness.receiver.received["notify"]
        assert harness.receiver.answered["notify"] == [503, 503, 200]
        assert {headers["webhook-id"] for headers, _ in received} == {dead["event_id"]}
        assert json.loads(received[-1][1])["data"]["id"] == task_id


async def test_another_clients_task_or_none_is_404_as_the_task_itself(harness: Harness) -> None:
    task_id = await harness.track(notify_url=HOOK.format(name="notify"))
    await harness.deliver()
    for token, named in [(BOB, task_id), (ALICE, "tsk_nosuchtask"), (ALICE, "no'such")]:
        headers = auth(token)
        listed = await harness.client.get(f"/v1/tasks/{named}/deliveries", headers=headers)
        task = await harness.client.get(f"/v1/tasks/{named}", headers=headers)
        assert (listed.status_code, error_code(listed)) == (404, "not_found"), named
        assert listed.json() == task.json()
    # Bad query parameters of another client's task: the same 400 as for one's own (they are
    # read before the task is looked up), so the answer tells nothing about the task.
    bad = await harness.client.get(f"/v1/tasks/{task_id}/deliveries?limit=0", headers=auth(BOB))
    assert bad.status_code == 400


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=201",
        "limit=ten",
        "limit=1&limit=2",
        "limit=",
        "status=",
        "status=bogus",
        "status=Dead",
        "status=dead,pending",
        "status=dead&status=pending",
        "cursor=not-a-cursor",
        f"cursor={encode_cursor(0)}",  # no key is that small
        f"cursor={encode_cursor(5, 'after')}",  # a cursor of a list in the other order
        "cursor=1&cursor=2",
        "since=2020-01-01T00:00:00Z",
        "status=bogus&limit=0",  # several bad: the same one named first
    ],
)
async def test_bad_parameters_get_the_same_400_as_a_subscriptions_list(
    harness: Harness, query: str
) -> None:
    endpoint = await harness.subscribe("endpoint")
    task_id = await harness.track()
    await harness.deliver()
    mine = await harness.client.get(f"/v1/tasks/{task_id}/deliveries?{query}", headers=auth())
    theirs = await harness.client.get(
        f"/v1/subscriptions/{endpoint['id']}/deliveries?{query}", headers=auth()
    )
    assert mine.status_code == 400, mine.text
    assert mine.json() == theirs.json()


async def test_the_limits_bounds_are_taken(harness: Harness) -> None:
    task_id = await harness.track(notify_url=HOOK.format(name="notify"))
    for limit in (1, 200):
        page = await task_deliveries(harness, task_id, f"?limit={limit}")
        assert len(page["data"]) == 1 and page["next_cursor"] is None


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?status=pending",
        "?status=succeeded",
        f"?cursor={encode_cursor(99)}",
        f"?status=dead&cursor={encode_cursor(99)}",
    ],
)
async def test_the_list_reads_the_tasks_events_then_their_deliveries_by_index(
    harness: Harness, query: str
) -> None:
    """No index on delivery leads with task_pk: the list goes from the task's events
    (ix_task_event_task_seq) to their deliveries (ix_delivery_event_seq), whatever the filters;
    never through ix_delivery_status_next_attempt (every pending, or delivered, delivery of
    the store) nor down the whole table by key for the cursor's or the order's sake."""
    await harness.subscribe("endpoint")
    task_id = await harness.track(notify_url=HOOK.format(name="notify"))
    harness.update(task_id, TaskStatus.succeeded)
    engine = harness.runtime.store.engine
    with statements_with(engine, "JOIN task_event ON") as seen:
        page = await task_deliveries(harness, task_id, query)
    assert len(page["data"]) == (0 if "dead" in query or "succeeded" in query else 4)
    ((sql, parameters),) = seen
    plan = query_plan(engine, sql, parameters)
    if engine.dialect.name == "sqlite":
        assert plan.startswith(
            "SEARCH task_event USING INDEX ix_task_event_task_seq (task_pk=?) | "
            "SEARCH delivery USING INDEX ix_delivery_event_seq (event_seq=?"  # AND rowid<? (cursor)
        ), plan
    else:
        assert "Index Scan using ix_task_event_task_seq on task_event" in plan, plan
        assert "Index Scan using ix_delivery_event_seq on delivery" in plan, plan
    assert "status_next_attempt" not in plan and "delivery_pkey" not in plan, plan
    assert "SCAN delivery" not in plan and "Scan Backward" not in plan, plan
