"""Issuance use cases: each runs in the caller's transaction and queues the events it causes.

Exactly one credential per completed enrollment: a completion that finds a credential for its
enrollment changes nothing, whatever its event id, and the unique constraint on `enrollment_id`
settles a race between two consumers (the loser's batch fails and is applied again, in halves
down to the event at fault alone, which then finds the credential). A pathway credential is
minted when a course credential completes a pathway, or when a pathway arrives that a learner's
credentials already complete; a partial unique index keeps it to one live credential per learner
and pathway. One that staff revoked stands until a course credential issued after the revocation
earns it again: the rule the sweeper finds missing pathway credentials by
(`repository.misses_pathway_credential`), so neither mints what the other would not.

Completions are minted a consumer batch at a time (`issue_course_credentials`), each step one
statement for the whole batch (which enrollments have a credential, the courses' locks and
versions, parking, status indexes, the credentials, their events), learner by learner only where
a course is in a pathway: with the result of minting them one by one, in their order.

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

Order, in every use case: course locks (ascending key), then learner locks (ascending key); a
batch of completions takes all its courses' locks in one step, then all its stacking learners'.
A consumer applies a poll's events in one transaction, several use cases in a row (e.g. a course
version between completions), so two batches can still take locks of different events in
opposite orders; PostgreSQL then detects the deadlock and fails one batch, which the runtime
applies again (in halves, down to the failed event alone, retried), with nothing half-done: the
locks only make a transaction wait, never decide anything by themselves. A wait longer than
`repository.LOCK_TIMEOUT` (a stuck holder) fails the transaction as an outage, redelivered later.
The sweeper (`sweeper.py`) finishes whatever is still found left behind.
"""

import asyncio
import hashlib
import json
import logging
import random
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from opentelemetry import trace

from microcred_events import (
    CourseCompleted,
    CoursePublished,
    CourseSnapshot,
    CourseUpdated,
    CredentialKind,
    CredentialRevoked,
    Learner,
    PathwayPublished,
    PathwaySnapshot,
)
from microcred_runtime import (
    AuditEntry,
    Connection,
    Delivery,
    Principal,
    Problem,
    decode_cursor,
    encode_cursor,
    outbox,
)

from . import domain, proofs, repository, status_list
from .domain import CascadePolicy, Credential, Issuance, StatusChangeRefused
from .jose import to_vc_jwt
from .keys import KeyRing, SigningKey, did_document, did_web, jwks

log = logging.getLogger(__name__)

STATUS_PURPOSE = "revocation"
# Random indexes collide more often as a list fills; after this many collisions in a row it counts
# as full (about 80% used, when a collision is that likely) and a new list is opened.
_INDEX_ATTEMPTS = 8
# Credentials signed between two statements at most: about a CPU-millisecond each, so the
# transaction is never idle near repository.IDLE_HOLDER_TIMEOUT, however many completions a course
# version releases at once (a new consumer group can park a whole cohort on one).
MINT_CHUNK = 200
_random = random.SystemRandom()  # the operating system's randomness, as `secrets` draws from


@dataclass(frozen=True)
class Platform:
    """Who signs and where things live: the public base URL and the platform's keys.

    The platform signs on the institutions' behalf: each institution has a did:web under our base
    URL whose document lists the platform's keys, so a credential names its institution as issuer
    and its proof resolves through that institution's DID.
    """

    base_url: str
    keyring: KeyRing
    pathway_cascade: CascadePolicy = CascadePolicy.REVOKE

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

    def issuance(self, issuer_id: UUID, status_list_id: UUID, status_index: int, now: datetime) -> Issuance:
        """A new credential of this issuer, at this place of a status list: its id, URLs and salt."""
        credential_id = uuid.uuid4()
        return Issuance(
            credential_id=credential_id,
            credential_url=self.credential_url(credential_id),
            issuer_did=self.issuer_did(issuer_id),
            issued_at=domain.whole_seconds(now),
            status_list_id=status_list_id,
            status_index=status_index,
            status_entry=status_list.status_entry(
                self.status_list_url(status_list_id), status_index, STATUS_PURPOSE
            ),
            salt=secrets.token_hex(16),
        )

    def sign(self, document: dict[str, Any], controller: str, now: datetime) -> str:
        """Sign with the active key as `controller`'s verification method; the JSON as served."""
        key = self.keyring.signing
        return proofs.signed_json(
            document, key, verification_method=f"{controller}#{key.key_id}", created=domain.whole_seconds(now)
        )


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
    for completion in parked:
        log.info("minting a parked completion", extra={"enrollment_id": str(completion.enrollment_id)})
    await issue_course_credentials(conn, platform, [_here(completion) for completion in parked])


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
    holding = await repository.learners_holding_all(conn, list(pathway.course_ids), now)
    # Each learner's lock orders the minting with a revocation of one of their parts (`_cascade`).
    await repository.lock_learners(conn, holding)
    for learner_id in holding:
        if not await repository.misses_pathway_credential(conn, learner_id, pathway, now):
            continue
        learner = await repository.latest_learner(conn, learner_id)
        if learner is not None:
            await _issue_pathway_credential(conn, platform, pathway, learner, now)


