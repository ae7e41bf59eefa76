"""Issuance's HTTP API: parse, call the use case in a transaction, answer.

Public: a credential (JSON-LD, or a page for browsers), its VC-JWT and badge, status lists, DID
documents and keys, and verification of any credential. Learners list their own credentials;
staff list anyone's and revoke, suspend or reinstate them.
"""

import asyncio
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from microcred_events import CredentialKind
from microcred_runtime import (
    AuditEntry,
    Caller,
    Cursor,
    Db,
    Limit,
    Page,
    Problem,
    RateLimited,
    RuntimeDep,
    Staff,
    max_body_bytes,
    problem_doc,
)

from . import images, pages, service
from .domain import REASON_MAX_LENGTH, Credential, DisplayStatus, part_ids
from .keys import did_document, jwks
from .proof_workers import ProofWorkers, VerifierBusy
from .service import Platform
from .settings import Settings
from .verification import Check, DatabaseRecords, Fetch, Outcome, Trust, Verdict, Verifier

_CREDENTIAL_ID = "7e2b9d4c-5a1f-4c36-b8e0-6d3a2f9c1e47"
JSON_MEDIA_TYPES = ("application/vc", "application/ld+json", "application/json")
VC_JWT = "application/vc+jwt"
# The page shows only what we wrote (escaped); nothing on it needs scripts, frames or forms.
_PAGE_POLICY = (
    "default-src 'none'; img-src * data:; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

Responses = dict[int | str, dict[str, Any]]


def _problems(described: dict[int, str]) -> Responses:
    return {status: problem_doc(description) for status, description in described.items()}


def _platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


def _trust(request: Request) -> Trust:
    trust: Trust = request.app.state.trust
    return trust


def _fetch(request: Request) -> Fetch:
    fetch: Fetch = request.app.state.fetch
    return fetch


def _proof_workers(request: Request) -> ProofWorkers:
    workers: ProofWorkers = request.app.state.proof_workers
    return workers


PlatformDep = Annotated[Platform, Depends(_platform)]
TrustDep = Annotated[Trust, Depends(_trust)]
FetchDep = Annotated[Fetch, Depends(_fetch)]
ProofWorkersDep = Annotated[ProofWorkers, Depends(_proof_workers)]

credentials = APIRouter(prefix="/credentials", tags=["credentials"])
learners = APIRouter(prefix="/me", tags=["credentials"])
published = APIRouter(tags=["keys and status lists"])
verification = APIRouter(tags=["verification"])


class CredentialOut(BaseModel):
    """A credential as issuance records it; the signed credential itself is at `credential_url`."""

    credential_id: UUID = Field(examples=[_CREDENTIAL_ID])
    kind: CredentialKind = Field(description="For a course or a pathway.", examples=["course"])
    credential_url: str = Field(
        description="The signed credential (JSON-LD), or its page in a browser.",
        examples=[f"https://credentials.microcred.example/credentials/{_CREDENTIAL_ID}"],
    )
    learner_id: UUID
    learner_display_name: str = Field(examples=["Ada Lovelace"])
    enrollment_id: UUID | None = Field(description="The completed enrollment, for a course credential.")
    course_id: UUID | None = None
    pathway_id: UUID | None = None
    issuer_id: UUID
    achievement_id: UUID
    achievement_name: str = Field(examples=["Data Analysis Foundations"])
    issued_at: datetime
    valid_until: datetime | None = Field(description="Null when it does not expire.")
    status: DisplayStatus = Field(description="valid, revoked, suspended or expired.", examples=["valid"])
    revoked_at: datetime | None = None
    revocation_reason: str | None = None
    suspended_at: datetime | None = None
    suspension_reason: str | None = None
    parts: list[UUID] = Field(
        default=[],
        description=(
            "For a pathway credential, the course credentials it stands on, as its evidence names them "
            "(empty for a course credential)."
        ),
    )

    @classmethod
    def of(cls, credential: Credential, platform: Platform, now: datetime) -> Self:
        parts = part_ids(json.loads(credential.document)) if credential.kind is CredentialKind.PATHWAY else []
        return cls(
            parts=parts,
            credential_id=credential.credential_id,
            kind=credential.kind,
            credential_url=platform.credential_url(credential.credential_id),
            learner_id=credential.learner.learner_id,
            learner_display_name=credential.learner.display_name,
            enrollment_id=credential.enrollment_id,
            course_id=credential.course_id,
            pathway_id=credential.pathway_id,
            issuer_id=credential.issuer_id,
            achievement_id=credential.achievement_id,
            achievement_name=credential.achievement_name,
            issued_at=credential.issued_at,
            valid_until=credential.valid_until,
            status=credential.status(now),
            revoked_at=credential.revoked_at,
            revocation_reason=credential.revocation_reason,
            suspended_at=credential.suspended_at,
            suspension_reason=credential.suspension_reason,
        )


class StatusChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(
        min_length=1,
        max_length=REASON_MAX_LENGTH,
        description="Why, as published in the CredentialRevoked event.",
        examples=["Completion was recorded in error."],
    )


# --- public views of a credential ------------------------------------------------------------

_CREDENTIAL_CONTENT = {
    "application/vc": {"schema": {"type": "object", "description": "The signed OpenBadgeCredential."}},
    "application/ld+json": {"schema": {"type": "object"}},
    "application/json": {"schema": {"type": "object"}},
    "text/html": {"schema": {"type": "string", "description": "The credential's page."}},
}


# A browser is answered with a page, everyone else with the problem.
_NOT_FOUND_CONTENT = {
    "description": "No such credential.",
    "content": {
        **_problems({404: "No such credential."})[404]["content"],
        "text/html": {"schema": {"type": "string", "description": "A page saying so."}},
    },
}


@credentials.get(
    "/{credential_id}",
    summary="A credential: JSON-LD, or its page for browsers",
    description=(
        "The signed Open Badges 3.0 credential, byte for byte as issued (`application/vc` unless "
        "`Accept` prefers `application/ld+json` or `application/json`). A browser (`Accept` "
        "preferring `text/html`) gets the human-readable page: name, issuer, holder, dates, status, "
        'skills, an "Add to LinkedIn profile" link and Open Graph tags for link previews. Public: '
        "whoever has the link may see it, as with a paper certificate."
    ),
    response_class=Response,
    responses={200: {"content": _CREDENTIAL_CONTENT}, 404: _NOT_FOUND_CONTENT},
)
async def get_credential(
    credential_id: UUID,
    request: Request,
    db: Db,
    platform: PlatformDep,
    format: Annotated[
        Literal["json", "html"] | None,
        Query(description="Overrides `Accept`: a browser link to the JSON-LD itself uses `?format=json`."),
    ] = None,
) -> Response:
    accept = request.headers.get("accept", "")
    headers = {"Vary": "Accept"}
    page = format == "html" or (format is None and prefers_html(accept))
    async with db.acquire() as conn:
        try:
            credential = await service.get_credential(conn, credential_id)
        except Problem as problem:
            if not page or problem.status != 404:
                raise
            # A person who followed a broken link gets a page; API clients keep the problem JSON.
            headers["Content-Security-Policy"] = _PAGE_POLICY
            return Response(
                pages.not_found_page(str(credential_id)),
                status_code=404,
                media_type="text/html; charset=utf-8",
                headers=headers,
            )
    if page:
        view = pages.CredentialView.of(
            credential,
            json.loads(credential.document),
            _now(),
            credential_url=platform.credential_url(credential_id),
            verify_url=f"{platform.base_url}/verify",
        )
        headers["Content-Security-Policy"] = _PAGE_POLICY
        return Response(pages.credential_page(view), media_type="text/html; charset=utf-8", headers=headers)
    return Response(credential.document.encode(), media_type=json_media_type(accept), headers=headers)


@credentials.get(
    "/{credential_id}/jwt",
    summary="A credential as a VC-JWT",
    description=(
        "The same credential secured as a VC-JWT (JOSE, EdDSA), `application/vc+jwt`. Its header's "
        "`kid` is the issuer's DID URL: resolve it through `/issuers/{issuer_id}/did.json`, or look "
        "it up in `/issuers/{issuer_id}/jwks.json`."
    ),
    response_class=Response,
    responses={
        200: {"content": {VC_JWT: {"schema": {"type": "string"}}}},
        **_problems({404: "No such credential."}),
    },
)
async def get_credential_jwt(credential_id: UUID, db: Db, platform: PlatformDep) -> Response:
    async with db.acquire() as conn:
        credential = await service.get_credential(conn, credential_id)
    return Response(service.credential_jwt(platform, credential), media_type=VC_JWT)


# An SVG opened on its own is a document: nothing in it runs or loads.
_SVG_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}


