"""The supervisor of ``taskrelay serve --workers N``: uvicorn's, with two changes."""

from __future__ import annotations

from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess


class Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes, which also closes its own copy of the
    listening socket when it stops them. Each worker closes its copy as soon as it is told to
    stop; the parent's kept the kernel accepting connections that no process would take, each
    reset once the workers had drained (a callback lost, for a provider that does not retry).
    Closed, new connections are refused at once, which a load balancer retries elsewhere."""

    def terminate_all(self) -> None:
        # uvicorn calls this once, last, when it stops (restarts stop one process at a time).
        for listening in self.sockets:
            listening.close()
        super().terminate_all()

    @property
    def failed_to_start(self) -> bool:
        """Whether it stopped because a worker failed to start (the app's start-up raised):
        uvicorn's supervisor then returns as after a clean stop."""
        return any(process.exitcode == STARTUP_FAILURE for process in self.processes)
