"""The sandbox's own machinery: behaviour knobs, directives, dice, PNGs, control API, serving."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import sys
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from service.sandbox import BehaviourError, Sandbox, SandboxBehaviour
from service.sandbox import app as sandbox_app
from service.sandbox.behaviour import chance, parse_directives, rolls
from service.sandbox.png import BAND_HALF_WIDTH, colour_for, encode_png, placeholder_png
from service.sandbox.testing import CallbackRecorder, ManualClock, asgi_client

AUTH = {"Authorization": "Bearer sandbox-key"}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def sandbox(clock: ManualClock) -> AsyncIterator[Sandbox]:
    async with CallbackRecorder().client() as http:
        box = Sandbox(
            http,
            behaviour={
                "*": SandboxBehaviour(duration=4.0),
                "grsai": SandboxBehaviour(duration=8.0),
            },
            clock=clock,
            sleep=clock.sleep,
        )
        yield box
        await box.aclose()


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(sandbox.app, base_url="http://sandbox.test", headers=AUTH) as http:
        yield http


async def evolink_task(http: httpx.AsyncClient, prompt: str = "a cat") -> str:
    response = await http.post("/evolink/v1/images/generations", json={"prompt": prompt})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


# --- behaviour and directives ---------------------------------------------------------------------


def test_behaviour_defaults() -> None:
    behaviour = SandboxBehaviour()
    assert (behaviour.duration, behaviour.fail_rate, behaviour.callback) == (2.0, 0.0, "normal")
    assert behaviour.failure_reason == "Content policy violation detected"
    assert (behaviour.status_errors, behaviour.status_error, behaviour.timeout_seconds) == (
        0,
        500,
        30,
    )
    assert behaviour.submit_error is None and behaviour.callback_delay == 0
    assert behaviour.effective_estimated_time == 2
    assert SandboxBehaviour(duration=2.1).effective_estimated_time == 3
    assert SandboxBehaviour(duration=2.1, estimated_time=100).effective_estimated_time == 100


def test_directives_are_parsed_from_whole_words() -> None:
    prompt = (
        "a cat sandbox:duration=0.1 sandbox:fail=1 sandbox:callback=drop "
        "sandbox:status_errors=2 sandbox:status_error=429 xsandbox:duration=9 "
        "sandbox:duration=150ms"
    )
    directives = parse_directives(prompt)
    assert directives == {
        "duration": "150ms",  # a later word wins; "xsandbox:" is not a directive
        "fail": "1",
        "callback": "drop",
        "status_errors": "2",
        "status_error": "429",
    }
    behaviour = SandboxBehaviour().updated(directives)
    assert behaviour.duration == pytest.approx(0.15)
    assert behaviour.fail_rate == 1.0 and behaviour.callback == "drop"
    assert (behaviour.status_errors, behaviour.status_error) == (2, 429)
    assert parse_directives(None) == {} and parse_directives("no directives") == {}


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        ({"fail": "0"}, {"fail_rate": 0.0}),
        ({"fail": "true"}, {"fail_rate": 1.0}),
        ({"fail_rate": 0.25}, {"fail_rate": 0.25}),
        ({"status_error": "timeout"}, {"status_error": "timeout"}),
        ({"submit_error": "none"}, {"submit_error": None}),
        ({"submit_error": 401}, {"submit_error": 401}),
        ({"submit_error": "Gateway_Timeout"}, {"submit_error": "gateway_timeout"}),
        ({"failure_reason": "NSFW%20image"}, {"failure_reason": "NSFW image"}),
        ({"estimated_time": "7"}, {"estimated_time": 7}),
        ({"callback_retries": "0"}, {"callback_retries": 0}),
        ({"timeout_seconds": "2s"}, {"timeout_seconds": 2.0}),
    ],
)
def test_knob_values(knobs: dict[str, object], expected: dict[str, object]) -> None:
    behaviour = SandboxBehaviour().updated(knobs)
    for name, value in expected.items():
        assert getattr(behaviour, name) == value


@pytest.mark.parametrize(
    "knobs",
    [
        {"fial": "1"},
        {"fail": "2"},
        {"duration": "-1"},
        {"duration": "soon"},
        {"callback": "sometimes"},
        {"status_error": "404"},
        {"status_error": "none"},
        {"status_error": "gateway_timeout"},
        {"submit_error": 503},
        {"status_errors": "1.5"},
        {"duration": True},
        {"queued_fraction": "1.5"},
    ],
)
def test_bad_knobs_are_refused(knobs: dict[str, object]) -> None:
    with pytest.raises(BehaviourError) as caught:
        SandboxBehaviour().updated(knobs)
    assert next(iter(knobs)) in str(caught.value)


async def test_directives_apply_to_their_task_only(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    quick = await evolink_task(client, "x sandbox:duration=1 sandbox:estimated_time=9")
    normal = await evolink_task(client)
    assert sandbox.tasks[quick].behaviour.duration == 1.0
    assert sandbox.tasks[normal].behaviour.duration == 4.0
    reply = (await client.get(f"/evolink/v1/tasks/{quick}")).json()
    assert reply["task_info"]["estimated_time"] == 9


# --- the dice -------------------------------------------------------------------------------------


def test_chance_is_a_pure_function_of_the_task_id() -> None:
    digest = hashlib.sha256(b"task-1:fail").digest()
    assert chance("task-1", "fail") == int.from_bytes(digest[:8], "big") / 2.0**64
    assert chance("task-1", "fail") != chance("task-2", "fail")
    assert 0.0 <= chance("anything") < 1.0


def test_rolls_honours_the_rate() -> None:
    ids = [f"task-{i}" for i in range(4000)]
    assert not any(rolls(0.0, task_id, "fail") for task_id in ids)
    assert all(rolls(1.0, task_id, "fail") for task_id in ids)
    share = sum(rolls(0.3, task_id, "fail") for task_id in ids) / len(ids)
    assert 0.27 < share < 0.33


async def test_fail_rate_outcome_is_fixed_by_the_task_id(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    ids = [await evolink_task(client, "x sandbox:fail_rate=0.5") for _ in range(30)]
    outcomes = {task_id: sandbox.tasks[task_id].outcome for task_id in ids}
    for task_id, outcome in outcomes.items():
        assert outcome == ("failed" if rolls(0.5, task_id, "fail") else "succeeded")
    assert set(outcomes.values()) == {"failed", "succeeded"}


# --- PNG ------------------------------------------------------------------------------------------


def parse_png(data: bytes) -> tuple[int, int, bytes]:
    """Walk the chunks, check every CRC; return width, height and the decompressed IDAT."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        payload = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + payload) & 0xFFFFFFFF
        chunks.append((kind, payload))
        offset += 12 + length
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour) == (8, 2)
    pixels = zlib.decompress(b"".join(p for kind, p in chunks if kind == b"IDAT"))
    return width, height, pixels


