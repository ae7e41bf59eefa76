"""What the HTTP layer decides on its own: reading the `If-Match` precondition."""

import pytest

from catalog.api import if_match_versions


@pytest.mark.parametrize(
    ("header", "versions"),
    [
        (None, None),
        ("*", None),
        ('"3"', frozenset({3})),
        ('"2", "3"', frozenset({2, 3})),
        # Strong comparison: a weak tag never matches; nor does anything that is not one of our tags.
        ('W/"3"', frozenset()),
        ("3", frozenset()),
        ('"three"', frozenset()),
        ('"³"', frozenset()),
    ],
)
async def test_if_match_admits_the_versions_it_names(
    header: str | None, versions: frozenset[int] | None
) -> None:
    assert await if_match_versions(header) == versions