# --- minting ---------------------------------------------------------------------------------


async def issue_course_credentials(
    conn: Connection, platform: Platform, deliveries: Sequence[Delivery]
) -> None:
    """Mint, sign and record the credentials completions earn (each delivery's content is a
    `CourseCompleted`), once per enrollment, in their order: of two of one enrollment the first
    counts, and a learner's pathway is completed by all of theirs.

    The course version may not have reached us yet (catalog and enrollment are separate topics):
    the completion then waits in `awaiting_course_version` and is minted when that version arrives.
    """
    completions = await _without_credentials(conn, deliveries)
    if not completions:
        return
    await repository.lock_courses(
        conn, {completion.course_id for _, completion in completions}, exclusive=False
    )
    courses = await repository.course_versions(
        conn, {(completion.course_id, completion.course_version) for _, completion in completions}
    )
    earned: list[tuple[trace.Span, CourseCompleted, CourseSnapshot]] = []
    parked: list[CourseCompleted] = []
    for delivery, completion in completions:
        course = courses.get((completion.course_id, completion.course_version))
        if course is not None:
            earned.append((delivery.span, completion, course))
            continue
        with delivery.current():
            log.warning(
                "course version %d not known yet; the completion waits for it",
                completion.course_version,
                extra=_context(completion),
            )
        parked.append(completion)
    await repository.park_completions(conn, parked)
    if earned:
        await _issue_course_credentials(conn, platform, earned)


async def _without_credentials(
    conn: Connection, deliveries: Sequence[Delivery]
) -> list[tuple[Delivery, CourseCompleted]]:
    """The completions of enrollments without a credential, the first of each enrollment."""
    if not deliveries:
        return []
    existing = await repository.credentials_for_enrollments(
        conn, {delivery.content.enrollment_id for delivery in deliveries}
    )
    first: dict[UUID, tuple[Delivery, CourseCompleted]] = {}
    for delivery in deliveries:
        completion: CourseCompleted = delivery.content
        credential_id = existing.get(completion.enrollment_id)
        if credential_id is None and completion.enrollment_id not in first:
            first[completion.enrollment_id] = (delivery, completion)
            continue
        with delivery.current():
            if credential_id is not None:
                log.info(
                    "completion already has its credential",
                    extra={**_context(completion), "credential_id": str(credential_id)},
                )
            else:
                log.info("completion repeats an earlier one of its batch", extra=_context(completion))
    return list(first.values())


async def _issue_course_credentials(
    conn: Connection, platform: Platform, earned: Sequence[tuple[trace.Span, CourseCompleted, CourseSnapshot]]
) -> None:
    """Mint the credentials, a chunk at a time; each is recorded in the span of the event that
    earned it."""
    now = _now()
    for start in range(0, len(earned), MINT_CHUNK):
        await _mint(conn, platform, earned[start : start + MINT_CHUNK], now)
    await _stack(
        conn,
        platform,
        [(span, completion.learner, course.course_id) for span, completion, course in earned],
        now,
    )


async def _mint(
    conn: Connection,
    platform: Platform,
    earned: Sequence[tuple[trace.Span, CourseCompleted, CourseSnapshot]],
    now: datetime,
) -> None:
    issuances = await _issuances(conn, platform, [course.issuer.issuer_id for _, _, course in earned], now)
    issued: list[tuple[trace.Span, Credential]] = []
    for (span, completion, course), issuance in zip(earned, issuances, strict=True):
        credential = signed_course_credential(platform, issuance, course, completion, now)
        issued.append((span, credential))
        # Signing is CPU work: between two, the event loop's other work goes on (the consumer
        # group's heartbeats among it, which a large batch would otherwise hold up for seconds).
        await asyncio.sleep(0)
    await _record(conn, platform, issued)


