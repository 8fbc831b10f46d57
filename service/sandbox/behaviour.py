"""Behaviour knobs, prompt directives and the sandbox's deterministic dice.

A :class:`SandboxBehaviour` says how an emulated provider behaves: how long a task takes,
whether it fails, how its callback is delivered, which status queries answer an error. Defaults
come from the :class:`~service.sandbox.app.Sandbox` (per provider or ``"*"``), can be changed at
run time through ``PUT /_sandbox/behaviour/{provider}``, and are overridden per request by
``sandbox:key=value`` words in the prompt (see the package docstring for the grammar).

Every random choice is drawn by :func:`chance` from a hash of the task id, so one task id always
gets the same outcome: tests and benchmarks are repeatable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args
from urllib.parse import unquote

CallbackMode = Literal["normal", "drop", "duplicate", "out_of_order"]
StatusError = Literal[429, 500, 503, "timeout"]
# "timeout": no task, a 504 after timeout_seconds. "gateway_timeout": the task is made (and
# called back) all the same: a gateway in front of a slow provider gave up waiting for it.
SubmitError = Literal[400, 401, 429, 500, "timeout", "gateway_timeout"]

CALLBACK_MODES: tuple[str, ...] = get_args(CallbackMode)
STATUS_ERRORS: tuple[int | str, ...] = get_args(StatusError)
SUBMIT_ERRORS: tuple[int | str, ...] = get_args(SubmitError)

# `sandbox:key=value`, a whole word of the prompt; the value runs to the next whitespace.
DIRECTIVE_RE = re.compile(r"(?<!\S)sandbox:([A-Za-z_]+)=(\S*)")

# Directive spellings that are not knob names.
ALIASES = {"fail": "fail_rate"}

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(ms|s)?$")
_TRUE = {"true", "yes", "on"}
_FALSE = {"false", "no", "off"}


class BehaviourError(ValueError):
    """A knob name or value that the sandbox does not understand (names the knob)."""

    def __init__(self, knob: str, message: str) -> None:
        super().__init__(f"sandbox knob {knob!r}: {message}")
        self.knob = knob


@dataclass(frozen=True)
class SandboxBehaviour:
    """How an emulated provider behaves. Times are seconds on the sandbox's clock."""

    # How long a task takes from submit to its final state.
    duration: float = 2.0
    # Probability (0..1) that a task fails; drawn once per task id.
    fail_rate: float = 0.0
    failure_reason: str = "Content policy violation detected"
    # normal: one final callback; drop: none; duplicate: the final one twice;
    # out_of_order: the final one, then a stale "running" one.
    callback: CallbackMode = "normal"
    # Extra wait after the task finishes before the callback is sent.
    callback_delay: float = 0.0
    # Probability (0..1) that a task's callbacks are silently never sent.
    callback_drop_rate: float = 0.0
    # The first N status queries of each task answer ``status_error``.
    status_errors: int = 0
    status_error: StatusError = 500
    # Probability (0..1) that any one status query answers ``status_error``.
    status_error_rate: float = 0.0
    # How long a "timeout" answer hangs before it gives up with HTTP 504.
    timeout_seconds: float = 30.0
    # How long every status answer takes (a slow provider; makes overlapping queries visible).
    status_latency: float = 0.0
    # Make the submit request itself fail (no task is created).
    submit_error: SubmitError | None = None
    # EvoLink's task_info.estimated_time; None means the duration rounded up.
    estimated_time: int | None = None
    # Share of ``duration`` spent queued (progress 0) before the task runs.
    queued_fraction: float = 0.2
    # Retries after a failed callback delivery (non-2xx or no answer); None means the
    # provider's own rule: EvoLink retries 3 times, the others do not retry.
    callback_retries: int | None = None
    # Wait before retry k (1-based) is ``callback_retry_backoff * k``.
    callback_retry_backoff: float = 1.0
    # Timeout of one callback POST (EvoLink documents 10 s).
    callback_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in (
            "duration",
            "callback_delay",
            "timeout_seconds",
            "callback_retry_backoff",
            "status_latency",
        ):
            if getattr(self, name) < 0:
                raise BehaviourError(name, "must not be negative")
        if self.callback_timeout <= 0:
            raise BehaviourError("callback_timeout", "must be greater than zero")
        for name in ("fail_rate", "callback_drop_rate", "status_error_rate", "queued_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise BehaviourError(name, "must be between 0 and 1")
        if self.callback not in CALLBACK_MODES:
            raise BehaviourError("callback", "one of " + ", ".join(CALLBACK_MODES))
        if self.status_errors < 0:
            raise BehaviourError("status_errors", "must not be negative")
        if self.status_error not in STATUS_ERRORS:
            raise BehaviourError("status_error", "one of 429, 500, 503, timeout")
        if self.submit_error is not None and self.submit_error not in SUBMIT_ERRORS:
            raise BehaviourError("submit_error", "one of none, 400, 401, 429, 500, timeout")
        if self.estimated_time is not None and self.estimated_time < 0:
            raise BehaviourError("estimated_time", "must not be negative")
        if self.callback_retries is not None and self.callback_retries < 0:
            raise BehaviourError("callback_retries", "must not be negative")

    @property
    def effective_estimated_time(self) -> int:
        if self.estimated_time is not None:
            return self.estimated_time
        return math.ceil(self.duration)

    def updated(self, knobs: Mapping[str, Any]) -> SandboxBehaviour:
        """A copy with ``knobs`` applied. Values may be JSON values or directive strings."""
        changes: dict[str, Any] = {}
        for raw_name, value in knobs.items():
            name = ALIASES.get(raw_name, raw_name)
            if name not in _FIELDS:
                raise BehaviourError(raw_name, "unknown knob; known: " + ", ".join(knob_names()))
            changes[name] = _coerce(raw_name, name, value)
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name for f in dataclasses.fields(SandboxBehaviour)}


