"""The published catalog's answers, kept in each process and dropped on every write.

Browsing the published catalog (the course and pathway lists, one course or one pathway) is most
of the catalog's traffic, and what it shows changes only when staff change a course or pathway.
Each process keeps the answers it gave anonymous callers, ready to send (JSON, ETag, headers), by
the request's path and query, and answers the same request again before routing
(`ServedFromCache`): no dependencies, no SQL, no JSON. Answers to a bearer of a token are never
kept: a token may show more (staff see drafts).

A kept answer is dropped as soon as a write is known to have committed:
- every change of the courses or pathways notifies `catalog_changed` at its commit, whoever made
  it (migrations/004); each process LISTENs on a connection of its own and drops all it keeps on
  each notification, and a process's own writes drop them at once;
- while that connection is not established (starting, PostgreSQL restarting, the network gone, a
  heartbeat unanswered), nothing is kept or answered from the cache, so a notification missed
  meanwhile cannot leave an answer behind;
- an answer read while a write committed is not kept (`generation`).
What remains is the notification's delivery: between another process's commit and its
notification reaching this one, this one may still answer as before the commit. Nothing expires
otherwise: a clock would add nothing to this, and all concurrent requests for an answer that had
expired would miss together (13% of the samples, with answers kept 2 s, on a loaded machine).
COURSE_LIST_CACHE_SECONDS is what clients and shared caches are told (`Cache-Control: max-age`);
0 keeps nothing anywhere.

Every answer has an `ETag` (a list's: a digest of its bytes; one item's: its version): a client
that sends it back in `If-None-Match` is answered `304 Not Modified`, without the body, while the
answer is the same.
"""

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Self

import asyncpg
from fastapi import Depends, Header, Request, Response
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from microcred_runtime import Runtime, Viewer

log = logging.getLogger(__name__)

CHANNEL = "catalog_changed"  # migrations/004_change_notifications.sql
_MAX_IF_NONE_MATCH = 8192  # characters of If-None-Match compared at most
# Bounded: every distinct query is a key, and anyone can send those.
_MAX_BYTES = 32 * 1024 * 1024
# How often the listening connection must answer, and how long it may take (a loaded machine is
# slow, a lost connection never answers), before it counts as lost; the pause before the next one.
_HEARTBEAT_SECONDS = 1.0
_HEARTBEAT_TIMEOUT_SECONDS = 3.0
_RECONNECT_SECONDS = 1.0
_CONNECT_SECONDS = 10.0
_LOST = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

Target = tuple[str, bytes]
"""What a kept answer answers: a GET's path and raw query string."""


def target(scope: Scope) -> Target:
    return scope["path"], scope["query_string"]


def version_tag(version: int) -> str:
    """One course's or pathway's `ETag`: its version."""
    return f'"{version}"'


@dataclass(frozen=True)
class Answer:
    """An answer's JSON, ready to send, its strong `ETag` and its `Cache-Control` (if any)."""

    body: bytes
    etag: str
    cache_control: str | None = None

    @classmethod
    def digested(cls, body: bytes, cache_control: str) -> Self:
        """A page of a list, tagged with a digest of its bytes."""
        return cls(body, f'"{hashlib.sha256(body).hexdigest()[:32]}"', cache_control)

    def matches(self, if_none_match: str | None) -> bool:
        """Whether `If-None-Match` names this answer (RFC 9110 13.1.2: weak comparison, or `*`)."""
        # One over-long is answered in full rather than refused: a client may collect many tags.
        if if_none_match is None or len(if_none_match) > _MAX_IF_NONE_MATCH:
            return False
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or self.etag in tags

    def response(self, if_none_match: str | None) -> Response:
        """The answer in full, or `304 Not Modified` when `If-None-Match` names it."""
        headers = {"ETag": self.etag}
        if self.cache_control is not None:
            headers["Cache-Control"] = self.cache_control
        if self.matches(if_none_match):
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type="application/json", headers=headers)


