"""Issuance use cases: each runs in the caller's transaction and queues the events it causes.

Exactly one credential per completed enrollment: a completion that finds a credential for its
enrollment changes nothing, whatever its event id, and the unique constraint on `enrollment_id`
settles a race between two consumers (the loser's transaction fails, is retried, and finds the
credential). A pathway credential is minted when a course credential completes a pathway, or when
a pathway arrives that a learner's credentials already complete; a partial unique index keeps it
to one live credential per learner and pathway. One that staff revoked stands until a course
credential issued after the revocation earns it again: the rule the sweeper finds missing pathway
credentials by (`repository.misses_pathway_credential`), so neither mints what the other would not.

Several replicas apply events at once, under READ COMMITTED: decisions that read rows other
events write take transaction-level advisory locks (held until the consumer's batch commits), so
whichever of two racing transactions reads second reads after the first has committed:

- the course lock, SHARED by whoever mints from a course (a completion, a parked completion, a
  reinstatement that stacks), EXCLUSIVE by whoever changes what minting reads about the course: a
  new course version (which takes the completions parked for it) and a pathway (on each of its
  courses). A completion that found no version, or a credential stacked without a pathway being
  published at that moment, is thereby seen by the other side; completions of one course still
  mint side by side.
- the learner lock, EXCLUSIVE, by whoever decides on the learner's pathway credentials (stacking,
  the sweeper): of two of the learner's last course credentials minted at once, the second sees
  the first.

Order, in every use case: course locks (ascending key), then learner locks (ascending key). A
consumer applies a batch of events in one transaction, so two batches can still take locks of
different events in opposite orders; PostgreSQL then detects the deadlock and fails one batch,
which the runtime applies again (the failed event alone, retried), with nothing half-done: the
locks only make a transaction wait, never decide anything by themselves. A wait longer than
`repository.LOCK_TIMEOUT` (a stuck holder) fails the transaction as an outage, redelivered later.
The sweeper (`sweeper.py`) finishes whatever is still found left behind.
"""

import hashlib
import json
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from microcred_events import (
    CourseCompleted,
    CoursePublished,
    CourseSnapshot,
    CourseUpdated,
    CredentialKind,
    Learner,
    PathwayPublished,
    PathwaySnapshot,
)
from microcred_runtime import AuditEntry, Connection, Principal, Problem, decode_cursor, encode_cursor, outbox

from . import domain, proofs, repository, status_list
from .domain import Credential, Issuance, StatusChangeRefused
from .jose import to_vc_jwt
from .keys import KeyRing, SigningKey, did_document, did_web

log = logging.getLogger(__name__)

STATUS_PURPOSE = "revocation"
# Random indexes collide more often as a list fills; after this many collisions in a row it counts
# as full (about 80% used, when a collision is that likely) and a new list is opened.
_INDEX_ATTEMPTS = 8


@dataclass(frozen=True)
class Platform:
    """Who signs and where things live: the public base URL and the platform's keys.

    The platform signs on the institutions' behalf: each institution has a did:web under our base
    URL whose document lists the platform's keys, so a credential names its institution as issuer
    and its proof resolves through that institution's DID.
    """

    base_url: str
    keyring: KeyRing

    @property
    def did(self) -> str:
        """The platform's own did:web (it issues the status lists)."""
        return did_web(self.base_url)

    def issuer_did(self, issuer_id: UUID) -> str:
        return did_web(self.base_url, "issuers", str(issuer_id))

    def credential_url(self, credential_id: UUID) -> str:
        return f"{self.base_url}/credentials/{credential_id}"

    def status_list_url(self, list_id: UUID) -> str:
        return f"{self.base_url}/status/{list_id}"

    def sign(self, document: dict[str, Any], controller: str, now: datetime) -> str:
        """Sign with the active key as `controller`'s verification method; the JSON as served."""
        key = self.keyring.signing
        secured = proofs.sign(
            document, key, verification_method=f"{controller}#{key.key_id}", created=domain.whole_seconds(now)
        )
        # The Open Badges 3.0 schema wants `proof` as an array. JSON-LD reads a one-element array
        # and a single object alike, and the proof is not part of what is signed, so wrapping it
        # changes no signature.
        secured["proof"] = [secured["proof"]]
        return serialize(secured)


