"""The OpenAPI 3.1 document served at ``/openapi.json``.

Schemas come from the same pydantic models that validate request bodies, so the document
cannot drift from what the endpoints accept.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service import __version__
from service.schemas import (
    EVENT_SCHEMA_VERSION,
    CallbackAck,
    CallbackPage,
    DeliveryDetail,
    DeliveryOut,
    ErrorResponse,
    EventPage,
    NotifySecretOut,
    Replay,
    ReplayResult,
    SecretRotation,
    SubscriptionCreate,
    SubscriptionList,
    SubscriptionOut,
    SubscriptionUpdate,
    TaskCreate,
    TaskOut,
    TaskPage,
    TaskPatch,
    TaskTrack,
    TrackedTaskOut,
    WebhookEvent,
)
from service.settings import PROVIDERS
from service.store import DEFAULT_PAGE_SIZE, DEFAULT_RECEIPTS_PAGE, MAX_PAGE_SIZE

_MODELS: list[type[BaseModel]] = [
    TaskCreate,
    TaskTrack,
    TaskPatch,
    TaskOut,
    TrackedTaskOut,
    TaskPage,
    EventPage,
    CallbackPage,
    ErrorResponse,
    CallbackAck,
    WebhookEvent,
    SubscriptionCreate,
    SubscriptionUpdate,
    SubscriptionOut,
    SecretRotation,
    Replay,
    DeliveryOut,
    DeliveryDetail,
    SubscriptionList,
    NotifySecretOut,
    ReplayResult,
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Invalid input; `details` names each bad field",
        401: "Missing or invalid API token",
        403: "Forbidden",
        404: "Not found (or another client's task)",
        409: "Conflict",
        413: "Body larger than the limit",
        415: "Body is not JSON",
        416: "The range starts past the end of the file (`Content-Range: bytes */size`)",
        422: "Idempotency-Key reused with a different body",
        502: "The provider refused or failed the request (`upstream_*`)",
        503: "Database unavailable, or its storage read-only or failing; nothing was recorded",
        507: "The database's disk is full (`store_full`); nothing was recorded",
    }
    answers = {}
    for status in statuses:
        answers[str(status)] = _json("ErrorResponse", text[status])
        if status in _RETRIED:
            answers[str(status)]["headers"] = {"Retry-After": _RETRY_AFTER}
        if status == 401:
            answers[str(status)]["headers"] = {"WWW-Authenticate": _WWW_AUTHENTICATE}
    return answers


_WWW_AUTHENTICATE = {
    "description": 'The scheme the API wants: `Bearer realm="taskrelay"`',
    "schema": {"type": "string"},
}
_REPLAYED = {
    "description": "`true`: this answer replays an earlier request's (same Idempotency-Key)",
    "schema": {"type": "string", "enum": ["true"]},
}


# Answers that carry Retry-After: the database's outages and storage faults.
_RETRIED = frozenset({503, 507})
# What every operation that writes to the database may answer besides its own errors.
_STORE = (503, 507)


_AUTH: list[dict[str, list[str]]] = [{"bearer": []}]
_TASK_ID = {
    "name": "task_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "maxLength": 40},
}
_IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    "description": "The same key from the same client returns the same task; nothing is "
    "submitted twice.",
}


# A query parameter that takes one value: the API refuses it repeated rather than pick one.
_ONCE = "at most once (given twice, the request is a 400)."


def _json_body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


_SUBSCRIPTION_ID = {
    "name": "subscription_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "maxLength": 40},
}
_DELIVERY_ID = {
    "name": "delivery_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "maxLength": 40},
}
_RETRY_AFTER = {
    "description": "Seconds to wait before trying again",
    "schema": {"type": "integer", "minimum": 1},
}
_RATE_LIMITED = {
    **_json(
        "ErrorResponse",
        "This client made more requests than TASKRELAY_RATE_LIMIT allows (`rate_limited`); "
        "nothing was done",
    ),
    "headers": {"Retry-After": _RETRY_AFTER},
}


def _with_rate_limits(paths: dict[str, Any]) -> dict[str, Any]:
    """Every operation that takes an API token may answer 429 (service/ratelimit.py)."""
    for operations in paths.values():
        for operation in operations.values():
            if operation.get("security") and "429" not in operation["responses"]:
                operation["responses"]["429"] = _RATE_LIMITED
    return paths


def _op(summary: str, op_id: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "summary": summary,
        "operationId": op_id,
        "security": _AUTH,
        **extra,
        "responses": responses,
    }


def _delivery_page(item: dict[str, Any]) -> dict[str, Any]:
    """The 200 answer of a list of deliveries, each shaped by ``item``."""
    return {
        "description": "A page of deliveries",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "data": {"type": "array", "items": item},
                        "next_cursor": {"type": ["string", "null"]},
                    },
                }
            }
        },
    }


_DELIVERY_STATUS = {
    "name": "status",
    "in": "query",
    "required": False,
    "description": f"Only the deliveries in this status; {_ONCE}",
    "schema": {
        "type": "string",
        "enum": ["pending", "succeeded", "dead", "coalesced"],
    },
}


def _event_paths() -> dict[str, Any]:
    sub_params = [_SUBSCRIPTION_ID]
    return {
        "/v1/tasks/{task_id}/refresh": {
            "post": _op(
                "Ask the provider about the task now",
                "refreshTask",
                {
                    "200": _json("TaskOut", "The updated task"),
                    **_errors(401, 404, 409, 502, 507),
                    "503": {
                        **_json(
                            "ErrorResponse",
                            "Database unavailable, or the provider unavailable or rate "
                            "limiting (`upstream_unavailable`, `upstream_rate_limited`)",
                        ),
                        "headers": {"Retry-After": _RETRY_AFTER},
                    },
                },
                parameters=[_TASK_ID],
            )
        },
        "/v1/tasks/{task_id}/stream": {
            "get": _op(
                "The task's events as Server-Sent Events, until its final event",
                "streamTask",
                {
                    "200": {
                        "description": "text/event-stream",
                        "content": {"text/event-stream": {}},
                    },
                    "204": {
                        "description": "Resumed (Last-Event-ID) after the task's final event: "
                        "nothing more will come; an EventSource stops reconnecting"
                    },
                    **_errors(401, 404),
                    "429": {
                        **_json(
                            "ErrorResponse",
                            "This client already holds TASKRELAY_MAX_STREAMS_PER_CLIENT open "
                            "streams (`too_many_streams`), or made more requests than "
                            "TASKRELAY_RATE_LIMIT allows (`rate_limited`)",
                        ),
                        "headers": {"Retry-After": _RETRY_AFTER},
                    },
                    "503": {
                        **_json(
                            "ErrorResponse",
                            "Database unavailable, or this process serves "
                            "TASKRELAY_MAX_STREAMS streams (`stream_capacity_reached`)",
                        ),
                        "headers": {"Retry-After": _RETRY_AFTER},
                    },
                },
                parameters=[
                    _TASK_ID,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "maxLength": 40},
                        "description": "Resume after this event (sent by EventSource on "
                        "reconnect).",
                    },
                ],
            )
        },
        "/v1/subscriptions": {
            "post": _op(
                "Subscribe an endpoint to your task events",
                "createSubscription",
                {
                    "201": _json("SubscriptionOut", "Created, with its secret"),
                    **_errors(400, 401, 413, 415, *_STORE),
                },
                requestBody=_json_body("SubscriptionCreate"),
            ),
            "get": _op(
                "Your subscriptions",
                "listSubscriptions",
                {"200": _json("SubscriptionList", "Your subscriptions"), **_errors(400, 401, 503)},
            ),
        },
        "/v1/subscriptions/{subscription_id}": {
            "get": _op(
                "A subscription",
                "getSubscription",
                {"200": _json("SubscriptionOut", "The subscription"), **_errors(401, 404, 503)},
                parameters=sub_params,
            ),
            "patch": _op(
                "Change a subscription (url, filters, description, enabled)",
                "updateSubscription",
                {
                    "200": _json("SubscriptionOut", "The subscription"),
                    **_errors(400, 401, 404, 413, 415, *_STORE),
                },
                parameters=sub_params,
                requestBody=_json_body("SubscriptionUpdate"),
            ),
            "delete": _op(
                "Delete a subscription",
                "deleteSubscription",
                {"204": {"description": "Deleted"}, **_errors(401, 404, *_STORE)},
                parameters=sub_params,
            ),
        },
        "/v1/subscriptions/{subscription_id}/rotate-secret": {
            "post": _op(
                "New secret; the previous one keeps signing during the overlap",
                "rotateSubscriptionSecret",
                {
                    "200": _json("SubscriptionOut", "With the new secret"),
                    **_errors(400, 401, 404, 413, 415, *_STORE),
                },
                parameters=sub_params,
                requestBody={
                    "required": False,
                    "content": {"application/json": {"schema": _ref("SecretRotation")}},
                },
            )
        },
        "/v1/subscriptions/{subscription_id}/deliveries": {
            "get": _op(
                "The subscription's deliveries, newest first",
                "listDeliveries",
                {"200": _delivery_page(_ref("DeliveryOut")), **_errors(400, 401, 404, 503)},
                parameters=[
                    _SUBSCRIPTION_ID,
                    _DELIVERY_STATUS,
                    *_page_params("Deliveries", DEFAULT_PAGE_SIZE),
                ],
            )
        },
        "/v1/tasks/{task_id}/deliveries": {
            "get": _op(
                "The task's deliveries to your subscribers (its notify_url and your "
                "endpoints), newest first",
                "listTaskDeliveries",
                {"200": _delivery_page(_ref("DeliveryOut")), **_errors(400, 401, 404, 503)},
                parameters=[
                    _TASK_ID,
                    _DELIVERY_STATUS,
                    *_page_params("Deliveries", DEFAULT_PAGE_SIZE),
                ],
            )
        },
        "/v1/subscriptions/{subscription_id}/replay": {
            "post": _op(
                "Send the events since a time again",
                "replayEvents",
                {
                    "202": _json("ReplayResult", "The events are sent again"),
                    **_errors(400, 401, 404, 409, 413, 415, *_STORE),
                },
                parameters=sub_params,
                requestBody=_json_body("Replay"),
            )
        },
        "/v1/deliveries/{delivery_id}": {
            "get": _op(
                "A delivery with its attempt log",
                "getDelivery",
                {"200": _json("DeliveryDetail", "The delivery"), **_errors(401, 404, 503)},
                parameters=[_DELIVERY_ID],
            )
        },
        "/v1/deliveries/{delivery_id}/retry": {
            "post": _op(
                "Send a delivery again now",
                "retryDelivery",
                {"202": _json("DeliveryOut", "Scheduled"), **_errors(401, 404, 409, *_STORE)},
                parameters=[_DELIVERY_ID],
            )
        },
        "/v1/notify-secret": {
            "get": _op(
                "The secret that signs your tasks' notify_url deliveries (made on first use)",
                "getNotifySecret",
                {"200": _json("NotifySecretOut", "The notify secret"), **_errors(401, *_STORE)},
            )
        },
        "/v1/notify-secret/rotate": {
            "post": _op(
                "Rotate the notify secret",
                "rotateNotifySecret",
                {
                    "200": _json("NotifySecretOut", "The new notify secret"),
                    **_errors(400, 401, 413, 415, *_STORE),
                },
                requestBody={
                    "required": False,
                    "content": {"application/json": {"schema": _ref("SecretRotation")}},
                },
            )
        },
    }


def _page_params(noun: str, default: int) -> list[dict[str, Any]]:
    """A paged list's ``limit`` and ``cursor`` query parameters."""
    return [
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "description": f"{noun} per page; {_ONCE}",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_PAGE_SIZE,
                "default": default,
            },
        },
        {
            "name": "cursor",
            "in": "query",
            "required": False,
            "description": f"The previous page's next_cursor; {_ONCE}",
            "schema": {"type": "string"},
        },
    ]