class PublicCache:
    """Answers by target, at most `max_bytes` of them (the least recently used out first), and
    only while `listening`; `seconds` is how long clients may keep the lists (0: none is kept)."""

    def __init__(self, seconds: float, *, max_bytes: int = _MAX_BYTES) -> None:
        self.seconds = seconds
        self._max_bytes = max_bytes
        self._answers: OrderedDict[Target, Answer] = OrderedDict()
        self._bytes = 0
        self._generation = 0
        self._listening = False

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    @property
    def cache_control(self) -> str:
        """What the published lists tell clients and shared caches."""
        return f"public, max-age={int(self.seconds)}" if self.enabled else "no-cache"

    @property
    def generation(self) -> int:
        """Read before querying, handed to `put`: an answer read across a write is not kept."""
        return self._generation

    @property
    def listening(self) -> bool:
        return self._listening

    @listening.setter
    def listening(self, listening: bool) -> None:
        """Whether this process hears of every write now; either way, what it kept goes."""
        self._listening = listening
        self.clear()

    def get(self, key: Target) -> Answer | None:
        answer = self._answers.get(key)
        if answer is not None:
            self._answers.move_to_end(key)
        return answer

    def put(self, key: Target, answer: Answer, generation: int) -> None:
        if not (self.enabled and self._listening) or generation != self._generation:
            return
        self._drop(key)
        self._answers[key] = answer
        self._bytes += len(answer.body)
        while self._bytes > self._max_bytes:
            self._drop(next(iter(self._answers)))

    def clear(self) -> None:
        self._answers.clear()
        self._bytes = 0
        self._generation += 1

    def _drop(self, key: Target) -> None:
        answer = self._answers.pop(key, None)
        if answer is not None:
            self._bytes -= len(answer.body)

    @contextlib.asynccontextmanager
    async def invalidated_by_writes(self, runtime: Runtime[Any]) -> AsyncIterator[None]:
        """Listen for the catalog's changes while the service runs (a `Service` background work);
        the first LISTEN is part of the start, so a ready service keeps answers."""
        if not self.enabled:
            yield
            return
        dsn = str(runtime.settings.database_url)
        listening = asyncio.create_task(self._listen(dsn, await self._connect(dsn)), name=CHANNEL)
        try:
            yield
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening

    async def _connect(self, dsn: str) -> asyncpg.Connection:
        # Named, so that pg_stat_activity tells it from the pool's connections.
        conn = await asyncpg.connect(
            dsn, timeout=_CONNECT_SECONDS, server_settings={"application_name": CHANNEL}
        )
        try:
            conn.add_termination_listener(self._lost)
            await conn.add_listener(CHANNEL, self._changed)
        except BaseException:
            conn.terminate()
            raise
        self.listening = True
        return conn

    async def _listen(self, dsn: str, conn: asyncpg.Connection | None) -> None:
        """Heartbeats on the listening connection; a new one when it is lost."""
        while True:
            try:
                if conn is None:
                    conn = await self._connect(dsn)
                while True:
                    await asyncio.sleep(_HEARTBEAT_SECONDS)
                    await conn.fetchval("SELECT 1", timeout=_HEARTBEAT_TIMEOUT_SECONDS)
            except _LOST as exc:
                log.warning("the catalog's changes are not heard, so no answer is kept: %s", exc)
            except Exception:
                # Listening must outlive any surprise: without it, nothing is kept.
                log.exception("listening for the catalog's changes failed; starting it again")
            finally:
                self.listening = False
                if conn is not None:
                    conn.remove_termination_listener(self._lost)
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=_HEARTBEAT_SECONDS)
                conn = None
            await asyncio.sleep(_RECONNECT_SECONDS)

    def _changed(self, *_: object) -> None:
        self.clear()

    def _lost(self, *_: object) -> None:
        self.listening = False


class ServedFromCache:
    """Pure ASGI middleware, inside the runtime's (CORS, metrics) and before routing: answers a
    GET without credentials that the cache holds an answer for."""

    def __init__(self, app: ASGIApp, *, cache: PublicCache) -> None:
        self.app = app
        self.cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            answer = self.cache.get(target(scope))
            if answer is not None:
                headers = Headers(scope=scope)
                if "authorization" not in headers:
                    await answer.response(headers.get("if-none-match"))(scope, receive, send)
                    return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class Reading:
    """One GET of the catalog. Its answer is kept when the caller sent no token: a token may show
    more (staff see drafts)."""

    cache: PublicCache
    target: Target
    anonymous: bool
    if_none_match: str | None
    generation: int  # read before the query (see `PublicCache.generation`)

    def page(self, page: BaseModel, *, private: bool) -> Response:
        """A page of a list; a `private` one (a staff listing of what the public does not see) is
        the caller's alone, asked again each time (with its ETag: maybe a 304)."""
        cache_control = "private, no-cache" if private else self.cache.cache_control
        return self._answer(Answer.digested(page.model_dump_json().encode(), cache_control))

    def item(self, item: BaseModel, version: int) -> Response:
        return self._answer(Answer(item.model_dump_json().encode(), version_tag(version)))

    def _answer(self, answer: Answer) -> Response:
        if self.anonymous:
            self.cache.put(self.target, answer, self.generation)
        return answer.response(self.if_none_match)


async def _public_cache(request: Request) -> PublicCache:
    cache: PublicCache = request.app.state.public_cache
    return cache


Cache = Annotated[PublicCache, Depends(_public_cache)]


async def _reading(
    request: Request,
    viewer: Viewer,
    cache: Cache,
    if_none_match: Annotated[
        str | None,
        Header(description="The `ETag` of the answer you hold: `304 Not Modified` while it is the same."),
    ] = None,
) -> Reading:
    return Reading(cache, target(request.scope), viewer is None, if_none_match, cache.generation)


Read = Annotated[Reading, Depends(_reading)]
