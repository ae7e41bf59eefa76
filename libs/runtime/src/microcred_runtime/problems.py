"""RFC 9457 problem details for every HTTP error, so clients parse one error shape."""

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .body_limit import BodyTooLarge

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
# RFC 9457's own members; an extension must not overwrite them.
_MEMBERS = frozenset({"type", "title", "status", "detail", "instance"})


class ProblemDetails(BaseModel):
    """An RFC 9457 problem: every error of a microcred API has this shape (`application/problem+json`)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        description="Stable identifier of the kind of problem; branch on this.",
        examples=["urn:microcred:problem:course-not-found"],
    )
    title: str = Field(description="The HTTP status phrase.", examples=["Not Found"])
    status: int = Field(examples=[404])
    detail: str = Field(description="What went wrong, for people.", examples=["no such course"])
    instance: str | None = Field(default=None, description="The path the request was for.")


def problem_doc(description: str) -> dict[str, Any]:
    """An OpenAPI response entry for routes' `responses=`: a problem with this description."""
    return {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": ProblemDetails.model_json_schema()}},
    }


class Problem(Exception):
    """An error a use case reports to the caller; `kind` becomes the problem type URI."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        reserved = _MEMBERS & extensions.keys()
        if reserved:
            raise ValueError(f"problem extensions may not be named {', '.join(sorted(reserved))}")
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.headers = dict(headers or {})
        self.extensions = extensions


def problem_response(
    status: int, detail: str, *, kind: str | None = None, instance: str | None = None, **extensions: Any
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"urn:microcred:problem:{kind}" if kind else "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extensions)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


async def _problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    response = problem_response(
        exc.status, exc.detail, kind=exc.kind, instance=request.url.path, **exc.extensions
    )
    response.headers.update(exc.headers)
    return response


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    response = problem_response(exc.status_code, str(exc.detail), instance=request.url.path)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _too_large(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BodyTooLarge)
    return problem_response(
        413, str(exc.detail), kind="body-too-large", instance=request.url.path, limit=exc.limit
    )


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"location": list(error["loc"]), "message": error["msg"], "type": error["type"]}
        for error in exc.errors()
    ]
    return problem_response(
        422,
        "The request is not valid; see errors.",
        kind="invalid-request",
        instance=request.url.path,
        errors=errors,
    )


async def _unstorable_text(request: Request, exc: Exception) -> JSONResponse:
    # PostgreSQL cannot store some text (a NUL character, say): the input is bad, not the server.
    return problem_response(
        422,
        "The request contains text that cannot be stored (e.g. a NUL character).",
        kind="invalid-text",
        instance=request.url.path,
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return problem_response(500, "An unexpected error occurred.", instance=request.url.path)


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(BodyTooLarge, _too_large)
    app.add_exception_handler(RequestValidationError, _invalid)
    for unstorable in (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError):
        app.add_exception_handler(unstorable, _unstorable_text)
    app.add_exception_handler(Exception, _unexpected)
