"""The baseline of ``bench/ingest.py``: a bare Starlette endpoint that reads the body and answers
200, on the route shape of TaskRelay's callback endpoint, served by ``uvicorn.run`` with the
options ``taskrelay serve`` passes (``service/cli.py``): one worker, ``log_config=None``, no
access log, proxy headers on, no server header, and uvicorn's default (``auto``) loop and HTTP
implementation, so uvloop and httptools whenever TaskRelay gets them.

Run: ``.venv/bin/python bench/bare_app.py --port 8001`` (``bench/ingest.py`` starts it itself).
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# taskrelay serve's default; the process is stopped with SIGTERM and has nothing in flight.
GRACEFUL_SHUTDOWN_SECONDS = 30


async def receive_callback(request: Request) -> Response:
    await request.body()
    return JSONResponse({"received": True})


app = Starlette(routes=[Route("/callbacks/{provider}/{token}", receive_callback, methods=["POST"])])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The bare baseline endpoint of bench/ingest.py.")
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
