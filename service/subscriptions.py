"""The subscriptions API: endpoints that receive a client's task events, their deliveries,
retries, replays and signing secrets. A client sees and changes only its own."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import observe
from service.api import only_params, page_cursor, page_size, single_param
from service.errors import ValidationFailed
from service.models import ClientSecret, DeliveryAttempt, DeliveryStatus, Subscription
from service.outbox import DeliveryView
from service.runtime import runtime_of
from service.schemas import (
    Replay,
    SecretRotation,
    SubscriptionCreate,
    SubscriptionUpdate,
    in_utc,
    isoformat,
    parse_body,
)
from service.web import by_method, json_response, read_json_object

_STATUSES = {status.value for status in DeliveryStatus}


def subscription_json(subscription: Subscription, *, secret: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": subscription.id,
        "url": subscription.url,
        "event_types": subscription.event_types,
        "providers": subscription.providers,
        "description": subscription.description,
        "enabled": subscription.enabled,
        "disabled_reason": subscription.disabled_reason,
        "previous_secret_expires_at": isoformat(subscription.previous_secret_expires_at),
        "created_at": isoformat(subscription.created_at),
        "updated_at": isoformat(subscription.updated_at),
    }
    if secret:
        data["secret"] = subscription.secret
    return data


def delivery_json(view: DeliveryView) -> dict[str, Any]:
    delivery = view.delivery
    return {
        "id": delivery.id,
        "event_id": view.event_id,
        "subscription_id": view.subscription_id,
        "target": view.target,
        "event_type": delivery.event_type,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": (
            isoformat(delivery.next_attempt_at)
            if delivery.status == DeliveryStatus.pending.value
            else None
        ),
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "created_at": isoformat(delivery.created_at),
        "delivered_at": isoformat(delivery.delivered_at),
    }


def attempt_json(attempt: DeliveryAttempt) -> dict[str, Any]:
    return {
        "attempted_at": isoformat(attempt.attempted_at),
        "status_code": attempt.status_code,
        "duration_ms": round(attempt.duration_ms, 3),
        "response_body": attempt.response_body,
        "error": attempt.error,
    }


def client_secret_json(row: ClientSecret) -> dict[str, Any]:
    return {
        "secret": row.secret,
        "previous_secret_expires_at": isoformat(row.previous_secret_expires_at),
    }


async def create_subscription(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    spec = parse_body(
        SubscriptionCreate, await read_json_object(request, runtime.settings.max_body_bytes)
    )
    url = await runtime.check_webhook_url(spec.url, "url")
    subscription = await run_in_threadpool(
        runtime.outbox.create_subscription,
        owner,
        url=url,
        event_types=list(spec.event_types) if spec.event_types else None,
        providers=list(spec.providers) if spec.providers else None,
        description=spec.description,
    )
    return json_response(subscription_json(subscription, secret=True), status_code=201)


async def list_subscriptions(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    only_params(request.query_params)
    rows = await run_in_threadpool(runtime.outbox.list_subscriptions, owner)
    return json_response({"data": [subscription_json(row) for row in rows]})


async def get_subscription(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    row = await run_in_threadpool(
        runtime.outbox.get_subscription, owner, request.path_params["subscription_id"]
    )
    return json_response(subscription_json(row))


async def update_subscription(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    spec = parse_body(
        SubscriptionUpdate, await read_json_object(request, runtime.settings.max_body_bytes)
    )
    changes = spec.model_dump(exclude_unset=True)
    if not changes:
        raise ValidationFailed(
            "Nothing to change: send url, event_types, providers, description or enabled.",
            details=[{"field": "(body)", "message": "no updatable field given"}],
        )
    if changes.get("url") is not None:
        changes["url"] = await runtime.check_webhook_url(changes["url"], "url")
    for name in ("url", "enabled"):
        if name in changes and changes[name] is None:
            raise ValidationFailed(
                f"{name} cannot be null.", details=[{"field": name, "message": "null"}]
            )
    row = await run_in_threadpool(
        runtime.outbox.update_subscription, owner, request.path_params["subscription_id"], changes
    )
    return json_response(subscription_json(row))


async def delete_subscription(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    await run_in_threadpool(
        runtime.outbox.delete_subscription, owner, request.path_params["subscription_id"]
    )
    return Response(status_code=204)


async def _rotation(request: Request) -> timedelta:
    runtime = runtime_of(request)
    # No body: the defaults. A body: JSON, as for every other endpoint.
    body = await read_json_object(request, runtime.settings.max_body_bytes, optional=True)
    return timedelta(seconds=parse_body(SecretRotation, body).overlap_seconds)


async def rotate_subscription_secret(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    overlap = await _rotation(request)
    row = await run_in_threadpool(
        runtime.outbox.rotate_subscription_secret,
        owner,
        request.path_params["subscription_id"],
        overlap,
    )
    return json_response(subscription_json(row, secret=True))


def delivery_status(params: QueryParams) -> str | None:
    """The ``status`` filter of a list of deliveries: one delivery status, or None (every
    delivery)."""
    status = single_param(params, "status")
    if status is not None and status not in _STATUSES:
        statuses = sorted(_STATUSES)
        raise ValidationFailed(
            f"Unknown delivery status {status!r}; use one of {', '.join(statuses)}.",
            details=[{"field": "status", "message": f"must be one of {statuses}"}],
        )
    return status


def _delivery_page(request: Request) -> tuple[str | None, int, str | None]:
    """A list of deliveries' query, checked in this order (the first wrong one is named):
    the ``status`` filter, the page size, the cursor; any other parameter is a 400."""
    only_params(request.query_params, "status", "limit", "cursor")
    status = delivery_status(request.query_params)
    return status, page_size(request.query_params), page_cursor(request)


async def _listed_deliveries(
    request: Request,
    listing: Callable[..., tuple[list[DeliveryView], str | None]],
    owner: str,
    of: str,
) -> Response:
    """One page of deliveries, as ``listing`` (an Outbox list method) gives them for the
    client's ``of`` (a subscription's id, or a task's), with :func:`_delivery_page`'s query."""
    status, limit, cursor = _delivery_page(request)
    rows, next_cursor = await run_in_threadpool(
        listing, owner, of, status=status, cursor=cursor, limit=limit
    )
    return json_response({"data": [delivery_json(row) for row in rows], "next_cursor": next_cursor})


async def list_deliveries(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    subscription_id = request.path_params["subscription_id"]
    return await _listed_deliveries(request, runtime.outbox.list_deliveries, owner, subscription_id)


async def get_delivery(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    view, attempts = await run_in_threadpool(
        runtime.outbox.get_delivery, owner, request.path_params["delivery_id"]
    )
    data = delivery_json(view)
    data["attempt_log"] = [attempt_json(attempt) for attempt in attempts]
    return json_response(data)


async def retry_delivery(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    view = await run_in_threadpool(
        runtime.outbox.retry_delivery, owner, request.path_params["delivery_id"]
    )
    runtime.dispatcher.notify()
    return json_response(delivery_json(view), status_code=202)


async def replay(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    spec = parse_body(Replay, await read_json_object(request, runtime.settings.max_body_bytes))
    since = in_utc("since", spec.since)
    until = None if spec.until is None else in_utc("until", spec.until)
    if until is not None and until <= since:  # compared in UTC: either may come without a zone
        raise ValidationFailed(
            "until must be later than since: an empty range replays nothing.",
            details=[{"field": "until", "message": "must be later than since"}],
        )
    count = await run_in_threadpool(
        runtime.outbox.replay,
        owner,
        request.path_params["subscription_id"],
        since=since,
        until=until,
    )
    runtime.dispatcher.notify()
    return json_response({"replayed": count}, status_code=202)


async def get_notify_secret(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    row = await run_in_threadpool(runtime.outbox.client_secret, owner)
    return json_response(client_secret_json(row))


async def rotate_notify_secret(request: Request) -> Response:
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    overlap = await _rotation(request)
    row = await run_in_threadpool(runtime.outbox.rotate_client_secret, owner, overlap)
    return json_response(client_secret_json(row))


async def list_task_deliveries(request: Request) -> Response:
    """Every delivery of the task's events to the client's subscribers, newest first, paged
    as a subscription's deliveries are: the one way to find (and so to retry) what went to
    the task's notify_url, whose subscription no other endpoint shows."""
    runtime = runtime_of(request)
    owner = runtime.clients.authenticate(request)
    task_id = request.path_params["task_id"]
    observe.bind(task_id=task_id)
    return await _listed_deliveries(request, runtime.outbox.list_task_deliveries, owner, task_id)


routes = [
    by_method("/v1/subscriptions", GET=list_subscriptions, POST=create_subscription),
    by_method(
        "/v1/subscriptions/{subscription_id}",
        GET=get_subscription,
        PATCH=update_subscription,
        DELETE=delete_subscription,
    ),
    Route(
        "/v1/subscriptions/{subscription_id}/rotate-secret",
        rotate_subscription_secret,
        methods=["POST"],
    ),
    Route("/v1/subscriptions/{subscription_id}/deliveries", list_deliveries, methods=["GET"]),
    Route("/v1/tasks/{task_id}/deliveries", list_task_deliveries, methods=["GET"]),
    Route("/v1/subscriptions/{subscription_id}/replay", replay, methods=["POST"]),
    Route("/v1/deliveries/{delivery_id}", get_delivery, methods=["GET"]),
    Route("/v1/deliveries/{delivery_id}/retry", retry_delivery, methods=["POST"]),
    Route("/v1/notify-secret", get_notify_secret, methods=["GET"]),
    Route("/v1/notify-secret/rotate", rotate_notify_secret, methods=["POST"]),
]