def test_encode_png_writes_a_valid_file() -> None:
    rows = [bytes([x * 80, y * 80, 0]) * 1 for y in range(2) for x in range(1)]
    width, height, pixels = parse_png(encode_png(1, 2, rows))
    assert (width, height) == (1, 2)
    assert pixels == b"\x00" + rows[0] + b"\x00" + rows[1]
    with pytest.raises(ValueError):
        encode_png(2, 2, rows)


@pytest.mark.parametrize(
    ("aspect", "size"), [("1:1", (64, 64)), ("2:3", (64, 96)), ("3:2", (96, 64))]
)
def test_placeholder_pngs(aspect: str, size: tuple[int, int]) -> None:
    width, height, pixels = parse_png(placeholder_png("task-x", 0, aspect))
    assert (width, height) == size
    assert len(pixels) == height * (1 + width * 3)
    assert pixels[:: width * 3 + 1] == b"\x00" * height  # filter byte 0 on every row
    # The colour is derived from the task id (and index): stable, and different between tasks.
    assert placeholder_png("task-x", 0, aspect) == placeholder_png("task-x", 0, aspect)
    assert placeholder_png("task-x", 0, aspect) != placeholder_png("task-y", 0, aspect)
    assert placeholder_png("task-x", 0, aspect) != placeholder_png("task-x", 1, aspect)