@credentials.get(
    "/{credential_id}/badge.svg",
    summary="A credential's badge image",
    description="A generated SVG badge with the achievement's and the issuer's names.",
    response_class=Response,
    responses={200: {"content": {"image/svg+xml": {}}}, **_problems({404: "No such credential."})},
)
async def get_badge(credential_id: UUID, db: Db) -> Response:
    async with db.acquire() as conn:
        credential = await service.get_credential(conn, credential_id)
    document = json.loads(credential.document)
    return Response(
        pages.badge_svg(credential.achievement_name, str(document["issuer"]["name"])),
        media_type="image/svg+xml",
        headers=_SVG_HEADERS,
    )


@credentials.get(
    "/{credential_id}/badge.png",
    dependencies=[RateLimited],  # each drawing costs CPU
    summary="A credential's badge, as PNG",
    description=(
        "The badge as a 600x600 PNG with a transparent background, for an email signature, a CV or "
        "a site that takes no SVG."
    ),
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_problems({404: "No such credential."})},
)
async def get_badge_png(credential_id: UUID, db: Db) -> Response:
    async with db.acquire() as conn:
        credential = await service.get_credential(conn, credential_id)
    issuer_name = str(json.loads(credential.document)["issuer"]["name"])
    png = await _drawn(images.badge_png, credential.achievement_name, issuer_name)
    # The names in a signed credential never change.
    return Response(png, media_type="image/png", headers={"Cache-Control": "public, max-age=86400"})


