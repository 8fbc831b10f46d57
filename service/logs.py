"""Logging: one JSON object per line on stderr, so log shippers need no parsing rules.

Each line carries the request id of the HTTP request it was emitted for, and the task id and
provider of the task being worked on, when there are any (``service.observe`` keeps them in a
context variable; :class:`LogContextFilter` copies them onto the record). Explicit ``extra``
values win. Tokens and callback URLs never go into a log line: name a route by its template
(``service.web.route_path``), never by its concrete path.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

from service.observe import current

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
# uvicorn's copy of its message with terminal colour codes: noise in a JSON line.
_STANDARD.add("color_message")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            # Which process wrote it: serve --workers N runs N of them side by side.
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class LogContextFilter(logging.Filter):
    """Stamps ``request_id``, ``task_id`` and ``provider`` from the log context on a record.

    A handler filter, so it runs in the thread (and context) that emitted the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = current()
        fields = record.__dict__
        if context.request_id is not None:
            fields.setdefault("request_id", context.request_id)
        if context.task_id is not None:
            fields.setdefault("task_id", context.task_id)
        if context.provider is not None:
            fields.setdefault("provider", context.provider)
        return True


def json_handler(stream: TextIO) -> logging.Handler:
    """A handler writing JSON lines, with the log context, to ``stream``."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(LogContextFilter())
    return handler


class SecondaryPipelineError(logging.Filter):
    """Drops psycopg's warning that leaving pipeline mode failed while an error was already on
    its way out of the pipeline (``error ignored terminating <psycopg.Pipeline>``): the first
    error is raised and reported (a batch refused while the database is unavailable), and this
    second one says the same of the same connection, which is then thrown away."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        return not (isinstance(message, str) and message.startswith("error ignored terminating"))


_SECONDARY_PIPELINE_ERROR = SecondaryPipelineError()  # one instance: added once however often


class DrainCutOffIsAWarning(logging.Filter):
    """uvicorn logs "Cancel N running task(s), timeout graceful shutdown exceeded" as an error:
    the shutdown's budget doing its job (each request cut off gets its 503 and a warning of
    its own, service/observe.py), not a fault. Logged as a warning, so that error lines stay
    for real errors (found by the metrics and logs hunt)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if isinstance(message, str) and message.startswith("Cancel %s running task(s)"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_DRAIN_CUT_OFF = DrainCutOffIsAWarning()


def configure_logging(level: str) -> None:
    root = logging.getLogger()
    root.handlers[:] = [json_handler(sys.stderr)]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Access logs would print callback URLs, and those carry tokens: keep them off.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("psycopg").addFilter(_SECONDARY_PIPELINE_ERROR)
    logging.getLogger("uvicorn.error").addFilter(_DRAIN_CUT_OFF)
