"""Issuance's rules, without I/O: what a credential says, when a pathway is complete, and how a
credential's status may change.

A credential is a W3C Verifiable Credential 2.0 / Open Badges 3.0 `OpenBadgeCredential`. It is
built here unsigned, from the catalog's snapshot of exactly the course version (or pathway) it
is for; `service` signs it and records it.

Status: a credential is revoked (final) or suspended (until reinstated); revocation supersedes
a suspension. Its displayed status is revoked, suspended, expired or valid, in that precedence.
"""

import contextlib
import enum
import hashlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from pydantic import HttpUrl

from microcred_events import (
    Achievement,
    CourseCompleted,
    CourseSnapshot,
    CredentialIssued,
    CredentialKind,
    CredentialReinstated,
    CredentialRevoked,
    Issuer,
    Learner,
    PathwaySnapshot,
    SkillAlignment,
    StatusPurpose,
)
from microcred_runtime import AuditEntry

from .jsonld import OB_V3, VC_V2

CREDENTIAL_TYPE = ("VerifiableCredential", "OpenBadgeCredential")
REASON_MAX_LENGTH = 500


class DisplayStatus(enum.StrEnum):
    """What the credential page and the API show."""

    VALID = "valid"
    REVOKED = "revoked"
    SUSPENDED = "suspended"
    EXPIRED = "expired"


def timestamp(moment: datetime) -> str:
    """An XML Schema dateTime in UTC with whole seconds, as credentials carry them."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def whole_seconds(moment: datetime) -> datetime:
    """`moment` as the credential states it, so the record and the document agree to the second."""
    return moment.astimezone(UTC).replace(microsecond=0)


def identity_object(email: str, salt: str) -> dict[str, Any]:
    """The learner as an Open Badges IdentityObject: a salted SHA-256 of their email address.

    Whoever knows the address (an employer the learner gave it to) can check the hash; nobody can
    read the address from the credential. A fresh salt per credential keeps one learner's
    credentials from being linked by their hash.
    """
    digest = hashlib.sha256((email + salt).encode()).hexdigest()
    return {
        "type": "IdentityObject",
        "identityHash": f"sha256${digest}",
        "identityType": "emailAddress",
        "hashed": True,
        "salt": salt,
    }


def issuer_profile(issuer: Issuer, did: str) -> dict[str, Any]:
    return {"id": did, "type": ["Profile"], "name": issuer.name, "url": str(issuer.url)}


def achievement_node(achievement: Achievement) -> dict[str, Any]:
    node: dict[str, Any] = {
        "id": achievement.achievement_id.urn,
        "type": ["Achievement"],
        "name": achievement.name,
        "description": achievement.description,
        "criteria": {"narrative": achievement.criteria_narrative},
    }
    if achievement.alignments:
        node["alignment"] = [_alignment(skill) for skill in achievement.alignments]
    return node


def _alignment(skill: SkillAlignment) -> dict[str, Any]:
    alignment: dict[str, Any] = {
        "type": ["Alignment"],
        "targetName": skill.target_name,
        "targetUrl": str(skill.target_url),
    }
    if skill.target_framework:
        alignment["targetFramework"] = skill.target_framework
    if skill.target_code:
        alignment["targetCode"] = skill.target_code
    return alignment


def evidence(completion: CourseCompleted) -> list[dict[str, Any]]:
    """What the completion carried as evidence: the learner's work and/or their score."""
    if completion.evidence_url is None and completion.score is None:
        return []
    item: dict[str, Any] = {"type": ["Evidence"]}
    if completion.evidence_url is not None:
        item["id"] = str(completion.evidence_url)
        item["name"] = "Work submitted for the course"
    if completion.score is not None:
        item["narrative"] = f"Completed with a final score of {completion.score:g}%."
    return [item]


@dataclass(frozen=True)
class Issuance:
    """Where a credential lives and under what names: fixed before it is built and signed."""

    credential_id: UUID
    credential_url: str
    issuer_did: str
    issued_at: datetime
    status_list_id: UUID
    status_index: int
    status_entry: dict[str, Any]
    salt: str


