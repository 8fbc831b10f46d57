"""Contract tests, end to end: a real ``taskrelay serve`` process (uvicorn) with the sandbox
mounted, real HTTP between TaskRelay and the sandbox, and the sandbox's callbacks coming back
over real HTTP. Parametrised over the five providers."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import ServiceProcess

TOKEN = "contract-token-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
PROVIDERS = ["openai", "grsai", "gptimage15", "evolink", "apiinone"]
CALLBACK_PROVIDERS = ["grsai", "gptimage15", "evolink", "apiinone"]
FAST = " sandbox:duration=0.3"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def start(tmp_path: Path, name: str, **environ: str) -> ServiceProcess:
    service = ServiceProcess(
        {
            "TASKRELAY_DATA_DIR": str(tmp_path / name),
            "TASKRELAY_API_TOKENS": f"contract:{TOKEN}",
            "TASKRELAY_SANDBOX": "true",
            "TASKRELAY_SUBMIT_BACKOFF": "50ms",
            **environ,
        },
        log_path=tmp_path / f"{name}.log",
    )
    service.wait_ready()
    return service


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    service = start(tmp_path_factory.mktemp("relay"), "relay")
    try:
        with httpx.Client(base_url=service.url, headers=HEADERS, timeout=10) as client:
            yield client
    finally:
        service.stop()


def wait_final(client: httpx.Client, task_id: str, limit: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        task: dict[str, Any] = client.get(f"/v1/tasks/{task_id}").json()
        if task["status"] in {"succeeded", "failed", "canceled", "expired"}:
            return task
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} not final: {client.get(f'/v1/tasks/{task_id}').json()}")


def submit(client: httpx.Client, provider: str, prompt: str, **extra: Any) -> dict[str, Any]:
    response = client.post("/v1/tasks", json={"provider": provider, "prompt": prompt, **extra})
    assert response.status_code == 202, response.text
    task: dict[str, Any] = response.json()
    return task


def event_types(client: httpx.Client, task_id: str) -> list[str]:
    return [e["type"] for e in client.get(f"/v1/tasks/{task_id}/events").json()["data"]]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_submit_completes_with_real_images(relay: httpx.Client, provider: str) -> None:
    task = submit(relay, provider, "a red bicycle" + FAST, size="2:3")
    done = wait_final(relay, task["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 100
    assert done["error"] is None
    assert done["images"], done
    for image in done["images"]:
        picture = httpx.get(image["url"], timeout=5)
        assert picture.status_code == 200
        assert picture.content.startswith(PNG_SIGNATURE)
    if provider == "openai":
        # OpenAI answers with base64; TaskRelay keeps the file and serves it itself.
        assert done["images"][0]["url"].startswith(f"{relay.base_url}/files/{task['id']}/")
        assert done["last_update_source"] == "submit"
    else:
        assert done["provider_task_id"]
        assert done["last_update_source"] == "callback"
    types = event_types(relay, task["id"])
    assert types[0] == "task.submitted" and types[-1] == "task.succeeded"
    assert types.count("task.succeeded") == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_provider_failure_ends_failed_with_its_reason(relay: httpx.Client, provider: str) -> None:
    task = submit(relay, provider, "forbidden" + FAST + " sandbox:fail=1")
    done = wait_final(relay, task["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "content_policy_violation"
    assert "Content policy violation detected" in done["error"]["message"]
    assert event_types(relay, task["id"])[-1] == "task.failed"


@pytest.mark.parametrize("provider", CALLBACK_PROVIDERS)
@pytest.mark.parametrize("mode", ["duplicate", "out_of_order"])
def test_duplicate_and_reordered_callbacks_make_one_transition(
    relay: httpx.Client, provider: str, mode: str
) -> None:
    task = submit(relay, provider, "twice" + FAST + f" sandbox:callback={mode}")
    done = wait_final(relay, task["id"])
    assert done["status"] == "succeeded"
    # The sandbox sends the second callback once the first is answered: wait for it to land.
    deadline = time.monotonic() + 15
    while True:
        callbacks = relay.get(f"/v1/tasks/{task['id']}/callbacks").json()["data"]
        if len(callbacks) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(callbacks) == 2
    assert sorted(c["outcome"] for c in callbacks) == ["applied", "terminal"]
    assert relay.get(f"/v1/tasks/{task['id']}").json()["status"] == "succeeded"
    assert event_types(relay, task["id"]).count("task.succeeded") == 1


@pytest.mark.parametrize("provider", CALLBACK_PROVIDERS)
def test_tracked_task_completes_by_callback(relay: httpx.Client, provider: str) -> None:
    """The caller submits to the provider itself and gives it TaskRelay's callback URL."""
    tracked = relay.post("/v1/tasks/track", json={"provider": provider}).json()
    callback_url = tracked["callback_url"]
    base = f"{relay.base_url}/sandbox/{provider}"
    sandbox = httpx.Client(headers={"Authorization": "Bearer sandbox-key"}, timeout=10)
    prompt = "tracked" + FAST
    if provider == "grsai":
        reply = sandbox.post(
            f"{base}/v1/draw/completions",
            json={"model": "gpt-image-1.5", "prompt": prompt, "webHook": callback_url},
        )
    elif provider == "gptimage15":
        reply = sandbox.post(
            f"{base}/api/generate", json={"prompt": prompt, "callback_url": callback_url}
        )
    elif provider == "evolink":
        reply = sandbox.post(
            f"{base}/v1/images/generations",
            json={"model": "gpt-image-1.5", "prompt": prompt, "callback_url": callback_url},
        )
    else:
        reply = sandbox.post(
            f"{base}/api/v1/images/generations",
            json={"model": "gpt-image-1-5", "prompt": prompt, "callback_url": callback_url},
        )
    assert reply.status_code == 200, reply.text
    done = wait_final(relay, tracked["id"])
    assert done["status"] == "succeeded"
    assert done["provider_task_id"]  # learned from the first callback
    assert done["images"]


