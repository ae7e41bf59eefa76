"""One address in front of a service's replicas, as a Kubernetes Service is in front of its pods:
requests go round-robin to the replicas that run, and one that refuses the connection (killed)
or says it is still starting (503 `starting`: a Service routes only to ready pods) is skipped for
the next. A request cut off half-way is answered 502, as a real proxy would: the caller retries
it (the APIs the workload calls are idempotent on retry).

Callers that do their own retries take `next_url()` and talk to a replica directly (no hop);
whoever cannot (the payment provider's webhook) is given the address of a `Balancer` app.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .processes import Process

# Not forwarded: they describe one connection, not the request.
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip
# The problem type of a service's routes while its start waits (microcred_runtime.service).
_STARTING = b"urn:microcred:problem:starting"


class Replicas:
    """The replicas of one service; `next_url()` names a running one, round-robin."""

    def __init__(self, name: str, processes: Sequence[Process]) -> None:
        self.name = name
        self.processes = list(processes)
        self._turn = itertools.count()

    def next_url(self) -> str:
        running = [process for process in self.processes if process.running and not process.held_down]
        chosen = running or self.processes  # none runs: the caller's retry meets the refusal
        return chosen[next(self._turn) % len(chosen)].url


class Balancer:
    """An ASGI app forwarding every request to one of the replicas."""

    def __init__(self, replicas: Replicas, timeout: float = 30.0) -> None:
        self.replicas = replicas
        self._client = httpx.AsyncClient(timeout=timeout)

    def app(self) -> Starlette:
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        return Starlette(routes=[Route("/{path:path}", self._forward, methods=methods)])

    async def _forward(self, request: Request) -> Response:
        body = await request.body()
        headers = {name: value for name, value in request.headers.items() if name not in _HOP_BY_HOP}
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        for _ in self.replicas.processes:
            try:
                answer = await self._client.request(
                    request.method, self.replicas.next_url() + target, content=body, headers=headers
                )
            except httpx.ConnectError:
                continue  # not listening: the next replica
            except httpx.HTTPError as exc:
                return Response(f"{self.replicas.name}: {type(exc).__name__}", status_code=502)
            if answer.status_code == 503 and _STARTING in answer.content:
                continue  # listening, not started yet: the next replica
            kept = {name: value for name, value in answer.headers.items() if name not in _HOP_BY_HOP}
            kept.pop("content-encoding", None)  # httpx has decoded the body
            return Response(answer.content, status_code=answer.status_code, headers=kept)
        return Response(f"{self.replicas.name}: no replica answers", status_code=503)

    async def close(self) -> None:
        await self._client.aclose()
