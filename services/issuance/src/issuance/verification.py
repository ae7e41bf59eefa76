"""Verifying any Open Badges 3.0 / VC 2.0 credential, ours or another issuer's.

Four checks, each reported on its own as passed, failed or unknown, with a reason:
- structure: the members and types VC 2.0 and OB 3.0 require, and only JSON-LD contexts we hold
  (an unknown `@context` fails; it is never fetched);
- signature: the Data Integrity proof (eddsa-rdfc-2022), or the VC-JWT, against the key its
  verification method names, which must belong to the credential's issuer;
- dates: validFrom <= now < validUntil;
- status: every Bitstring Status List entry, and for our own credentials their suspension.

It fails closed: the credential is "valid" only when every check passed; "invalid" when one
failed; otherwise "unknown" (a status list that cannot be fetched, an issuer we may not ask).

It never fetches a URL it was not configured to trust: our own DIDs and status lists are read
locally, `did:key` needs no fetch, and a `did:web` document or a status list of another host is
fetched only over HTTPS from a host in VERIFY_TRUSTED_HOSTS, with a time and size limit and no
redirects. Nothing in the credential (`@context`, issuer, verification method, status URL) can
make the service call anywhere else.
"""

import asyncio
import base64
import binascii
import enum
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import jose, keys, proofs, repository, status_list
from .jsonld import SUPPORTED_CONTEXTS, VC_V2, CanonicalizationError, ContextNotAvailable
from .service import Platform

log = logging.getLogger(__name__)

CRYPTOSUITE = "eddsa-rdfc-2022"
OB_TYPES = frozenset({"OpenBadgeCredential", "AchievementCredential"})
STATUS_ENTRY_TYPE = "BitstringStatusListEntry"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_INDEX = re.compile(r"[0-9]{1,10}")