def _credential(
    issuance: Issuance,
    *,
    issuer: Issuer,
    achievement: Achievement,
    learner: Learner,
    valid_until: datetime | None,
    awarded_at: datetime | None,
    evidence_items: list[dict[str, Any]],
) -> dict[str, Any]:
    credential: dict[str, Any] = {
        "@context": [VC_V2, OB_V3],
        "id": issuance.credential_url,
        "type": list(CREDENTIAL_TYPE),
        "name": achievement.name,
        "description": achievement.description,
        "issuer": issuer_profile(issuer, issuance.issuer_did),
        "validFrom": timestamp(issuance.issued_at),
    }
    if valid_until is not None:
        credential["validUntil"] = timestamp(valid_until)
    if awarded_at is not None:
        credential["awardedDate"] = timestamp(awarded_at)
    credential["credentialSubject"] = {
        "type": ["AchievementSubject"],
        "identifier": [identity_object(learner.email, issuance.salt)],
        "achievement": achievement_node(achievement),
    }
    if evidence_items:
        credential["evidence"] = evidence_items
    # Open Badges 3.0 allows one status entry (its schema makes `credentialStatus` an object), so
    # the credential carries its revocation entry; see README for how suspension is reported.
    credential["credentialStatus"] = issuance.status_entry
    return credential


def valid_until(course: CourseSnapshot, issued_at: datetime) -> datetime | None:
    if course.credential_validity_days is None:
        return None
    return issued_at + timedelta(days=course.credential_validity_days)


def course_credential(
    issuance: Issuance, course: CourseSnapshot, completion: CourseCompleted
) -> dict[str, Any]:
    """The unsigned credential for a completed course, from the course version enrolled in."""
    return _credential(
        issuance,
        issuer=course.issuer,
        achievement=course.achievement,
        learner=completion.learner,
        valid_until=valid_until(course, issuance.issued_at),
        awarded_at=completion.completed_at,
        evidence_items=evidence(completion),
    )


class CascadePolicy(enum.StrEnum):
    """What revoking a course credential does to the pathway credentials that stand on it."""

    REVOKE = "revoke"
    SUSPEND = "suspend"


# The `genre` of the evidence items by which a pathway credential names the course credentials it
# stands on (Open Badges 3.0 Evidence: `id` the course credential's URL, `name` its name).
PART_GENRE = "Course credential"


@dataclass(frozen=True)
class PathwayPart:
    """A course credential a pathway credential stands on."""

    credential_url: str
    name: str


def pathway_credential(
    issuance: Issuance, pathway: PathwaySnapshot, learner: Learner, parts: Sequence[PathwayPart]
) -> dict[str, Any]:
    """The unsigned credential for a completed pathway: awarded now, for as long as it is held. Its
    evidence names the course credentials it stands on, in the pathway's order."""
    return _credential(
        issuance,
        issuer=pathway.issuer,
        achievement=pathway.achievement,
        learner=learner,
        valid_until=None,
        awarded_at=None,
        evidence_items=[
            {
                "id": part.credential_url,
                "type": ["Evidence"],
                "name": part.name,
                "genre": PART_GENRE,
                "narrative": f"Holds the course credential {part.name}, part of this pathway.",
            }
            for part in parts
        ],
    )


def part_ids(document: dict[str, Any]) -> list[UUID]:
    """The ids of the course credentials a pathway credential names as its parts (none for a
    course credential): the last segment of each part's URL."""
    found = []
    for item in document.get("evidence", []):
        if isinstance(item, dict) and item.get("genre") == PART_GENRE and isinstance(item.get("id"), str):
            with contextlib.suppress(ValueError):
                found.append(UUID(item["id"].rstrip("/").rpartition("/")[2]))
    return found


def completed_pathways(
    held_course_ids: Collection[UUID], pathways: Iterable[PathwaySnapshot]
) -> list[PathwaySnapshot]:
    """The pathways every course of which the learner holds a current credential for."""
    held = set(held_course_ids)
    return [pathway for pathway in pathways if held.issuperset(pathway.course_ids)]


# --- the credential record and its status ----------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """An issued credential as issuance records it."""

    credential_id: UUID
    kind: CredentialKind
    learner: Learner
    issuer_id: UUID
    achievement_id: UUID
    achievement_name: str
    document: str
    document_sha256: str
    issued_at: datetime
    valid_until: datetime | None
    revocation_list_id: UUID
    revocation_index: int
    enrollment_id: UUID | None = None
    course_id: UUID | None = None
    course_version: int | None = None
    pathway_id: UUID | None = None
    pathway_version: int | None = None
    revoked_at: datetime | None = None
    revocation_reason: str | None = None
    suspended_at: datetime | None = None
    suspension_reason: str | None = None

    def status(self, now: datetime) -> DisplayStatus:
        if self.revoked_at is not None:
            return DisplayStatus.REVOKED
        if self.suspended_at is not None:
            return DisplayStatus.SUSPENDED
        if self.valid_until is not None and now >= self.valid_until:
            return DisplayStatus.EXPIRED
        return DisplayStatus.VALID

    def counts_towards_pathways(self, now: datetime) -> bool:
        """A course credential that is current: not revoked, suspended or expired."""
        return self.kind is CredentialKind.COURSE and self.status(now) is DisplayStatus.VALID


