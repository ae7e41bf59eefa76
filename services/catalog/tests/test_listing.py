"""Pages of the published course list are kept for a while, bounded, and never across a write."""

from catalog.listing import PageCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_page_is_kept_for_its_seconds() -> None:
    clock = Clock()
    cache = PageCache(2.0, clock=clock)
    cache.put("q", b"page", cache.generation)
    clock.now += 1.9
    assert cache.get("q") == b"page"
    clock.now += 0.1
    assert cache.get("q") is None


def test_a_write_empties_it_and_a_page_read_across_the_write_is_not_kept() -> None:
    cache = PageCache(2.0, clock=Clock())
    cache.put("q", b"before", cache.generation)
    read_at = cache.generation  # a request starts its query...
    cache.clear()  # ...a write commits meanwhile...
    cache.put("q", b"stale", read_at)  # ...and the page it read would be stale
    assert cache.get("q") is None
    cache.put("q", b"fresh", cache.generation)
    assert cache.get("q") == b"fresh"


def test_it_holds_at_most_its_entries_dropping_the_oldest() -> None:
    cache = PageCache(2.0, entries=2, clock=Clock())
    for key in ("a", "b", "c"):
        cache.put(key, key.encode(), cache.generation)
    assert [cache.get(key) for key in ("a", "b", "c")] == [None, b"b", b"c"]


def test_zero_seconds_keeps_nothing() -> None:
    cache = PageCache(0.0, clock=Clock())
    assert not cache.enabled
    cache.put("q", b"page", cache.generation)
    assert cache.get("q") is None
