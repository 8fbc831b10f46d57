"""Run a real TaskRelay process (``taskrelay serve``) for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import httpx

T = TypeVar("T")
WAIT = 60.0  # the most any single condition may take, even on a loaded 2-core machine


def wait_until(condition: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    """Poll ``condition`` every 50 ms until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def held_port(owner: object) -> int:
    """A free port on 127.0.0.1 for ``owner``'s server process, kept for it while ``owner``
    lives, restarts included. :func:`free_port` leaves the port to anyone between its check and
    the server's bind (another xdist worker's bind(0), an outgoing connection), and again while
    the server is down. Here a socket of this process keeps it bound, with SO_REUSEADDR and
    never listening: connections to it are refused while the server is down, the server (which
    sets SO_REUSEADDR, as uvicorn does) binds it all the same, and no other socket can take
    it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    weakref.finalize(owner, sock.close)
    return int(sock.getsockname()[1])


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections for as long as the block runs: bound by
    this process, so that nothing else (another xdist worker's bind(0) included) can take it
    meanwhile, but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


class ServiceProcess:
    def __init__(self, environ: Mapping[str, str], *args: str, log_path: Path) -> None:
        self.port = held_port(self)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRELAY_")}
        env.update(environ)
        env.setdefault("TASKRELAY_PUBLIC_URL", self.url)
        self._log = open(log_path, "wb")  # noqa: SIM115  (closed in stop())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for /readyz; on failure the process is stopped (a caller that never got the
        object back could not clean it up) and the error carries its log."""
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"taskrelay exited early:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"taskrelay did not become ready:\n{self.logs()}")

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class SandboxProcess:
    """``taskrelay sandbox`` on a free port; providers at ``{url}/{provider}``."""

    def __init__(self, log_path: Path) -> None:
        self.port = held_port(self)
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")  # noqa: SIM115  (closed in stop())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "sandbox", "--port", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": "Bearer sandbox-key"}, timeout=10
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.http.get("/_sandbox/tasks").raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the sandbox did not start") from None
                time.sleep(0.1)

    def provider_environment(self) -> dict[str, str]:
        """TASKRELAY_* settings that point every provider at this sandbox."""
        env = {}
        for provider in ("openai", "grsai", "gptimage15", "evolink", "apiinone"):
            env[f"TASKRELAY_{provider.upper()}_BASE_URL"] = f"{self.url}/{provider}"
            env[f"TASKRELAY_{provider.upper()}_API_KEY"] = "sandbox-key"
        return env

    def behave(self, provider: str, **knobs: object) -> None:
        self.http.put(f"/_sandbox/behaviour/{provider}", json=knobs).raise_for_status()

    def tasks(self) -> list[dict[str, object]]:
        tasks: list[dict[str, object]] = self.http.get("/_sandbox/tasks").json()
        return tasks

    def stop(self) -> None:
        self.http.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


# --- a real webhook subscriber ------------------------------------------------------------------

from typing import Any  # noqa: E402  (this section was added after the others)

_REPO_ROOT = Path(__file__).resolve().parent.parent


def serve_quietly(app: Any, port: int) -> None:
    """Run ``app`` on 127.0.0.1:``port`` in this (child) process: warnings only, no access
    log, a graceful shutdown of at most 1 s."""
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )


def subscriber_main(argv: list[str]) -> None:
    """Run the subscriber app (in its own process): ``PORT RECORDS_PATH STATUS HOLD``.

    Every POST (any path) is appended to RECORDS_PATH as one JSON line when it arrives
    (``kind: request``: path, headers, body, the status it will be answered), and once more when
    it is answered (``kind: answer``: whether the client was still connected). ``POST /_control``
    ``{"status": 503, "hold": 5.0}`` changes how later requests are answered and releases
    requests being held; ``GET /_health`` answers 200.
    """
    import asyncio
    import contextlib
    import json

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    port, records_path = int(argv[0]), Path(argv[1])
    mode: dict[str, float] = {"status": int(argv[2]), "hold": float(argv[3])}
    release = asyncio.Event()
    counter = {"n": 0}
    records = open(records_path, "a", encoding="utf-8")  # noqa: SIM115  (lives with the process)

    def write(record: dict[str, object]) -> None:
        records.write(json.dumps(record) + "\n")
        records.flush()

    async def hook(request: Request) -> Response:
        body = await request.body()
        counter["n"] += 1
        number = f"{os.getpid()}-{counter['n']}"
        status, hold = int(mode["status"]), mode["hold"]
        write(
            {
                "kind": "request",
                "n": number,
                "at": time.time(),
                "path": request.url.path,
                "headers": dict(request.headers),
                "body": body.decode("utf-8", errors="replace"),
                "status": status,
                "held": hold,
            }
        )
        gone = False
        if hold > 0:
            waiter = release
            deadline = time.monotonic() + hold
            while time.monotonic() < deadline and not waiter.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), timeout=0.1)
                if await request.is_disconnected():
                    gone = True
                    break
        gone = gone or await request.is_disconnected()
        write({"kind": "answer", "n": number, "at": time.time(), "client_gone": gone})
        return Response(status_code=status)

    async def control(request: Request) -> Response:
        nonlocal release
        changes = await request.json()
        mode.update({k: changes[k] for k in ("status", "hold") if k in changes})
        release.set()  # held requests are answered now
        release = asyncio.Event()
        return JSONResponse(mode)

    async def health(request: Request) -> Response:
        return JSONResponse({"pid": os.getpid(), **mode})

    app = Starlette(
        routes=[
            Route("/_control", control, methods=["POST"]),
            Route("/_health", health, methods=["GET"]),
            Route("/{path:path}", hook, methods=["POST"]),
        ]
    )
    serve_quietly(app, port)


class SubscriberProcess:
    """A real webhook receiver (Starlette on uvicorn) in a process of its own, on a free port.

    It records every request to a JSON-lines file that outlives the process, so it can be
    killed (the subscriber is down: connections are refused) and started again on the same
    port (held meanwhile: see :func:`held_port`). ``configure(status=..., hold=...)`` changes
    how it answers while it runs.
    """

    def __init__(self, directory: Path, *, status: int = 200, hold: float = 0.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = held_port(self)
        self.url = f"http://127.0.0.1:{self.port}"
        self.records_path = directory / "subscriber.jsonl"
        self.records_path.touch()
        self._log_path = directory / "subscriber.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start(status=status, hold=hold)

    def hook_url(self, path: str) -> str:
        return f"{self.url}/{path.lstrip('/')}"

    def start(self, *, status: int = 200, hold: float = 0.0, timeout: float = 20.0) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        code = "import sys; from tests.servers import subscriber_main as m; m(sys.argv[1:])"
        with open(self._log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    code,
                    str(self.port),
                    str(self.records_path),
                    str(status),
                    str(hold),
                ],
                cwd=_REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                health = httpx.get(f"{self.url}/_health", timeout=1.0)
                if health.status_code == 200 and health.json()["pid"] == self.process.pid:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(
                    f"the subscriber did not start:\n{self._log_path.read_text(errors='replace')}"
                )
            time.sleep(0.05)

    def configure(self, *, status: int | None = None, hold: float | None = None) -> None:
        changes = {k: v for k, v in (("status", status), ("hold", hold)) if v is not None}
        httpx.post(f"{self.url}/_control", json=changes, timeout=5.0).raise_for_status()

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the process; SIGKILL (the default) drops held requests on the floor."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """Every request received so far (oldest first), each with ``answered`` (whether it
        was answered while its client was still connected) merged in."""
        import json

        received: list[dict[str, Any]] = []
        answers: dict[str, dict[str, Any]] = {}
        for line in self.records_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line being written right now
                continue
            if record["kind"] == "answer":
                answers[record["n"]] = record
            elif path is None or record["path"] == path:
                received.append(record)
        for record in received:
            answer = answers.get(record["n"])
            record["answered"] = answer is not None and not answer["client_gone"]
        return received


# --- a load balancer in front of several TaskRelay processes ------------------------------------

# Hop-by-hop headers (RFC 9110, 7.6.1) and the ones httpx sets itself: never forwarded.
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def _in_connection_setup(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while httpcore set a connection up: its traceback passes
    through httpcore's connection but not through the HTTP/1.1 or HTTP/2 exchange that sends
    the request."""
    import traceback

    files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(exc.__traceback__)]

    def passes(name: str) -> bool:
        return any(Path(file).parts[-3:] == ("httpcore", "_async", name) for file in files)

    return passes("connection.py") and not (passes("http11.py") or passes("http2.py"))