@pytest.mark.parametrize("aspect", ["1:1", "2:3", "3:2"])
def test_placeholder_band_follows_the_diagonal(aspect: str) -> None:
    width, height, pixels = parse_png(placeholder_png("task-x", 1, aspect))
    red, green, blue = colour_for("task-x", 1)
    base = bytes((red, green, blue))
    light = bytes((min(255, red + 70), min(255, green + 70), min(255, blue + 70)))
    stride = 1 + width * 3
    for y in range(height):
        row = pixels[y * stride + 1 : (y + 1) * stride]
        for x in range(width):
            near = abs(x - y * width // height) < BAND_HALF_WIDTH
            assert row[x * 3 : x * 3 + 3] == (light if near else base), (x, y)


async def test_served_images_and_their_404s(client: httpx.AsyncClient, clock: ManualClock) -> None:
    task_id = await evolink_task(client)
    url = f"/evolink/files/{task_id}/0.png"
    assert (await client.get(url)).status_code == 404  # not finished yet
    clock.advance(4.0)
    image = await client.get(url, headers={"Authorization": ""})  # links need no key
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert parse_png(image.content)[:2] == (64, 64)
    for missing in (
        f"/evolink/files/{task_id}/1.png",
        f"/evolink/files/{task_id}/0.jpg",
        f"/apiinone/files/{task_id}/0.png",
        "/evolink/files/nope/0.png",
    ):
        assert (await client.get(missing)).status_code == 404, missing


async def test_file_names_int_cannot_read_are_404s(
    client: httpx.AsyncClient, clock: ManualClock
) -> None:
    task_id = await evolink_task(client)
    clock.advance(4.0)
    # "²" is a digit to str.isdigit() but not to int(); int() also stops at 4300 digits.
    for name in ("².png", "1" * 5000 + ".png"):
        assert (await client.get(f"/evolink/files/{task_id}/{name}")).status_code == 404


async def test_the_oldest_tasks_are_forgotten_beyond_the_cap(
    client: httpx.AsyncClient, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox_app, "MAX_TASKS", 3)
    ids = [await evolink_task(client) for _ in range(5)]
    assert list(sandbox.tasks) == ids[2:]
    assert (await client.get(f"/evolink/v1/tasks/{ids[0]}")).status_code == 404


# --- mounted inside another app -------------------------------------------------------------------


async def test_links_carry_the_mount_prefix(sandbox: Sandbox, clock: ManualClock) -> None:
    host = Starlette(routes=[Mount("/sandbox", app=sandbox.app)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=host), base_url="http://relay:8000", headers=AUTH
    ) as http:
        reply = await http.post("/sandbox/evolink/v1/images/generations", json={"prompt": "x"})
        task_id = reply.json()["id"]
        clock.advance(4.0)
        task = (await http.get(f"/sandbox/evolink/v1/tasks/{task_id}")).json()
        (url,) = task["results"]
        assert url == f"http://relay:8000/sandbox/evolink/files/{task_id}/0.png"
        assert (await http.get(url)).status_code == 200
        listed = (await http.get("/sandbox/_sandbox/tasks")).json()
        assert [item["id"] for item in listed] == [task_id]


# --- control API ----------------------------------------------------------------------------------


async def test_control_lists_tasks_with_their_status_queries(
    client: httpx.AsyncClient, clock: ManualClock
) -> None:
    evo = await evolink_task(client)
    clock.advance(1.0)
    await client.get(f"/evolink/v1/tasks/{evo}")
    clock.advance(1.0)
    await client.get(f"/evolink/v1/tasks/{evo}")
    grs = (
        await client.post("/grsai/v1/draw/completions", json={"prompt": "x", "webHook": "-1"})
    ).json()["data"]["id"]

    tasks = (await client.get("/_sandbox/tasks")).json()
    assert [task["id"] for task in tasks] == [evo, grs]
    first = tasks[0]
    assert (first["provider"], first["mode"], first["status_queries"]) == ("evolink", "poll", 2)
    assert [q["since_created"] for q in first["status_query_log"]] == [1.0, 2.0]
    assert [q["answer"] for q in first["status_query_log"]] == [200, 200]
    assert (first["status"], first["progress"], first["final_status"]) == (
        "running",
        50,
        "succeeded",
    )
    assert first["finish_at"] - first["created_at"] == 4.0
    assert tasks[1]["behaviour"]["duration"] == 8.0  # grsai's own defaults

    only = (await client.get("/_sandbox/tasks", params={"provider": "grsai"})).json()
    assert [task["id"] for task in only] == [grs]
    one = (await client.get(f"/_sandbox/tasks/{evo}")).json()
    assert one["id"] == evo and one["status_queries"] == 2
    missing = await client.get("/_sandbox/tasks/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "task_not_found"


async def test_control_changes_behaviour_at_run_time(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    response = await client.put("/_sandbox/behaviour/evolink", json={"duration": 0.5, "fail": 1})
    assert response.status_code == 200
    current = response.json()
    assert current["evolink"]["duration"] == 0.5 and current["evolink"]["fail_rate"] == 1.0
    assert current["apiinone"]["duration"] == 4.0
    task_id = await evolink_task(client)
    assert sandbox.tasks[task_id].outcome == "failed"

    # "*" changes every provider, including those with their own defaults.
    current = (await client.put("/_sandbox/behaviour/*", json={"callback_delay": 2})).json()
    assert {name: knobs["callback_delay"] for name, knobs in current.items()} == {
        "*": 2.0, "openai": 2.0, "grsai": 2.0, "gptimage15": 2.0, "evolink": 2.0, "apiinone": 2.0
    }  # fmt: skip
    assert current["grsai"]["duration"] == 8.0 and current["evolink"]["duration"] == 0.5
    assert (await client.get("/_sandbox/behaviour")).json() == current

    bad = await client.put("/_sandbox/behaviour/evolink", json={"duration": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_knob"
    assert sandbox.behaviour_for("evolink").duration == 0.5  # nothing changed
    assert (await client.put("/_sandbox/behaviour/nobody", json={})).status_code == 404
    assert (await client.put("/_sandbox/behaviour/evolink", content=b"[1]")).status_code == 400


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b'{"duration": 1' + b"0" * 400 + b"}", "invalid_knob"),  # beyond float's range
        (b'{"duration": 1' + b"0" * 5000 + b"}", "invalid_json"),  # beyond int()'s digits
        (b"[" * 100_000, "invalid_json"),  # deeper than the JSON decoder recurses
    ],
)
async def test_control_refuses_json_python_chokes_on(
    client: httpx.AsyncClient, content: bytes, code: str
) -> None:
    response = await client.put("/_sandbox/behaviour/evolink", content=content)
    assert response.status_code == 400 and response.json()["error"]["code"] == code


async def test_control_reset(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    await client.put("/_sandbox/behaviour/*", json={"duration": 1})
    await evolink_task(client)
    hooked = (
        await client.post(
            "/evolink/v1/images/generations",
            json={"prompt": "x", "callback_url": "http://receiver.test/h"},
        )
    ).json()["id"]
    task = sandbox.tasks[hooked]
    assert sandbox.tasks[hooked].callback_state == "pending"
    response = await client.post("/_sandbox/reset")
    assert response.status_code == 200 and response.json() == {"reset": True}
    assert sandbox.tasks == {} and task.callback_state == "canceled"
    assert sandbox.behaviour_for("evolink").duration == 4.0
    assert sandbox.behaviour_for("grsai").duration == 8.0
    assert (await client.get("/_sandbox/tasks")).json() == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/_sandbox/tasks"),
        ("GET", "/_sandbox/tasks/x"),
        ("GET", "/_sandbox/behaviour"),
        ("PUT", "/_sandbox/behaviour/*"),
        ("POST", "/_sandbox/reset"),
    ],
)
async def test_control_wants_the_key(client: httpx.AsyncClient, method: str, path: str) -> None:
    response = await client.request(method, path, headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


async def test_constructor_checks_its_arguments() -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ValueError, match="unknown provider"):
            Sandbox(http, behaviour={"midjourney": SandboxBehaviour()})
        with pytest.raises(ValueError):
            Sandbox(http, api_key="")


async def test_sandbox_takes_a_custom_key(clock: ManualClock) -> None:
    async with httpx.AsyncClient() as http:
        box = Sandbox(http, api_key="other-key", clock=clock, sleep=clock.sleep)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=box.app), base_url="http://s"
        ) as client:
            path = "/apiinone/api/v1/tasks/x"
            assert (await client.get(path, headers=AUTH)).status_code == 401
            other = {"Authorization": "Bearer other-key"}
            assert (await client.get(path, headers=other)).status_code == 404


