"""The public course list, kept for a moment in each process.

Browsing the published catalog is most of the catalog's traffic, and what it shows changes only
when staff publish, update or retire a course. Each process keeps the pages it rendered (the
JSON, ready to send) for `COURSE_LIST_CACHE_SECONDS`: its own writes empty it at once, another
replica's are seen within that time, the staleness `Cache-Control: max-age` announces anyway.
Staff listings of drafts and retired courses are never kept.

Every page carries an `ETag` (a digest of its bytes): a client that sends it back in
`If-None-Match` is answered `304 Not Modified`, without the body, while the page is the same.
"""

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Annotated, Self

from fastapi import Depends, Request

from microcred_runtime import RuntimeDep

_MAX_IF_NONE_MATCH = 8192  # characters of If-None-Match compared at most


@dataclass(frozen=True)
class Rendered:
    """A page's JSON, ready to send, and its strong `ETag`."""

    body: bytes
    etag: str

    @classmethod
    def of(cls, body: bytes) -> Self:
        return cls(body, f'"{hashlib.sha256(body).hexdigest()[:32]}"')

    def matches(self, if_none_match: str | None) -> bool:
        """Whether `If-None-Match` names this page (RFC 9110 13.1.2: weak comparison, or `*`)."""
        # One over-long is answered in full rather than refused: a client may collect many tags.
        if if_none_match is None or len(if_none_match) > _MAX_IF_NONE_MATCH:
            return False
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or self.etag in tags


class PageCache:
    """Rendered pages by query, each kept `seconds`; at most `entries` of them (oldest out first)."""

    def __init__(
        self, seconds: float, *, entries: int = 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.seconds = seconds
        self._entries = entries
        self._clock = clock
        self._pages: OrderedDict[Hashable, tuple[float, Rendered]] = OrderedDict()
        self._generation = 0

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    @property
    def generation(self) -> int:
        """Read before querying, handed to `put`: a page read across a write is not kept."""
        return self._generation

    def get(self, key: Hashable) -> Rendered | None:
        entry = self._pages.get(key)
        if entry is None:
            return None
        expires, page = entry
        if self._clock() >= expires:
            del self._pages[key]
            return None
        return page

    def put(self, key: Hashable, page: Rendered, generation: int) -> None:
        if not self.enabled or generation != self._generation:
            return
        self._pages[key] = (self._clock() + self.seconds, page)
        self._pages.move_to_end(key)
        # Bounded: every distinct search text is a key, and anyone can send those.
        while len(self._pages) > self._entries:
            self._pages.popitem(last=False)

    def clear(self) -> None:
        self._pages.clear()
        self._generation += 1


def _page_cache(request: Request, runtime: RuntimeDep) -> PageCache:
    # One per application (tests run several in one process), made on first use.
    state = request.app.state
    if not hasattr(state, "course_pages"):
        state.course_pages = PageCache(runtime.settings.course_list_cache_seconds)
    cache: PageCache = state.course_pages
    return cache


Pages = Annotated[PageCache, Depends(_page_cache)]
