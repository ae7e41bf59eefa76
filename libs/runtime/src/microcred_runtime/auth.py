"""Who is calling: bearer JWTs from an OIDC-style issuer, checked against its published keys.

The token's signature is verified with the issuer's JSON Web Key Set (from a URL, refreshed when
a token names a key id we have not seen, or from a file); the algorithm list is pinned by
configuration, so a token cannot choose `none` or HS256-with-the-public-key; `exp`, `iss`, `aud`
and `sub` are required, and the header's `typ` must be an accepted type (RFC 8725 3.11: `at+jwt`,
an RFC 9068 access token, by default), so another JWT of the same issuer (an ID token) is not taken
for an access token. Roles come from a claim (`roles` by default): learner, staff, admin.

A learner's id is derived from the token's subject (UUIDv5), a UUID-shaped subject included: only
when the operator says the issuer's subjects are learner ids (AUTH_UUID_SUBJECTS_ARE_LEARNER_IDS)
is a UUID subject taken as the id itself, since otherwise anyone whose subject is the text of
another learner's id would be that learner.

Staff act for institutions, not for the platform: the `issuers` claim lists the issuer
(institution) ids a staff member may act for, and `Principal.may_act_for` is what every staff
action checks. A staff token without the claim acts for no issuer. Admins act for every issuer.
"""

import asyncio
import enum
import json
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .problems import Problem

log = logging.getLogger(__name__)

_LEARNER_NAMESPACE = uuid.UUID("6f1d7c1e-3b5a-4d0e-9a52-2c8e4b7f1a90")
# A token naming an unknown key id triggers a refresh, but not more often than this.
_REFRESH_INTERVAL = 30.0


class Role(enum.StrEnum):
    LEARNER = "learner"
    STAFF = "staff"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    subject: str
    roles: frozenset[Role]
    email: str | None = None
    name: str | None = None
    # The issuers (institutions) a staff role acts for; admins act for all of them.
    issuers: frozenset[uuid.UUID] = frozenset()
    # Set when the issuer's subjects are learner ids and this one is a UUID (checked on the token).
    subject_is_learner_id: bool = False

    @property
    def learner_id(self) -> uuid.UUID:
        """The caller's id in microcred events: derived from the subject (UUIDv5), so every service
        maps one subject to the same learner without a lookup; the subject itself only when it is
        vouched for as a learner id (`subject_is_learner_id`)."""
        if self.subject_is_learner_id:
            return uuid.UUID(self.subject)
        return uuid.uuid5(_LEARNER_NAMESPACE, self.subject)

    @property
    def is_staff(self) -> bool:
        return bool(self.roles & {Role.STAFF, Role.ADMIN})

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    @property
    def actor(self) -> str:
        """Who acted, as the audit trail records it: the role and the token's subject."""
        role = Role.ADMIN if self.is_admin else Role.STAFF if Role.STAFF in self.roles else Role.LEARNER
        return f"{role}:{self.subject}"

    def may_act_for(self, issuer_id: uuid.UUID | None) -> bool:
        """Whether the caller may act as staff for what `issuer_id` issues (None: an unknown issuer,
        which only admins act for)."""
        if self.is_admin:
            return True
        return Role.STAFF in self.roles and issuer_id is not None and issuer_id in self.issuers

    def require_issuer(self, issuer_id: uuid.UUID | None) -> None:
        """403 unless the caller may act for `issuer_id`."""
        if not self.may_act_for(issuer_id):
            raise Problem(
                403, "issuer-scope", f"the token's staff role does not cover the issuer {issuer_id}"
            )


@dataclass(frozen=True)
class AuthConfig:
    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    jwks_url: str | None = None
    jwks_file: Path | None = None
    roles_claim: str = "roles"
    issuers_claim: str = "issuers"
    # RFC 8725 3.11 explicit typing: the header `typ` values accepted (compared without case and
    # without an `application/` prefix, RFC 7515 4.1.9).
    token_types: tuple[str, ...] = ("at+jwt",)
    uuid_subjects_are_learner_ids: bool = False


