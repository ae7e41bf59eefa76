"""A development token issuer: what an OIDC provider does for microcred, for local runs and tests.

It holds an RSA signing key generated on first use under `.local/dev-issuer/` (git-ignored,
never committed), publishes the public half as a JWKS, and mints bearer tokens for any subject
and roles. Run it with `python scripts/dev_issuer.py` (the run command does); tests import
`DevIssuer` and use it in-process. A staff token names the issuers (institutions) it acts for:

    curl -s -X POST localhost:8000/token -H 'content-type: application/json' \\
         -d '{"sub": "learner-1", "roles": ["learner"], "email": "ada@example.org"}'
    curl -s -X POST localhost:8000/token -H 'content-type: application/json' \\
         -d '{"sub": "sam", "roles": ["staff"], "issuers": ["bf5780e1-3f49-4e91-a3f5-6d631f62dbab"]}'
"""

import base64
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
KEY_DIR = ROOT / ".local" / "dev-issuer"
PORT = int(os.environ.get("MICROCRED_DEV_ISSUER_PORT", "8000"))
ISSUER = f"http://127.0.0.1:{PORT}"
AUDIENCE = "microcred"


class DevIssuer:
    def __init__(self, key_dir: Path, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.issuer = issuer
        self.audience = audience
        self.key_dir = key_dir
        key_file = key_dir / "signing-key.pem"
        if not key_file.exists():
            key_dir.mkdir(parents=True, exist_ok=True)
            pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            key_file.touch(mode=0o600)
            key_file.write_bytes(pem)
        private_key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        assert isinstance(private_key, rsa.RSAPrivateKey), f"{key_file} is not an RSA key"
        self._private_key = private_key
        public_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._private_key.public_key()))
        self.key_id = _thumbprint(public_jwk)
        self._jwk = {**public_jwk, "kid": self.key_id, "use": "sig", "alg": "RS256"}

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self._jwk]}

    def token(
        self,
        subject: str,
        roles: list[str],
        *,
        email: str | None = None,
        name: str | None = None,
        ttl: int = 3600,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "roles": roles,
            "iat": now,
            "exp": now + ttl,
            "jti": str(uuid.uuid4()),
            **({"email": email} if email else {}),
            **({"name": name} if name else {}),
            **claims,
        }
        # An RFC 9068 access token: services refuse another JWT type (RFC 8725 3.11).
        headers = {"kid": self.key_id, "typ": "at+jwt"}
        return jwt.encode(payload, self._private_key, algorithm="RS256", headers=headers)


def _thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638: the key id is the hash of the key itself, so it changes exactly when the key does."""
    canonical = json.dumps({name: jwk[name] for name in ("e", "kty", "n")}, separators=(",", ":"))
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def main() -> None:
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel, Field

    issuer = DevIssuer(KEY_DIR)
    app = FastAPI(title="microcred dev token issuer")

    class TokenRequest(BaseModel):
        sub: str = Field(min_length=1, examples=["learner-1"])
        roles: list[str] = Field(default=["learner"], examples=[["learner"]])
        email: str | None = Field(default=None, examples=["ada@example.org"])
        name: str | None = Field(default=None, examples=["Ada Lovelace"])
        ttl: int = Field(default=3600, gt=0, le=86_400)
        issuers: list[str] | None = Field(
            default=None,
            examples=[["bf5780e1-3f49-4e91-a3f5-6d631f62dbab"]],
            description="A staff role's scope.",
        )

    @app.get("/.well-known/openid-configuration")
    async def discovery() -> dict[str, Any]:
        return {
            "issuer": issuer.issuer,
            "jwks_uri": f"{issuer.issuer}/jwks.json",
            "token_endpoint": f"{issuer.issuer}/token",
        }

    @app.get("/jwks.json")
    async def jwks() -> dict[str, Any]:
        return issuer.jwks()

    @app.post("/token")
    async def token(request: TokenRequest) -> dict[str, Any]:
        scope = {"issuers": request.issuers} if request.issuers is not None else {}
        access = issuer.token(
            request.sub, request.roles, email=request.email, name=request.name, ttl=request.ttl, **scope
        )
        return {"access_token": access, "token_type": "Bearer", "expires_in": request.ttl}

    uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")


if __name__ == "__main__":
    main()
