"""Every operation of every service, fed generated requests: never a 5xx, always what it documents.

Schemathesis reads each service's own OpenAPI document and generates requests for every
operation, both valid ones (positive) and ones that break the schema (negative), sent with an
admin's or a learner's bearer token. Each answer must pass four checks: not a server error, a
documented status code, a documented content type, and a body matching the documented schema.

The service runs in this process with its whole lifespan (PostgreSQL, Kafka, relay, consumers),
served by uvicorn on a loopback port; Hypothesis runs in a worker thread, because the requests it
makes are blocking and the service answers on the test's event loop.

The CI form is small and reproducible: `ABUSE_EXAMPLES` examples per operation and mode (20 by
default), derandomized. The long form, e.g.

    ABUSE_EXAMPLES=500 .venv/bin/pytest tests/integration/abuse/test_schemathesis.py

draws more (and still the same ones on every run; set `ABUSE_SEED` for other ones).
"""

import asyncio
import os
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import PROBLEM_JSON, SERVICES, Platform, on_loopback

EXAMPLES = int(os.environ.get("ABUSE_EXAMPLES", "20"))
SEED = os.environ.get("ABUSE_SEED")
pytestmark = [
    # Schemathesis' own strategies draw from `random`; not ours to change.
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
    # The long form takes longer than the suite's default of 300 s per test.
    pytest.mark.timeout(300 + 10 * EXAMPLES),
]
UNPARSEABLE_BODY = "There was an error parsing the body"
CHECKS: list[Callable[..., Any]] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _settings() -> hypothesis.settings:
    return hypothesis.settings(
        max_examples=EXAMPLES,
        derandomize=SEED is None,
        deadline=None,
        database=None,
        # No shrinking: it would replay a failing request many times; the report names the case.
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
        print_blob=False,
    )


def _exercise(schema: Any, base_url: str, identities: list[dict[str, str]]) -> list[str]:
    """Run every operation of `schema` against `base_url`; one message per operation that failed."""
    failures: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                drawn = st.tuples(operation.as_strategy(generation_mode=mode), st.sampled_from(identities))

                @_settings()
                @hypothesis.given(drawn)
                def check(case_and_identity: tuple[Any, dict[str, str]]) -> None:
                    case, identity = case_and_identity
                    # Schemathesis adds its own headers to the dict it is given: a copy each time.
                    response = case.call(
                        base_url=base_url, session=session, headers=dict(identity), timeout=30
                    )
                    case.validate_response(
                        response,
                        checks=CHECKS,
                        headers=dict(identity),
                        transport_kwargs={"base_url": base_url, "session": session},
                    )

                if SEED is not None:
                    check = hypothesis.seed(int(SEED))(check)
                try:
                    check()
                except hypothesis.errors.Unsatisfiable:
                    continue  # nothing to break: the operation takes no parameters and no body
                except (Exception, BaseExceptionGroup) as exc:  # schemathesis reports a FailureGroup
                    failures.append(f"{operation.label} ({mode}): {exc}")
    return failures


@pytest.mark.parametrize("service", SERVICES)
async def test_every_operation_answers_what_its_openapi_documents(platform: Platform, service: str) -> None:
    app = platform.apps[service]
    schema = schemathesis.openapi.from_dict(app.openapi())
    identities = [platform.admin(), platform.learner("fuzzy")]
    async with on_loopback(app) as port:
        failures = await asyncio.to_thread(_exercise, schema, f"http://127.0.0.1:{port}", identities)
    assert not failures, f"{len(failures)} operation(s) of {service} broke their contract:\n\n" + "\n\n".join(
        failures
    )


# One operation with a JSON body per service, and who may call it.
BODY_OPERATIONS: dict[str, tuple[str, str, str]] = {
    "catalog": ("POST", "/courses", "/courses"),
    "enrollment": (
        "POST",
        "/enrollments/{enrollment_id}/cancellation",
        f"/enrollments/{uuid.uuid4()}/cancellation",
    ),
    "billing": ("POST", "/payments/{payment_id}/refunds", f"/payments/{uuid.uuid4()}/refunds"),
    "issuance": (
        "POST",
        "/credentials/{credential_id}/revocation",
        f"/credentials/{uuid.uuid4()}/revocation",
    ),
    "notifications": ("PUT", "/me/preferences", "/me/preferences"),
}
NOT_UTF8_JSON = b'{"title": "\xff\xfe"}'  # JSON to look at, but not UTF-8


async def _not_json(platform: Platform, service: str) -> httpx.Response:
    method, _, path = BODY_OPERATIONS[service]
    headers = {**platform.admin(), "content-type": "application/json"}
    return await platform.clients[service].request(method, path, content=NOT_UTF8_JSON, headers=headers)


@pytest.mark.parametrize("service", SERVICES)
async def test_a_body_that_is_not_json_is_a_client_error(platform: Platform, service: str) -> None:
    response = await _not_json(platform, service)

    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["detail"] == UNPARSEABLE_BODY


@pytest.mark.parametrize("service", SERVICES)
async def test_a_body_that_is_not_json_gets_a_documented_answer(platform: Platform, service: str) -> None:
    method, template, _ = BODY_OPERATIONS[service]
    response = await _not_json(platform, service)
    documented = platform.apps[service].openapi()["paths"][template][method.lower()]["responses"]

    assert str(response.status_code) in documented, f"{response.status_code} not in {sorted(documented)}"