def serialize(document: dict[str, Any]) -> str:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- the catalog read model ------------------------------------------------------------------


async def record_course(conn: Connection, platform: Platform, event: CoursePublished | CourseUpdated) -> None:
    """Keep the course version, and mint what waited for exactly this version."""
    course = event.course
    await repository.record_issuer(conn, course.issuer)
    if not await repository.record_course_version(conn, course):
        return
    # Waits for completions that found no version and are parking (they hold the course lock
    # shared), so the take below sees their rows; any that come later see this version.
    await repository.lock_courses(conn, [course.course_id], exclusive=True)
    parked = await repository.take_parked_completions(conn, course.course_id, course.version)
    # All their learners at once, in the lock order, rather than one by one as each stacks.
    await repository.lock_learners(conn, {completion.learner.learner_id for completion in parked})
    for completion in parked:
        log.info("minting a parked completion", extra={"enrollment_id": str(completion.enrollment_id)})
        await _issue_course_credential(conn, platform, completion, course)


async def record_pathway(conn: Connection, platform: Platform, event: PathwayPublished) -> None:
    """Keep the pathway; learners whose credentials already complete it get its credential now."""
    pathway = event.pathway
    await repository.record_issuer(conn, pathway.issuer)
    if not await repository.record_pathway(conn, pathway):
        return
    # Waits for credentials of its courses being minted (course lock shared), so the read below
    # sees them; those minted later find this pathway when they stack.
    await repository.lock_courses(conn, pathway.course_ids, exclusive=True)
    now = _now()
    for learner_id in await repository.learners_holding_all(conn, list(pathway.course_ids), now):
        if not await repository.misses_pathway_credential(conn, learner_id, pathway, now):
            continue
        learner = await repository.latest_learner(conn, learner_id)
        if learner is not None:
            await _issue_pathway_credential(conn, platform, pathway, learner, now)


# --- minting ---------------------------------------------------------------------------------


async def issue_course_credential(conn: Connection, platform: Platform, completion: CourseCompleted) -> None:
    """Mint, sign and record the credential a completion earns, once per enrollment.

    The course version may not have reached us yet (catalog and enrollment are separate topics):
    the completion then waits in `awaiting_course_version` and is minted when that version arrives.
    """
    context = {"enrollment_id": str(completion.enrollment_id), "course_id": str(completion.course_id)}
    existing = await repository.credential_for_enrollment(conn, completion.enrollment_id)
    if existing is not None:
        log.info("completion already has its credential", extra={**context, "credential_id": str(existing)})
        return
    await repository.lock_courses(conn, [completion.course_id], exclusive=False)
    course = await repository.course_version(conn, completion.course_id, completion.course_version)
    if course is None:
        log.warning(
            "course version %d not known yet; the completion waits for it",
            completion.course_version,
            extra=context,
        )
        await repository.park_completion(conn, completion)
        return
    await _issue_course_credential(conn, platform, completion, course)


async def _issue_course_credential(
    conn: Connection, platform: Platform, completion: CourseCompleted, course: CourseSnapshot
) -> None:
    now = _now()
    issuance = await _issuance(conn, platform, course.issuer.issuer_id, now)
    document = platform.sign(domain.course_credential(issuance, course, completion), issuance.issuer_did, now)
    credential = Credential(
        credential_id=issuance.credential_id,
        kind=CredentialKind.COURSE,
        learner=completion.learner,
        issuer_id=course.issuer.issuer_id,
        achievement_id=course.achievement.achievement_id,
        achievement_name=course.achievement.name,
        document=document,
        document_sha256=sha256(document),
        issued_at=issuance.issued_at,
        valid_until=domain.valid_until(course, issuance.issued_at),
        revocation_list_id=issuance.status_list_id,
        revocation_index=issuance.status_index,
        enrollment_id=completion.enrollment_id,
        course_id=course.course_id,
        course_version=course.version,
    )
    await _record(conn, platform, credential)
    await _stack(conn, platform, completion.learner, course.course_id, now)


