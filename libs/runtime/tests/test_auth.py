"""Bearer-token checks: what gets in, and what is turned away with 401 or 403."""

import base64
import hashlib
import hmac
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from microcred_runtime import Caller, Principal, Role, Staff
from microcred_runtime.auth import AuthConfig, Authenticator
from microcred_runtime.problems import install_problem_handlers

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from dev_issuer import DevIssuer

ISSUER = "https://issuer.test"


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> DevIssuer:
    return DevIssuer(tmp_path_factory.mktemp("keys"), issuer=ISSUER, audience="microcred")


@pytest.fixture
def app(issuer: DevIssuer, tmp_path: Path) -> FastAPI:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    app = FastAPI()
    install_problem_handlers(app)
    app.state.authenticator = Authenticator(
        AuthConfig(issuer=ISSUER, audience="microcred", algorithms=("RS256",), jwks_file=jwks)
    )

    @app.get("/me")
    async def me(caller: Caller) -> dict[str, Any]:
        return {
            "subject": caller.subject,
            "roles": sorted(caller.roles),
            "learner_id": str(caller.learner_id),
        }

    @app.get("/staff-only")
    async def staff_only(caller: Staff) -> dict[str, str]:
        return {"subject": caller.subject}

    return app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_a_valid_token_admits_the_caller(client: httpx.AsyncClient, issuer: DevIssuer) -> None:
    response = await client.get("/me", headers=bearer(issuer.token("ada", ["learner"])))
    assert response.status_code == 200
    assert response.json()["subject"] == "ada"
    assert response.json()["roles"] == ["learner"]


async def test_staff_route_admits_staff_and_refuses_learners(
    client: httpx.AsyncClient, issuer: DevIssuer
) -> None:
    assert (await client.get("/staff-only", headers=bearer(issuer.token("s", ["staff"])))).status_code == 200
    assert (await client.get("/staff-only", headers=bearer(issuer.token("a", ["admin"])))).status_code == 200
    refused = await client.get("/staff-only", headers=bearer(issuer.token("l", ["learner"])))
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"


def _unsigned(issuer: DevIssuer) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "microcred", "sub": "eve", "roles": ["admin"], "exp": now + 60}
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."


def _hs256_with_public_key(issuer: DevIssuer) -> str:
    # The classic algorithm-confusion attack: sign with HMAC, using the public key as the secret.
    private = serialization.load_pem_private_key(
        (issuer.key_dir / "signing-key.pem").read_bytes(), password=None
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "microcred", "sub": "eve", "roles": ["admin"], "exp": now + 60}
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': issuer.key_id})}.{_b64(claims)}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("no token", lambda issuer: None),
        ("not a JWT", lambda issuer: "not-a-jwt"),
        ("alg none", _unsigned),
        ("HS256 signed with the public key", _hs256_with_public_key),
        ("expired", lambda issuer: issuer.token("ada", ["learner"], ttl=-120)),
        ("wrong audience", lambda issuer: issuer.token("ada", ["learner"], aud="someone-else")),
        ("wrong issuer", lambda issuer: issuer.token("ada", ["learner"], iss="https://evil.test")),
        ("tampered payload", lambda issuer: _tampered(issuer.token("ada", ["learner"]))),
        ("unknown key", lambda issuer: _other_key_token()),
    ],
)
async def test_bad_tokens_are_refused_with_401(
    client: httpx.AsyncClient, issuer: DevIssuer, case: str, make: Any
) -> None:
    token = make(issuer)
    response = await client.get("/me", headers=bearer(token) if token else {})
    assert response.status_code == 401, case
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    return f"{header}.{_b64(claims)}.{signature}"


def _other_key_token() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "microcred", "sub": "eve", "roles": ["admin"], "exp": now + 60}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "someone-elses-key"})


async def test_a_token_without_a_microcred_role_is_forbidden(
    client: httpx.AsyncClient, issuer: DevIssuer
) -> None:
    response = await client.get("/me", headers=bearer(issuer.token("ada", ["viewer"])))
    assert response.status_code == 403


def test_learner_id_is_stable_and_derived_even_from_a_uuid_subject() -> None:
    uuid_subject = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    # Otherwise a subject that is the text of another learner's id would be that learner.
    assert str(Principal(uuid_subject, frozenset()).learner_id) != uuid_subject
    vouched = Principal(uuid_subject, frozenset(), subject_is_learner_id=True)
    assert str(vouched.learner_id) == uuid_subject
    assert Principal("auth0|ada", frozenset()).learner_id == Principal("auth0|ada", frozenset()).learner_id
    assert Principal("auth0|ada", frozenset()).learner_id != Principal("auth0|bob", frozenset()).learner_id


