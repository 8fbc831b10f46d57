"""What every emulated provider shares: auth, JSON bodies, directives, injected errors, files.

A provider module subclasses :class:`ProviderEmulator`, says how its errors look
(:meth:`~ProviderEmulator.error`) and how its status and callback bodies look, and lists its
routes. Everything else (the Bearer check, the ``sandbox:`` directives, ``submit_error``,
``status_errors``, placeholder files) is done here the same way for all five.
"""

from __future__ import annotations

import abc
import json
import math
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from service.sandbox.behaviour import BehaviourError, SandboxBehaviour, parse_directives, rolls
from service.sandbox.png import placeholder_png
from service.sandbox.tasks import SandboxTask, View

if TYPE_CHECKING:
    from service.sandbox.app import Sandbox

# Default messages of the errors the sandbox injects on purpose.
INJECTED_MESSAGES = {
    400: "Bad request (sandbox: injected error)",
    401: "Invalid API key (sandbox: injected error)",
    429: "Rate limit exceeded, retry later (sandbox: injected error)",
    500: "Internal server error (sandbox: injected error)",
    503: "Service temporarily unavailable (sandbox: injected error)",
    504: "Upstream timed out (sandbox: injected error)",
}


class Invalid(Exception):
    """A request value the provider refuses; ``param`` names the field."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def is_http_url(value: object, *, max_length: int = 2048) -> bool:
    if not isinstance(value, str) or len(value) > max_length:
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def require_prompt(body: Mapping[str, Any], *, max_chars: int | None = None) -> str:
    prompt = body.get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise Invalid("prompt", "'prompt' is required.")
    if not isinstance(prompt, str):
        raise Invalid("prompt", "'prompt' must be a string.")
    if max_chars is not None and len(prompt) > max_chars:
        raise Invalid("prompt", f"'prompt' must be at most {max_chars} characters.")
    return prompt


def choice(body: Mapping[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(key)
    if value is None:
        return default
    if value not in allowed:
        raise Invalid(key, f"'{key}' must be one of {', '.join(allowed)}.")
    return str(value)


def integer(body: Mapping[str, Any], key: str, low: int, high: int, default: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise Invalid(key, f"'{key}' must be an integer.")
    if not low <= int(value) <= high:
        raise Invalid(key, f"'{key}' must be between {low} and {high}.")
    return int(value)


def url_list(
    body: Mapping[str, Any], key: str, *, low: int = 0, high: int = 16
) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(is_http_url(item) for item in value):
        raise Invalid(key, f"'{key}' must be a list of http(s) URLs.")
    if not low <= len(value) <= high:
        raise Invalid(key, f"'{key}' must hold {low} to {high} URLs.")
    return list(value)


def callback_url(body: Mapping[str, Any], key: str, *, max_length: int = 2048) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > max_length:
        raise Invalid(key, f"'{key}' must be a URL of at most {max_length} characters.")
    if not is_http_url(value, max_length=max_length):
        raise Invalid(key, f"'{key}' must be an http(s) URL.")
    return value


def string(body: Mapping[str, Any], key: str, default: str | None) -> str | None:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise Invalid(key, f"'{key}' must be a non-empty string.")
    return value


class ProviderEmulator(abc.ABC):
    """One provider's HTTP API, mounted under ``/<name>`` in the sandbox app."""

    name: ClassVar[str]
    # Callback retries after a failed delivery when the behaviour leaves it to the provider.
    callback_retries: ClassVar[int] = 0

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    # --- what a provider module supplies -----------------------------------------------------

    @abc.abstractmethod
    def endpoints(self) -> list[BaseRoute]:
        """The provider's own API routes (the files route is added by :meth:`routes`)."""

    @abc.abstractmethod
    def error(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """An error reply in this provider's format."""

    def callback_body(self, task: SandboxTask, view: View) -> dict[str, Any]:
        """What this provider POSTs to a callback URL for ``task`` as it is in ``view``."""
        raise NotImplementedError(f"{self.name} sends no callbacks")

    # --- shared behaviour --------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [*self.endpoints(), Route("/files/{task_id}/{name}", self.file, methods=["GET"])]

    def authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        expected = self.sandbox.api_key.encode()
        return scheme.lower() == "bearer" and secrets.compare_digest(
            token.strip().encode(), expected
        )

    def unauthorized(self) -> Response:
        return self.error(401, "Invalid or missing API key.", code="invalid_api_key")

    def invalid(self, exc: Invalid) -> Response:
        return self.error(400, exc.message, param=exc.param)

    async def read_object(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw.decode("utf-8-sig")) if raw.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise Invalid(None, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise Invalid(None, "The request body must be a JSON object.")
        return body

    def base_url(self, request: Request) -> str:
        """This provider's base URL as the client reached it (mount prefixes included)."""
        root_path = str(request.scope.get("root_path", ""))
        return f"{request.url.scheme}://{request.url.netloc}{root_path}".rstrip("/")

    def behaviour_for(self, prompt: object) -> SandboxBehaviour:
        """The provider's current behaviour with the prompt's directives applied."""
        base = self.sandbox.behaviour_for(self.name)
        try:
            return base.updated(parse_directives(prompt))
        except BehaviourError as exc:
            raise Invalid("prompt", f"Bad sandbox directive: {exc}") from None

    async def injected_error(self, error: int | str, behaviour: SandboxBehaviour) -> Response:
        if error == "timeout":
            await self.sandbox.sleep(behaviour.timeout_seconds)
            return self.error(504, INJECTED_MESSAGES[504], code="timeout")
        status = int(error)
        headers = {"Retry-After": "1"} if status == 429 else None
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
        return self.error(status, INJECTED_MESSAGES[status], code=code, headers=headers)

    async def submit_failure(self, behaviour: SandboxBehaviour) -> Response | None:
        """The error the submit answers when ``submit_error`` asks for one (no task is made)."""
        if behaviour.submit_error is None:
            return None
        return await self.injected_error(behaviour.submit_error, behaviour)

    async def status_failure(self, task: SandboxTask) -> Response | None:
        """Record one status query; the error it answers when the behaviour asks for one."""
        behaviour = task.behaviour
        index = len(task.status_queries)
        fails = index < behaviour.status_errors or rolls(
            behaviour.status_error_rate, task.id, "status", index
        )
        query = self.sandbox.record_status_query(task, 200)
        if not fails:
            return None
        query.answer = behaviour.status_error
        return await self.injected_error(behaviour.status_error, behaviour)

    def new_task(
        self,
        request: Request,
        task_id: str,
        behaviour: SandboxBehaviour,
        body: dict[str, Any],
        **fields: Any,
    ) -> SandboxTask:
        """Create and register a task; its outcome is drawn from its id."""
        return self.sandbox.add_task(
            SandboxTask(
                id=task_id,
                provider=self.name,
                created_at=self.sandbox.clock(),
                created_unix=int(time.time()),
                behaviour=behaviour,
                outcome="failed" if rolls(behaviour.fail_rate, task_id, "fail") else "succeeded",
                base_url=self.base_url(request),
                request=body,
                **fields,
            )
        )

    def task(self, task_id: object) -> SandboxTask | None:
        if not isinstance(task_id, str):
            return None
        task = self.sandbox.tasks.get(task_id)
        return task if task is not None and task.provider == self.name else None

    def view(self, task: SandboxTask) -> View:
        return task.view(self.sandbox.clock())

    async def file(self, request: Request) -> Response:
        task = self.task(request.path_params["task_id"])
        name: str = request.path_params["name"]
        stem, _, ext = name.partition(".")
        if (
            task is None
            or ext != "png"
            or not stem.isdigit()
            or int(stem) >= task.n
            or self.view(task).phase != "succeeded"
        ):
            return JSONResponse({"error": "not found"}, status_code=404)
        return Response(
            placeholder_png(task.id, int(stem), task.aspect),
            media_type="image/png",
            headers={"Cache-Control": "public, max-age=86400"},
        )


def estimate_tokens(text: str) -> int:
    """A rough token count (EvoLink limits prompts in tokens): about four characters each."""
    return max(len(text.split()), math.ceil(len(text) / 4))