async def _drawn(draw: Callable[..., bytes], *arguments: Any) -> bytes:
    """An image drawn on `images.DRAWING`, off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(images.DRAWING, draw, *arguments)


_BAKED_DESCRIPTION = (
    "The badge with the signed credential baked in (Open Badges 3.0 §5.3), to download: a copy "
    "placed on a website or in an email signature carries its own proof, which any Open Badges 3.0 "
    "verifier extracts and checks."
)


@credentials.get(
    "/{credential_id}/baked.png",
    dependencies=[RateLimited],  # each drawing costs CPU
    summary="The badge as PNG, with the credential baked in",
    description=f"{_BAKED_DESCRIPTION} The credential is in an `openbadgecredential` iTXt chunk.",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_problems({404: "No such credential."})},
)
async def get_baked_png(credential_id: UUID, db: Db) -> Response:
    async with db.acquire() as conn:
        credential = await service.get_credential(conn, credential_id)
    issuer_name = str(json.loads(credential.document)["issuer"]["name"])
    badge = await _drawn(images.badge_png, credential.achievement_name, issuer_name)
    return Response(
        images.baked_png(badge, credential.document),
        media_type="image/png",
        headers={"Content-Disposition": _attachment(credential, "png")},
    )


@credentials.get(
    "/{credential_id}/baked.svg",
    summary="The badge as SVG, with the credential baked in",
    description=f"{_BAKED_DESCRIPTION} The credential is in an `openbadges:credential` element.",
    response_class=Response,
    responses={200: {"content": {"image/svg+xml": {}}}, **_problems({404: "No such credential."})},
)
async def get_baked_svg(credential_id: UUID, db: Db) -> Response:
    async with db.acquire() as conn:
        credential = await service.get_credential(conn, credential_id)
    issuer_name = str(json.loads(credential.document)["issuer"]["name"])
    return Response(
        pages.baked_svg(credential.achievement_name, issuer_name, credential.document),
        media_type="image/svg+xml",
        headers={**_SVG_HEADERS, "Content-Disposition": _attachment(credential, "svg")},
    )


def _attachment(credential: Credential, extension: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "-", credential.achievement_name).strip("-").lower() or "badge"
    return f'attachment; filename="{stem[:80]}.{extension}"'


@credentials.get(
    "/{credential_id}/card.png",
    dependencies=[RateLimited],  # each drawing costs CPU
    summary="A credential's share card, as PNG",
    description=(
        "A 1200x630 PNG for link previews (the page's `og:image`): the badge, the credential's and "
        "the learner's names, the issuer, the date and the status, which it shows within five minutes "
        "of a change."
    ),
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_problems({404: "No such credential."})},
)
async def get_share_card(credential_id: UUID, db: Db) -> Response:
    async with db.acquire() as conn:
        credential = await service.get_credential(conn, credential_id)
    document = json.loads(credential.document)
    png = await _drawn(
        images.share_card_png,
        str(document.get("name") or credential.achievement_name),
        str(document["issuer"]["name"]),
        credential.learner.display_name,
        credential.issued_at,
        credential.status(_now()),
    )
    return Response(png, media_type="image/png", headers={"Cache-Control": "public, max-age=300"})


# --- lists -----------------------------------------------------------------------------------


@learners.get(
    "/credentials",
    summary="My credentials",
    description="The caller's own credentials, newest first, a page at a time.",
    responses=_problems({400: "The cursor is not one this API returned.", 401: "No valid bearer token."}),
)
async def my_credentials(
    caller: Caller, db: Db, platform: PlatformDep, limit: Limit = 20, cursor: Cursor = None
) -> Page[CredentialOut]:
    async with db.acquire() as conn:
        found, next_cursor = await service.list_credentials(
            conn, caller.learner_id, limit=limit, cursor=cursor
        )
    now = _now()
    return Page(items=[CredentialOut.of(item, platform, now) for item in found], next_cursor=next_cursor)


@credentials.get(
    "",
    summary="Credentials (staff)",
    description="Every credential, or one learner's, newest first, a page at a time.",
    responses=_problems(
        {400: "The cursor is not one this API returned.", 401: "No valid bearer token.", 403: "Not staff."}
    ),
)
async def list_credentials(
    staff: Staff,
    db: Db,
    platform: PlatformDep,
    learner_id: Annotated[UUID | None, Query(description="Only this learner's credentials.")] = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Page[CredentialOut]:
    async with db.acquire() as conn:
        found, next_cursor = await service.list_credentials(conn, learner_id, limit=limit, cursor=cursor)
    now = _now()
    return Page(items=[CredentialOut.of(item, platform, now) for item in found], next_cursor=next_cursor)


# --- status (staff) --------------------------------------------------------------------------

_STATUS_PROBLEMS = _problems(
    {
        401: "No valid bearer token.",
        403: "Not staff, staff of another issuer (`issuer-scope`), or the credential's holder "
        "(`own-credential`).",
        404: "No such credential.",
        409: (
            "The change does not apply (already revoked, already suspended, not suspended; a pathway "
            "credential standing on a revoked course credential is not reinstated)."
        ),
    }
)


@credentials.get(
    "/{credential_id}/audit",
    summary="Who did what to a credential (staff)",
    description=(
        "The credential's history, oldest first: its issuance, then every revocation, suspension "
        "and reinstatement with who made it and when. For staff of the credential's issuer, and admins."
    ),
    responses=_problems(
        {
            401: "No valid bearer token.",
            403: "Not staff, or staff of another issuer.",
            404: "No such credential.",
        }
    ),
)
async def audit_credential(credential_id: UUID, staff: Staff, db: Db) -> list[AuditEntry]:
    async with db.acquire() as conn:
        return await service.audit_credential(conn, staff, credential_id)


@credentials.post(
    "/{credential_id}/revocation",
    summary="Revoke a credential (staff)",
    description=(
        "Revokes for good: the credential's bit is set in its published status list (re-signed at "
        "once) and CredentialRevoked is published. A revoked credential stays revoked; the learner "
        "can earn the achievement again only through a new completion."
    ),
    responses=_STATUS_PROBLEMS,
)
async def revoke(
    credential_id: UUID, request: StatusChange, staff: Staff, db: Db, platform: PlatformDep
) -> CredentialOut:
    async with db.acquire() as conn, conn.transaction():
        credential = await service.revoke_credential(conn, platform, staff, credential_id, request.reason)
    return CredentialOut.of(credential, platform, _now())


@credentials.post(
    "/{credential_id}/suspension",
    summary="Suspend a credential (staff)",
    description=(
        "Suspends until reinstated: verification reports the credential as suspended, and "
        "CredentialRevoked (status_purpose suspension) is published."
    ),
    responses=_STATUS_PROBLEMS,
)
async def suspend(
    credential_id: UUID, request: StatusChange, staff: Staff, db: Db, platform: PlatformDep
) -> CredentialOut:
    async with db.acquire() as conn, conn.transaction():
        credential = await service.suspend_credential(conn, platform, staff, credential_id, request.reason)
    return CredentialOut.of(credential, platform, _now())


@credentials.delete(
    "/{credential_id}/suspension",
    summary="Reinstate a suspended credential (staff)",
    description="Lifts the suspension: the credential verifies as valid again (unless it expired).",
    responses=_STATUS_PROBLEMS,
)
async def reinstate(credential_id: UUID, staff: Staff, db: Db, platform: PlatformDep) -> CredentialOut:
    async with db.acquire() as conn, conn.transaction():
        credential = await service.reinstate_credential(conn, platform, staff, credential_id)
    return CredentialOut.of(credential, platform, _now())


# --- status lists, DIDs and keys -------------------------------------------------------------


@published.get(
    "/status/{list_id}",
    summary="A status list",
    description=(
        "A signed W3C BitstringStatusListCredential: bit `statusListIndex` of a credential's entry "
        "is set when it is revoked. Re-signed whenever a bit changes."
    ),
    response_class=Response,
    responses={200: {"content": {"application/vc": {}}}, **_problems({404: "No such status list."})},
)
async def get_status_list(list_id: UUID, db: Db) -> Response:
    async with db.acquire() as conn:
        document = await service.status_list_document(conn, list_id)
    # Short caching: a revocation must show soon, but verifiers need not ask every time.
    return Response(
        document.encode(), media_type="application/vc", headers={"Cache-Control": "public, max-age=60"}
    )


@published.get(
    "/issuers/{issuer_id}/did.json",
    summary="An institution's DID document (did:web)",
    description=(
        "The did:web document of an issuing institution seen in the catalog. It lists the platform's "
        "keys, old and new: the platform signs on the institutions' behalf, and a credential signed "
        "before a key rotation keeps verifying."
    ),
    responses=_problems({404: "No such issuer."}),
)
async def get_issuer_did(issuer_id: UUID, db: Db, platform: PlatformDep) -> dict[str, Any]:
    async with db.acquire() as conn:
        return await service.issuer_did_document(conn, platform, issuer_id)


@published.get(
    "/issuers/{issuer_id}/jwks.json",
    summary="An institution's public keys (JWKS)",
    description=(
        "The keys of the institution's DID document as a JSON Web Key Set (OKP / Ed25519), old and "
        "new. Each `kid` is the full DID URL (`did:web:...:issuers:<id>#key-...`), the `kid` its "
        "VC-JWTs carry in their header, so a standard JWKS client finds the key from the token."
    ),
    responses=_problems({404: "No such issuer."}),
)
async def get_issuer_jwks(issuer_id: UUID, db: Db, platform: PlatformDep) -> dict[str, Any]:
    async with db.acquire() as conn:
        return await service.issuer_jwks(conn, platform, issuer_id)


@published.get(
    "/.well-known/did.json",
    summary="The platform's DID document (did:web)",
    description="The platform's own did:web: it signs the status lists.",
)
async def get_platform_did(platform: PlatformDep) -> dict[str, Any]:
    return did_document(platform.did, platform.keyring)


@published.get(
    "/.well-known/jwks.json",
    summary="The platform's public keys (JWKS)",
    description=(
        "Every signing key, old and new, as a JSON Web Key Set (OKP / Ed25519); each `kid` is the "
        "key's DID URL in the platform's own did:web (`did:web:<host>#key-...`). An institution's "
        "VC-JWTs name its DID instead: their keys are at `/issuers/{issuer_id}/jwks.json`."
    ),
)
async def get_jwks(platform: PlatformDep) -> dict[str, Any]:
    return jwks(platform.keyring, did=platform.did)


# --- verification ----------------------------------------------------------------------------


class CheckOut(BaseModel):
    result: Outcome = Field(
        description="passed, failed or unknown (could not be decided).", examples=["passed"]
    )
    detail: str = Field(examples=["signed by did:web:credentials.microcred.example:issuers:...#key-1"])

    @classmethod
    def of(cls, check: Check) -> Self:
        return cls(result=check.outcome, detail=check.detail)


class ChecksOut(BaseModel):
    structure: CheckOut = Field(description="Required members and types; only contexts the service holds.")
    signature: CheckOut = Field(description="The proof (or VC-JWT) against the issuer's key.")
    dates: CheckOut = Field(description="validFrom <= now < validUntil.")
    status: CheckOut = Field(description="Revocation and suspension.")


class VerificationOut(BaseModel):
    """The verdict and each check. `valid` only when every check passed; `invalid` when one failed;
    otherwise `unknown` (e.g. a status list that cannot be fetched). Never valid by default."""

    verified: Verdict = Field(examples=["valid"])
    checks: ChecksOut
    credential_id: str | None = Field(default=None, description="The credential's `id`, if it has one.")
    issuer: str | None = Field(default=None, description="The issuer's id, if the credential names one.")
    checked_at: datetime


def _verify_max_body_bytes(settings: Settings) -> int:
    return settings.verify_max_body_bytes


_VERIFY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"type": "object", "description": "A credential with an embedded proof."},
                        {"type": "string", "description": "A VC-JWT."},
                    ]
                }
            },
            "application/vc": {"schema": {"type": "object"}},
            "application/ld+json": {"schema": {"type": "object"}},
            VC_JWT: {"schema": {"type": "string"}},
        },
    }
}


@verification.post(
    "/verify",
    summary="Verify any Open Badges 3.0 / VC 2.0 credential",
    dependencies=[RateLimited],
    description=(
        "Checks a credential, ours or another issuer's: a JSON credential with an embedded Data "
        "Integrity proof (eddsa-rdfc-2022), or a VC-JWT (as a JSON string, or the raw token with "
        "`Content-Type: application/vc+jwt`). Reports structure, signature, dates and status "
        "separately. Nothing named in the credential is fetched unless its host is in "
        "VERIFY_TRUSTED_HOSTS; what cannot be checked is `unknown`, never `passed`."
    ),
    openapi_extra=_VERIFY_BODY,
    responses=_problems(
        {
            413: "The body is larger than VERIFY_MAX_BODY_BYTES.",
            422: "Not a credential.",
            503: "VERIFY_MAX_CONCURRENT verifications are under way (`verifier-busy`); see Retry-After.",
        }
    ),
)
@max_body_bytes(_verify_max_body_bytes)
async def verify(
    request: Request,
    runtime: RuntimeDep,
    platform: PlatformDep,
    trust: TrustDep,
    fetch: FetchDep,
    workers: ProofWorkersDep,
) -> VerificationOut:
    # Admitted once the body is in: a client that sends it slowly holds no verification's turn.
    body = await request.body()
    presented = _presented(body, request.headers.get("content-type", ""))
    return await _verification(presented, runtime, platform, trust, fetch, workers)


@credentials.get(
    "/{credential_id}/verification",
    summary="Verify a credential we issued, as it was issued",
    dependencies=[RateLimited],
    description=(
        "The checks of `POST /verify` run on this credential, byte for byte as issued: what the "
        "Verify button of the credential's page shows. JSON, or a page for browsers (`Accept` "
        "preferring `text/html`)."
    ),
    response_model=VerificationOut,
    responses={
        200: {"content": {"text/html": {"schema": {"type": "string"}}}},
        **_problems(
            {
                404: "No such credential.",
                503: "VERIFY_MAX_CONCURRENT verifications are under way (`verifier-busy`); see Retry-After.",
            }
        ),
    },
)
async def get_verification(
    credential_id: UUID,
    request: Request,
    db: Db,
    runtime: RuntimeDep,
    platform: PlatformDep,
    trust: TrustDep,
    fetch: FetchDep,
    workers: ProofWorkersDep,
) -> Response:
    async with db.acquire() as conn:
        credential = await service.get_credential(conn, credential_id)
    out = await _verification(json.loads(credential.document), runtime, platform, trust, fetch, workers)
    headers = {"Vary": "Accept", "Cache-Control": "no-store"}
    if not prefers_html(request.headers.get("accept", "")):
        return Response(out.model_dump_json(), media_type="application/json", headers=headers)
    page = pages.verification_page(
        credential.achievement_name,
        platform.credential_url(credential_id),
        out.verified,
        [(name, check.result, check.detail) for name, check in out.checks],
        out.checked_at,
    )
    headers["Content-Security-Policy"] = _PAGE_POLICY
    return Response(page, media_type="text/html; charset=utf-8", headers=headers)


async def _verification(
    presented: dict[str, Any] | str,
    runtime: RuntimeDep,
    platform: Platform,
    trust: Trust,
    fetch: Fetch,
    workers: ProofWorkers,
) -> VerificationOut:
    now = _now()
    records = DatabaseRecords(runtime.pool)
    try:
        with workers.admitted():
            report = await Verifier(platform, trust, records, fetch, now, workers.check).verify(presented)
    except VerifierBusy:
        raise Problem(
            503,
            "verifier-busy",
            "too many verifications are under way; try again shortly",
            headers={"Retry-After": "1"},
        ) from None
    credential = report.credential or {}
    issuer = credential.get("issuer")
    issuer_id = issuer.get("id") if isinstance(issuer, dict) else issuer
    credential_id = credential.get("id")
    return VerificationOut(
        verified=report.verified,
        checks=ChecksOut(**{name: CheckOut.of(check) for name, check in report.checks.items()}),
        credential_id=credential_id if isinstance(credential_id, str) else None,
        issuer=issuer_id if isinstance(issuer_id, str) else None,
        checked_at=now,
    )


_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def _presented(body: bytes, content_type: str) -> dict[str, Any] | str:
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type in (VC_JWT, "application/jwt", "text/plain"):
        token = body.decode("utf-8", "replace").strip()
        if not _JWT.fullmatch(token):
            raise Problem(422, "not-a-credential", "the body is not a compact JWS (VC-JWT)")
        return token
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        raise Problem(422, "not-a-credential", "the body is not JSON (or nests too deeply)") from None
    if isinstance(parsed, dict):
        return parsed
    if isinstance(parsed, str) and _JWT.fullmatch(parsed.strip()):
        return parsed
    raise Problem(422, "not-a-credential", "send a credential (a JSON object) or a VC-JWT (a JSON string)")


# --- content negotiation ---------------------------------------------------------------------


def _accepted(accept: str) -> list[tuple[str, float]]:
    ranges = []
    for part in accept.split(","):
        media_range, *parameters = (item.strip() for item in part.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media_range:
            ranges.append((media_range.lower(), quality))
    return ranges


def _quality(ranges: list[tuple[str, float]], media_type: str, *, wildcard: bool) -> float:
    family = media_type.split("/")[0] + "/*"
    matches = [q for media_range, q in ranges if media_range in (media_type, family)]
    if wildcard:
        matches += [q for media_range, q in ranges if media_range == "*/*"]
    return max(matches, default=0.0)


def prefers_html(accept: str) -> bool:
    """Whether a client asks for the page: it names text/html at least as keenly as any JSON type.

    `*/*` counts for JSON only, so a bare client (curl, a wallet) gets the credential itself and a
    browser (`text/html,...,*/*;q=0.8`) gets the page.
    """
    ranges = _accepted(accept)
    html = _quality(ranges, "text/html", wildcard=False)
    data = max(_quality(ranges, media_type, wildcard=True) for media_type in JSON_MEDIA_TYPES)
    return html > 0 and html >= data


def json_media_type(accept: str) -> str:
    """The JSON media type to answer with: the one the client likes best, `application/vc` by default."""
    ranges = _accepted(accept)
    return max(JSON_MEDIA_TYPES, key=lambda media_type: _quality(ranges, media_type, wildcard=False))


def _now() -> datetime:
    return datetime.now(UTC)