class Outcome(enum.StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    UNKNOWN = "unknown"


class Verdict(enum.StrEnum):
    VALID = "valid"
    INVALID = "invalid"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Check:
    outcome: Outcome
    detail: str


def passed(detail: str) -> Check:
    return Check(Outcome.PASSED, detail)


def failed(detail: str) -> Check:
    return Check(Outcome.FAILED, detail)


def unknown(detail: str) -> Check:
    return Check(Outcome.UNKNOWN, detail)


def combine(checks: list[Check], *, when_none: Check) -> Check:
    """Several findings of one check: any failure fails it, any unknown leaves it unknown."""
    if not checks:
        return when_none
    for outcome in (Outcome.FAILED, Outcome.UNKNOWN):
        found = [check.detail for check in checks if check.outcome is outcome]
        if found:
            return Check(outcome, "; ".join(found))
    return passed("; ".join(check.detail for check in checks))


@dataclass(frozen=True)
class Report:
    verified: Verdict
    checks: dict[str, Check]
    credential: dict[str, Any] | None = None

    @classmethod
    def of(cls, checks: dict[str, Check], credential: dict[str, Any] | None) -> "Report":
        outcomes = {check.outcome for check in checks.values()}
        if Outcome.FAILED in outcomes:
            verdict = Verdict.INVALID
        elif outcomes == {Outcome.PASSED}:
            verdict = Verdict.VALID
        else:
            verdict = Verdict.UNKNOWN
        return cls(verdict, checks, credential)


class Records(Protocol):
    """What the verifier reads from our own database."""

    async def status_list(self, list_id: UUID) -> tuple[str, bytes] | None:
        """A status list's purpose and bits."""

    async def issuer_known(self, issuer_id: UUID) -> bool: ...

    async def is_suspended(self, credential_id: UUID) -> bool: ...


class Unreachable(Exception):
    """A trusted document could not be fetched (network, status, size, not JSON)."""


Fetch = Callable[[str], Awaitable[Any]]
"""Fetches a JSON document from a URL the verifier has already allowed."""


@dataclass(frozen=True)
class Trust:
    """Who the verifier may ask: hosts (`name` or `name:port`), over HTTPS, within these limits."""

    hosts: frozenset[str] = frozenset()
    timeout: float = 3.0
    max_bytes: int = 256 * 1024

    def allows(self, url: str) -> bool:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return False
        if parts.username or parts.password or not parts.hostname:
            return False
        host = parts.hostname.lower()
        # did:web resolves loopback hosts over plain HTTP (a development issuer); all else is HTTPS.
        if parts.scheme != "https" and not (parts.scheme == "http" and host in _LOOPBACK):
            return False
        return host in self.hosts or (port is not None and f"{host}:{port}" in self.hosts)


def http_fetcher(trust: Trust, transport: httpx.AsyncBaseTransport | None = None) -> Fetch:
    """Fetches JSON over HTTPS: no redirects (they could lead anywhere), a deadline for the whole
    exchange (a slow drip cannot hold a request), and a size limit read as it streams."""

    async def fetch(url: str) -> Any:
        try:
            async with asyncio.timeout(trust.timeout):
                async with (
                    httpx.AsyncClient(
                        timeout=trust.timeout, follow_redirects=False, transport=transport, trust_env=False
                    ) as client,
                    client.stream(
                        "GET",
                        url,
                        headers={"Accept": "application/did+json, application/vc, application/json"},
                    ) as response,
                ):
                    if response.status_code != 200:
                        raise Unreachable(f"{url} answered {response.status_code}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > trust.max_bytes:
                            raise Unreachable(f"{url} is larger than {trust.max_bytes} bytes")
        except TimeoutError:
            raise Unreachable(f"{url} did not answer within {trust.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise Unreachable(f"{url}: {type(exc).__name__}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise Unreachable(f"{url} did not answer JSON") from None

    return fetch


@dataclass(frozen=True)
class _Key:
    public_key: Ed25519PublicKey
    controller: str


def check_proof(secured: dict[str, Any], public_key: Ed25519PublicKey | bytes, method: str) -> Check:
    """The signature check of a credential with a single proof by `public_key` (the key itself or
    its 32 raw bytes, as a worker process gets it), named `method`: CPU work, all of it."""
    if isinstance(public_key, bytes):
        public_key = Ed25519PublicKey.from_public_bytes(public_key)
    try:
        valid = proofs.verify(secured, public_key)
    except ContextNotAvailable as exc:
        return unknown(f"not checked: {exc}")
    except CanonicalizationError as exc:
        return failed(f"the credential cannot be canonicalized: {exc}")
    except Exception:
        log.exception("proof verification raised")
        return unknown("the proof could not be checked")
    if not valid:
        return failed("the signature does not match the credential: it was changed, or signed by another key")
    return passed(f"signed by {method}")


CheckProof = Callable[[dict[str, Any], Ed25519PublicKey, str], Awaitable[Check]]
"""`check_proof`, run where it does not hold the event loop (`proof_workers.ProofWorkers.check`)."""


async def check_proof_here(secured: dict[str, Any], public_key: Ed25519PublicKey, method: str) -> Check:
    """`check_proof` on the caller's thread: for tests, where nothing else waits for the loop."""
    return check_proof(secured, public_key, method)


@dataclass
class Verifier:
    platform: Platform
    trust: Trust
    records: Records
    fetch: Fetch
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    proof_checker: CheckProof = check_proof_here

    async def verify(self, presented: dict[str, Any] | str) -> Report:
        """Check a credential (a JSON object with an embedded proof, or a VC-JWT string)."""
        if isinstance(presented, str):
            credential, signature = await self._jwt(presented.strip())
        else:
            credential = presented
            signature = None
        if credential is None:
            assert signature is not None
            return Report.of(
                {
                    "structure": unknown("not checked: the VC-JWT could not be read"),
                    "signature": signature,
                    "dates": unknown("not checked"),
                    "status": unknown("not checked"),
                },
                None,
            )
        structure = check_structure(credential)
        if signature is None:
            signature = await self._proof(credential, structure)
        return Report.of(
            {
                "structure": structure,
                "signature": signature,
                "dates": check_dates(credential, self.now),
                "status": await self._status(credential),
            },
            credential,
        )

    # --- signature -------------------------------------------------------------------------

    async def _proof(self, credential: dict[str, Any], structure: Check) -> Check:
        if structure.outcome is Outcome.FAILED and not _contexts_supported(credential):
            return unknown("not checked: the credential's contexts are not supported")
        proof = credential.get("proof")
        candidates = proof if isinstance(proof, list) else [proof] if proof is not None else []
        if not candidates:
            return failed("the credential has no proof")
        if len(candidates) != 1 or not isinstance(candidates[0], dict):
            return unknown("only a single Data Integrity proof can be checked")
        single = candidates[0]
        if single.get("type") != "DataIntegrityProof" or single.get("cryptosuite") != CRYPTOSUITE:
            return unknown(f"unsupported proof: only DataIntegrityProof with {CRYPTOSUITE} is checked")
        if single.get("proofPurpose") != "assertionMethod":
            return failed("the proof's purpose is not assertionMethod")
        method = single.get("verificationMethod")
        if not isinstance(method, str):
            return failed("the proof names no verification method")
        resolved = await self._resolve(method, _issuer_id(credential))
        if isinstance(resolved, Check):
            return resolved
        return await self.proof_checker({**credential, "proof": single}, resolved.public_key, method)

    async def _jwt(self, token: str) -> tuple[dict[str, Any] | None, Check]:
        kid = _jwt_kid(token)
        if kid is None:
            return None, failed("not a VC-JWT with a key id (`kid`) in its header")
        claimed = _jwt_payload(token)
        resolved = await self._resolve(kid, _issuer_id(claimed) if claimed else None)
        if isinstance(resolved, Check):
            return claimed, resolved
        try:
            credential = jose.from_vc_jwt(token, resolved.public_key)
        except jose.InvalidVcJwt as exc:
            return claimed, failed(f"the VC-JWT does not verify: {exc}")
        return credential, passed(f"VC-JWT signed by {kid}")

    async def _resolve(self, method: str, issuer: str | None) -> _Key | Check:
        """The public key a verification method names, if it belongs to `issuer`."""
        did, _, fragment = method.partition("#")
        if issuer is None:
            return failed("the credential names no issuer")
        if did != issuer:
            return failed(f"the verification method {method} does not belong to the issuer {issuer}")
        if not fragment:
            return failed("the verification method names no key (#fragment)")
        if did.startswith("did:key:"):
            try:
                return _Key(keys.did_key_public_key(method), did)
            except ValueError as exc:
                return failed(f"not a usable did:key: {exc}")
        if not did.startswith("did:web:"):
            return unknown(f"unsupported verification method {method}: only did:web and did:key are resolved")
        ours = await self._our_key(did, fragment)
        if ours is not None:
            return ours
        try:
            url = keys.did_web_document_url(did)
        except ValueError as exc:
            return failed(f"not a valid did:web: {exc}")
        if not self.trust.allows(url):
            return unknown("untrusted issuer host: its DID document is not fetched")
        try:
            document = await self.fetch(url)
        except Unreachable as exc:
            return unknown(f"the issuer's DID document could not be fetched: {exc}")
        return _key_from_did_document(document, did, method)

    async def _our_key(self, did: str, fragment: str) -> _Key | Check | None:
        """Our own DIDs resolve locally, from the key ring; None for another host's."""
        institution = _id_in(did, self.platform.issuer_did)
        if did != self.platform.did and institution is None:
            return None
        if institution is not None and not await self.records.issuer_known(institution):
            return failed(f"{did} is not an issuer of this platform")
        key = self.platform.keyring.get(fragment)
        if key is None:
            return failed(f"{did} has no key {fragment}")
        return _Key(key.public_key, did)

    # --- status ----------------------------------------------------------------------------

    async def _status(self, credential: dict[str, Any]) -> Check:
        entries = credential.get("credentialStatus")
        listed = entries if isinstance(entries, list) else [entries] if entries is not None else []
        checks = [await self._status_entry(entry) for entry in listed]
        credential_id = credential.get("id")
        our_id = (
            _id_in(credential_id, self.platform.credential_url) if isinstance(credential_id, str) else None
        )
        if our_id is not None and await self.records.is_suspended(our_id):
            checks.append(failed("suspended by its issuer"))
        return combine(checks, when_none=passed("the credential has no status to check"))

    async def _status_entry(self, entry: Any) -> Check:
        if not isinstance(entry, dict) or entry.get("type") != STATUS_ENTRY_TYPE:
            return unknown(f"unsupported status entry: only {STATUS_ENTRY_TYPE} is checked")
        purpose = entry.get("statusPurpose")
        url = entry.get("statusListCredential")
        raw_index = entry.get("statusListIndex")
        if not isinstance(raw_index, str) or not _INDEX.fullmatch(raw_index):
            return failed("the status entry has no valid statusListIndex")
        index = int(raw_index)
        if purpose not in ("revocation", "suspension") or not isinstance(url, str):
            return failed("the status entry lacks a revocation/suspension purpose or a list URL")
        held = await self._status_bits(url, purpose)
        if isinstance(held, Check):
            return held
        if index >= len(held) * 8:
            return failed(f"statusListIndex {index} is outside the list")
        if status_list.get_bit(held, index):
            return failed("revoked by its issuer" if purpose == "revocation" else "suspended by its issuer")
        return passed(f"not {'revoked' if purpose == 'revocation' else 'suspended'}")

    async def _status_bits(self, url: str, purpose: str) -> bytes | Check:
        ours = _id_in(url, self.platform.status_list_url)
        if ours is not None:
            held = await self.records.status_list(ours)
            if held is None:
                return failed(f"{url} is not a status list of this platform")
            if held[0] != purpose:
                return failed(f"{url} is a {held[0]} list, not a {purpose} list")
            return held[1]
        if not self.trust.allows(url):
            return unknown("untrusted status list host: the list is not fetched")
        try:
            document = await self.fetch(url)
        except Unreachable as exc:
            return unknown(f"the status list could not be fetched: {exc}")
        return await self._foreign_bits(document, url, purpose)

    async def _foreign_bits(self, document: Any, url: str, purpose: str) -> bytes | Check:
        if not isinstance(document, dict):
            return unknown(f"{url} is not a status list credential")
        subject = document.get("credentialSubject")
        types = document.get("type")
        if (
            not isinstance(subject, dict)
            or not isinstance(types, list)
            or "BitstringStatusListCredential" not in types
            or subject.get("statusPurpose") != purpose
            or not isinstance(subject.get("encodedList"), str)
        ):
            return unknown(f"{url} is not a {purpose} BitstringStatusListCredential")
        # The list is itself a credential: a forged one must not vouch for anything.
        signature = await self._proof(document, check_structure(document, ob=False))
        if signature.outcome is not Outcome.PASSED:
            return unknown(f"the status list's own signature was not verified: {signature.detail}")
        try:
            # Bounded: a few KB of crafted GZIP cannot expand into gigabytes.
            return status_list.decode_list(subject["encodedList"])
        except ValueError as exc:
            return unknown(f"{url} holds a list that cannot be decoded: {exc}")


# --- structure and dates ---------------------------------------------------------------------


def _contexts_supported(document: dict[str, Any]) -> bool:
    contexts = document.get("@context")
    return isinstance(contexts, list) and all(
        isinstance(context, str) and context in SUPPORTED_CONTEXTS for context in contexts
    )


def _types(node: Any) -> list[str]:
    if not isinstance(node, dict):
        return []
    types = node.get("type")
    if isinstance(types, str):
        return [types]
    return [item for item in types if isinstance(item, str)] if isinstance(types, list) else []


def check_structure(credential: dict[str, Any], *, ob: bool | None = None) -> Check:
    """The members and types a VC 2.0 (and, when typed so, OB 3.0) credential must have.

    `ob` None: checked as Open Badges when the credential's types say it is one.
    """
    contexts = credential.get("@context")
    if not isinstance(contexts, list) or not contexts or contexts[0] != VC_V2:
        return failed(f"@context must be a list starting with {VC_V2}")
    unsupported = [
        context for context in contexts if not (isinstance(context, str) and context in SUPPORTED_CONTEXTS)
    ]
    if unsupported:
        return failed(f"unsupported context: {json.dumps(unsupported[0])[:200]}")
    problems: list[str] = []
    types = _types(credential)
    if "VerifiableCredential" not in types:
        problems.append("type lacks VerifiableCredential")
    is_ob = bool(OB_TYPES & set(types)) if ob is None else ob
    if "id" in credential and not isinstance(credential["id"], str):
        problems.append("id is not a string")
    if _issuer_id(credential) is None:
        problems.append("issuer is missing (a URL, or an object with an id)")
    subject = credential.get("credentialSubject")
    if not isinstance(subject, dict) and not (
        isinstance(subject, list) and subject and all(isinstance(item, dict) for item in subject)
    ):
        problems.append("credentialSubject is missing")
    if is_ob:
        problems += _ob_problems(credential, subject)
    if problems:
        return failed("; ".join(problems))
    return passed("Open Badges 3.0 credential" if is_ob else "Verifiable Credential 2.0")


def _ob_problems(credential: dict[str, Any], subject: Any) -> list[str]:
    problems = []
    if not isinstance(credential.get("id"), str):
        problems.append("an Open Badges credential needs an id")
    if not isinstance(credential.get("validFrom"), str):
        problems.append("an Open Badges credential needs validFrom")
    issuer = credential.get("issuer")
    if isinstance(issuer, dict) and "Profile" not in _types(issuer):
        problems.append("the issuer is not a Profile")
    if "AchievementSubject" not in _types(subject):
        problems.append("credentialSubject is not an AchievementSubject")
    else:
        achievement = subject.get("achievement")
        if "Achievement" not in _types(achievement):
            problems.append("credentialSubject.achievement is not an Achievement")
        elif not all(isinstance(achievement.get(name), str | dict) for name in ("id", "name", "criteria")):
            problems.append("the achievement needs an id, a name and criteria")
        if not isinstance(subject.get("id"), str) and not subject.get("identifier"):
            problems.append("credentialSubject needs an id or an identifier")
    return problems


def check_dates(credential: dict[str, Any], now: datetime) -> Check:
    bounds: dict[str, datetime | None] = {}
    for name in ("validFrom", "validUntil"):
        value = credential.get(name)
        moment = _instant(value)
        if value is not None and moment is None:
            return failed(f"{name} is not a date-time with a time zone")
        bounds[name] = moment
    valid_from, valid_until = bounds["validFrom"], bounds["validUntil"]
    if valid_until is not None and valid_from is not None and valid_until <= valid_from:
        return failed("validUntil is not after validFrom")
    if valid_from is not None and now < valid_from:
        return failed(f"not valid before {credential['validFrom']}")
    if valid_until is not None and now >= valid_until:
        return failed(f"expired at {credential['validUntil']}")
    return passed("valid" + (f" until {credential['validUntil']}" if valid_until else ", without expiry"))


def _instant(value: Any) -> datetime | None:
    """A timezone-aware date-time, or None."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


# --- helpers ---------------------------------------------------------------------------------


def _issuer_id(credential: dict[str, Any]) -> str | None:
    issuer = credential.get("issuer")
    if isinstance(issuer, dict):
        issuer = issuer.get("id")
    return issuer if isinstance(issuer, str) and issuer else None


def _id_in(value: str, template: Callable[[UUID], str]) -> UUID | None:
    """The id in `value` if it is one of our URLs (or DIDs) made by `template`, else None."""
    placeholder = str(UUID(int=0))
    prefix, _, suffix = template(UUID(int=0)).partition(placeholder)
    if not (value.startswith(prefix) and value.endswith(suffix)):
        return None
    middle = value[len(prefix) : len(value) - len(suffix)]
    if not _UUID.fullmatch(middle):
        return None
    return UUID(middle)


def _jwt_segment(token: str, index: int) -> Any:
    segments = token.split(".")
    if len(segments) != 3:
        return None
    try:
        padded = segments[index] + "=" * (-len(segments[index]) % 4)
        return json.loads(base64.urlsafe_b64decode(padded))
    except (binascii.Error, ValueError):
        return None


def _jwt_kid(token: str) -> str | None:
    header = _jwt_segment(token, 0)
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) else None


def _jwt_payload(token: str) -> dict[str, Any] | None:
    """The credential a VC-JWT claims to carry, before its signature is checked: only to find
    the issuer the key must belong to."""
    payload = _jwt_segment(token, 1)
    if isinstance(payload, dict) and isinstance(payload.get("vc"), dict):
        payload = payload["vc"]
    return payload if isinstance(payload, dict) else None


def _key_from_did_document(document: Any, did: str, method: str) -> _Key | Check:
    if not isinstance(document, dict) or document.get("id") != did:
        return failed(f"the DID document fetched for {did} is not that DID's")
    fragment = "#" + method.partition("#")[2]
    assertion = _listed(document.get("assertionMethod"))
    allowed = {
        item if isinstance(item, str) else item.get("id")
        for item in assertion
        if isinstance(item, str | dict)
    }
    if not allowed & {method, fragment}:
        return failed(f"{method} is not an assertion method of {did}")
    candidates = [
        item
        for item in (*_listed(document.get("verificationMethod")), *assertion)
        if isinstance(item, dict) and item.get("id") in (method, fragment)
    ]
    if not candidates:
        return failed(f"{did} does not describe the key {method}")
    described = candidates[0]
    try:
        if isinstance(described.get("publicKeyMultibase"), str):
            return _Key(keys.public_key_from_multibase(described["publicKeyMultibase"]), did)
        jwk = described.get("publicKeyJwk")
        if isinstance(jwk, dict) and jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
            x = str(jwk.get("x", ""))
            raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            return _Key(Ed25519PublicKey.from_public_bytes(raw), did)
    except (ValueError, binascii.Error) as exc:
        return failed(f"the key {method} cannot be read: {exc}")
    return unknown(f"the key {method} is not an Ed25519 key this service can use")


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


class DatabaseRecords:
    """`Records` from our database; a connection is borrowed per lookup, never held across a fetch."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def status_list(self, list_id: UUID) -> tuple[str, bytes] | None:
        async with self._pool.acquire() as conn:
            return await repository.status_list_bits(conn, list_id)

    async def issuer_known(self, issuer_id: UUID) -> bool:
        async with self._pool.acquire() as conn:
            return await repository.issuer_known(conn, issuer_id)

    async def is_suspended(self, credential_id: UUID) -> bool:
        async with self._pool.acquire() as conn:
            return await repository.is_suspended(conn, credential_id)
