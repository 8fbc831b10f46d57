"""The management API: submit, track, look up and list tasks (``/v1/tasks...``).

Endpoints are thin: authenticate, validate the body, call the store in a worker thread, shape
the JSON. A client sees and changes only its own tasks; another client's task is a 404.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import observe
from service.errors import ValidationFailed
from service.models import TaskOrigin
from service.providers.base import GenerationRequest
from service.runtime import Runtime, runtime_of
from service.schemas import (
    StatusName,
    TaskCreate,
    TaskPatch,
    TaskTrack,
    event_json,
    isoformat,
    parse_body,
    parse_timestamp,
)
from service.settings import PROVIDERS
from service.store import (
    DEFAULT_PAGE_SIZE,
    DEFAULT_RECEIPTS_PAGE,
    MAX_PAGE_SIZE,
    TaskFilter,
    decode_cursor,
    fingerprint,
)
from service.web import by_method, json_response, read_json_object, reserved

MAX_IDEMPOTENCY_KEY = 255
_STATUSES = set(StatusName.__args__)  # type: ignore[attr-defined]


def _check_metadata(runtime: Runtime, metadata: dict[str, Any] | None) -> None:
    if metadata is None:
        return
    # Compact UTF-8 JSON: ensure_ascii would count each "é" as the six bytes of "\u00e9".
    text = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"))
    size = len(text.encode("utf-8"))
    limit = runtime.settings.max_metadata_bytes
    if size > limit:
        raise ValidationFailed(
            f"metadata is {size} bytes as JSON; the limit is {limit} "
            "(TASKRELAY_MAX_METADATA_BYTES).",
            details=[{"field": "metadata", "message": f"larger than {limit} bytes"}],
        )


def _require_trackable(runtime: Runtime, provider: str) -> None:
    """A tracked task learns its result by callback or by asking the provider; a provider that
    offers neither (OpenAI: its reply to the request is the result) could only expire."""
    adapter = runtime.adapters[provider]
    if adapter.delivers_callbacks() or adapter.can_query_status:
        return
    raise ValidationFailed(
        f"Provider {provider!r} cannot be tracked: it sends no callbacks and has no status "
        "endpoint, so TaskRelay would never learn the result. Submit "
        f"{provider} tasks through POST /v1/tasks instead.",
        code="provider_not_trackable",
        details=[{"field": "provider", "message": "sends no callbacks and has no status endpoint"}],
    )


async def _notify_url(runtime: Runtime, url: str | None) -> str | None:
    return None if url is None else await runtime.check_webhook_url(url, "notify_url")


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise ValidationFailed(
            f"The Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY} characters.",
            details=[{"field": "Idempotency-Key", "message": "empty or too long"}],
        )
    return key


def _created(result_task: dict[str, Any], created: bool, status: int) -> Response:
    if created:
        return json_response(result_task, status_code=status)
    return json_response(result_task, status_code=200, headers={"Idempotent-Replayed": "true"})


async def create_task(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    body = await read_json_object(request, runtime.settings.max_body_bytes)
    spec = parse_body(TaskCreate, body)
    _check_metadata(runtime, spec.metadata)
    generation = GenerationRequest(
        prompt=spec.prompt,
        size=spec.size,
        quality=spec.quality,
        n=spec.n,
        image_urls=tuple(spec.image_urls),
        model=spec.model,
    )
    runtime.require_submittable(spec.provider).validate(generation)
    notify_url = await _notify_url(runtime, spec.notify_url)
    key = _idempotency_key(request)
    result = await run_in_threadpool(
        runtime.store.create_task,
        owner=owner,
        provider=spec.provider,
        origin=TaskOrigin.submitted,
        request=generation.to_json(),
        metadata=spec.metadata,
        idempotency_key=key,
        request_fingerprint=fingerprint(spec.model_dump()) if key else None,
        notify_url=notify_url,
    )
    observe.bind(task_id=result.task["id"], provider=spec.provider)
    task = result.task
    if result.created or (task["status"] == "queued" and task["submit_attempts"] == 0):
        # A replay of a task nobody has sent yet (its replica may have died before sending):
        # send it now rather than at the next sweep. The first attempt is a compare-and-set,
        # so if the first replica is sending it after all, only one of them does.
        runtime.submitter.submit(task["id"])
    # 202: the task is recorded and on its way; its outcome arrives later.
    return _created(result.task, result.created, 202)


async def track_task(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    body = await read_json_object(request, runtime.settings.max_body_bytes)
    spec = parse_body(TaskTrack, body)
    _require_trackable(runtime, spec.provider)
    _check_metadata(runtime, spec.metadata)
    notify_url = await _notify_url(runtime, spec.notify_url)
    key = _idempotency_key(request)
    result = await run_in_threadpool(
        runtime.store.create_task,
        notify_url=notify_url,
        owner=owner,
        provider=spec.provider,
        origin=TaskOrigin.tracked,
        request={},
        metadata=spec.metadata,
        provider_task_id=spec.provider_task_id,
        idempotency_key=key,
        request_fingerprint=fingerprint(spec.model_dump()) if key else None,
    )
    observe.bind(task_id=result.task["id"], provider=spec.provider)
    task = dict(result.task)
    task["callback_url"] = runtime.callback_url(task["id"], spec.provider)
    return _created(task, result.created, 201)


async def get_task(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    observe.bind(task_id=request.path_params["task_id"])
    task = await run_in_threadpool(runtime.store.get_task, owner, request.path_params["task_id"])
    return json_response(task)


async def patch_task(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    observe.bind(task_id=request.path_params["task_id"])
    body = await read_json_object(request, runtime.settings.max_body_bytes)
    spec = parse_body(TaskPatch, body)
    if spec.provider_task_id is None and spec.metadata is None:
        raise ValidationFailed(
            "Nothing to change: send provider_task_id and/or metadata.",
            details=[{"field": "(body)", "message": "no updatable field given"}],
        )
    _check_metadata(runtime, spec.metadata)
    task = await run_in_threadpool(
        runtime.store.patch_task,
        owner,
        request.path_params["task_id"],
        provider_task_id=spec.provider_task_id,
        metadata=spec.metadata,
    )
    return json_response(task)


async def refresh_task(request: Request) -> Response:
    """Ask the provider about the task now, record the answer, return the task."""
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    observe.bind(task_id=request.path_params["task_id"])
    task = await run_in_threadpool(runtime.store.get_task, owner, request.path_params["task_id"])
    observe.bind(provider=task["provider"])
    return json_response(await runtime.scheduler.refresh(task))


def page_size(params: QueryParams, default: int = DEFAULT_PAGE_SIZE) -> int:
    """The ``limit`` query parameter: from 1 to MAX_PAGE_SIZE, ``default`` when absent."""
    text = single_param(params, "limit")
    if text is None:
        return default
    # ASCII digits only: int() also takes " 5", "1_0" and other scripts' digits.
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else 0
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise ValidationFailed(
            f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}.",
            details=[{"field": "limit", "message": f"from 1 to {MAX_PAGE_SIZE}"}],
        )
    return value


def single_param(params: QueryParams, name: str) -> str | None:
    """The value of a query parameter that takes one; given twice it is a 400, rather than
    one of the values chosen silently."""
    values = params.getlist(name)
    if len(values) > 1:
        raise ValidationFailed(
            f"The query parameter {name} was given {len(values)} times; it takes one value.",
            details=[{"field": name, "message": "given more than once"}],
        )
    return values[0] if values else None


def page_cursor(request: Request, direction: str = "before") -> str | None:
    """The ``cursor`` query parameter, refused (400) unless it could have come from a page of
    a list in this ``direction`` (a crafted position beyond any key is a value no database
    column takes; a cursor of a list in the other order is refused too)."""
    cursor = single_param(request.query_params, "cursor") or None
    if cursor is not None:
        decode_cursor(cursor, direction)  # 400 now, before any other work, if not one of ours
    return cursor


def only_params(params: QueryParams, *known: str) -> None:
    """Refuse (400) query parameters the endpoint does not take, rather than ignore them."""
    unknown = set(params) - set(known)
    if unknown:
        names = ", ".join(sorted(unknown))
        raise ValidationFailed(
            f"Unknown query parameter(s): {names}.",
            details=[
                {"field": name, "message": "unknown query parameter"} for name in sorted(unknown)
            ],
        )


def _filters(request: Request) -> TaskFilter:
    params = request.query_params
    only_params(params, "status", "provider", "created_after", "created_before", "limit", "cursor")
    statuses: list[str] = []
    for value in params.getlist("status"):
        statuses.extend(item.strip() for item in value.split(",") if item.strip())
    bad = [item for item in statuses if item not in _STATUSES]
    if bad:
        raise ValidationFailed(
            f"Unknown status {bad[0]!r}; use one of {', '.join(sorted(_STATUSES))}.",
            details=[{"field": "status", "message": f"must be one of {sorted(_STATUSES)}"}],
        )
    provider = single_param(params, "provider")
    if provider is not None and provider not in PROVIDERS:
        raise ValidationFailed(
            f"Unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}.",
            details=[{"field": "provider", "message": f"must be one of {list(PROVIDERS)}"}],
        )
    after = single_param(params, "created_after")
    before = single_param(params, "created_before")
    created_after = parse_timestamp("created_after", after) if after else None
    created_before = parse_timestamp("created_before", before) if before else None
    if created_after and created_before and created_before <= created_after:
        # As replay's since/until: an empty range is a mistake (swapped bounds, most likely),
        # not a question whose answer is "no tasks".
        raise ValidationFailed(
            "created_before must be later than created_after: the range holds no time. "
            "Swap them if they are reversed.",
            details=[{"field": "created_before", "message": "must be later than created_after"}],
        )
    return TaskFilter(
        status=tuple(dict.fromkeys(statuses)),
        provider=provider,
        created_after=created_after,
        created_before=created_before,
    )


async def list_tasks(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    filters = _filters(request)
    limit = page_size(request.query_params)
    tasks, next_cursor = await run_in_threadpool(
        runtime.store.list_tasks,
        owner,
        filters,
        cursor=page_cursor(request),
        limit=limit,
    )
    return json_response({"data": tasks, "next_cursor": next_cursor})


async def list_events(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    observe.bind(task_id=request.path_params["task_id"])
    only_params(request.query_params)  # every event (a task has at most about a hundred)
    events = await run_in_threadpool(
        runtime.store.list_events, owner, request.path_params["task_id"]
    )
    return json_response({"data": [event_json(event) for event in events]})


def _body_json(body: bytes) -> dict[str, str]:
    """UTF-8 bodies as text; anything else base64, so the audit copy is exact."""
    try:
        return {"body": body.decode("utf-8"), "body_encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"body": base64.b64encode(body).decode("ascii"), "body_encoding": "base64"}


async def list_callbacks(request: Request) -> Response:
    """The audit trail of callbacks received for a task, raw bodies included."""
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    observe.bind(task_id=request.path_params["task_id"])
    params = request.query_params
    only_params(params, "limit", "cursor")
    receipts, next_cursor = await run_in_threadpool(
        runtime.store.list_receipts,
        owner,
        request.path_params["task_id"],
        cursor=page_cursor(request, "after"),
        limit=page_size(params, DEFAULT_RECEIPTS_PAGE),
    )
    return json_response(
        {
            "data": [
                {
                    "received_at": isoformat(receipt.received_at),
                    "outcome": receipt.outcome,
                    "error": receipt.error,
                    "content_type": receipt.content_type,
                    **_body_json(receipt.body),
                    "body_size": receipt.body_size,
                    "body_truncated": receipt.body_truncated,
                }
                for receipt in receipts
            ],
            "next_cursor": next_cursor,
        }
    )


routes = [
    by_method("/v1/tasks", GET=list_tasks, POST=create_task),
    reserved("/v1/tasks/track", POST=track_task),
    by_method("/v1/tasks/{task_id}", GET=get_task, PATCH=patch_task),
    Route("/v1/tasks/{task_id}/events", list_events, methods=["GET"]),
    Route("/v1/tasks/{task_id}/refresh", refresh_task, methods=["POST"]),
    Route("/v1/tasks/{task_id}/callbacks", list_callbacks, methods=["GET"]),
]
