"""Fuzzing the HTTP API from its own OpenAPI document (schemathesis), in process, on SQLite.

Every operation in ``/openapi.json`` gets schema-valid (positive) and schema-breaking
(negative) requests, authenticated as a client; each answer must not be a 5xx, and must match
what the document says (status codes, content types, response bodies). Half the generated ids
are swapped for ids that exist (a task, a subscription, a delivery of the client), so the paths
behind a successful lookup are fuzzed too, not only the 404s.

Bounded and repeatable: a fixed number of examples per operation and mode, derandomized (the
same requests on every run), no example database. Runs in well under a minute.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette

from service.app import create_app
from tests.conftest import ALICE, make_settings

# FUZZ_EXAMPLES=500 for a deeper run by hand.
EXAMPLES_PER_MODE = int(os.environ.get("FUZZ_EXAMPLES", "12"))
AUTH = {"Authorization": f"Bearer {ALICE}"}
# A refresh asks the provider, so the provider's refusal or outage is a documented 502/503
# (`upstream_*`); anywhere else, and for any other reason, a 5xx is a bug.
REFRESH = "POST /v1/tasks/{task_id}/refresh"


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    if (
        case.operation.label == REFRESH
        and response.status_code in (502, 503)
        and str(response.json()["error"]["code"]).startswith("upstream_")
    ):
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
PUBLIC_ADDRESS = "93.184.215.14"  # what every subscriber host "resolves" to here (no DNS)


@pytest.fixture
def fuzz_app(
    sqlite_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Starlette]:
    path = tmp_path / "fuzz.db"
    shutil.copyfile(sqlite_template, path)
    settings_ = make_settings(
        f"sqlite:///{path}",
        tmp_path,
        TASKRELAY_SCHEDULER="false",
        TASKRELAY_DISPATCHER="false",  # subscriptions point at public addresses: never sent
        TASKRELAY_RATE_LIMIT="0",  # the limiter has tests of its own; here it would only hide
    )

    async def resolver(host: str, port: int) -> list[str]:
        return [PUBLIC_ADDRESS]

    monkeypatch.setattr("service.netguard.system_resolver", resolver)
    # Submissions and refreshes reach the mounted sandbox in process, as in tests/conftest.py.
    transport = httpx.ASGITransport(app=None)  # type: ignore[arg-type]
    app = create_app(settings_, http_transport=transport)
    transport.app = app
    yield app
    # schemathesis runs the app's lifespan on its own event loop thread; stop it here, not at
    # interpreter exit, so no scheduler or committer outlives this test.
    asgi.shutdown_lifespans()


def seed(app: Starlette) -> dict[str, str]:
    """A task, a subscription and a delivery of the fuzzing client: ids that exist."""
    with asgi.get_client(app) as client:
        task = client.post("/v1/tasks/track", json={"provider": "evolink"}, headers=AUTH).json()
        subscription = client.post(
            "/v1/subscriptions", json={"url": "https://hooks.example.com/taskrelay"}, headers=AUTH
        ).json()
        client.post("/v1/tasks/track", json={"provider": "grsai"}, headers=AUTH)
        deliveries = client.get(
            f"/v1/subscriptions/{subscription['id']}/deliveries", headers=AUTH
        ).json()["data"]
    return {
        "task_id": task["id"],
        "subscription_id": subscription["id"],
        "delivery_id": deliveries[0]["id"],
    }


def use_existing_ids(case: Any, existing: dict[str, str]) -> None:
    """Swap about half the generated ids (deterministically) for ones that exist."""
    parameters = case.path_parameters or {}
    for name, value in existing.items():
        generated = parameters.get(name)
        if isinstance(generated, str) and len(generated) % 2 == 0:
            parameters[name] = value


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
def test_every_operation_holds_to_the_openapi_document(fuzz_app: Starlette) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    schema.config.max_stream_events = 1  # an SSE stream is read up to its first event, then cut
    existing = seed(fuzz_app)
    failures: list[str] = []
    seen: dict[str, Counter[int]] = {}
    # Deletions last, so the other operations still find the ids that exist.
    operations = sorted(
        (result.ok() for result in schema.get_all_operations()),
        key=lambda operation: operation.method.upper() == "DELETE",
    )
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES_PER_MODE,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case: Any) -> None:
                use_existing_ids(case, existing)
                response = case.call(headers=AUTH, timeout=10)
                seen.setdefault(case.operation.label, Counter())[response.status_code] += 1
                case.validate_response(response, checks=CHECKS)

            # Every operation runs even when one fails: one report lists them all.
            try:
                fuzz()
            except Unsatisfiable:  # nothing to break in an operation without any input
                assert mode is GenerationMode.NEGATIVE
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert len(operations) >= 20
    # The answers each operation got (shown with -s): what a deeper run reached.
    print("\n".join(f"{label}: {dict(counts)}" for label, counts in seen.items()))
    assert not failures, "\n\n".join(failures)
