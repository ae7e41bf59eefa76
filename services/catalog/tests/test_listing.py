"""Pages of the published course list are kept for a while, bounded, and never across a write;
each has an ETag that `If-None-Match` is compared with."""

import re

import pytest

from catalog.listing import PageCache, Rendered


def page(body: bytes) -> Rendered:
    return Rendered.of(body)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_page_is_kept_for_its_seconds() -> None:
    clock = Clock()
    cache = PageCache(2.0, clock=clock)
    cache.put("q", page(b"page"), cache.generation)
    clock.now += 1.9
    assert cache.get("q") == page(b"page")
    clock.now += 0.1
    assert cache.get("q") is None


def test_a_write_empties_it_and_a_page_read_across_the_write_is_not_kept() -> None:
    cache = PageCache(2.0, clock=Clock())
    cache.put("q", page(b"before"), cache.generation)
    read_at = cache.generation  # a request starts its query...
    cache.clear()  # ...a write commits meanwhile...
    cache.put("q", page(b"stale"), read_at)  # ...and the page it read would be stale
    assert cache.get("q") is None
    cache.put("q", page(b"fresh"), cache.generation)
    assert cache.get("q") == page(b"fresh")


def test_it_holds_at_most_its_entries_dropping_the_oldest() -> None:
    cache = PageCache(2.0, entries=2, clock=Clock())
    for key in ("a", "b", "c"):
        cache.put(key, page(key.encode()), cache.generation)
    assert [cache.get(key) for key in ("a", "b", "c")] == [None, page(b"b"), page(b"c")]


def test_zero_seconds_keeps_nothing() -> None:
    cache = PageCache(0.0, clock=Clock())
    assert not cache.enabled
    cache.put("q", page(b"page"), cache.generation)
    assert cache.get("q") is None


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
def test_if_none_match_names_the_page_by_its_etag_or_any(if_none_match: str | None, matches: bool) -> None:
    rendered = page(b"[]")
    header = None if if_none_match is None else if_none_match.format(etag=rendered.etag)

    assert rendered.matches(header) is matches