@pytest.mark.parametrize(
    ("error", "code", "attempts"),
    [
        ("500", "upstream_unavailable", 4),
        ("429", "upstream_rate_limited", 4),
        ("400", "upstream_bad_request", 1),
        ("401", "upstream_unauthorized", 1),
    ],
)
@pytest.mark.parametrize("provider", ["gptimage15", "evolink"])
def test_submission_failures_retry_only_when_the_provider_is_at_fault(
    relay: httpx.Client, provider: str, error: str, code: str, attempts: int
) -> None:
    task = submit(relay, provider, "doomed" + FAST + f" sandbox:submit_error={error}")
    done = wait_final(relay, task["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == code
    assert done["submit_attempts"] == attempts


@pytest.mark.parametrize("provider", ["gptimage15", "evolink"])
def test_a_gateway_timeout_on_submit_is_not_resent_and_the_callback_settles_it(
    relay: httpx.Client, provider: str
) -> None:
    """The provider made the task, but the gateway in front of it answered the submission
    504 (it gave up waiting). Sent again, the image would be made and billed twice: the task
    waits for the provider's callback instead, which settles it."""
    prompt = f"gateway {provider}{FAST} sandbox:submit_error=gateway_timeout"
    task = submit(relay, provider, prompt + " sandbox:timeout_seconds=0.2")
    done = wait_final(relay, task["id"])
    assert done["status"] == "succeeded", done
    assert done["submit_attempts"] == 1
    assert done["last_update_source"] == "callback"
    made = [
        t
        for t in sandbox_tasks(relay)
        if str(t["request"].get("prompt", "")).startswith(f"gateway {provider} ")
    ]
    assert len(made) == 1


def sandbox_tasks(relay: httpx.Client) -> list[dict[str, Any]]:
    """What the sandbox saw (its control API)."""
    response = httpx.get(
        f"{relay.base_url}/sandbox/_sandbox/tasks", headers={"Authorization": "Bearer sandbox-key"}
    )
    tasks: list[dict[str, Any]] = response.json()
    return tasks


def test_rejected_values_never_reach_the_provider(relay: httpx.Client) -> None:
    before = len(sandbox_tasks(relay))
    for provider, body in [
        ("apiinone", {"quality": "low"}),
        ("gptimage15", {"n": 2}),
        ("grsai", {"n": 3}),
        ("grsai", {"quality": "high"}),
        ("gptimage15", {"prompt": "x" * 2001}),
    ]:
        payload = {"provider": provider, "prompt": "x", **body}
        response = relay.post("/v1/tasks", json=payload)
        assert response.status_code == 400, (provider, body)
        assert provider in response.json()["error"]["message"]
    after = len(sandbox_tasks(relay))
    assert after == before


def test_grsai_stream_mode_reports_live_progress(tmp_path: Path) -> None:
    service = start(tmp_path, "stream", TASKRELAY_GRSAI_MODE="stream")
    try:
        with httpx.Client(base_url=service.url, headers=HEADERS, timeout=10) as client:
            task = submit(client, "grsai", "streamed sandbox:duration=1")
            done = wait_final(client, task["id"])
            assert done["status"] == "succeeded"
            assert done["images"]
            # The result came on the stream's last line; no line names the task (seed 000).
            assert done["last_update_source"] == "submit"
            assert done["provider_task_id"] is None
            assert done["submit_attempts"] == 1
            events = client.get(f"/v1/tasks/{task['id']}/events").json()["data"]
            progress = [e for e in events if e["type"] == "task.progress"]
            assert len(progress) >= 3
            assert all(e["source"] == "stream" for e in progress)
            values = [e["data"]["progress"] for e in progress]
            assert values == sorted(values) and values[-1] < 100
    finally:
        service.stop()


def test_grsai_poll_mode_completes_by_status_queries(tmp_path: Path) -> None:
    service = start(
        tmp_path,
        "poll",
        TASKRELAY_GRSAI_MODE="poll",
        TASKRELAY_GRSAI_TYPICAL_DURATION="1s",
        TASKRELAY_SCHEDULER_TICK="100ms",
    )
    try:
        with httpx.Client(base_url=service.url, headers=HEADERS, timeout=10) as client:
            task = submit(client, "grsai", "polled sandbox:duration=1")
            done = wait_final(client, task["id"])
            assert done["status"] == "succeeded"
            assert done["images"]
            assert done["last_update_source"] == "poll"
            seen = [t for t in sandbox_tasks(client) if t["provider"] == "grsai"]
            assert len(seen) == 1
            assert seen[0]["mode"] == "poll"  # submitted with webHook "-1"
            assert seen[0]["status_queries"] >= 1
            assert seen[0]["callbacks"] == []
    finally:
        service.stop()


def _send_half_a_body(base_url: str, path: str) -> None:
    """A POST announcing 100 bytes of body, 6 of them sent, then the connection closed."""
    url = httpx.URL(base_url)
    with socket.create_connection((url.host, url.port or 80), timeout=5) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"a": ')


def test_a_client_gone_mid_body_is_one_quiet_line_not_an_error(tmp_path: Path) -> None:
    """Anyone can send half a body and hang up: an info line each, no traceback, nothing
    changed, and the callback counted as client_gone (it was counted as an error)."""
    service = start(tmp_path, "gone")
    try:
        with httpx.Client(base_url=service.url, headers=HEADERS, timeout=10) as client:
            task = client.post("/v1/tasks/track", json={"provider": "evolink"}).json()
            callback_path = httpx.URL(task["callback_url"]).raw_path.decode()
            _send_half_a_body(service.url, "/v1/tasks")
            _send_half_a_body(service.url, callback_path)
            deadline = time.monotonic() + 10
            while service.logs().count("went away") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            metrics = client.get("/metrics").text
            listed = [item["id"] for item in client.get("/v1/tasks").json()["data"]]
            assert listed == [task["id"]]  # the half-sent task was not created
            after = client.get(f"/v1/tasks/{task['id']}").json()
    finally:
        service.stop()
    logs = service.logs()
    assert logs.count("went away") == 2, logs
    assert "Traceback" not in logs and "unhandled error" not in logs, logs
    assert 'taskrelay_callbacks_total{outcome="client_gone",provider="evolink"} 1' in metrics
    assert (after["status"], after["updated_at"]) == (task["status"], task["updated_at"])