def build_openapi() -> dict[str, Any]:
    _, definitions = models_json_schema(
        [(model, "validation") for model in _MODELS],
        ref_template="#/components/schemas/{model}",
    )
    schemas = definitions.get("$defs", {})
    list_params = [
        {
            "name": "status",
            "in": "query",
            "required": False,
            "description": "Any of these statuses: repeat the parameter or comma-separate.",
            "style": "form",
            "explode": True,
            "schema": {
                "type": "array",
                "items": {
                    "type": "string",
                    "enum": ["queued", "running", "succeeded", "failed", "canceled", "expired"],
                },
            },
        },
        {
            "name": "provider",
            "in": "query",
            "required": False,
            "description": f"One provider; {_ONCE}",
            "schema": {"type": "string", "enum": list(PROVIDERS)},
        },
        {
            "name": "created_after",
            "in": "query",
            "required": False,
            "description": f"Created at or after this time; {_ONCE}",
            "schema": {"type": "string", "format": "date-time"},
        },
        {
            "name": "created_before",
            "in": "query",
            "required": False,
            "description": f"Created before this time (later than created_after); {_ONCE}",
            "schema": {"type": "string", "format": "date-time"},
        },
        *_page_params("Tasks", DEFAULT_PAGE_SIZE),
    ]
    paths: dict[str, Any] = {
        "/v1/tasks": {
            "post": {
                "summary": "Submit a generation task to a provider",
                "operationId": "createTask",
                "security": _AUTH,
                "parameters": [_IDEMPOTENCY],
                "requestBody": _json_body("TaskCreate"),
                "responses": {
                    "202": _json("TaskOut", "Task recorded; submission runs in the background"),
                    "200": {
                        **_json("TaskOut", "Idempotent replay of an earlier request"),
                        "headers": {"Idempotent-Replayed": _REPLAYED},
                    },
                    **_errors(400, 401, 413, 415, 422, *_STORE),
                },
            },
            "get": {
                "summary": "List tasks, newest first",
                "operationId": "listTasks",
                "security": _AUTH,
                "parameters": list_params,
                "responses": {
                    "200": _json("TaskPage", "A page of tasks"),
                    **_errors(400, 401, 503),
                },
            },
        },
        "/v1/tasks/track": {
            "post": {
                "summary": "Register a task submitted to the provider by the caller",
                "operationId": "trackTask",
                "security": _AUTH,
                "parameters": [_IDEMPOTENCY],
                "requestBody": _json_body("TaskTrack"),
                "responses": {
                    "201": _json("TrackedTaskOut", "Task registered, with its callback URL"),
                    "200": {
                        **_json("TrackedTaskOut", "Idempotent replay of an earlier request"),
                        "headers": {"Idempotent-Replayed": _REPLAYED},
                    },
                    **_errors(400, 401, 409, 413, 415, 422, *_STORE),
                },
            }
        },
        "/v1/tasks/{task_id}": {
            "get": {
                "summary": "Get a task",
                "operationId": "getTask",
                "security": _AUTH,
                "parameters": [_TASK_ID],
                "responses": {"200": _json("TaskOut", "The task"), **_errors(401, 404, 503)},
            },
            "patch": {
                "summary": "Set the provider task id or replace metadata",
                "operationId": "patchTask",
                "security": _AUTH,
                "parameters": [_TASK_ID],
                "requestBody": _json_body("TaskPatch"),
                "responses": {
                    "200": _json("TaskOut", "The updated task"),
                    **_errors(400, 401, 404, 409, 413, 415, *_STORE),
                },
            },
        },
        "/v1/tasks/{task_id}/events": {
            "get": {
                "summary": "A task's history of state changes, oldest first",
                "operationId": "listTaskEvents",
                "security": _AUTH,
                "parameters": [_TASK_ID],
                "responses": {
                    "200": _json("EventPage", "The events"),
                    **_errors(400, 401, 404, 503),
                },
            }
        },
        "/v1/tasks/{task_id}/callbacks": {
            "get": {
                "summary": "Callbacks received for a task, oldest first, raw bodies included",
                "operationId": "listTaskCallbacks",
                "security": _AUTH,
                "parameters": [_TASK_ID, *_page_params("Callbacks", DEFAULT_RECEIPTS_PAGE)],
                "responses": {
                    "200": _json("CallbackPage", "A page of the task's callback receipts"),
                    **_errors(400, 401, 404, 503),
                },
            }
        },
        "/callbacks/{provider}/{token}": {
            "post": {
                "summary": "Provider callback; the signed token in the URL is the proof",
                "operationId": "receiveCallback",
                "parameters": [
                    {
                        "name": "provider",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": list(PROVIDERS)},
                    },
                    {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": _json("CallbackAck", "Recorded (applied, unchanged or terminal)"),
                    **_errors(400, 401, 403, 404, 409, 413, *_STORE),
                },
            }
        },
        "/files/{task_id}/{name}": {
            "get": {
                "summary": "An image TaskRelay stored itself (OpenAI's base64 results)",
                "description": "A capability URL, as a task's `images[].url` gives it: the task "
                "id is 128 random bits, so it needs no API token (nor is it rate limited).",
                "operationId": "getFile",
                "parameters": [
                    _TASK_ID,
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "The image's file name: `0.png`, `1.png`, ...",
                    },
                ],
                "responses": {
                    "200": {"description": "The PNG image", "content": {"image/png": {}}},
                    "206": {
                        "description": "One byte range of it (`Range: bytes=first-last`, "
                        "`first-` or `-suffix`); any other Range is ignored (200)",
                        "content": {"image/png": {}},
                    },
                    **_errors(404, 416),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness: the process is up",
                "operationId": "healthz",
                "responses": {"200": {"description": "Up", "content": {"application/json": {}}}},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: the database answers and its schema is current",
                "operationId": "readyz",
                "responses": {
                    "200": {"description": "Ready", "content": {"application/json": {}}},
                    "503": {"description": "Not ready", "content": {"application/json": {}}},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Metrics in the Prometheus text format (version 0.0.4)",
                "description": "Counters and histograms of this process, and queue depths read "
                "from the database at scrape time. Open unless TASKRELAY_METRICS_TOKEN is set; "
                "then send 'Authorization: Bearer <that token>' (not an API token, so no "
                "`security` entry here; nor is it rate limited).",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "The exposition",
                        "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}},
                    },
                    "401": {
                        **_json(
                            "ErrorResponse",
                            "TASKRELAY_METRICS_TOKEN is set and was not sent (or another was)",
                        ),
                        "headers": {"WWW-Authenticate": _WWW_AUTHENTICATE},
                    },
                },
            }
        },
    }
    paths.update(_event_paths())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "TaskRelay",
            "version": __version__,
            "description": "Tracks asynchronous image-generation tasks across providers.",
        },
        "paths": _with_rate_limits(paths),
        "webhooks": {
            "taskEvent": {
                "post": {
                    "summary": f"A task event (event schema version {EVENT_SCHEMA_VERSION})",
                    "description": "Signed per the Standard Webhooks specification: headers "
                    "webhook-id (the event id), webhook-timestamp and webhook-signature "
                    "(v1,<base64 HMAC-SHA256 of '{id}.{timestamp}.{body}'>).",
                    "requestBody": {
                        "content": {"application/json": {"schema": _ref("WebhookEvent")}}
                    },
                    "responses": {"200": {"description": "Any 2xx acknowledges the event"}},
                }
            }
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
