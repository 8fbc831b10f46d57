"""What every emulated provider shares: the request-handling skeleton, validation, files.

A provider module subclasses :class:`ProviderEmulator` and supplies only what differs: its paths
(class attributes), how it validates a submit (:meth:`~ProviderEmulator.parse_submit`), how its
task ids, replies, status and callback bodies and errors look. The endpoints themselves
(:meth:`~ProviderEmulator.submit`, :meth:`~ProviderEmulator.status`, the files) are written here
once: the Bearer check, the JSON body, the ``sandbox:`` directives, ``submit_error``,
``status_errors`` and the task registry work the same way for all five.
"""

from __future__ import annotations

import abc
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Submission:
    """A valid submit: its prompt (whose directives pick the behaviour) and the task it asks for."""

    prompt: str
    model: str | None = None
    n: int = 1
    aspect: str = "1:1"
    quality: str | None = None
    callback_url: str | None = None
    # "sync" (OpenAI) or "stream" (GrsAI); None means "callback" with a callback URL, else "poll".
    mode: str | None = None


def has_api_key(request: Request, api_key: str) -> bool:
    """Whether the request bears ``Authorization: Bearer <api_key>``."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(
        token.strip().encode(), api_key.encode()
    )


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object."""
    try:
        body = json.loads(raw.decode("utf-8-sig")) if raw.strip() else None
    # ValueError also covers numbers longer than int() accepts, not only malformed JSON.
    except (ValueError, RecursionError):
        raise Invalid(None, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise Invalid(None, "The request body must be a JSON object.")
    return body


def is_http_url(value: object, *, max_length: int = 2048) -> bool:
    if not isinstance(value, str) or len(value) > max_length:
        return False
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False
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
    # is_integer() is also false for infinity and NaN, which JSON bodies may hold.
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    ):
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


def failure_code(reason: str) -> str:
    """The error code of a failed generation: a policy refusal or a plain failure."""
    return "content_policy_violation" if "policy" in reason.lower() else "generation_failed"


def image_index(name: str) -> int | None:
    """The image number of a file name ``<n>.png``, or None for any other name."""
    stem, _, ext = name.partition(".")
    if ext != "png" or not (stem.isascii() and stem.isdigit()):
        return None
    try:
        return int(stem)
    except ValueError:  # more digits than int() takes
        return None


