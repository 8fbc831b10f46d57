"""The supervisor of ``taskrelay serve --workers N``: uvicorn's, with one change at shutdown."""

from __future__ import annotations

from uvicorn.supervisors import Multiprocess


class Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes, which also closes its own copy of the
    listening socket when it stops them. Each worker closes its copy as soon as it is told to
    stop; the parent's kept the kernel accepting connections that no process would take, each
    reset once the workers had drained (a callback lost, for a provider that does not retry).
    Closed, new connections are refused at once, which a load balancer retries elsewhere."""

    def terminate_all(self) -> None:
        for listening in self.sockets:
            listening.close()
        super().terminate_all()