def balancer_main(argv: list[str]) -> None:
    """Run the balancer app (in its own process): ``PORT``.

    Every request (except ``/_balancer/...``) goes to the next backend, round robin. A backend
    that refuses the connection is skipped and the request goes to the next one (nothing was
    sent, so that is safe for any method); a backend that fails once the request has been sent
    (it died mid-request) makes the answer a 502, as nginx does for a POST, and the client
    retries. ``PUT /_balancer/backends`` ``["http://...", ...]`` sets the backends; ``GET
    /_balancer/stats`` counts, per backend, requests answered, connections refused and requests
    broken mid-flight. Answers carry ``x-balancer-backend``.
    """
    import itertools

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    port = int(argv[0])
    backends: list[str] = []
    turn = itertools.count()
    stats: dict[str, dict[str, int]] = {}
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(60.0, connect=2.0),
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        follow_redirects=False,
        trust_env=False,
    )

    def count(backend: str, what: str) -> None:
        row = stats.setdefault(backend, {"answered": 0, "refused": 0, "broken": 0})
        row[what] += 1

    async def forward(request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        first = next(turn)
        for offset in range(len(backends)):
            backend = backends[(first + offset) % len(backends)]
            try:
                answer = await client.request(
                    request.method, backend + target, headers=headers, content=body
                )
            except httpx.ConnectError:
                count(backend, "refused")
                continue
            except AttributeError as exc:
                # httpcore on anyio, when the backend resets a connection it has just accepted
                # (a replica frozen, then killed): reading the new socket's peer name fails
                # while the connection is set up, before the request is sent. Refused, as far
                # as the request is concerned; raised from anywhere else, it is a bug.
                if not _in_connection_setup(exc):
                    raise
                count(backend, "refused")
                continue
            except httpx.TransportError as exc:
                count(backend, "broken")
                return JSONResponse(
                    {"balancer": "backend failed mid-request", "error": type(exc).__name__},
                    status_code=502,
                    headers={"x-balancer-backend": backend},
                )
            count(backend, "answered")
            kept = {
                k: v
                for k, v in answer.headers.items()
                if k.lower() not in _HOP_HEADERS and k.lower() != "content-encoding"
            }
            kept["x-balancer-backend"] = backend
            return Response(answer.content, status_code=answer.status_code, headers=kept)
        return JSONResponse({"balancer": "no backend accepted the connection"}, status_code=503)

    async def set_backends(request: Request) -> Response:
        backends[:] = [str(url).rstrip("/") for url in await request.json()]
        return JSONResponse(backends)

    async def get_stats(request: Request) -> Response:
        return JSONResponse({"pid": os.getpid(), "backends": backends, "stats": stats})

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
    app = Starlette(
        routes=[
            Route("/_balancer/backends", set_backends, methods=["PUT"]),
            Route("/_balancer/stats", get_stats, methods=["GET"]),
            Route("/{path:path}", forward, methods=methods),
        ]
    )
    serve_quietly(app, port)


class BalancerProcess:
    """A round-robin HTTP load balancer (Starlette on uvicorn, httpx to the backends) in a
    process of its own, on a free port: the address providers and clients use when TaskRelay
    runs as several replicas. Start it first (its URL is every replica's public URL), then
    hand it the replicas with :meth:`set_backends`."""

    def __init__(self, directory: Path, timeout: float = 20.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = held_port(self)
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(directory / "balancer.log", "wb")  # noqa: SIM115  (closed in stop())
        code = "import sys; from tests.servers import balancer_main as m; m(sys.argv[1:])"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, str(self.port)],
            cwd=_REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/_balancer/stats", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the balancer did not start")
            time.sleep(0.05)

    def set_backends(self, urls: list[str]) -> None:
        httpx.put(f"{self.url}/_balancer/backends", json=urls, timeout=5.0).raise_for_status()

    def stats(self) -> dict[str, dict[str, int]]:
        stats: dict[str, dict[str, int]] = httpx.get(
            f"{self.url}/_balancer/stats", timeout=5.0
        ).json()["stats"]
        return stats

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# --- a private PostgreSQL server ----------------------------------------------------------------

