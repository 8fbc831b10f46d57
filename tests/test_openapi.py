"""The OpenAPI document is valid OpenAPI 3.1 and covers every route the app serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.routing import Route

from service.app import create_app
from service.db import migrate
from service.openapi import build_openapi
from service.settings import Settings
from tests.conftest import _pg_url, auth, make_settings, serving


def test_document_is_valid_openapi_3_1() -> None:
    validate(build_openapi())  # raises on any violation


def test_bounds_are_json_schema_keywords() -> None:
    """pydantic wrote the bounds of ``n`` and ``overlap_seconds`` as "ge"/"le", which JSON
    Schema does not know: validators and client generators ignored them (the document still
    validated). Every bound is minimum/maximum (found by a newcomer's walk through the
    README)."""
    document = build_openapi()
    strays: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "type" in node:
                strays.extend(f"{where}.{key}" for key in ("ge", "le", "gt", "lt") if key in node)
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}[{index}]")

    walk(document, "")
    assert strays == []
    schemas = document["components"]["schemas"]
    n = schemas["TaskCreate"]["properties"]["n"]
    assert (n["minimum"], n["maximum"]) == (1, 10)
    overlap = schemas["SecretRotation"]["properties"]["overlap_seconds"]
    assert (overlap["minimum"], overlap["maximum"]) == (0, 7 * 86400)


def test_every_route_is_documented(tmp_path: Path) -> None:
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'x.db'}", tmp_path))
    documented = {
        (path, method.upper())
        for path, operations in build_openapi()["paths"].items()
        for method in operations
    }
    served = {
        (route.path, method)
        for route in app.routes
        if isinstance(route, Route) and route.path != "/openapi.json"
        for method in (route.methods or set()) - {"HEAD"}
    }
    assert served - documented == set()
    assert documented - served == set()


def test_event_schema_is_published_as_a_webhook() -> None:
    document = build_openapi()
    event = document["components"]["schemas"]["WebhookEvent"]
    assert set(event["required"]) == {"id", "type", "timestamp", "data"}
    assert "taskEvent" in document["webhooks"]
    assert "version 1" in document["webhooks"]["taskEvent"]["post"]["summary"]


# --- what the routes really answer when the database cannot take a write or cannot be reached -


PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
# Kept for audit with the receipt: needs pages a full store lacks.
PADDING = "x" * 60_000
BODIES: dict[str, Any] = {
    "createTask": {"provider": "evolink", "prompt": "a lighthouse at dawn"},
    "trackTask": {"provider": "evolink"},
    "patchTask": {"metadata": {"order": 42}},
    "receiveCallback": {
        "id": "task-unified-1757156493-openapi",
        "object": "image.generation.task",
        "status": "processing",
        "progress": 30,
        "pad": PADDING,
    },
    "createSubscription": {"url": "http://127.0.0.1:9/hooks/openapi"},
    "updateSubscription": {"description": "changed"},
    "rotateSubscriptionSecret": {},
    "replayEvents": {"since": "2020-01-01T00:00:00Z"},
    "rotateNotifySecret": {},
}


def quiet_settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(
        database_url,
        tmp_path,
        TASKRELAY_SCHEDULER="false",
        TASKRELAY_DISPATCHER="false",
        TASKRELAY_RATE_LIMIT="0",
        TASKRELAY_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
    )


def keep_image(files_dir: Path, task_id: str) -> None:
    (files_dir / task_id).mkdir(parents=True)
    (files_dir / task_id / "0.png").write_bytes(PNG)


async def seed(client: httpx.AsyncClient, settings: Settings) -> dict[str, str]:
    """A task with a kept image, a subscription and a delivery of the client: every path
    parameter of the document, as ids that exist."""
    task = await client.post("/v1/tasks/track", json={"provider": "evolink"}, headers=auth())
    subscription = await client.post(
        "/v1/subscriptions", json=BODIES["createSubscription"], headers=auth()
    )
    assert (task.status_code, subscription.status_code) == (201, 201), subscription.text
    await client.post("/v1/tasks/track", json={"provider": "grsai"}, headers=auth())
    subscription_id = subscription.json()["id"]
    deliveries = await client.get(f"/v1/subscriptions/{subscription_id}/deliveries", headers=auth())
    keep_image(settings.files_dir, task.json()["id"])
    return {
        "task_id": task.json()["id"],
        "subscription_id": subscription_id,
        "delivery_id": deliveries.json()["data"][0]["id"],
        "provider": "evolink",
        "token": httpx.URL(task.json()["callback_url"]).path.rsplit("/", 1)[1],
        "name": "0.png",
    }


async def every_answer(
    client: httpx.AsyncClient, ids: dict[str, str], skip: frozenset[str] = frozenset()
) -> dict[str, tuple[int, set[str]]]:
    """Each operation of the document, asked once: its answer's status, and the statuses the
    document gives it. Deletions last, so the others still find what they look for."""
    operations = [
        (path, method, operation)
        for path, methods in build_openapi()["paths"].items()
        for method, operation in methods.items()
        if operation["operationId"] not in skip
    ]
    operations.sort(key=lambda found: found[1] == "delete")
    answers = {}
    for path, method, operation in operations:
        name = operation["operationId"]
        response = await client.request(
            method.upper(),
            path.format(**ids),
            json=BODIES.get(name),
            headers=auth() if operation.get("security") else {},
        )
        answers[name] = (response.status_code, set(operation["responses"]))
    return answers


def undocumented(answers: dict[str, tuple[int, set[str]]]) -> list[str]:
    return [
        f"{name} answered {status}"
        for name, (status, documented) in answers.items()
        if str(status) not in documented
    ]


def body_mismatch(document: dict[str, Any], operation: dict[str, Any], response: Any) -> str:
    """Why ``response``'s JSON body is not what the document gives for its status ("" if it
    is, or the answer is not JSON)."""
    documented = operation["responses"].get(str(response.status_code), {})
    schema = documented.get("content", {}).get("application/json", {}).get("schema")
    if schema is None or not response.headers.get("content-type", "").startswith(
        "application/json"
    ):
        return ""
    validator = Draft202012Validator({**schema, "components": document["components"]})
    errors = [error.message for error in validator.iter_errors(response.json())]
    return "; ".join(errors)


async def test_every_answer_of_a_working_store_has_the_documented_shape(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Each operation's answer, validated against the schema the document gives for its
    status: four success answers were only `{"type": "object"}`, and a client generated from
    the document got untyped maps (found by the OpenAPI hunt)."""
    settings = quiet_settings(sqlite_url, tmp_path)
    document = build_openapi()
    mismatches, statuses = [], {}
    async with serving(settings, webhook_app=Starlette()) as (_, client):
        ids = await seed(client, settings)
        operations = [
            (path, method, operation)
            for path, methods in document["paths"].items()
            for method, operation in methods.items()
            if operation["operationId"] != "streamTask"
        ]
        operations.sort(key=lambda found: found[1] == "delete")
        for path, method, operation in operations:
            response = await client.request(
                method.upper(),
                path.format(**ids),
                json=BODIES.get(operation["operationId"]),
                headers=auth() if operation.get("security") else {},
            )
            statuses[operation["operationId"]] = response.status_code
            why = body_mismatch(document, operation, response)
            if why:
                mismatches.append(f"{operation['operationId']} {response.status_code}: {why}")
    assert mismatches == []
    for name in ("listSubscriptions", "getNotifySecret", "rotateNotifySecret"):
        assert statuses[name] == 200, statuses
    assert statuses["replayEvents"] == 202, statuses
    # No success answer is left untyped.
    for methods in document["paths"].values():
        for operation in methods.values():
            for status, answer in operation["responses"].items():
                schema = answer.get("content", {}).get("application/json", {}).get("schema")
                assert schema != {"type": "object"}, (operation["operationId"], status)