class ProviderEmulator(abc.ABC):
    """One provider's HTTP API, mounted under ``/<name>`` in the sandbox app."""

    name: ClassVar[str]
    submit_path: ClassVar[str]
    # The status endpoint as (HTTP method, path); None for a synchronous API.
    status_route: ClassVar[tuple[str, str] | None] = None
    # The 404 message for an unknown task id ("{task_id}" is filled in).
    task_not_found: ClassVar[str] = "Task not found: {task_id}"
    # Callback retries after a failed delivery when the behaviour leaves it to the provider.
    callback_retries: ClassVar[int] = 0

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    # --- what a provider module supplies -----------------------------------------------------

    @abc.abstractmethod
    def parse_submit(self, body: dict[str, Any]) -> Submission:
        """Validate a submit body (raising :class:`Invalid`) into the task it asks for."""

    @abc.abstractmethod
    def new_task_id(self, created_unix: int) -> str:
        """A fresh task id in this provider's style."""

    @abc.abstractmethod
    async def submit_reply(self, task: SandboxTask) -> Response:
        """The answer to a submit that created ``task``."""

    @abc.abstractmethod
    def error_body(
        self, status: int, message: str, *, param: str | None, code: str | None
    ) -> dict[str, Any]:
        """An error body in this provider's format."""

    async def status_task_id(self, request: Request) -> str:
        """The task id a status request asks about (raises :class:`Invalid` when it has none)."""
        task_id: str = request.path_params["task_id"]
        return task_id

    def status_body(self, task: SandboxTask, view: View) -> dict[str, Any]:
        """What the status endpoint answers for ``task`` as it is in ``view``."""
        raise NotImplementedError(f"{self.name} has no status endpoint")

    def callback_body(self, task: SandboxTask, view: View) -> dict[str, Any]:
        """What this provider POSTs to a callback URL: by default, the status body."""
        return self.status_body(task, view)

    # --- the endpoints -----------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [Route(self.submit_path, self.submit, methods=["POST"])]
        if self.status_route is not None:
            method, path = self.status_route
            routes.append(Route(path, self.status, methods=[method]))
        routes.append(Route("/files/{task_id}/{name}", self.file, methods=["GET"]))
        return routes

    async def submit(self, request: Request) -> Response:
        """Auth, body, validation, directives, an injected error or a new task, the reply."""
        if not self.authorized(request):
            return self.unauthorized()
        try:
            body = json_object(await request.body())
            submission = self.parse_submit(body)
            behaviour = self.behaviour_for(submission.prompt)
        except Invalid as exc:
            return self.invalid(exc)
        if behaviour.submit_error not in (None, "gateway_timeout"):
            return await self.injected_error(behaviour.submit_error, behaviour)
        task = self.new_task(request, behaviour, body, submission)
        if behaviour.submit_error == "gateway_timeout":
            return await self.injected_error("timeout", behaviour)
        return await self.submit_reply(task)

    async def status(self, request: Request) -> Response:
        """Auth, the task, an injected error or the task's status body."""
        if not self.authorized(request):
            return self.unauthorized()
        try:
            task_id = await self.status_task_id(request)
        except Invalid as exc:
            return self.invalid(exc)
        task = self.task(task_id)
        if task is None:
            return self.error(404, self.task_not_found.format(task_id=task_id))
        failure = await self.status_failure(task)
        if failure is not None:
            return failure
        if task.behaviour.status_latency:
            await self.sandbox.hold(task.behaviour.status_latency)
        return JSONResponse(self.status_body(task, self.view(task)))

    async def file(self, request: Request) -> Response:
        task = self.task(request.path_params["task_id"])
        index = image_index(request.path_params["name"])
        if task is None or index is None or index >= task.n or self.view(task).phase != "succeeded":
            return JSONResponse({"error": "not found"}, status_code=404)
        return Response(
            placeholder_png(task.id, index, task.aspect),
            media_type="image/png",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    # --- shared pieces -----------------------------------------------------------------------

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
        body = self.error_body(status, message, param=param, code=code)
        return JSONResponse(body, status_code=status, headers=headers)

    def authorized(self, request: Request) -> bool:
        return has_api_key(request, self.sandbox.api_key)

    def unauthorized(self) -> Response:
        return self.error(401, "Invalid or missing API key.", code="invalid_api_key")

    def invalid(self, exc: Invalid) -> Response:
        return self.error(400, exc.message, param=exc.param)

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
            await self.sandbox.hold(behaviour.timeout_seconds)
            return self.error(504, INJECTED_MESSAGES[504], code="timeout")
        status = int(error)
        headers = {"Retry-After": "1"} if status == 429 else None
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
        return self.error(status, INJECTED_MESSAGES[status], code=code, headers=headers)

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
        behaviour: SandboxBehaviour,
        body: dict[str, Any],
        submission: Submission,
    ) -> SandboxTask:
        """Create and register a task; its outcome is drawn from its id."""
        created_unix = int(time.time())
        task_id = self.new_task_id(created_unix)
        mode = submission.mode or ("callback" if submission.callback_url else "poll")
        return self.sandbox.add_task(
            SandboxTask(
                id=task_id,
                provider=self.name,
                created_at=self.sandbox.clock(),
                created_unix=created_unix,
                behaviour=behaviour,
                outcome="failed" if rolls(behaviour.fail_rate, task_id, "fail") else "succeeded",
                base_url=self.base_url(request),
                request=body,
                model=submission.model,
                n=submission.n,
                aspect=submission.aspect,
                quality=submission.quality,
                mode=mode,
                callback_url=submission.callback_url,
            )
        )

    def task(self, task_id: object) -> SandboxTask | None:
        if not isinstance(task_id, str):
            return None
        task = self.sandbox.tasks.get(task_id)
        return task if task is not None and task.provider == self.name else None

    def view(self, task: SandboxTask) -> View:
        return task.view(self.sandbox.clock())
