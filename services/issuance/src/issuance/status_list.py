"""W3C Bitstring Status List v1.0: the revocation list credentials point into.

A list is a bitstring, index 0 being the most significant bit of the first byte, published
GZIP-compressed, base64url-encoded (no padding) with the multibase prefix "u" as the
``encodedList`` of an (unsigned here) ``BitstringStatusListCredential``.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import re
import zlib
from datetime import UTC, datetime
from typing import Any, Final

from .jsonld import VC_V2

MIN_LIST_SIZE: Final = 131_072  # bits (16 KiB): the spec's minimum, for herd privacy
# A foreign list is decompressed before use: refuse more than 16 MiB (134 million entries, a
# thousand times the minimum), so a few KB of crafted GZIP cannot take the memory.
MAX_DECODED_BYTES: Final = 16 * 1024 * 1024
PURPOSES: Final = frozenset({"revocation", "suspension", "refresh"})  # "message" needs more fields
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def encode_list(bits: bytes | bytearray) -> str:
    """The ``encodedList`` form of a bitstring of at least ``MIN_LIST_SIZE`` bits (deterministic:
    the GZIP header carries no time)."""
    if len(bits) * 8 < MIN_LIST_SIZE:
        raise ValueError(f"a status list has at least {MIN_LIST_SIZE} bits, got {len(bits) * 8}")
    compressed = gzip.compress(bits, mtime=0)
    return "u" + base64.urlsafe_b64encode(compressed).rstrip(b"=").decode()


def decode_list(encoded: str) -> bytes:
    """The bitstring of an ``encodedList``. Raises ``ValueError`` for anything that is not
    multibase base64url of a single GZIP member, or that decompresses beyond
    ``MAX_DECODED_BYTES``."""
    if not encoded.startswith("u") or not _BASE64URL.fullmatch(encoded[1:].rstrip("=")):
        raise ValueError("an encodedList is 'u' + base64url (multibase)")
    body = encoded[1:].rstrip("=")
    try:
        compressed = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except binascii.Error as error:
        raise ValueError(f"an encodedList is 'u' + base64url: {error}") from None
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # GZIP framing
    try:
        bits = decompressor.decompress(compressed, MAX_DECODED_BYTES + 1)
    except zlib.error as error:
        raise ValueError(f"the status list is not GZIP data: {error}") from None
    if len(bits) > MAX_DECODED_BYTES:
        raise ValueError(f"the status list decompresses to more than {MAX_DECODED_BYTES} bytes")
    if not decompressor.eof or decompressor.unused_data:
        raise ValueError("the status list is not exactly one complete GZIP member")
    return bits


def get_bit(bits: bytes | bytearray, index: int) -> bool:
    """Whether entry ``index`` is set. Raises ``IndexError`` outside the list."""
    _check_index(bits, index)
    return bool(bits[index // 8] & (0x80 >> (index % 8)))


def set_bit(bits: bytearray, index: int, value: bool) -> None:
    """Set or clear entry ``index`` in place. Raises ``IndexError`` outside the list."""
    _check_index(bits, index)
    if value:
        bits[index // 8] |= 0x80 >> (index % 8)
    else:
        bits[index // 8] &= ~(0x80 >> (index % 8)) & 0xFF


def status_list_credential(
    list_url: str, purpose: str, bits: bytes | bytearray, issuer: str, valid_from: datetime
) -> dict[str, Any]:
    """The unsigned ``BitstringStatusListCredential`` published at ``list_url`` (sign it with
    ``proofs.sign``). ``valid_from`` must be timezone-aware."""
    _check_purpose(purpose)
    if valid_from.tzinfo is None:
        raise ValueError("valid_from must be timezone-aware")
    return {
        "@context": [VC_V2],
        "id": list_url,
        "type": ["VerifiableCredential", "BitstringStatusListCredential"],
        "issuer": issuer,
        "validFrom": valid_from.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "credentialSubject": {
            "id": f"{list_url}#list",
            "type": "BitstringStatusList",
            "statusPurpose": purpose,
            "encodedList": encode_list(bits),
        },
    }


def status_entry(list_url: str, index: int, purpose: str) -> dict[str, Any]:
    """The ``credentialStatus`` (a ``BitstringStatusListEntry``) of a credential at ``index``."""
    _check_purpose(purpose)
    if index < 0:
        raise ValueError(f"a status list index is not negative, got {index}")
    return {
        "id": f"{list_url}#{index}",
        "type": "BitstringStatusListEntry",
        "statusPurpose": purpose,
        "statusListIndex": str(index),
        "statusListCredential": list_url,
    }


def _check_index(bits: bytes | bytearray, index: int) -> None:
    # Explicit: a negative index would silently read from the end of the list.
    if not 0 <= index < len(bits) * 8:
        raise IndexError(f"status list index {index} is outside a list of {len(bits) * 8} entries")


def _check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise ValueError(f"status purpose {purpose!r} is not one of {sorted(PURPOSES)}")