async def _issue_pathway_credential(
    conn: Connection, platform: Platform, pathway: PathwaySnapshot, learner: Learner, now: datetime
) -> None:
    issuance = await _issuance(conn, platform, pathway.issuer.issuer_id, now)
    document = platform.sign(domain.pathway_credential(issuance, pathway, learner), issuance.issuer_did, now)
    credential = Credential(
        credential_id=issuance.credential_id,
        kind=CredentialKind.PATHWAY,
        learner=learner,
        issuer_id=pathway.issuer.issuer_id,
        achievement_id=pathway.achievement.achievement_id,
        achievement_name=pathway.achievement.name,
        document=document,
        document_sha256=sha256(document),
        issued_at=issuance.issued_at,
        valid_until=None,
        revocation_list_id=issuance.status_list_id,
        revocation_index=issuance.status_index,
        pathway_id=pathway.pathway_id,
        pathway_version=pathway.version,
    )
    await _record(conn, platform, credential)


async def _stack(
    conn: Connection, platform: Platform, learner: Learner, course_id: UUID, now: datetime
) -> None:
    """Mint the pathway credentials the learner's current course credentials now complete.

    The caller holds the course's lock, so no pathway of the course is being recorded meanwhile."""
    pathways = await repository.pathways_with_course(conn, course_id)
    if not pathways:
        return
    await repository.lock_learners(conn, [learner.learner_id])
    held = await repository.current_course_ids(conn, learner.learner_id, now)
    for pathway in domain.completed_pathways(held, pathways):
        if await repository.misses_pathway_credential(conn, learner.learner_id, pathway, now):
            await _issue_pathway_credential(conn, platform, pathway, learner, now)


async def _issuance(conn: Connection, platform: Platform, issuer_id: UUID, now: datetime) -> Issuance:
    credential_id = uuid.uuid4()
    list_id, index = await _status_index(conn, platform, now)
    return Issuance(
        credential_id=credential_id,
        credential_url=platform.credential_url(credential_id),
        issuer_did=platform.issuer_did(issuer_id),
        issued_at=domain.whole_seconds(now),
        status_list_id=list_id,
        status_index=index,
        status_entry=status_list.status_entry(platform.status_list_url(list_id), index, STATUS_PURPOSE),
        salt=secrets.token_hex(16),
    )


async def _record(conn: Connection, platform: Platform, credential: Credential) -> None:
    await repository.insert_credential(conn, credential)
    await outbox.add(conn, domain.issued_event(credential, platform.credential_url(credential.credential_id)))
    log.info(
        "credential issued",
        extra={
            "credential_id": str(credential.credential_id),
            "kind": credential.kind.value,
            "learner_id": str(credential.learner.learner_id),
        },
    )


async def _status_index(conn: Connection, platform: Platform, now: datetime) -> tuple[UUID, int]:
    """A random unused index of the open status list, opening a new list when that one is full."""
    while True:
        opened = await repository.open_status_list(conn, STATUS_PURPOSE)
        if opened is None:
            await _open_status_list(conn, platform, now)
            continue
        list_id, size = opened
        for _ in range(_INDEX_ATTEMPTS):
            index = secrets.randbelow(size)
            if await repository.claim_status_index(conn, list_id, index):
                return list_id, index
        log.info("status list %s is full; opening another", list_id)
        await repository.close_status_list(conn, list_id)