# --- run(): a real uvicorn server -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_run_serves_the_sandbox_over_real_http() -> None:
    port = free_port()
    code = f"from service.sandbox import run; run('127.0.0.1', {port}, api_key='real-key')"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": "Bearer real-key"}
    try:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=5.0) as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    await http.get("/_sandbox/tasks")
                    break
                except httpx.TransportError:
                    assert process.returncode is None, (
                        await process.stderr.read() if process.stderr else b""
                    )
                    assert time.monotonic() < deadline, "the sandbox did not start"
                    await asyncio.sleep(0.1)

            reply = await http.post(
                "/apiinone/api/v1/images/generations",
                json={"model": "gpt-image-1-5", "prompt": "a cat sandbox:duration=0.2"},
            )
            assert reply.status_code == 200
            task_id = reply.json()["data"]["task_id"]
            for _ in range(100):
                data = (await http.get(f"/apiinone/api/v1/tasks/{task_id}")).json()["data"]
                if data["status"] != "IN_PROGRESS":
                    break
                await asyncio.sleep(0.05)
            assert data["status"] == "completed"
            (url,) = data["results"]
            assert url == f"{base}/apiinone/files/{task_id}/0.png"
            image = await http.get(url)
            assert image.headers["content-type"] == "image/png"
            assert parse_png(image.content)[:2] == (64, 64)
            listed = (await http.get(f"/_sandbox/tasks/{task_id}")).json()
            assert listed["status_queries"] >= 1
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
                await process.wait()
