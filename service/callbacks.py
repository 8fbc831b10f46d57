"""The callback endpoint: ``POST /callbacks/{provider}/{token}``.

Providers do not sign their callbacks, so the signed token in the URL is the proof. The
endpoint is a thin shell around two pure steps: :func:`verify` (token -> the task it names, or a
typed error) and :func:`parse` (body -> a normalised update, or a typed error). Then one transaction
applies the update and keeps the raw body. A 2xx goes out only after that commit, and no
outbound call happens before answering.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.errors import CallbackParseError, NotFound
from service.ingest import UpdateRequest
from service.lifecycle import TaskUpdate
from service.models import UpdateSource
from service.providers.base import ProviderAdapter
from service.runtime import runtime_of
from service.signing import CallbackClaim, CallbackSigner
from service.store import ReceiptDraft
from service.web import BodyTooLarge, json_response, read_body

log = logging.getLogger(__name__)


def verify(
    signer: CallbackSigner, adapters: Mapping[str, ProviderAdapter], provider: str, token: str
) -> CallbackClaim:
    if provider not in adapters:
        raise NotFound(
            f"Unknown provider {provider!r} in the callback URL; "
            f"known providers: {', '.join(adapters)}."
        )
    return signer.verify(token, provider)


def parse(adapter: ProviderAdapter, headers: Mapping[str, str], body: bytes) -> TaskUpdate:
    """The provider adapter's reading of a callback body (pure; CallbackParseError if none)."""
    return adapter.parse_callback(body, headers)


async def receive_callback(request: Request) -> Response:
    runtime = runtime_of(request)
    provider = request.path_params["provider"]
    token = request.path_params["token"]
    content_type = request.headers.get("content-type")
    # The token is checked before the body is read: a forged URL costs us nothing.
    claim = verify(runtime.signer, runtime.adapters, provider, token)
    try:
        body = await read_body(request, runtime.settings.max_body_bytes, keep_prefix=True)
    except BodyTooLarge as exc:
        draft = ReceiptDraft(provider, exc.prefix, content_type, error=exc.message, size=exc.size)
        await run_in_threadpool(runtime.store.record_rejected_callback, claim.task_id, draft)
        raise
    try:
        update = parse(runtime.adapters[provider], request.headers, body)
    except CallbackParseError as exc:
        draft = ReceiptDraft(provider, body, content_type, error=exc.message)
        await run_in_threadpool(runtime.store.record_rejected_callback, claim.task_id, draft)
        log.info("callback for %s rejected: %s", claim.task_id, exc.message)
        raise
    draft = ReceiptDraft(provider, body, content_type)
    request_ = UpdateRequest(claim.task_id, update, UpdateSource.callback, draft)
    applied = await runtime.committer.apply(request_)
    return json_response(
        {
            "received": True,
            "task_id": claim.task_id,
            "status": applied.task["status"],
            "outcome": applied.outcome.value,
        }
    )


routes = [Route("/callbacks/{provider}/{token}", receive_callback, methods=["POST"])]
