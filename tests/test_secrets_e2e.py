"""Secrets never leave in logs, errors or task JSON: a full run of a real ``taskrelay serve``.

One TaskRelay process at DEBUG level (the most it ever logs) talks to the provider sandbox in a
process of its own, which wants an API key of our choosing, and delivers to a real subscriber.
The run goes through everything that handles a secret: submissions to every provider with their
API keys (one of them wrong, so the provider refuses it), callbacks on signed URLs (also
forged, tampered, signed with the previous key, for the wrong provider, unparseable, too
large), a subscription with its whsec_ secret and a rotation, the notify secret and its
rotation, wrong and missing API tokens, another client's task, the rate limit, the metrics
token. Then every secret, and every callback token TaskRelay handed out, is looked for in the
process's whole log, in every error body it answered, and in every task, event, receipt and
delivery it serves or sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer

from service.signing import SALT
from tests.conftest import altered
from tests.servers import SandboxProcess, ServiceProcess, SubscriberProcess, free_port

T = TypeVar("T")
WAIT = 30.0
FAST = "a lighthouse at dawn sandbox:duration=0.3"
SUBMITTED = ("evolink", "grsai", "gptimage15", "apiinone")


def _secret(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(24)}"


SIGNING_KEY = _secret("signing-key")
PREVIOUS_SIGNING_KEY = _secret("previous-signing-key")
PROVIDER_KEY = _secret("sk-provider")
WRONG_PROVIDER_KEY = _secret("sk-refused")  # OpenAI's, which the sandbox does not accept
ALICE = _secret("alice-token")
BOB = _secret("bob-token")
METRICS_TOKEN = _secret("metrics-token")


class KeyedSandbox(SandboxProcess):
    """The provider sandbox on its own, wanting ``api_key`` instead of the well-known
    ``sandbox-key`` (so the key is a secret worth looking for)."""

    def __init__(self, log_path: Path, api_key: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")  # noqa: SIM115  (closed in stop())
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "sandbox",
                "--port",
                str(self.port),
                "--api-key",
                api_key,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=10
        )
        deadline = time.monotonic() + WAIT
        while True:
            try:
                self.http.get("/_sandbox/tasks").raise_for_status()
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("the sandbox did not start") from None
                time.sleep(0.1)


def wait_until(condition: Callable[[], T | None], what: str) -> T:
    deadline = time.monotonic() + WAIT
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Run:
    """What the run saw: every answer TaskRelay gave, split into errors and the rest."""

    def __init__(self, relay: ServiceProcess) -> None:
        self.relay = relay
        self.http = httpx.Client(base_url=relay.url, timeout=10)
        self.errors: list[httpx.Response] = []
        self.answers: list[httpx.Response] = []

    def call(
        self,
        method: str,
        path: str,
        token: str | None = ALICE,
        expect: int | None = None,
        **kw: Any,
    ) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token}")
        for _ in range(5):
            response = self.http.request(method, path, headers=headers, **kw)
            (self.errors if response.status_code >= 400 else self.answers).append(response)
            if response.status_code != 429 or expect in (None, 429):
                break
            # A call expecting an answer met the client's rate limit (the reads at the end
            # come in a burst, as many as there are deliveries): wait as told, as a client would.
            time.sleep(float(response.headers["Retry-After"]))
        if expect is not None:
            assert response.status_code == expect, (method, path, response.text)
        return response


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[tuple[ServiceProcess, KeyedSandbox, SubscriberProcess]]:
    sandbox = KeyedSandbox(tmp_path / "sandbox.log", PROVIDER_KEY)
    subscriber = SubscriberProcess(tmp_path / "subscriber")
    environ = {
        "TASKRELAY_DATA_DIR": str(tmp_path / "data"),
        "TASKRELAY_SECRET_KEY": SIGNING_KEY,
        "TASKRELAY_SECRET_KEY_FALLBACKS": PREVIOUS_SIGNING_KEY,
        "TASKRELAY_API_TOKENS": f"alice:{ALICE},bob:{BOB}",
        "TASKRELAY_METRICS_TOKEN": METRICS_TOKEN,
        "TASKRELAY_LOG_LEVEL": "DEBUG",
        "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "TASKRELAY_DELIVERY_SCHEDULE": "0s,100ms,200ms",
        "TASKRELAY_SCHEDULER_TICK": "100ms",
        "TASKRELAY_SUBMIT_BACKOFF": "50ms",
        "TASKRELAY_RATE_LIMIT": "20",
        "TASKRELAY_RATE_LIMIT_BURST": "40",
        "TASKRELAY_MAX_BODY_BYTES": "65536",
        **sandbox.provider_environment(),
    }
    for provider in (*SUBMITTED, "openai"):
        environ[f"TASKRELAY_{provider.upper()}_API_KEY"] = PROVIDER_KEY
    environ["TASKRELAY_OPENAI_API_KEY"] = WRONG_PROVIDER_KEY
    relay = ServiceProcess(environ, log_path=tmp_path / "taskrelay.log")
    try:
        relay.wait_ready()
        yield relay, sandbox, subscriber
    finally:
        relay.stop()
        subscriber.stop()
        sandbox.stop()


def signature_part(token: str) -> str:
    return token.rsplit(".", 1)[-1]


def test_no_secret_or_callback_token_leaves_in_logs_errors_or_task_json(
    processes: tuple[ServiceProcess, KeyedSandbox, SubscriberProcess],
) -> None:
    relay, sandbox, subscriber = processes
    run = Run(relay)

    # Subscriptions and their secrets, rotated.
    subscription = run.call(
        "POST", "/v1/subscriptions", json={"url": subscriber.hook_url("/hooks/alice")}, expect=201
    ).json()
    rotated = run.call(
        "POST", f"/v1/subscriptions/{subscription['id']}/rotate-secret", json={}, expect=200
    ).json()
    notify = run.call("GET", "/v1/notify-secret", expect=200).json()
    notify_rotated = run.call("POST", "/v1/notify-secret/rotate", json={}, expect=200).json()
    webhook_secrets = {
        subscription["secret"],
        rotated["secret"],
        notify["secret"],
        notify_rotated["secret"],
    }
    assert len(webhook_secrets) == 4

    # Submissions to every provider (OpenAI with a key the provider refuses).
    task_ids = [
        run.call(
            "POST",
            "/v1/tasks",
            json={
                "provider": provider,
                "prompt": FAST,
                "notify_url": subscriber.hook_url(f"/hooks/notify-{provider}"),
            },
            expect=202,
        ).json()["id"]
        for provider in SUBMITTED
    ]
    refused = run.call(
        "POST", "/v1/tasks", json={"provider": "openai", "prompt": FAST}, expect=202
    ).json()["id"]

    # A tracked task and its callback URL, used well and badly.
    tracked = run.call("POST", "/v1/tasks/track", json={"provider": "evolink"}, expect=201).json()
    callback_url = httpx.URL(tracked["callback_url"])
    token = callback_url.path.rsplit("/", 1)[1]
    previous_key_token = URLSafeTimedSerializer(
        PREVIOUS_SIGNING_KEY, salt=SALT, signer_kwargs={"digest_method": hashlib.sha256}
    ).dumps([tracked["id"], "evolink"])
    callback_tokens = {token, previous_key_token}
    body = {"id": "task-unified-1", "status": "processing", "progress": 10}
    payload, stamp, signature = token.split(".")
    run.call(
        "POST",
        f"/callbacks/evolink/{payload}.{stamp}.{altered(signature, 10)}",
        None,
        401,
        json=body,
    )
    run.call(
        "POST",
        f"/callbacks/evolink/{altered(payload, -2)}.{stamp}.{signature}",
        None,
        401,
        json=body,
    )
    run.call("POST", f"/callbacks/grsai/{token}", None, 403, json=body)
    run.call("POST", f"/callbacks/acme/{token}", None, 404, json=body)
    run.call("GET", f"/callbacks/evolink/{token}", None, 405)
    run.call("POST", f"/callbacks/evolink/{token}/extra", None, 404, json=body)
    run.call("POST", callback_url.path, None, 400, content=b"{not json")
    run.call("POST", callback_url.path, None, 413, content=b"x" * 70_000)
    run.call("POST", f"/callbacks/evolink/{previous_key_token}", None, 200, json=body)
    run.call("POST", callback_url.path, None, 200, json={**body, "progress": 50})

    # Wrong, missing and other clients' tokens; the rate limit; the metrics token.
    run.call("GET", "/v1/tasks", None, 401)
    run.call("GET", "/v1/tasks", f"{ALICE}x", 401)
    run.call("GET", "/v1/tasks", None, 401, headers={"Authorization": f"Basic {ALICE}"})
    run.call("GET", f"/v1/tasks/{tracked['id']}", BOB, 404)
    run.call("GET", f"/v1/subscriptions/{subscription['id']}", BOB, 404)
    # Bob's bucket (40, refilled at 20/s) holds out for at least the burst less his two reads
    # above, then answers 429: ask until it does (however slowly the requests go).
    passed = 0
    for _ in range(400):
        status = run.call("GET", "/v1/tasks", BOB).status_code
        if status != 200:
            break
        passed += 1
    assert status == 429
    assert passed >= 40 - 2
    run.call("GET", "/metrics", None, 401)
    run.call("GET", "/metrics", METRICS_TOKEN, 200)

    # Everything settles: tasks final, events delivered.
    def final() -> list[dict[str, Any]] | None:
        time.sleep(0.1)  # one list per 0.1 s: well inside alice's rate limit
        page = run.call("GET", "/v1/tasks", params={"limit": 200}, expect=200).json()["data"]
        wanted = {*task_ids, refused}
        done = [t for t in page if t["id"] in wanted and t["status"] not in {"queued", "running"}]
        return page if len(done) == len(wanted) else None

    tasks = {task["id"]: task for task in wait_until(final, "every submitted task to finish")}
    assert [tasks[task_id]["status"] for task_id in task_ids] == ["succeeded"] * len(task_ids)
    assert tasks[refused]["status"] == "failed"
    assert tasks[refused]["error"]["code"] == "upstream_unauthorized"
    wait_until(
        lambda: len(subscriber.requests("/hooks/alice")) >= 2 * len(task_ids),
        "the subscriber to get the events",
    )

    # The callback URLs TaskRelay handed to the provider carry tokens too.
    handed_out = re.findall(
        r"/callbacks/[a-z0-9]+/([A-Za-z0-9_\-.]+)", sandbox.http.get("/_sandbox/tasks").text
    )
    assert len(set(handed_out)) >= len(task_ids) - 1  # every provider but OpenAI's takes one
    callback_tokens |= set(handed_out)

    # What TaskRelay serves: tasks, histories, receipts, subscriptions, deliveries.
    served: list[str] = []
    receipts: list[str] = []
    for task_id in [*tasks, tracked["id"]]:
        for suffix in ("", "/events"):
            served.append(run.call("GET", f"/v1/tasks/{task_id}{suffix}", expect=200).text)
        receipts.append(run.call("GET", f"/v1/tasks/{task_id}/callbacks", expect=200).text)
    served.append(run.call("GET", "/v1/subscriptions", expect=200).text)
    served.append(run.call("GET", f"/v1/subscriptions/{subscription['id']}", expect=200).text)
    deliveries = run.call(
        "GET",
        f"/v1/subscriptions/{subscription['id']}/deliveries",
        params={"limit": 200},
        expect=200,
    ).json()["data"]
    served.extend(
        run.call("GET", f"/v1/deliveries/{row['id']}", expect=200).text for row in deliveries
    )
    sent = [record["body"] for record in subscriber.requests()]
    assert sent

    relay.stop()
    logs = relay.logs()
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(line["message"] == "TaskRelay ready" for line in lines)
    assert any(line["level"] == "debug" for line in lines)  # DEBUG was really on

    secret_values = {
        "TASKRELAY_SECRET_KEY": SIGNING_KEY,
        "TASKRELAY_SECRET_KEY_FALLBACKS": PREVIOUS_SIGNING_KEY,
        "provider API key": PROVIDER_KEY,
        "refused provider API key": WRONG_PROVIDER_KEY,
        "alice's API token": ALICE,
        "bob's API token": BOB,
        "TASKRELAY_METRICS_TOKEN": METRICS_TOKEN,
    }
    for number, secret in enumerate(sorted(webhook_secrets)):
        secret_values[f"webhook secret {number}"] = secret
        # The key without its prefix, and its raw bytes as another encoder would write them.
        raw = base64.b64decode(secret.removeprefix("whsec_"))
        secret_values[f"webhook secret {number} (base64)"] = secret.removeprefix("whsec_")
        secret_values[f"webhook secret {number} (hex)"] = raw.hex()
    for number, value in enumerate(sorted(callback_tokens)):
        secret_values[f"callback token {number}"] = value
        secret_values[f"callback token {number} (signature)"] = signature_part(value)

    def leaks(text: str, *, tokens: bool = True) -> list[str]:
        return [
            name
            for name, value in secret_values.items()
            if value in text and (tokens or not name.startswith("callback token"))
        ]

    assert leaks(logs) == [], "secrets in TaskRelay's log"
    assert run.errors, "the run answered errors"
    for response in run.errors:
        assert leaks(response.text) == [], (response.request.url.path[:30], response.text)
        assert "Traceback" not in response.text
    for text in served:
        assert leaks(text) == [], text[:300]
    # Receipts are the providers' bodies kept verbatim for audit, shown only to the task's
    # owner; gptimage15 echoes the submitted request, callback URL included, in every answer.
    for text in receipts:
        assert leaks(text, tokens=False) == [], text[:300]
    for text in sent:
        assert leaks(text) == [], text[:300]