class StatusChangeRefused(Exception):
    """Staff asked for a status change the rules refuse; the message says why."""


def _reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        raise StatusChangeRefused("a reason is required")
    return reason


def cascade_reason(part: Credential) -> str:
    """Why a pathway credential lost its standing with `part`, a course credential just revoked
    or suspended."""
    change, why = (
        ("revoked", part.revocation_reason)
        if part.revoked_at is not None
        else ("suspended", part.suspension_reason)
    )
    reason = f"The course credential {part.achievement_name} it stands on was {change}: {why}"
    return reason[: REASON_MAX_LENGTH - 3] + "..." if len(reason) > REASON_MAX_LENGTH else reason


def revoke(
    credential: Credential, reason: str, now: datetime, actor: str
) -> tuple[Credential, CredentialRevoked]:
    """Revoke for good: the credential's bit is set in its revocation list and never cleared."""
    if credential.revoked_at is not None:
        raise StatusChangeRefused(f"the credential was already revoked at {timestamp(credential.revoked_at)}")
    revoked = replace(
        credential,
        revoked_at=now,
        revocation_reason=_reason(reason),
        suspended_at=None,
        suspension_reason=None,
    )
    return revoked, _revoked_event(revoked, StatusPurpose.REVOCATION, revoked.revocation_reason, now, actor)


def suspend(
    credential: Credential, reason: str, now: datetime, actor: str
) -> tuple[Credential, CredentialRevoked]:
    """Suspend until reinstated; a revoked credential cannot be suspended (it is already final)."""
    if credential.revoked_at is not None:
        raise StatusChangeRefused("the credential is revoked; revocation is final")
    if credential.suspended_at is not None:
        raise StatusChangeRefused(
            f"the credential is already suspended since {timestamp(credential.suspended_at)}"
        )
    suspended = replace(credential, suspended_at=now, suspension_reason=_reason(reason))
    return suspended, _revoked_event(
        suspended, StatusPurpose.SUSPENSION, suspended.suspension_reason, now, actor
    )


def reinstate(credential: Credential, now: datetime, actor: str) -> tuple[Credential, CredentialReinstated]:
    """Lift a suspension."""
    if credential.revoked_at is not None:
        raise StatusChangeRefused("the credential is revoked; revocation is final")
    if credential.suspended_at is None:
        raise StatusChangeRefused("the credential is not suspended")
    reinstated = replace(credential, suspended_at=None, suspension_reason=None)
    event = CredentialReinstated(
        credential_id=credential.credential_id,
        learner_id=credential.learner.learner_id,
        reinstated_at=now,
        reinstated_by=actor,
    )
    return reinstated, event


def _revoked_event(
    credential: Credential, purpose: StatusPurpose, reason: str | None, now: datetime, actor: str
) -> CredentialRevoked:
    assert reason is not None
    return CredentialRevoked(
        credential_id=credential.credential_id,
        learner_id=credential.learner.learner_id,
        status_purpose=purpose,
        reason=reason,
        revoked_at=now,
        revoked_by=actor,
    )


@dataclass(frozen=True)
class StatusChange:
    """A recorded change of a credential's status: revoked, suspended or reinstated."""

    change: str
    reason: str | None
    actor: str
    at: datetime


def audit_trail(credential: Credential, changes: Iterable[StatusChange]) -> list[AuditEntry]:
    """The credential's history in order: its issuance (by this service, for an enrollment's
    completion or a pathway the learner's credentials complete), then each status change."""
    issued = AuditEntry(
        change="issued",
        at=credential.issued_at,
        actor="issuance",
        source="enrollment" if credential.kind is CredentialKind.COURSE else "issuance",
    )
    return [
        issued,
        *(AuditEntry(change=c.change, at=c.at, actor=c.actor, source="issuance") for c in changes),
    ]


def issued_event(credential: Credential, credential_url: str) -> CredentialIssued:
    return CredentialIssued(
        credential_id=credential.credential_id,
        kind=credential.kind,
        learner_id=credential.learner.learner_id,
        enrollment_id=credential.enrollment_id,
        course_id=credential.course_id,
        pathway_id=credential.pathway_id,
        achievement_id=credential.achievement_id,
        achievement_name=credential.achievement_name,
        issued_at=credential.issued_at,
        valid_until=credential.valid_until,
        credential_url=HttpUrl(credential_url),
    )