def test_the_headers_the_api_sends_are_documented() -> None:
    document = build_openapi()
    refresh = document["paths"]["/v1/tasks/{task_id}/refresh"]["post"]["responses"]
    assert "Retry-After" in refresh["503"]["headers"]
    for path, name in (("/v1/tasks", "createTask"), ("/v1/tasks/track", "trackTask")):
        operation = document["paths"][path]["post"]
        assert operation["operationId"] == name
        assert "Idempotent-Replayed" in operation["responses"]["200"]["headers"]
    for methods in document["paths"].values():
        for operation in methods.values():
            if "401" in operation["responses"]:
                assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
    # url and enabled are left out of a PATCH, never null: a generated client sent null.
    update = document["components"]["schemas"]["SubscriptionUpdate"]["properties"]
    assert update["url"]["type"] == "string" and update["enabled"]["type"] == "boolean"


async def test_a_full_store_answers_only_what_the_document_says(
    sqlite_url: str, tmp_path: Path
) -> None:
    settings = quiet_settings(sqlite_url, tmp_path)
    async with serving(settings, webhook_app=Starlette()) as (app, client):
        ids = await seed(client, settings)

        # Each pooled connection caps the file at its size: SQLite's own "database or disk
        # is full", as a full disk gives it. Free room in its pages is used up first.
        @sa.event.listens_for(app.state.runtime.engine, "checkout")
        def full(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            dbapi_connection.execute("PRAGMA max_page_count = 1")

        for _ in range(500):
            track = await client.post("/v1/tasks/track", json=BODIES["trackTask"], headers=auth())
            if track.status_code != 201:
                break
        assert track.status_code == 507
        # An event stream of a task that is not final stays open: a read, nothing to store.
        answers = await every_answer(client, ids, skip=frozenset({"streamTask"}))
    assert undocumented(answers) == []
    refused = {name for name, (status, _) in answers.items() if status == 507}
    assert {"trackTask", "receiveCallback"} <= refused, answers
    assert answers["getFile"][0] == 200


async def test_a_database_refusing_connections_answers_only_what_the_document_says(
    empty_postgres: str, tmp_path: Path
) -> None:
    migrate(empty_postgres)
    settings = quiet_settings(empty_postgres, tmp_path)
    name = sa.engine.make_url(empty_postgres).database
    admin = sa.create_engine(str(_pg_url()), isolation_level="AUTOCOMMIT")

    def connections(allowed: bool) -> None:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {allowed}')
            if not allowed:  # and the pool's connections are gone
                connection.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )

    try:
        async with serving(settings, webhook_app=Starlette()) as (_, client):
            ids = await seed(client, settings)
            connections(False)
            try:
                answers = await every_answer(client, ids)
            finally:
                connections(True)
    finally:
        admin.dispose()
    assert undocumented(answers) == []
    api = {
        operation["operationId"]
        for methods in build_openapi()["paths"].values()
        for operation in methods.values()
        if operation.get("security")
    }
    unavailable = {name for name, (status, _) in answers.items() if status == 503}
    assert unavailable == api | {"receiveCallback", "readyz"}


