"""Cursor pagination, the same in every service: `?limit=&cursor=` in, `{items, next_cursor}` out.

The cursor is opaque to clients: the sort key of the last item returned, base64url-encoded JSON.
Keyset pagination stays fast and stable while rows are added, unlike offsets.
"""

import base64
import binascii
import json
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, Field

from .problems import Problem

T = TypeVar("T")

MAX_PAGE_SIZE = 100

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Items per page.")]
Cursor = Annotated[
    str | None,
    Query(max_length=512, description="The `next_cursor` of the previous page; omit it for the first page."),
]


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page.", examples=[None]
    )


def encode_cursor(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key, default=str, separators=(",", ":")).encode()).decode()


def decode_cursor(cursor: str | None, arity: int) -> list[Any] | None:
    """The sort key a cursor carries; a 400 problem when it was not made by `encode_cursor`."""
    if cursor is None:
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        key = None
    if not isinstance(key, list) or len(key) != arity:
        raise Problem(400, "invalid-cursor", "the cursor is not one this API returned")
    return key
