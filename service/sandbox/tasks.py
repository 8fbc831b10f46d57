"""The emulated tasks: what was asked, when it ends, how it ends, and what the sandbox did.

A task's state is never stored: :meth:`SandboxTask.view` computes it from the elapsed time on the
sandbox's clock (queued for ``queued_fraction`` of the duration, then running with rising
progress, then final). Its outcome (success or failure) is drawn once, at submit time, from the
task id. Every status query and callback attempt is recorded for tests and benchmarks.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Literal

from service.sandbox.behaviour import SandboxBehaviour

Phase = Literal["queued", "running", "succeeded", "failed"]
Outcome = Literal["succeeded", "failed"]
CallbackKind = Literal["final", "stale"]
# none: the request gave no callback URL; pending: waiting to send; dropped: never sent on
# purpose; sent: delivery finished (see the attempts); canceled: the sandbox shut down first;
# error: the sandbox itself failed while sending (logged).
CallbackState = Literal["none", "pending", "dropped", "sent", "canceled", "error"]

# The progress a stale out-of-order callback reports.
STALE_PROGRESS = 50

_ALPHANUMERIC = string.ascii_lowercase + string.digits


def random_token(length: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


@dataclass(frozen=True)
class View:
    """A task as seen at one moment."""

    phase: Phase
    progress: int

    @property
    def final(self) -> bool:
        return self.phase in ("succeeded", "failed")


STALE_VIEW = View("running", STALE_PROGRESS)


@dataclass
class StatusQuery:
    at: float
    # The HTTP status answered, or "timeout" for a query left hanging.
    answer: int | str

    def to_json(self, created_at: float) -> dict[str, Any]:
        return {"at": self.at, "since_created": self.at - created_at, "answer": self.answer}


@dataclass
class CallbackAttempt:
    at: float
    url: str
    kind: CallbackKind
    attempt: int  # 1 for the first try, 2.. for retries
    body: dict[str, Any]
    status_code: int | None = None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def to_json(self, created_at: float) -> dict[str, Any]:
        return {
            "at": self.at,
            "since_created": self.at - created_at,
            "url": self.url,
            "kind": self.kind,
            "attempt": self.attempt,
            "status_code": self.status_code,
            "error": self.error,
            "delivered": self.delivered,
            "body": self.body,
        }


@dataclass
class SandboxTask:
    id: str
    provider: str
    # Clock time (the sandbox's injected clock) and wall time (unix seconds) of the submit.
    created_at: float
    created_unix: int
    behaviour: SandboxBehaviour
    outcome: Outcome
    # The provider's base URL as the submit request saw it; result links are built on it.
    base_url: str
    request: dict[str, Any]
    model: str | None = None
    n: int = 1
    aspect: str = "1:1"
    quality: str | None = None
    # How results are delivered: "sync" (OpenAI), "stream" (GrsAI), "callback" or "poll".
    mode: str = "poll"
    callback_url: str | None = None
    callback_state: CallbackState = "none"
    status_queries: list[StatusQuery] = field(default_factory=list)
    callbacks: list[CallbackAttempt] = field(default_factory=list)

    @property
    def finish_at(self) -> float:
        return self.created_at + self.behaviour.duration

    @property
    def failure_reason(self) -> str | None:
        return self.behaviour.failure_reason if self.outcome == "failed" else None

    def view(self, now: float) -> View:
        duration = self.behaviour.duration
        elapsed = now - self.created_at
        if now >= self.finish_at:
            return self.final_view()
        if elapsed < duration * self.behaviour.queued_fraction:
            return View("queued", 0)
        return View("running", max(1, min(99, int(100 * elapsed / duration))))

    def final_view(self) -> View:
        return View(self.outcome, 100)

    def image_urls(self) -> list[str]:
        return [f"{self.base_url}/files/{self.id}/{index}.png" for index in range(self.n)]

    def to_json(self, now: float) -> dict[str, Any]:
        view = self.view(now)
        return {
            "id": self.id,
            "provider": self.provider,
            "mode": self.mode,
            "created_at": self.created_at,
            "created_unix": self.created_unix,
            "finish_at": self.finish_at,
            "now": now,
            "status": view.phase,
            "progress": view.progress,
            "final_status": self.outcome,
            "failure_reason": self.failure_reason,
            "n": self.n,
            "model": self.model,
            "images": self.image_urls() if self.outcome == "succeeded" else [],
            "callback_url": self.callback_url,
            "callback_state": self.callback_state,
            "status_queries": len(self.status_queries),
            "status_query_log": [query.to_json(self.created_at) for query in self.status_queries],
            "callbacks": [attempt.to_json(self.created_at) for attempt in self.callbacks],
            "behaviour": self.behaviour.to_json(),
            "request": self.request,
        }
