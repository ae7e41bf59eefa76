"""Public answers are kept, bounded, only while the process hears of every write, and never across
a write; each has an ETag that `If-None-Match` is compared with."""

import re

import pytest

from catalog.public_cache import Answer, PublicCache

Q = ("/courses", b"")


def page(body: bytes) -> Answer:
    return Answer.digested(body, "public, max-age=2")


def listening_cache(seconds: float = 2.0, *, max_bytes: int = 1 << 20) -> PublicCache:
    cache = PublicCache(seconds, max_bytes=max_bytes)
    cache.listening = True
    return cache


def test_a_write_empties_it_and_an_answer_read_across_the_write_is_not_kept() -> None:
    cache = listening_cache()
    cache.put(Q, page(b"before"), cache.generation)
    read_at = cache.generation  # a request starts its query...
    cache.clear()  # ...a write commits meanwhile...
    cache.put(Q, page(b"stale"), read_at)  # ...and the answer it read would be stale
    assert cache.get(Q) is None
    cache.put(Q, page(b"fresh"), cache.generation)
    assert cache.get(Q) == page(b"fresh")


def test_nothing_is_kept_while_it_does_not_hear_of_every_write() -> None:
    cache = PublicCache(2.0)
    cache.put(Q, page(b"before it listens"), cache.generation)
    assert cache.get(Q) is None

    cache.listening = True
    cache.put(Q, page(b"kept"), cache.generation)
    read_at = cache.generation
    cache.listening = False  # the connection is lost: a write may go unheard from now on
    assert cache.get(Q) is None
    cache.put(Q, page(b"read before it was lost"), read_at)
    cache.put(Q, page(b"read after"), cache.generation)
    assert cache.get(Q) is None

    cache.listening = True  # heard again: what was read while deaf is not kept either
    cache.put(Q, page(b"read while deaf"), read_at)
    assert cache.get(Q) is None


def test_it_holds_at_most_its_bytes_dropping_the_least_recently_used() -> None:
    cache = listening_cache(max_bytes=8)
    for name in ("a", "b"):
        cache.put((f"/{name}", b""), page(b"four"), cache.generation)
    assert cache.get(("/a", b"")) is not None  # used: b is now the least recently used
    cache.put(("/c", b""), page(b"four"), cache.generation)
    assert [cache.get((f"/{name}", b"")) is not None for name in ("a", "b", "c")] == [True, False, True]
    cache.put(("/a", b""), page(b"replaced"), cache.generation)  # 8 bytes: it alone fits
    assert [cache.get((f"/{name}", b"")) is not None for name in ("a", "b", "c")] == [True, False, False]


def test_zero_seconds_keeps_nothing() -> None:
    cache = listening_cache(0.0)
    assert not cache.enabled
    assert cache.cache_control == "no-cache"
    cache.put(Q, page(b"page"), cache.generation)
    assert cache.get(Q) is None


def test_a_pages_etag_is_a_digest_of_its_bytes() -> None:
    assert page(b"one").etag == page(b"one").etag != page(b"two").etag
    assert re.fullmatch(r'"[0-9a-f]{32}"', page(b"one").etag)


@pytest.mark.parametrize(
    ("if_none_match", "matches"),
    [
        (None, False),
        ("{etag}", True),
        ('"other", {etag}', True),
        ("W/{etag}", True),  # If-None-Match compares weakly (RFC 9110 13.1.2)
        ("*", True),
        ('"other"', False),
        ('"x", ' * 2000 + "{etag}", False),  # too long to compare: answered in full
        ("", False),
    ],
)
def test_if_none_match_names_the_answer_by_its_etag_or_any(if_none_match: str | None, matches: bool) -> None:
    answer = page(b"[]")
    header = None if if_none_match is None else if_none_match.format(etag=answer.etag)

    assert answer.matches(header) is matches
    response = answer.response(header)
    assert response.status_code == (304 if matches else 200)
    assert response.body == (b"" if matches else b"[]")
    assert (response.headers["etag"], response.headers["cache-control"]) == (answer.etag, "public, max-age=2")