async def test_a_kept_image_is_served_and_a_missing_one_is_404(
    sqlite_url: str, tmp_path: Path
) -> None:
    settings = quiet_settings(sqlite_url, tmp_path)
    document = build_openapi()["paths"]["/files/{task_id}/{name}"]["get"]
    async with serving(settings, webhook_app=Starlette()) as (_, client):
        ids = await seed(client, settings)
        found = await client.get(f"/files/{ids['task_id']}/0.png")
        missing = await client.get(f"/files/{ids['task_id']}/1.png")
    assert (found.status_code, found.headers["content-type"], found.content) == (
        200,
        "image/png",
        PNG,
    )
    assert "image/png" in document["responses"]["200"]["content"]
    assert missing.status_code == 404 and "404" in document["responses"]


async def test_a_wrong_content_type_or_an_unknown_parameter_answers_what_the_document_says(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Each operation that takes a body, sent text instead of JSON (a 415), and each that
    takes none, asked with a query parameter it does not know (a 400 where it checks them):
    whatever it answers is in the document."""
    settings = quiet_settings(sqlite_url, tmp_path)
    found: dict[str, tuple[int, set[str]]] = {}
    async with serving(settings, webhook_app=Starlette()) as (_, client):
        ids = await seed(client, settings)
        for path, methods in build_openapi()["paths"].items():
            for method, operation in methods.items():
                name = operation["operationId"]
                if name in {"streamTask", "receiveCallback"} or method == "delete":
                    continue
                headers = auth() if operation.get("security") else {}
                if "requestBody" in operation:
                    response = await client.request(
                        method.upper(),
                        path.format(**ids),
                        content=b"provider=evolink",
                        headers={**headers, "Content-Type": "text/plain"},
                    )
                    assert response.status_code == 415, (name, response.text)
                else:
                    response = await client.request(
                        method.upper(), path.format(**ids) + "?colour=red", headers=headers
                    )
                found[name] = (response.status_code, set(operation["responses"]))
    assert undocumented(found) == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/tasks/"), ("GET", "/v1/subscriptions/"), ("GET", "/healthz/")],
)
async def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_host_header(
    sqlite_url: str, tmp_path: Path, method: str, path: str
) -> None:
    """Starlette redirected it (307) to a URL built from the request's Host header."""
    settings = quiet_settings(sqlite_url, tmp_path)
    async with serving(settings, webhook_app=Starlette()) as (_, client):
        response = await client.request(
            method, path, headers={**auth(), "Host": "evil.example"}, json={}
        )
    assert response.status_code == 404, response.headers
    assert "location" not in response.headers
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "text", ["2026-01-01T00:00:00Z", "2026-01-01t00:00:00z", "2026-01-01T02:00:00+02:00"]
)
def test_rfc_3339_times_of_either_case_are_taken(text: str) -> None:
    """The document says `format: date-time` (RFC 3339), which allows `t` and `z`: they were
    refused (found by the OpenAPI hunt)."""
    from datetime import UTC, datetime

    from service.schemas import Replay, parse_timestamp

    midnight = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_timestamp("created_after", text) == midnight
    assert Replay.model_validate({"since": text}).since == midnight


@pytest.mark.parametrize("unit", ["bytes", "BYTES", "Bytes"])
def test_a_range_unit_is_read_whatever_its_case(unit: str) -> None:
    from service.files import _range_to_serve

    assert _range_to_serve(f"{unit}=0-1", 10) == "bytes=0-1"