async def _open_status_list(conn: Connection, platform: Platform, now: datetime) -> None:
    list_id = uuid.uuid4()
    bits = bytes(status_list.MIN_LIST_SIZE // 8)
    await repository.create_status_list(
        conn, list_id, STATUS_PURPOSE, bits, _signed_status_list(platform, list_id, bits, now), now
    )


def _signed_status_list(platform: Platform, list_id: UUID, bits: bytes, now: datetime) -> str:
    unsigned = status_list.status_list_credential(
        platform.status_list_url(list_id), STATUS_PURPOSE, bits, platform.did, domain.whole_seconds(now)
    )
    return platform.sign(unsigned, platform.did, now)


# --- finishing what a race left behind (the sweeper) -----------------------------------------


async def finish_parked_completion(
    conn: Connection, platform: Platform, enrollment_id: UUID, course_id: UUID
) -> bool:
    """Mint a parked completion whose course version is held; False when another transaction
    took it first."""
    await repository.lock_courses(conn, [course_id], exclusive=False)
    completion = await repository.take_parked_completion(conn, enrollment_id)
    if completion is None:
        return False
    if await repository.credential_for_enrollment(conn, enrollment_id) is None:
        course = await repository.course_version(conn, completion.course_id, completion.course_version)
        assert course is not None, "a parked completion is taken only when its course version is held"
        await _issue_course_credential(conn, platform, completion, course)
    return True


async def finish_pathway(conn: Connection, platform: Platform, learner_id: UUID, pathway_id: UUID) -> bool:
    """Mint the pathway credential a learner is missing; False when it is not missing (any more)."""
    found = await repository.pathway(conn, pathway_id)
    if found is None:
        return False
    await repository.lock_courses(conn, found.course_ids, exclusive=False)
    await repository.lock_learners(conn, [learner_id])
    pathway = await repository.pathway(conn, pathway_id)
    if pathway is None or set(pathway.course_ids) != set(found.course_ids):
        # A new version changed its courses before the locks were held: the next pass looks again.
        return False
    now = _now()
    if not await repository.misses_pathway_credential(conn, learner_id, pathway, now):
        return False
    learner = await repository.latest_learner(conn, learner_id)
    assert learner is not None, "a learner missing a pathway credential holds course credentials"
    await _issue_pathway_credential(conn, platform, pathway, learner, now)
    return True


# --- status ----------------------------------------------------------------------------------


async def revoke_credential(
    conn: Connection, platform: Platform, staff: Principal, credential_id: UUID, reason: str
) -> Credential:
    """Revoke for good: set the credential's bit and re-sign its status list, in this transaction."""
    credential = await _credential_for_change(conn, staff, credential_id)
    now = _now()
    try:
        revoked, event = domain.revoke(credential, reason, now, staff.actor)
    except StatusChangeRefused as exc:
        raise Problem(
            409, "credential-status", str(exc), credential_status=credential.status(now).value
        ) from None
    await repository.save_status(conn, revoked)
    await repository.record_status_change(
        conn, credential_id, "revoked", revoked.revocation_reason, staff.actor, now
    )
    await _set_status_bit(conn, platform, revoked, now)
    await outbox.add(conn, event)
    return revoked


async def suspend_credential(
    conn: Connection, staff: Principal, credential_id: UUID, reason: str
) -> Credential:
    """Suspend until reinstated; verification reports the credential as suspended meanwhile."""
    credential = await _credential_for_change(conn, staff, credential_id)
    now = _now()
    try:
        suspended, event = domain.suspend(credential, reason, now, staff.actor)
    except StatusChangeRefused as exc:
        raise Problem(
            409, "credential-status", str(exc), credential_status=credential.status(now).value
        ) from None
    await repository.save_status(conn, suspended)
    await repository.record_status_change(
        conn, credential_id, "suspended", suspended.suspension_reason, staff.actor, now
    )
    await outbox.add(conn, event)
    return suspended


async def reinstate_credential(
    conn: Connection, platform: Platform, staff: Principal, credential_id: UUID
) -> Credential:
    """Lift a suspension; a pathway the credential completes is then minted if it was not yet."""
    credential = await _credential_for_change(conn, staff, credential_id)
    now = _now()
    try:
        reinstated, event = domain.reinstate(credential, now, staff.actor)
    except StatusChangeRefused as exc:
        raise Problem(
            409, "credential-status", str(exc), credential_status=credential.status(now).value
        ) from None
    await repository.save_status(conn, reinstated)
    await repository.record_status_change(conn, credential_id, "reinstated", None, staff.actor, now)
    await outbox.add(conn, event)
    if reinstated.course_id is not None and reinstated.counts_towards_pathways(now):
        await repository.lock_courses(conn, [reinstated.course_id], exclusive=False)
        await _stack(conn, platform, reinstated.learner, reinstated.course_id, now)
    return reinstated


async def _set_status_bit(
    conn: Connection, platform: Platform, credential: Credential, now: datetime
) -> None:
    held = await repository.status_list_bits(conn, credential.revocation_list_id, for_update=True)
    assert held is not None, "a credential's status list exists (foreign key)"
    _, bits = held
    updated = bytearray(bits)
    status_list.set_bit(updated, credential.revocation_index, True)
    document = _signed_status_list(platform, credential.revocation_list_id, bytes(updated), now)
    await repository.save_status_list(conn, credential.revocation_list_id, bytes(updated), document, now)


async def _credential_for_change(conn: Connection, staff: Principal, credential_id: UUID) -> Credential:
    """The credential, locked, when `staff` may change its status: staff of its issuer (or an
    admin), and never its holder."""
    credential = await repository.get_credential(conn, credential_id, for_update=True)
    if credential is None:
        raise _not_found(credential_id)
    if credential.learner.learner_id == staff.learner_id:
        raise Problem(403, "own-credential", "nobody changes the status of their own credential")
    staff.require_issuer(credential.issuer_id)
    return credential


# --- reading ---------------------------------------------------------------------------------


async def get_credential(conn: Connection, credential_id: UUID) -> Credential:
    credential = await repository.get_credential(conn, credential_id)
    if credential is None:
        raise _not_found(credential_id)
    return credential


async def audit_credential(conn: Connection, staff: Principal, credential_id: UUID) -> list[AuditEntry]:
    """Who did what to a credential, in order: for staff of its issuer and admins."""
    credential = await get_credential(conn, credential_id)
    staff.require_issuer(credential.issuer_id)
    return domain.audit_trail(credential, await repository.status_changes(conn, credential_id))


async def list_credentials(
    conn: Connection, learner_id: UUID | None, *, limit: int, cursor: str | None
) -> tuple[list[Credential], str | None]:
    """A page of credentials, newest first, and the cursor of the next page."""
    key = decode_cursor(cursor, 2)
    after = _sort_key(key) if key else None
    credentials = await repository.list_credentials(conn, learner_id, after=after, limit=limit + 1)
    page = credentials[:limit]
    if len(credentials) <= limit:
        return page, None
    last = page[-1]
    return page, encode_cursor([last.issued_at.isoformat(), str(last.credential_id)])


def credential_jwt(platform: Platform, credential: Credential) -> str:
    """The credential as a VC-JWT, signed with the key that signed its embedded proof.

    Made on request rather than stored: it is a second envelope of the same credential, and the
    key it needs stays in the key ring after a rotation (old credentials must keep verifying).
    """
    document = json.loads(credential.document)
    unsecured = {name: value for name, value in document.items() if name != "proof"}
    key = _proof_key(platform.keyring, document)
    issuer_did = platform.issuer_did(credential.issuer_id)
    return to_vc_jwt(unsecured, key, kid=f"{issuer_did}#{key.key_id}")


def single_proof(document: dict[str, Any]) -> dict[str, Any]:
    """The document with its one proof as an object, as `proofs` reads it (we store it in an array)."""
    proof = document.get("proof")
    if isinstance(proof, list) and len(proof) == 1:
        return {**document, "proof": proof[0]}
    return document


def _proof_key(keyring: KeyRing, document: dict[str, Any]) -> SigningKey:
    method = proofs.verification_method_of(single_proof(document))
    key_id = method.partition("#")[2] if method else ""
    return keyring.get(key_id) or keyring.signing


async def status_list_document(conn: Connection, list_id: UUID) -> str:
    document = await repository.status_list_document(conn, list_id)
    if document is None:
        raise Problem(404, "status-list-not-found", f"no status list {list_id}")
    return document


async def issuer_did_document(conn: Connection, platform: Platform, issuer_id: UUID) -> dict[str, Any]:
    """The did:web document of an institution seen in the catalog: the platform's keys."""
    if not await repository.issuer_known(conn, issuer_id):
        raise Problem(404, "issuer-not-found", f"no issuer {issuer_id}")
    return did_document(platform.issuer_did(issuer_id), platform.keyring)


def _not_found(credential_id: UUID) -> Problem:
    return Problem(404, "credential-not-found", f"no credential {credential_id}")


def _sort_key(key: list[Any]) -> tuple[datetime, UUID]:
    issued_at, credential_id = key
    try:
        if isinstance(issued_at, str) and isinstance(credential_id, str):
            after = datetime.fromisoformat(issued_at), UUID(credential_id)
            if after[0].tzinfo is not None:
                return after
    except ValueError:
        pass
    raise Problem(400, "invalid-cursor", "the cursor is not one this API returned")


def _now() -> datetime:
    return datetime.now(UTC)
