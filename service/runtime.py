"""The resources one TaskRelay process shares, owned by the app's lifespan and handed to
endpoints as typed state (``runtime_of(request)``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from sqlalchemy.engine import Engine
from starlette.requests import Request

from service.auth import ApiClients
from service.errors import ValidationFailed
from service.providers.base import ProviderAdapter
from service.settings import Settings
from service.signing import CallbackSigner
from service.store import Store

if TYPE_CHECKING:
    from service.dispatcher import Dispatcher
    from service.files import ImageFiles
    from service.groupcommit import GroupCommitter
    from service.metrics import Metrics, WorkerMetrics
    from service.netguard import AddressPolicy
    from service.outbox import Outbox
    from service.retention import Pruner
    from service.scheduler import Scheduler
    from service.stream import EventSignal
    from service.submitter import Submitter


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    store: Store
    http: httpx.AsyncClient
    adapters: Mapping[str, ProviderAdapter]
    signer: CallbackSigner
    clients: ApiClients
    files: ImageFiles
    submitter: Submitter
    scheduler: Scheduler
    metrics: Metrics
    outbox: Outbox
    dispatcher: Dispatcher
    event_signal: EventSignal
    address_policy: AddressPolicy
    committer: GroupCommitter
    pruner: Pruner | None = None  # TASKRELAY_RETENTION set
    worker_metrics: WorkerMetrics | None = None  # one of the workers of serve --workers N

    async def check_webhook_url(self, url: str, field: str) -> str:
        """A subscriber URL is http(s) and, resolved, reaches only public addresses (unless
        TASKRELAY_WEBHOOK_ALLOWED_NETWORKS allows more); a clear 400 otherwise."""
        from urllib.parse import urlsplit

        from service.netguard import check_url, resolve_and_check

        try:
            normalised = check_url(url, self.address_policy)
            parts = urlsplit(normalised)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            await resolve_and_check(parts.hostname or "", port, self.address_policy)
        except ValidationFailed as exc:
            detail = {"field": field, "message": exc.message}
            raise ValidationFailed(exc.message, code=exc.code, details=[detail]) from exc
        return normalised

    def callback_url(self, task_id: str, provider: str) -> str:
        return self.signer.callback_url(self.settings.public_url, task_id, provider)

    def require_submittable(self, provider: str) -> ProviderAdapter:
        """The adapter for a provider TaskRelay may submit to (it needs an API key)."""
        adapter = self.adapters[provider]
        if not adapter.settings.configured:
            raise ValidationFailed(
                f"Provider {provider!r} is not configured: set "
                f"TASKRELAY_{provider.upper()}_API_KEY "
                "(or run with TASKRELAY_SANDBOX=true to use the built-in sandbox).",
                code="provider_not_configured",
                details=[{"field": "provider", "message": "no API key configured"}],
            )
        return adapter


def runtime_of(request: Request) -> Runtime:
    runtime = request.app.state.runtime
    assert isinstance(runtime, Runtime)
    return runtime