class KeySet:
    """The issuer's public keys, loaded lazily and refreshed when a new key id shows up."""

    def __init__(self, config: AuthConfig) -> None:
        self._config = config
        self._keys: dict[str, jwt.PyJWK] = {}
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        if kid in self._keys or (kid is None and len(self._keys) == 1):
            return self._lookup(kid)
        async with self._lock:
            if kid not in self._keys and time.monotonic() - self._loaded_at > _REFRESH_INTERVAL:
                await self._load()
        return self._lookup(kid)

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _load(self) -> None:
        self._loaded_at = time.monotonic()
        try:
            document = await self._fetch()
            keys = jwt.PyJWKSet.from_dict(document).keys
        except (OSError, httpx.HTTPError, ValueError, jwt.PyJWKSetError) as exc:
            log.warning("cannot load the issuer's keys: %s", exc)
            return
        self._keys = {key.key_id or "": key for key in keys}

    async def _fetch(self) -> dict[str, Any]:
        if self._config.jwks_file is not None:
            document: dict[str, Any] = json.loads(self._config.jwks_file.read_text())
            return document
        assert self._config.jwks_url is not None
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(self._config.jwks_url)
            response.raise_for_status()
            fetched: dict[str, Any] = response.json()
            return fetched


def _media_type(typ: object) -> str | None:
    if not isinstance(typ, str):
        return None
    typ = typ.lower()
    return typ.removeprefix("application/")


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self._config = config
        self._keys = KeySet(config)

    async def principal(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _unauthorized("the bearer token is not a JWT") from None
        if header.get("alg") not in self._config.algorithms:
            raise _unauthorized("the token's signing algorithm is not accepted")
        if _media_type(header.get("typ")) not in {_media_type(typ) for typ in self._config.token_types}:
            raise _unauthorized(
                f"the token's type (`typ`) is not one accepted: {', '.join(self._config.token_types)}"
            )
        key = await self._keys.key(header.get("kid"))
        if key is None:
            raise _unauthorized("the token was signed with an unknown key")
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=list(self._config.algorithms),
                audience=self._config.audience,
                issuer=self._config.issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
                leeway=30,
            )
        except jwt.InvalidTokenError as exc:
            raise _unauthorized(f"the token is not valid: {exc}") from None
        raw_roles = claims.get(self._config.roles_claim, [])
        if not isinstance(raw_roles, list):
            raise _unauthorized(f"the token's `{self._config.roles_claim}` claim is not a list")
        roles = frozenset(Role(role) for role in raw_roles if role in Role.__members__.values())
        if not roles:
            raise Problem(403, "forbidden", "the token grants no microcred role")
        subject = str(claims["sub"])
        return Principal(
            subject=subject,
            roles=roles,
            email=claims.get("email"),
            name=claims.get("name"),
            issuers=self._issuers(claims.get(self._config.issuers_claim, [])),
            subject_is_learner_id=self._config.uuid_subjects_are_learner_ids and _is_uuid(subject),
        )

    def _issuers(self, raw: Any) -> frozenset[uuid.UUID]:
        claim = self._config.issuers_claim
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise _unauthorized(f"the token's `{claim}` claim is not a list of issuer ids")
        try:
            return frozenset(uuid.UUID(item) for item in raw)
        except ValueError:
            raise _unauthorized(
                f"the token's `{claim}` claim holds something other than issuer ids"
            ) from None


_bearer = HTTPBearer(auto_error=False)


async def _authenticated(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if credentials is None:
        raise _unauthorized("a bearer token is required")
    authenticator: Authenticator = request.app.state.authenticator
    return await authenticator.principal(credentials.credentials)


async def _optional(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal | None:
    # Public routes need no token, but one that is sent is checked: it may show staff more.
    if credentials is None:
        return None
    return await _authenticated(request, credentials)


def require(*roles: Role) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that admits callers holding any of `roles` (403 otherwise)."""

    async def check(principal: Annotated[Principal, Depends(_authenticated)]) -> Principal:
        if not principal.roles & set(roles):
            raise Problem(403, "forbidden", f"this needs the role {' or '.join(roles)}")
        return principal

    return check


Caller = Annotated[Principal, Depends(_authenticated)]
"""Any authenticated caller."""
Viewer = Annotated[Principal | None, Depends(_optional)]
"""A public route's caller: None without a token; a token that is sent must be valid."""
Staff = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN))]
"""Staff or admin."""
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