def _with_typ(issuer: DevIssuer, typ: str | None, **claims: Any) -> str:
    """A token the issuer signs, with the header `typ` given (None: no `typ` at all)."""
    now = int(time.time())
    payload = {
        "iss": ISSUER,
        "aud": "microcred",
        "sub": "ada",
        "roles": ["learner"],
        "exp": now + 60,
        **claims,
    }
    private = serialization.load_pem_private_key(
        (issuer.key_dir / "signing-key.pem").read_bytes(), password=None
    )
    # PyJWT leaves `typ` out of the header when it is given as None.
    headers: dict[str, Any] = {"kid": issuer.key_id, "typ": typ}
    return jwt.encode(payload, private, algorithm="RS256", headers=headers)  # type: ignore[arg-type]


@pytest.mark.parametrize("typ", ["JWT", "jwt", "id_token+jwt", "dpop+jwt", None])
async def test_a_token_of_another_type_is_refused_with_401(
    client: httpx.AsyncClient, issuer: DevIssuer, typ: str | None
) -> None:
    # An ID token (or any other JWT) of the same issuer is not an access token (RFC 8725 3.11).
    response = await client.get("/me", headers=bearer(_with_typ(issuer, typ)))
    assert response.status_code == 401, typ
    assert "typ" in response.json()["detail"]


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt"])
async def test_an_access_token_is_accepted_however_its_type_is_spelled(
    client: httpx.AsyncClient, issuer: DevIssuer, typ: str
) -> None:
    assert (await client.get("/me", headers=bearer(_with_typ(issuer, typ)))).status_code == 200


@pytest.mark.parametrize(
    "claims",
    [
        {"roles": "admin"},
        {"roles": {"admin": True}},
        {"roles": 7},
        {"roles": ["staff"], "issuers": "8a0d6c3b-2f4e-4b91-a7c5-1e9f3d2b6a40"},
        {"roles": ["staff"], "issuers": ["not an issuer id"]},
        {"roles": ["staff"], "issuers": [7]},
    ],
    ids=[
        "roles a string",
        "roles an object",
        "roles a number",
        "issuers a string",
        "issuers not ids",
        "issuers numbers",
    ],
)
async def test_a_malformed_roles_or_issuers_claim_is_refused_with_401(
    client: httpx.AsyncClient, issuer: DevIssuer, claims: dict[str, Any]
) -> None:
    response = await client.get("/me", headers=bearer(_with_typ(issuer, "at+jwt", **claims)))
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"


def test_staff_act_for_the_issuers_their_token_names_and_admins_for_all() -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    staff = Principal("sam", frozenset({Role.STAFF}), issuers=frozenset({mine}))
    assert staff.may_act_for(mine)
    assert not staff.may_act_for(theirs)
    assert not staff.may_act_for(None)
    assert not Principal("sam", frozenset({Role.STAFF})).may_act_for(mine), "no scope is no issuer"
    assert not Principal("ada", frozenset({Role.LEARNER}), issuers=frozenset({mine})).may_act_for(mine)
    admin = Principal("root", frozenset({Role.ADMIN}))
    assert admin.may_act_for(theirs)
    assert admin.may_act_for(None)
    assert (staff.actor, admin.actor, Principal("ada", frozenset({Role.LEARNER})).actor) == (
        "staff:sam",
        "admin:root",
        "learner:ada",
    )


@pytest.mark.parametrize("vouched", [False, True])
async def test_a_uuid_subject_is_the_learner_id_only_when_the_operator_says_so(
    issuer: DevIssuer, tmp_path: Path, vouched: bool
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    config = AuthConfig(
        issuer=ISSUER,
        audience="microcred",
        algorithms=("RS256",),
        jwks_file=jwks,
        uuid_subjects_are_learner_ids=vouched,
    )
    subject = str(uuid.uuid4())

    principal = await Authenticator(config).principal(issuer.token(subject, ["learner"]))
    named = await Authenticator(config).principal(issuer.token("auth0|ada", ["learner"]))

    assert (principal.learner_id == uuid.UUID(subject)) is vouched
    assert named.learner_id == Principal("auth0|ada", frozenset()).learner_id
