"""Images TaskRelay keeps itself: OpenAI answers with base64 data, not a link, so TaskRelay
writes the PNG to the files folder and serves it at ``{public_url}/files/{task_id}/{name}``.

File URLs are capability URLs: the task id is 128 random bits, so they need no API token and
work in a browser or an <img> tag, like the providers' own result links.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from service.errors import (
    ImageStorageFailed,
    NotFound,
    RangeNotSatisfiable,
    SettingsError,
    UpstreamProtocolError,
)

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SAFE_FILE = re.compile(r"^[0-9]{1,3}\.png$")
# A task id as service.store.new_id makes them: "tsk_" and 16 random bytes in base64url.
_TASK_FOLDER = re.compile(r"^tsk_[A-Za-z0-9_-]{22}$")


class Removed(NamedTuple):
    """What :meth:`ImageFiles.remove` did: task folders deleted, and those it could not."""

    removed: int
    failed: int
    left: tuple[str, ...] = ()  # the task ids whose folder could not be deleted


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class ImageFiles:
    def __init__(self, root: Path, public_url: str) -> None:
        self.root = root
        self.public_url = public_url

    def check_writable(self) -> None:
        """Refuse a files folder that cannot take an image, at start-up (the folder is made if
        need be, and a probe file written and removed): found only when an image comes in, it
        would fail every OpenAI task after its image was made and paid for."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            descriptor, probe = tempfile.mkstemp(dir=self.root, prefix=".taskrelay-write-check-")
            os.close(descriptor)
            os.unlink(probe)
        except OSError as exc:
            raise SettingsError(
                f"TASKRELAY_FILES_DIR: cannot write to {self.root} "
                f"({exc.strerror or type(exc).__name__}), where OpenAI's images are kept (each "
                "would be paid for and then lost): make it a folder TaskRelay can write, or set "
                "TASKRELAY_FILES_DIR to one.",
                details={"variable": "TASKRELAY_FILES_DIR"},
            ) from None

    def save_b64(self, task_id: str, index: int, data: str, *, provider: str) -> str:
        """Write one base64 PNG durably and return its public URL. Data that is not base64 is
        an UpstreamProtocolError; a folder that cannot take the file (full, read-only, not a
        folder) an ImageStorageFailed, with no partial file left."""
        if not _SAFE_NAME.match(task_id):
            raise ValueError(f"unsafe task id {task_id!r}")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise UpstreamProtocolError(
                f"{provider} returned image data that is not valid base64", provider=provider
            ) from exc
        folder = self.root / task_id
        name = f"{index}.png"
        temporary = folder / f".{name}.tmp"
        try:
            new_folder = not folder.is_dir()
            folder.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as handle:
                handle.write(raw)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, folder / name)
            # The rename, and a new folder's own entry, are durable only once their folders
            # are synced: a power cut could otherwise lose a file whose URL is recorded.
            _sync_folder(folder)
            if new_folder:
                _sync_folder(self.root)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise ImageStorageFailed(
                f"The image {provider} returned could not be stored: "
                f"{exc.strerror or type(exc).__name__}. The files folder "
                "(TASKRELAY_FILES_DIR) must be a writable folder with free space; the image "
                "was made and paid for, so it is not requested again. Submit a new task once "
                "the folder is fixed."
            ) from exc
        return f"{self.public_url}/files/{task_id}/{name}"

    def remove(self, task_ids: Iterable[str]) -> Removed:
        """Delete the images kept for these tasks (retention, once the tasks are deleted). A
        folder another process removes first is skipped; one that cannot be removed is logged
        and counted as failed, never raised."""
        removed = 0
        left: list[str] = []
        for task_id in task_ids:
            if not _SAFE_NAME.match(task_id):
                continue
            folder = self.root / task_id
            if not folder.is_dir():
                continue
            try:
                shutil.rmtree(folder)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("could not delete the images of task %s: %s", task_id, exc)
                left.append(task_id)
                continue
            removed += 1
        return Removed(removed, len(left), tuple(left))

    def task_folders(self, modified_before: float) -> list[str]:
        """The task ids whose folder here was last changed before ``modified_before`` (a
        Unix time). Only names shaped like a task id count: whatever else is in the folder
        is not TaskRelay's."""
        found = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not _TASK_FOLDER.match(entry.name):
                    continue
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    if entry.stat(follow_symlinks=False).st_mtime < modified_before:
                        found.append(entry.name)
                except FileNotFoundError:  # removed meanwhile (another replica's sweep)
                    continue
        return found

    def path(self, task_id: str, name: str) -> Path:
        if not _SAFE_NAME.match(task_id) or not _SAFE_FILE.match(name):
            raise NotFound("No such file.")
        path = self.root / task_id / name
        if not path.is_file():
            raise NotFound("No such file.")
        return path


# One byte range, first-last (last optional) or a suffix: the only Range served as a 206.
# The unit is case-insensitive (RFC 9110 §14.1): `BYTES=0-1` is the same range.
_ONE_RANGE = re.compile(
    r"bytes=(?:([0-9]{1,18})-([0-9]{0,18})|-([0-9]{1,18}))", re.ASCII | re.IGNORECASE
)


def _range_to_serve(wanted: str, size: int) -> str | None:
    """The ``Range`` to hand to the file response (normalised), or None to serve the whole
    file (200): RFC 9110 lets a server ignore a Range, and this one ignores what it does not
    serve (several ranges, another unit, a malformed one, last before first). A range that
    starts past the end is a 416."""
    match = _ONE_RANGE.fullmatch(wanted.strip())
    if match is None:
        return None
    first, last, suffix = match.groups()
    if suffix is not None:
        if int(suffix) == 0:
            raise RangeNotSatisfiable(
                "An empty suffix range (bytes=-0) selects nothing.", size=size
            )
        return f"bytes={max(0, size - int(suffix))}-"
    if last and int(last) < int(first):
        return None
    if int(first) >= size:
        raise RangeNotSatisfiable(
            f"The range starts at byte {int(first)}, past the end of this {size}-byte file.",
            size=size,
        )
    return f"bytes={int(first)}-{int(last) if last else ''}"


async def serve_file(request: Request) -> Response:
    from service.runtime import runtime_of

    files = runtime_of(request).files
    path = files.path(request.path_params["task_id"], request.path_params["name"])
    try:
        stat_result = path.stat()
    except FileNotFoundError:  # deleted meanwhile (retention)
        raise NotFound("No such file.") from None
    response = FileResponse(
        path,
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=86400"},
        stat_result=stat_result,  # its ETag and Last-Modified set now
    )
    wanted = request.headers.get("range")
    if wanted is not None:
        # Starlette's own parsing would answer plain-text errors, and its several-range
        # answer breaks off mid-body; it gets one well-formed range, or none. An If-Range
        # that names another version of the file makes the Range void (RFC 9110): the whole
        # file, never a 416 for a range of the version the client had.
        if_range = request.headers.get("if-range")
        current = (response.headers.get("etag"), response.headers.get("last-modified"))
        void = if_range is not None and if_range not in current
        served = None if void else _range_to_serve(wanted, stat_result.st_size)
        headers = [(k, v) for k, v in request.scope["headers"] if k != b"range"]
        if served is not None:
            headers.append((b"range", served.encode("ascii")))
        request.scope["headers"] = headers
    return response


routes = [Route("/files/{task_id}/{name}", serve_file, methods=["GET", "HEAD"])]
