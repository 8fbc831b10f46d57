"""GET /files/{task_id}/{name}: a kept image, and the Range requests it answers, through the
real app on SQLite."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from tests.conftest import serving
from tests.test_openapi import PNG, quiet_settings, seed

SIZE = len(PNG)


async def fetched(sqlite_url: str, tmp_path: Path, wanted: str) -> httpx.Response:
    """A kept image, asked for with ``Range: wanted``, through the real app."""
    settings = quiet_settings(sqlite_url, tmp_path)
    async with serving(settings, webhook_app=Starlette()) as (_, client):
        ids = await seed(client, settings)
        return await client.get(
            f"/files/{ids['task_id']}/0.png", headers={"Range": wanted.encode()}
        )


@pytest.mark.parametrize(
    ("wanted", "part"),
    [
        ("bytes=0-3", (0, 4)),
        ("bytes=70-", (70, SIZE)),
        ("bytes=70-1000", (70, SIZE)),  # a last byte past the end: up to the end
        ("bytes=-2", (SIZE - 2, SIZE)),
        ("bytes=-1000", (0, SIZE)),  # a suffix longer than the file: all of it
        (" bytes=1-1 ", (1, 2)),
    ],
)
async def test_one_byte_range_is_a_206(
    sqlite_url: str, tmp_path: Path, wanted: str, part: tuple[int, int]
) -> None:
    answer = await fetched(sqlite_url, tmp_path, wanted)
    start, end = part
    assert answer.status_code == 206, answer.text
    assert answer.content == PNG[start:end]
    assert answer.headers["content-range"] == f"bytes {start}-{end - 1}/{SIZE}"
    assert answer.headers["content-type"] == "image/png"


@pytest.mark.parametrize(
    "wanted",
    [
        "bytes=0-1,3-4",  # several ranges: Starlette's answer broke off mid-body
        "bytes=0-0,-1",
        "bytes=5-1",  # last before first
        "items=0-1",  # another unit
        "bytes=0_0-1",  # what int() takes but is no number here
        "bytes=\u0661-2",  # an Arabic-Indic 1
        "bytes=-",
        "bytes=",
        "nonsense",
    ],
)
async def test_any_other_range_is_ignored_and_the_whole_file_served(
    sqlite_url: str, tmp_path: Path, wanted: str
) -> None:
    answer = await fetched(sqlite_url, tmp_path, wanted)
    assert (answer.status_code, answer.content) == (200, PNG), answer.text
    assert answer.headers["content-length"] == str(SIZE)
    assert "content-range" not in answer.headers


@pytest.mark.parametrize("wanted", [f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 9}", "bytes=-0"])
async def test_a_range_past_the_end_is_a_416_json_error(
    sqlite_url: str, tmp_path: Path, wanted: str
) -> None:
    answer = await fetched(sqlite_url, tmp_path, wanted)
    assert answer.status_code == 416
    assert answer.headers["content-range"] == f"bytes */{SIZE}"
    error = answer.json()["error"]
    assert error["code"] == "range_not_satisfiable"
    assert f"{SIZE}" in error["message"] or "bytes=-0" in error["message"]


async def test_an_if_range_of_another_version_voids_the_range(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A client resuming a download of another version of the file gets the whole file (200),
    even for a range past this version's end; with this version's ETag, the range stands."""
    settings = quiet_settings(sqlite_url, tmp_path)
    async with serving(settings, webhook_app=Starlette()) as (_, client):
        ids = await seed(client, settings)
        url = f"/files/{ids['task_id']}/0.png"
        etag = (await client.get(url)).headers["etag"]
        stale = await client.get(url, headers={"Range": "bytes=500-", "If-Range": '"old"'})
        current = await client.get(url, headers={"Range": "bytes=1-2", "If-Range": etag})
        past_end = await client.get(url, headers={"Range": "bytes=500-", "If-Range": etag})
    assert (stale.status_code, stale.content) == (200, PNG)
    assert (current.status_code, current.content) == (206, PNG[1:3])
    assert past_end.status_code == 416
