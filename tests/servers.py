"""Run a real TaskRelay process (``taskrelay serve``) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    def __init__(self, environ: Mapping[str, str], *args: str, log_path: Path) -> None:
        self.port = free_port()
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
        self.port = free_port()
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
