"""The sandbox: emulated task state for all five providers, their routes, and callback delivery.

:class:`Sandbox` owns the tasks, the behaviour defaults, and the background callback senders.
Its ``app`` mounts each provider's emulator under ``/<provider>`` and the control API under
``/_sandbox``. Callbacks are POSTed with the ``httpx.AsyncClient`` the host hands in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

from service.sandbox.apiinone import ApiInOneEmulator
from service.sandbox.behaviour import SandboxBehaviour, rolls
from service.sandbox.common import ProviderEmulator
from service.sandbox.control import control_routes
from service.sandbox.evolink import EvoLinkEmulator
from service.sandbox.gptimage15 import GptImage15Emulator
from service.sandbox.grsai import GrsAIEmulator
from service.sandbox.openai import OpenAIEmulator
from service.sandbox.tasks import (
    STALE_VIEW,
    CallbackAttempt,
    CallbackKind,
    SandboxTask,
    StatusQuery,
)

log = logging.getLogger(__name__)

EMULATORS: tuple[type[ProviderEmulator], ...] = (
    OpenAIEmulator,
    GrsAIEmulator,
    GptImage15Emulator,
    EvoLinkEmulator,
    ApiInOneEmulator,
)
PROVIDER_NAMES: tuple[str, ...] = tuple(emulator.name for emulator in EMULATORS)
ALL_PROVIDERS = "*"

# The oldest tasks are forgotten beyond this many, so a long benchmark cannot exhaust memory.
MAX_TASKS = 100_000


class Sandbox:
    """An emulator of the five providers' HTTP APIs (see the package docstring)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_key: str = "sandbox-key",
        behaviour: Mapping[str, SandboxBehaviour] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        can_let_go: bool = False,
    ) -> None:
        """``can_let_go``: the requests' waits (:meth:`hold`) can be cut short by
        :meth:`let_go`, for a host serving the sandbox beside itself (``taskrelay serve``)."""
        if not api_key:
            raise ValueError("the sandbox needs a non-empty api_key")
        initial = dict(behaviour or {})
        for name, value in initial.items():
            if name != ALL_PROVIDERS and name not in PROVIDER_NAMES:
                raise ValueError(f"unknown provider {name!r} in behaviour; known: {PROVIDER_NAMES}")
            if not isinstance(value, SandboxBehaviour):
                raise TypeError(f"behaviour[{name!r}] must be a SandboxBehaviour")
        self.http = http
        self.api_key = api_key
        self.clock = clock
        self.sleep = sleep
        self._let_go = asyncio.Event() if can_let_go else None
        self._initial_behaviour = initial
        self.behaviours: dict[str, SandboxBehaviour] = dict(initial)
        # Oldest first; an OrderedDict drops its oldest entry in O(1), a dict does not.
        self.tasks: OrderedDict[str, SandboxTask] = OrderedDict()
        self._senders: dict[asyncio.Task[None], SandboxTask] = {}
        # Set by aclose(): the host's http client may be gone, so no callback starts after it.
        self._closed = False
        self.emulators: dict[str, ProviderEmulator] = {
            emulator.name: emulator(self) for emulator in EMULATORS
        }
        routes = [Mount(f"/{name}", routes=em.routes()) for name, em in self.emulators.items()]
        routes.append(Mount("/_sandbox", routes=control_routes(self)))
        self.app = Starlette(routes=routes)

    # --- behaviour -----------------------------------------------------------------------------

    def behaviour_for(self, provider: str) -> SandboxBehaviour:
        return self.behaviours.get(provider, self.behaviours.get(ALL_PROVIDERS, SandboxBehaviour()))

    def set_behaviour(self, provider: str, knobs: Mapping[str, Any]) -> SandboxBehaviour:
        """Change the defaults at run time. ``"*"`` changes every provider's defaults.

        Raises ``KeyError`` for an unknown provider and ``BehaviourError`` for a bad knob;
        nothing changes unless every knob is valid.
        """
        if provider == ALL_PROVIDERS:
            changed = {name: value.updated(knobs) for name, value in self.behaviours.items()}
            changed[ALL_PROVIDERS] = self.behaviour_for(ALL_PROVIDERS).updated(knobs)
            self.behaviours.update(changed)
            return changed[ALL_PROVIDERS]
        if provider not in PROVIDER_NAMES:
            raise KeyError(provider)
        updated = self.behaviour_for(provider).updated(knobs)
        self.behaviours[provider] = updated
        return updated

    # --- tasks ---------------------------------------------------------------------------------

    def add_task(self, task: SandboxTask) -> SandboxTask:
        """Register a new task and, when it has a callback URL, schedule its callbacks."""
        self.tasks[task.id] = task
        while len(self.tasks) > MAX_TASKS:
            self.tasks.popitem(last=False)
        if task.callback_url:
            behaviour = task.behaviour
            if behaviour.callback == "drop" or rolls(
                behaviour.callback_drop_rate, task.id, "callback_drop"
            ):
                task.callback_state = "dropped"
            elif self._closed:
                task.callback_state = "canceled"
            else:
                task.callback_state = "pending"
                sender = asyncio.get_running_loop().create_task(self._send_callbacks(task))
                self._senders[sender] = task
                sender.add_done_callback(self._forget_sender)
        return task

    def record_status_query(self, task: SandboxTask, answer: int | str) -> StatusQuery:
        query = StatusQuery(at=self.clock(), answer=answer)
        task.status_queries.append(query)
        return query

    async def sleep_until(self, when: float) -> None:
        delay = when - self.clock()
        if delay > 0:
            await self.sleep(delay)

    async def hold(self, seconds: float) -> None:
        """A request's wait (an answer held back: a task's duration, an injected timeout, a
        slow status), cut short once the host lets the held requests go (:meth:`let_go`)."""
        if self._let_go is None:
            await self.sleep(seconds)
            return
        if seconds <= 0 or self._let_go.is_set():
            return
        sleeping = asyncio.ensure_future(self.sleep(seconds))
        released = asyncio.ensure_future(self._let_go.wait())
        try:
            await asyncio.wait({sleeping, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            released.cancel()

    async def hold_until(self, when: float) -> None:
        delay = when - self.clock()
        if delay > 0:
            await self.hold(delay)

    def let_go(self) -> None:
        """End every request's wait now, and every later one at once: the host is shutting
        down, and the requests it still serves must end before it cancels them (a request
        cancelled there is answered 500, and logged as an error)."""
        if self._let_go is not None:
            self._let_go.set()

    async def reset(self) -> None:
        """Forget every task, cancel pending callbacks, restore the constructor's behaviour."""
        await self._cancel_senders()
        self.tasks.clear()
        self.behaviours = dict(self._initial_behaviour)

    async def aclose(self) -> None:
        """Cancel the pending background callback senders and start none from now on.

        The http client stays the host's; tasks submitted later get ``callback_state``
        "canceled".
        """
        self._closed = True
        await self._cancel_senders()

    def _forget_sender(self, sender: asyncio.Task[None]) -> None:
        task = self._senders.pop(sender, None)
        # A sender canceled before its first step never ran its own handler.
        if task is not None and task.callback_state == "pending":
            task.callback_state = "canceled"

    async def _cancel_senders(self) -> None:
        # A request served while we wait may start another sender: repeat until none is left.
        while self._senders:
            senders = list(self._senders)
            for sender in senders:
                sender.cancel()
            # gather() rather than awaiting each: a cancellation of our caller must propagate,
            # not be taken for a sender's own.
            await asyncio.gather(*senders, return_exceptions=True)
            for sender in senders:
                self._forget_sender(sender)

    # --- callbacks -----------------------------------------------------------------------------

    async def _send_callbacks(self, task: SandboxTask) -> None:
        emulator = self.emulators[task.provider]
        behaviour = task.behaviour
        try:
            await self.sleep_until(task.finish_at + behaviour.callback_delay)
            final = task.final_view()
            plan: list[tuple[CallbackKind, dict[str, Any]]] = [
                ("final", emulator.callback_body(task, final))
            ]
            if behaviour.callback == "duplicate":
                plan.append(("final", emulator.callback_body(task, final)))
            elif behaviour.callback == "out_of_order":
                plan.append(("stale", emulator.callback_body(task, STALE_VIEW)))
            retries = behaviour.callback_retries
            if retries is None:
                retries = emulator.callback_retries
            for kind, body in plan:
                await self._deliver(task, kind, body, retries)
            task.callback_state = "sent"
        except asyncio.CancelledError:
            task.callback_state = "canceled"
            raise
        except Exception:
            # A bug here must show in the log, not vanish with the background task.
            log.exception("sandbox: sending the callbacks of task %s failed", task.id)
            task.callback_state = "error"

    async def _deliver(
        self, task: SandboxTask, kind: CallbackKind, body: dict[str, Any], retries: int
    ) -> None:
        assert task.callback_url is not None
        behaviour = task.behaviour
        for attempt_number in range(1, retries + 2):
            attempt = CallbackAttempt(
                at=self.clock(), url=task.callback_url, kind=kind, attempt=attempt_number, body=body
            )
            task.callbacks.append(attempt)
            try:
                response = await self.http.post(
                    task.callback_url,
                    json=body,
                    headers={
                        "Content-Type": "application/json",
                        "User-Agent": f"taskrelay-sandbox/{task.provider}",
                    },
                    timeout=behaviour.callback_timeout,
                )
                attempt.status_code = response.status_code
            except httpx.HTTPError as exc:
                attempt.error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # the receiver's failure must not stop the sandbox
                # Not the URL: it carries the callback token, and a mounted sandbox logs into
                # TaskRelay's own log.
                log.warning("callback of sandbox task %s raised %r", task.id, exc)
                attempt.error = f"{type(exc).__name__}: {exc}"
            if attempt.delivered:
                return
            if attempt_number <= retries:
                await self.sleep(behaviour.callback_retry_backoff * attempt_number)
