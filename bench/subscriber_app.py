"""A minimal webhook subscriber for ``bench/e2e.py`` and ``bench/memory.py``: it notes when each
request arrived and answers 200 at once, verifying nothing (a real subscriber checks the
Standard Webhooks signature; that is the subscriber's cost, not TaskRelay's).

Every POST, to any path, is recorded as ``[received, webhook_id, type, key]``: ``received`` is
``time.monotonic()`` as the handler starts (CLOCK_MONOTONIC on Linux, one clock for every
process of the machine, so the benchmark compares it with its own send times); for a TaskRelay
event ``webhook_id`` is the ``webhook-id`` header, ``type`` the event type and ``key`` the task
id (``data.id``); for an EvoLink-shaped callback posted straight here (the benchmarks' bare
baseline) ``webhook_id`` is empty, ``type`` the callback's ``status`` and ``key`` its ``id``.

``GET /_records?since=N`` returns the records from the N-th on; ``GET /_stats`` counts them;
``GET /_health`` answers with the process id. Served by ``uvicorn.run`` with the options
``taskrelay serve`` passes (as ``bench/bare_app.py`` is).

Run: ``.venv/bin/python bench/subscriber_app.py --port 8002`` (the benchmarks start it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

GRACEFUL_SHUTDOWN_SECONDS = 5

Record = tuple[float, str, str, str]
records: list[Record] = []
webhook_ids: Counter[str] = Counter()


def describe(body: bytes) -> tuple[str, str]:
    """(type, key) of an event envelope or an EvoLink callback body; empty when unreadable."""
    try:
        payload: Any = json.loads(body)
    except ValueError:
        return "", ""
    if not isinstance(payload, dict):
        return "", ""
    data = payload.get("data")
    if isinstance(data, dict):
        return str(payload.get("type", "")), str(data.get("id", ""))
    return str(payload.get("status", "")), str(payload.get("id", ""))


async def receive(request: Request) -> Response:
    received = time.monotonic()
    body = await request.body()
    webhook_id = request.headers.get("webhook-id", "")
    kind, key = describe(body)
    records.append((received, webhook_id, kind, key))
    if webhook_id:
        webhook_ids[webhook_id] += 1
    return Response(b"ok", media_type="text/plain")


async def list_records(request: Request) -> Response:
    since = int(request.query_params.get("since", "0"))
    return JSONResponse({"total": len(records), "records": records[since:]})


async def stats(request: Request) -> Response:
    return JSONResponse(
        {
            "total": len(records),
            "webhooks": sum(webhook_ids.values()),
            "distinct_webhook_ids": len(webhook_ids),
            "types": Counter(kind for _, _, kind, _ in records),
        }
    )


async def health(request: Request) -> Response:
    return JSONResponse({"pid": os.getpid()})


app = Starlette(
    routes=[
        Route("/_records", list_records, methods=["GET"]),
        Route("/_stats", stats, methods=["GET"]),
        Route("/_health", health, methods=["GET"]),
        Route("/{path:path}", receive, methods=["POST"]),
    ]
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The local webhook subscriber of the benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        workers=1,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        server_header=False,
    )


if __name__ == "__main__":
    main()