def signed_course_credential(
    platform: Platform,
    issuance: Issuance,
    course: CourseSnapshot,
    completion: CourseCompleted,
    now: datetime,
) -> Credential:
    """The credential a completion earns under `issuance`, signed; no I/O."""
    document = platform.sign(domain.course_credential(issuance, course, completion), issuance.issuer_did, now)
    return Credential(
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


async def _issue_pathway_credential(
    conn: Connection, platform: Platform, pathway: PathwaySnapshot, learner: Learner, now: datetime
) -> None:
    held = await repository.current_course_credentials(conn, learner.learner_id, pathway.course_ids, now)
    if not held.keys() >= set(pathway.course_ids):
        # A part was suspended (or expired) since the caller's read: the pathway is not complete.
        return
    (issuance,) = await _issuances(conn, platform, [pathway.issuer.issuer_id], now)
    parts = [
        domain.PathwayPart(platform.credential_url(held[course_id][0]), held[course_id][1])
        for course_id in pathway.course_ids
    ]
    document = platform.sign(
        domain.pathway_credential(issuance, pathway, learner, parts), issuance.issuer_did, now
    )
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
    await _record(conn, platform, [(trace.get_current_span(), credential)])


async def _stack(
    conn: Connection, platform: Platform, earned: Sequence[tuple[trace.Span, Learner, UUID]], now: datetime
) -> None:
    """Mint the pathway credentials that learners' current course credentials now complete, after
    they earned (or got back) credentials for these courses: (span, learner, course id) each.

    The caller holds the courses' locks, so no pathway of them is being recorded meanwhile. Few
    courses are in a pathway: only their learners are locked and looked at, one by one."""
    pathways = await repository.pathways_with_courses(conn, {course_id for _, _, course_id in earned})
    if not pathways:
        return
    # By learner, the pathways of the courses they earned, each with the span and the learner (as
    # named) of the last of them: its credential is recorded under that span.
    stacking: dict[UUID, dict[UUID, tuple[trace.Span, Learner]]] = {}
    for span, learner, course_id in earned:
        for pathway in pathways:
            if course_id in pathway.course_ids:
                stacking.setdefault(learner.learner_id, {})[pathway.pathway_id] = (span, learner)
    await repository.lock_learners(conn, stacking.keys())
    for learner_id, candidates in stacking.items():
        held = await repository.current_course_ids(conn, learner_id, now)
        theirs = [pathway for pathway in pathways if pathway.pathway_id in candidates]
        for pathway in domain.completed_pathways(held, theirs):
            if await repository.misses_pathway_credential(conn, learner_id, pathway, now):
                span, learner = candidates[pathway.pathway_id]
                with trace.use_span(span, end_on_exit=False):
                    await _issue_pathway_credential(conn, platform, pathway, learner, now)


async def _issuances(
    conn: Connection, platform: Platform, issuer_ids: Sequence[UUID], now: datetime
) -> list[Issuance]:
    """Where each new credential of these issuers lives: an id and a status list index of its own."""
    places = await _status_indexes(conn, platform, len(issuer_ids), now)
    return [
        platform.issuance(issuer_id, list_id, index, now)
        for issuer_id, (list_id, index) in zip(issuer_ids, places, strict=True)
    ]


async def _record(
    conn: Connection, platform: Platform, issued: Sequence[tuple[trace.Span, Credential]]
) -> None:
    """Insert the credentials and queue their CredentialIssued, each under its span (its journey's)."""
    await repository.insert_credentials(conn, [credential for _, credential in issued])
    queued = []
    for span, credential in issued:
        with trace.use_span(span, end_on_exit=False):
            event = domain.issued_event(credential, platform.credential_url(credential.credential_id))
            queued.append(outbox.prepare(event))
            log.info(
                "credential issued",
                extra={
                    "credential_id": str(credential.credential_id),
                    "kind": credential.kind.value,
                    "learner_id": str(credential.learner.learner_id),
                },
            )
    await outbox.add_all(conn, queued)


async def _status_indexes(
    conn: Connection, platform: Platform, count: int, now: datetime
) -> list[tuple[UUID, int]]:
    """`count` random unused indexes of the open status list, opening a new list when that one is full.

    The rule is one credential's: it draws indexes until one is free, and the list is full when it
    draws `_INDEX_ATTEMPTS` taken ones in a row. Each credential still without an index draws one
    at the same time, and all are claimed in one statement."""
    claimed: list[tuple[UUID, int]] = []
    while len(claimed) < count:
        opened = await repository.open_status_list(conn, STATUS_PURPOSE)
        if opened is None:
            await _open_status_list(conn, platform, now)
            continue
        list_id, size = opened
        # The taken indexes each credential still without one drew in a row.
        misses = [0] * (count - len(claimed))
        while misses and max(misses) < _INDEX_ATTEMPTS:
            drawn = _random.sample(range(size), len(misses))
            taken = await repository.claim_status_indexes(conn, list_id, drawn)
            claimed += [(list_id, index) for index in drawn if index in taken]
            misses = [streak + 1 for streak, index in zip(misses, drawn, strict=True) if index not in taken]
        if misses:
            log.info("status list %s is full; opening another", list_id)
            await repository.close_status_list(conn, list_id)
    return claimed


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
    await issue_course_credentials(conn, platform, [_here(completion)])
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
    """Revoke for good: set the credential's bit and re-sign its status list, in this transaction.
    The pathway credentials that stand on a revoked course credential are revoked (or suspended, as
    `Platform.pathway_cascade` says) in the same transaction, each with its event."""
    credential = await _credential_for_change(conn, staff, credential_id)
    now = _now()
    try:
        revoked, event = domain.revoke(credential, reason, now, staff.actor)
    except StatusChangeRefused as exc:
        raise Problem(
            409, "credential-status", str(exc), credential_status=credential.status(now).value
        ) from None
    # What the cascade changes is locked before any status list is: the learner (ordered with
    # stacking), then the pathway credentials, as a revocation of one of those takes its row first.
    standing = await _standing_on(conn, revoked) if revoked.kind is CredentialKind.COURSE else []
    await _record_revocation(conn, platform, revoked, event, staff.actor, now)
    await _cascade(conn, platform, revoked, standing, staff.actor, now)
    return revoked


async def _record_revocation(
    conn: Connection,
    platform: Platform,
    revoked: Credential,
    event: CredentialRevoked,
    actor: str,
    now: datetime,
    caused_by: UUID | None = None,
) -> None:
    await repository.save_status(conn, revoked)
    await repository.record_status_change(
        conn, revoked.credential_id, "revoked", revoked.revocation_reason, actor, now, caused_by=caused_by
    )
    await _set_status_bit(conn, platform, revoked, now)
    await outbox.add(conn, event)


async def _standing_on(conn: Connection, part: Credential) -> list[Credential]:
    """The live pathway credentials of `part`'s holder that stand on it, locked. The learner's
    lock orders this with minting: a pathway credential minted before it is found here, and one
    minted after the revocation no longer counts `part`. One issued before pathway credentials
    named their parts stands on it if its pathway has `part`'s course."""
    await repository.lock_learners(conn, [part.learner.learner_id])
    pathways_of_course = (
        {pathway.pathway_id for pathway in await repository.pathways_with_courses(conn, [part.course_id])}
        if part.course_id is not None
        else set()
    )
    standing = []
    for candidate in await repository.live_pathway_credentials(conn, part.learner.learner_id):
        parts = domain.part_ids(json.loads(candidate.document))
        if part.credential_id in parts or (not parts and candidate.pathway_id in pathways_of_course):
            standing.append(candidate)
    return standing


async def _cascade(
    conn: Connection,
    platform: Platform,
    part: Credential,
    standing: Sequence[Credential],
    actor: str,
    now: datetime,
) -> None:
    """The pathway credentials standing on `part`, a course credential just revoked, lose their
    standing too: revoked, or suspended (as `platform.pathway_cascade` says), with the reason."""
    reason = domain.cascade_reason(part)
    for pathway_credential in standing:
        if part.revoked_at is None or platform.pathway_cascade is CascadePolicy.SUSPEND:
            if pathway_credential.suspended_at is None:
                await _suspend(conn, pathway_credential, reason, actor, now, caused_by=part.credential_id)
        else:
            revoked, revocation = domain.revoke(pathway_credential, reason, now, actor)
            await _record_revocation(
                conn, platform, revoked, revocation, actor, now, caused_by=part.credential_id
            )


async def _suspend(
    conn: Connection,
    credential: Credential,
    reason: str,
    actor: str,
    now: datetime,
    *,
    caused_by: UUID | None,
) -> Credential:
    suspended, event = domain.suspend(credential, reason, now, actor)
    await repository.save_status(conn, suspended)
    await repository.record_status_change(
        conn,
        suspended.credential_id,
        "suspended",
        suspended.suspension_reason,
        actor,
        now,
        caused_by=caused_by,
    )
    await outbox.add(conn, event)
    return suspended


async def suspend_credential(
    conn: Connection, platform: Platform, staff: Principal, credential_id: UUID, reason: str
) -> Credential:
    """Suspend until reinstated; verification reports the credential as suspended meanwhile. The
    pathway credentials that stand on a suspended course credential are suspended with it, and
    reinstated with it."""
    credential = await _credential_for_change(conn, staff, credential_id)
    now = _now()
    try:
        domain.suspend(credential, reason, now, staff.actor)
    except StatusChangeRefused as exc:
        raise Problem(
            409, "credential-status", str(exc), credential_status=credential.status(now).value
        ) from None
    standing = await _standing_on(conn, credential) if credential.kind is CredentialKind.COURSE else []
    suspended = await _suspend(conn, credential, reason, staff.actor, now, caused_by=None)
    await _cascade(conn, platform, suspended, standing, staff.actor, now)
    return suspended


async def _lift_cascaded_suspensions(conn: Connection, part: Credential, actor: str, now: datetime) -> None:
    """Reinstate the pathway credentials standing on `part` that a part's suspension suspended,
    once none of their parts is suspended or revoked any more (staff's own suspensions stay)."""
    await repository.lock_learners(conn, [part.learner.learner_id])
    for pathway_credential in await repository.suspended_by_cascade(conn, part.learner.learner_id):
        parts = domain.part_ids(json.loads(pathway_credential.document))
        if part.credential_id not in parts or await repository.not_in_good_standing(conn, parts):
            continue
        reinstated, event = domain.reinstate(pathway_credential, now, actor)
        await repository.save_status(conn, reinstated)
        await repository.record_status_change(
            conn, reinstated.credential_id, "reinstated", None, actor, now, caused_by=part.credential_id
        )
        await outbox.add(conn, event)


async def reinstate_credential(
    conn: Connection, platform: Platform, staff: Principal, credential_id: UUID
) -> Credential:
    """Lift a suspension; a pathway the credential completes is then minted if it was not yet.
    A pathway credential one of whose parts is revoked stays suspended (409)."""
    credential = await _credential_for_change(conn, staff, credential_id)
    now = _now()
    try:
        reinstated, event = domain.reinstate(credential, now, staff.actor)
    except StatusChangeRefused as exc:
        raise Problem(
            409, "credential-status", str(exc), credential_status=credential.status(now).value
        ) from None
    revoked_parts = await repository.revoked_among(conn, domain.part_ids(json.loads(credential.document)))
    if revoked_parts:
        raise Problem(
            409,
            "part-revoked",
            "a course credential this pathway credential stands on is revoked: it cannot be reinstated",
            revoked_parts=[str(part) for part in revoked_parts],
        )
    await repository.save_status(conn, reinstated)
    await repository.record_status_change(conn, credential_id, "reinstated", None, staff.actor, now)
    await outbox.add(conn, event)
    if reinstated.course_id is not None:
        # The course before the learner, as minting takes them.
        await repository.lock_courses(conn, [reinstated.course_id], exclusive=False)
        await _lift_cascaded_suspensions(conn, reinstated, staff.actor, now)
        if reinstated.counts_towards_pathways(now):
            await _stack(
                conn, platform, [(trace.get_current_span(), reinstated.learner, reinstated.course_id)], now
            )
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
    await _require_issuer(conn, issuer_id)
    return did_document(platform.issuer_did(issuer_id), platform.keyring)


async def issuer_jwks(conn: Connection, platform: Platform, issuer_id: UUID) -> dict[str, Any]:
    """An institution's keys as a JWK Set, each `kid` the DID URL its VC-JWTs name in their header
    (`did:web:...:issuers:<id>#key-...`), so a JWKS client finds the key by the header alone."""
    await _require_issuer(conn, issuer_id)
    return jwks(platform.keyring, did=platform.issuer_did(issuer_id))


async def _require_issuer(conn: Connection, issuer_id: UUID) -> None:
    if not await repository.issuer_known(conn, issuer_id):
        raise Problem(404, "issuer-not-found", f"no issuer {issuer_id}")


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


def _here(completion: CourseCompleted) -> Delivery:
    """A completion applied under the current span, not delivered to a handler of its own."""
    return Delivery(completion, trace.get_current_span())


def _context(completion: CourseCompleted) -> dict[str, str]:
    return {"enrollment_id": str(completion.enrollment_id), "course_id": str(completion.course_id)}