import glob  # noqa: E402  (this section was added after the others)
import pwd  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402


def _postgres_bindir() -> Path | None:
    """The folder with initdb, pg_ctl and postgres: ``TASKRELAY_TEST_PG_BINDIR``, else the
    newest ``/usr/lib/postgresql/<version>/bin`` (Debian, Ubuntu), else the ``PATH``."""
    candidates = [os.environ.get("TASKRELAY_TEST_PG_BINDIR", "")]
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0,
        reverse=True,
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    for candidate in candidates:
        if candidate and all((Path(candidate) / b).is_file() for b in ("initdb", "pg_ctl")):
            return Path(candidate)
    return None


class PrivatePostgres:
    """A PostgreSQL server of the test's own (``initdb`` into a temporary folder), which a test
    may stop and start again at will, unlike the shared one other tests use.

    It listens on 127.0.0.1 only, on one port for its whole life (below the ephemeral range, so
    no outgoing connection holds it while the server is down), with its Unix socket in its own
    folder, trust authentication for the ``postgres`` role, and ``fsync=off`` for speed: a
    stopped server, even one stopped with ``immediate`` (a crash), loses no committed
    transaction that way, only a crash of the machine would. PostgreSQL refuses to run as root,
    so when the tests run as root the server runs as the ``postgres`` OS user.
    :meth:`unavailable` says why none can be run here (or None).
    """

    def __init__(self) -> None:
        reason = self.unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        bindir = _postgres_bindir()
        assert bindir is not None
        self.bindir = bindir
        self._as_user: list[str] = []
        self.directory = Path(tempfile.mkdtemp(prefix="taskrelay-pg-"))
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.directory, account.pw_uid, account.pw_gid)
            if shutil.which("runuser"):
                self._as_user = ["runuser", "-u", "postgres", "--"]
            else:
                self._as_user = [
                    "setpriv",
                    f"--reuid={account.pw_uid}",
                    f"--regid={account.pw_gid}",
                    "--init-groups",
                ]
        self.data = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.port = self._pick_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )
            self.start()
        except BaseException:
            self.destroy()
            raise

    @staticmethod
    def unavailable() -> str | None:
        """Why no private server can run here, or None when one can."""
        if _postgres_bindir() is None:
            return (
                "no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin, "
                "on the PATH or in TASKRELAY_TEST_PG_BINDIR"
            )
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no 'postgres' OS user to run PostgreSQL as"
            if not (shutil.which("runuser") or shutil.which("setpriv")):
                return "running as root and neither runuser nor setpriv is available"
        return None

    @staticmethod
    def _pick_port() -> int:
        for _ in range(100):
            port = random.randint(20_000, 32_000)
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        raise RuntimeError("no free port for PostgreSQL")

    def _run(self, binary: str, *args: str, timeout: float = 60.0) -> None:
        command = [*self._as_user, str(self.bindir / binary), *args]
        done = subprocess.run(
            command,
            cwd=self.directory,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(f"{binary} {args[-1]} failed ({done.returncode}):\n{output}")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def start(self) -> None:
        """Start the server; returns once it accepts connections."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.directory} -c fsync=off "
            "-c shared_buffers=16MB -c max_connections=60"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (sessions are ended, open transactions roll back) or
        ``immediate`` (the processes are killed at once, as in a crash; the next start
        recovers from the WAL). Returns once it is down."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def destroy(self) -> None:
        """Stop the server if it runs and delete its files."""
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def serving_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    """A server-side TLS context presenting :func:`certificate`."""
    key, cert = certificate
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    return served