def knob_names() -> list[str]:
    return sorted(_FIELDS | set(ALIASES))


def _number(knob: str, value: Any, *, seconds: bool = False) -> float:
    if isinstance(value, bool):
        raise BehaviourError(knob, "expected a number")
    if isinstance(value, int | float):
        try:
            result = float(value)
        except OverflowError:  # an int beyond float's range
            raise BehaviourError(knob, "expected a finite number") from None
    elif isinstance(value, str):
        text = value.strip().lower()
        match = _DURATION_RE.match(text) if seconds else None
        if match:
            result = float(match.group(1)) * (0.001 if match.group(2) == "ms" else 1.0)
        else:
            try:
                result = float(text)
            except ValueError:
                raise BehaviourError(knob, f"expected a number, got {value!r}") from None
    else:
        raise BehaviourError(knob, "expected a number")
    if not math.isfinite(result):
        raise BehaviourError(knob, "expected a finite number")
    return result


def _integer(knob: str, value: Any) -> int:
    number = _number(knob, value)
    if number != int(number):
        raise BehaviourError(knob, f"expected a whole number, got {value!r}")
    return int(number)


def _rate(knob: str, value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return 1.0 if value.strip().lower() in _TRUE else 0.0
    return _number(knob, value)


def _error_choice(knob: str, value: Any, choices: tuple[int | str, ...]) -> int | str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    word = value.strip().lower() if isinstance(value, str) else None
    if word in choices:  # "timeout", "gateway_timeout"
        return word
    code = _integer(knob, value)
    if code not in choices:
        raise BehaviourError(knob, "one of " + ", ".join(str(c) for c in choices))
    return code


def _coerce(raw_name: str, name: str, value: Any) -> Any:
    if name in (
        "duration",
        "callback_delay",
        "timeout_seconds",
        "callback_retry_backoff",
        "callback_timeout",
        "status_latency",
    ):
        return _number(raw_name, value, seconds=True)
    if name in ("fail_rate", "callback_drop_rate", "status_error_rate"):
        return _rate(raw_name, value)
    if name == "queued_fraction":
        return _number(raw_name, value)
    if name in ("status_errors",):
        return _integer(raw_name, value)
    if name in ("estimated_time", "callback_retries"):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
            return None
        return _integer(raw_name, value)
    if name == "failure_reason":
        if not isinstance(value, str):
            raise BehaviourError(raw_name, "expected a string")
        return unquote(value)
    if name == "callback":
        if value not in CALLBACK_MODES:
            raise BehaviourError(raw_name, "one of " + ", ".join(CALLBACK_MODES))
        return cast(CallbackMode, value)
    if name == "status_error":
        result = _error_choice(raw_name, value, STATUS_ERRORS)
        if result is None:
            raise BehaviourError(raw_name, "one of 429, 500, 503, timeout")
        return result
    if name == "submit_error":
        return _error_choice(raw_name, value, SUBMIT_ERRORS)
    raise BehaviourError(raw_name, "cannot be set")  # pragma: no cover - every field is listed


def parse_directives(prompt: object) -> dict[str, str]:
    """The ``sandbox:key=value`` words of a prompt, in order (a later word wins)."""
    if not isinstance(prompt, str):
        return {}
    return {match.group(1): match.group(2) for match in DIRECTIVE_RE.finditer(prompt)}


def chance(task_id: str, *salt: object) -> float:
    """A number in [0, 1) that depends only on the task id and the salt: repeatable dice."""
    key = ":".join([task_id, *map(str, salt)]).encode("utf-8")
    digest = hashlib.sha256(key).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def rolls(rate: float, task_id: str, *salt: object) -> bool:
    """True with probability ``rate`` (exactly never at 0, always at 1), fixed per task id."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    return chance(task_id, *salt) < rate
