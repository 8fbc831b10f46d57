"""The sandbox: a runnable emulator of the five providers' HTTP APIs, no account or network needed.

Each provider sits under its own prefix of :attr:`Sandbox.app` and speaks its wire format as
``PROVIDERS.md`` describes it::

    /openai/v1/images/generations            POST, synchronous, base64 PNGs
    /grsai/v1/draw/completions               POST, webHook absent (stream) / "-1" (poll) / URL
    /grsai/v1/draw/result                    POST {"id"}
    /gptimage15/api/generate                 POST
    /gptimage15/api/status?task_id=          GET
    /evolink/v1/images/generations           POST
    /evolink/v1/tasks/{id}                   GET
    /apiinone/api/v1/images/generations      POST
    /apiinone/api/v1/tasks/{id}              GET
    /<provider>/files/{task_id}/{n}.png      GET, the placeholder images (no auth, like a CDN)
    /_sandbox/...                            the control API (see ``service.sandbox.control``)

So a provider's base URL is ``<where the app is mounted>/<provider>``: TaskRelay mounts it at
``/sandbox`` (``http://host:port/sandbox/evolink``); standalone (:func:`run`) it is at ``/``.
Every endpoint but the files wants ``Authorization: Bearer <api_key>`` and answers 401 in that
provider's error format otherwise.

A task's state follows the clock: queued for ``queued_fraction`` of ``duration`` (progress 0),
then running (progress rising 1..99), then final (progress 100) at ``duration``. Its outcome is
drawn at submit time from ``fail_rate`` with dice seeded by the task id. When the request gave a
callback URL, a background task POSTs the provider's callback body (JSON) after
``duration + callback_delay``.

Prompt directives
-----------------
Any request can override the provider's behaviour for itself with words in its prompt::

    directive := "sandbox:" knob "=" value     (one whitespace-separated word of the prompt)
    knob      := a SandboxBehaviour field name, or "fail" (alias of fail_rate)
    value     := runs to the next whitespace; percent-decoded for failure_reason

    a cat sandbox:duration=0.1 sandbox:fail=1 sandbox:callback=drop
    a dog sandbox:status_errors=2 sandbox:status_error=429 sandbox:failure_reason=NSFW%20image

Values: seconds as a number, optionally with ``ms`` or ``s`` (``duration=150ms``); rates 0..1
(``fail=1`` always fails, ``fail=0`` never; ``true``/``false`` also work); ``callback`` one of
normal, drop, duplicate, out_of_order; ``status_error`` 429, 500, 503 or timeout;
``submit_error`` none, 400, 401, 429, 500, timeout or gateway_timeout; counts as whole
numbers. A later word wins over an earlier one. An unknown knob or bad value makes the submit
answer 400 in the provider's error format, naming the knob. The directives stay in the prompt
the provider "sees" (it counts towards the length limits, and gptimage15 echoes it in
``request``).

Injected errors: ``submit_error`` fails the submit itself (no task is created); the first
``status_errors`` status queries of a task, and any query with probability ``status_error_rate``,
answer ``status_error``. 429 carries ``Retry-After: 1``; ``timeout`` hangs ``timeout_seconds``
and then answers 504. All in the provider's own error format. ``status_latency`` delays every
status answer (a slow provider).

Serving and testing: :func:`run` (or ``python -m service.sandbox``) serves it alone with uvicorn;
``service.sandbox.testing`` has a manual clock and a callback-recording receiver app for tests.
"""

from service.sandbox.app import PROVIDER_NAMES, Sandbox
from service.sandbox.behaviour import BehaviourError, SandboxBehaviour
from service.sandbox.server import run, standalone_app
from service.sandbox.tasks import CallbackAttempt, SandboxTask, StatusQuery

__all__ = [
    "PROVIDER_NAMES",
    "BehaviourError",
    "CallbackAttempt",
    "Sandbox",
    "SandboxBehaviour",
    "SandboxTask",
    "StatusQuery",
    "run",
    "standalone_app",
]
