from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, Field

from microcred_runtime import Problem
from microcred_runtime.problems import PROBLEM_JSON, install_problem_handlers


class Enrolment(BaseModel):
    course_id: str
    seats: int = Field(ge=1)


def app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/courses/{course_id}/enrollments")
    async def enroll(course_id: str, body: Enrolment) -> dict[str, str]:
        raise Problem(409, "already-enrolled", f"already enrolled in {course_id}", enrollment_id="e-1")

    @app.get("/me")
    async def me() -> None:
        raise Problem(
            401, "unauthenticated", "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # The app still raises the unexpected error after answering; the test wants the answer.
    transport = httpx.ASGITransport(app=app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


async def test_a_problem_raised_by_a_use_case_becomes_its_problem_document(client: httpx.AsyncClient) -> None:
    response = await client.post("/courses/c-1/enrollments", json={"course_id": "c-1", "seats": 1})

    assert problem(response, 409) == {
        "type": "urn:microcred:problem:already-enrolled",
        "title": "Conflict",
        "status": 409,
        "detail": "already enrolled in c-1",
        "instance": "/courses/c-1/enrollments",
        "enrollment_id": "e-1",
    }


async def test_a_problem_can_carry_response_headers(client: httpx.AsyncClient) -> None:
    response = await client.get("/me")

    assert problem(response, 401)["type"] == "urn:microcred:problem:unauthenticated"
    assert response.headers["www-authenticate"] == "Bearer"
    assert "headers" not in response.json()


async def test_an_unknown_route_is_a_404_problem(client: httpx.AsyncClient) -> None:
    body = problem(await client.get("/nowhere"), 404)

    assert body["type"] == "about:blank"
    assert body["title"] == "Not Found"
    assert body["instance"] == "/nowhere"


async def test_a_wrong_method_is_a_405_problem_that_keeps_the_allow_header(client: httpx.AsyncClient) -> None:
    response = await client.get("/courses/c-1/enrollments")

    problem(response, 405)
    assert response.headers["allow"] == "POST"


async def test_an_invalid_body_is_a_422_problem_listing_each_error(client: httpx.AsyncClient) -> None:
    response = await client.post("/courses/c-1/enrollments", json={"seats": 0})

    body = problem(response, 422)
    assert body["type"] == "urn:microcred:problem:invalid-request"
    assert body["instance"] == "/courses/c-1/enrollments"
    assert sorted((tuple(e["location"]), e["type"]) for e in body["errors"]) == [
        (("body", "course_id"), "missing"),
        (("body", "seats"), "greater_than_equal"),
    ]
    assert all(e["message"] for e in body["errors"])


async def test_a_body_that_is_not_json_is_a_422_problem_not_a_500(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/courses/c-1/enrollments", content=b"{", headers={"content-type": "application/json"}
    )

    assert problem(response, 422)["errors"]


async def test_an_unexpected_error_is_a_500_problem_that_reveals_nothing(client: httpx.AsyncClient) -> None:
    body = problem(await client.get("/boom"), 500)

    assert body["detail"] == "An unexpected error occurred."
    assert body["instance"] == "/boom"
    assert "a bug" not in str(body)
