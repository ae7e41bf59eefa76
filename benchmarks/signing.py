"""Signing throughput of the issuance service's eddsa-rdfc-2022 path.

Run from the repository root: `.venv/bin/python benchmarks/signing.py [--n 2000] [--rounds 5]`.
Builds N distinct, realistic OpenBadgeCredentials (40 courses with 0 to 3 alignments, evidence on
about half: eight document shapes) and reports credentials per second, as the median over the
rounds, for:

* sign: ``proofs.sign`` as the service calls it (templates by document shape, after warm-up);
* the full path stage by stage (JSON-LD to RDF with pyld, RDFC-1.0 with pyoxigraph, hash+sign),
  i.e. what a credential of a never-seen shape costs;
* the reference: pyld's own ``normalize`` (URDNA2015) for both canonical forms, then hash+sign;
* verify: ``proofs.verify`` of the signed credentials.

The slow paths run over the first ``--reference-n`` (300) credentials only.

Writes the table to benchmarks/results/signing.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import base58
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyld import jsonld as pyld

from issuance.jsonld import OB_V3, VC_V2, canonical_nquads, document_loader, to_dataset
from issuance.keys import SigningKey
from issuance.proofs import sign, verify

ISSUER = "did:web:badges.microcred.example"
METHOD = f"{ISSUER}#key-20261129"
CREATED = datetime(2026, 11, 29, 10, 15, tzinfo=UTC)
RESULTS = Path(__file__).parent / "results" / "signing.txt"
T = TypeVar("T")


def courses(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """Achievements: the part every learner of a course shares."""
    return [
        {
            "id": f"https://badges.microcred.example/achievements/{uuid.UUID(int=rng.getrandbits(128))}",
            "type": ["Achievement"],
            "achievementType": "Course",
            "name": f"Course {n}: {rng.choice(['Data', 'Cloud', 'Security', 'Design'])} essentials",
            "description": "Awarded for completing every module and the final project. " * rng.randint(1, 3),
            "criteria": {"narrative": "Complete all modules and pass the final project with at least 70%."},
            "image": {"id": f"https://badges.microcred.example/img/{n}.png", "type": "Image"},
            "alignment": [
                {
                    "type": ["Alignment"],
                    "targetName": f"Competency {n}.{a}",
                    "targetUrl": f"https://esco.example/skill/{n}-{a}",
                    "targetFramework": "ESCO",
                    "targetCode": f"S{n}.{a}",
                }
                for a in range(rng.randint(0, 3))
            ],
            "creator": {"id": ISSUER, "type": ["Profile"], "name": "Microcred University"},
        }
        for n in range(count)
    ]


def credential(rng: random.Random, achievement: dict[str, Any]) -> dict[str, Any]:
    issued = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 30_000_000))
    email = f"learner{rng.getrandbits(32)}@example.org"
    salt = f"{rng.getrandbits(64):016x}"
    index = rng.randrange(131_072)
    document: dict[str, Any] = {
        "@context": [VC_V2, OB_V3],
        "id": f"urn:uuid:{uuid.UUID(int=rng.getrandbits(128))}",
        "type": ["VerifiableCredential", "OpenBadgeCredential"],
        "name": achievement["name"],
        "issuer": {
            "id": ISSUER,
            "type": ["Profile"],
            "name": "Microcred University",
            "url": "https://microcred.example/",
        },
        "validFrom": f"{issued:%Y-%m-%dT%H:%M:%SZ}",
        "credentialSubject": {
            "type": ["AchievementSubject"],
            "identifier": [
                {
                    "type": "IdentityObject",
                    "identityHash": "sha256$" + hashlib.sha256((email + salt).encode()).hexdigest(),
                    "identityType": "emailAddress",
                    "hashed": True,
                    "salt": salt,
                }
            ],
            "achievement": achievement,
        },
        "credentialStatus": {
            "id": f"https://badges.microcred.example/status/1#{index}",
            "type": "BitstringStatusListEntry",
            "statusPurpose": "revocation",
            "statusListIndex": str(index),
            "statusListCredential": "https://badges.microcred.example/status/1",
        },
    }
    if rng.random() < 0.5:
        document["evidence"] = [
            {
                "id": f"https://lms.microcred.example/submissions/{rng.getrandbits(48):x}",
                "type": ["Evidence"],
                "name": "Final project",
                "narrative": f"Submitted project #{rng.getrandbits(16)}.",
            }
        ]
    return document


def proof_config(document: dict[str, Any]) -> dict[str, Any]:
    return {
        "@context": document["@context"],
        "type": "DataIntegrityProof",
        "cryptosuite": "eddsa-rdfc-2022",
        "created": f"{CREATED:%Y-%m-%dT%H:%M:%SZ}",
        "verificationMethod": METHOD,
        "proofPurpose": "assertionMethod",
    }


def rate(step: Callable[[T], object], items: Sequence[T], rounds: int) -> float:
    """Items per second: the median over ``rounds`` passes over ``items``."""
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        for item in items:
            step(item)
        timings.append(time.perf_counter() - started)
    return len(items) / statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=2000, help="distinct credentials (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="passes; the median is reported (default 5)")
    parser.add_argument(
        "--reference-n", type=int, default=300, help="credentials for the slow paths (default 300)"
    )
    args = parser.parse_args()

    rng = random.Random(20261129)  # noqa: S311  # reproducible sample data, not a secret
    achievements = courses(rng, 40)
    credentials = [credential(rng, rng.choice(achievements)) for _ in range(args.n)]
    sample = credentials[: args.reference_n]
    key = SigningKey("key-20261129", Ed25519PrivateKey.generate(), CREATED)
    configs = [proof_config(document) for document in sample]
    datasets = [(to_dataset(document), to_dataset(proof_config(document))) for document in sample]
    canonical = [
        (canonical_nquads(to_dataset(d)), canonical_nquads(to_dataset(proof_config(d)))) for d in sample
    ]
    hash_data = [
        hashlib.sha256(c.encode()).digest() + hashlib.sha256(d.encode()).digest() for d, c in canonical
    ]

    def sign_one(document: dict[str, Any]) -> dict[str, Any]:
        return sign(document, key, verification_method=METHOD, created=CREATED)

    def full_path(document: dict[str, Any]) -> bytes:
        canonical_config = canonical_nquads(to_dataset(proof_config(document)))
        canonical_document = canonical_nquads(to_dataset(document))
        digest = (
            hashlib.sha256(canonical_config.encode()).digest()
            + hashlib.sha256(canonical_document.encode()).digest()
        )
        return key.private_key.sign(digest)

    def reference(document: dict[str, Any]) -> bytes:
        options = {
            "algorithm": "URDNA2015",
            "format": "application/n-quads",
            "documentLoader": document_loader,
        }
        canonical_config = pyld.normalize(proof_config(document), options)
        canonical_document = pyld.normalize(document, options)
        digest = (
            hashlib.sha256(canonical_config.encode()).digest()
            + hashlib.sha256(canonical_document.encode()).digest()
        )
        return key.private_key.sign(digest)

    for document in credentials:  # warm-up: every shape seen twice builds its template
        sign_one(document)
    signed = [sign_one(document) for document in credentials]
    # The paths measured must agree (Ed25519 is deterministic, so equal signatures = equal input).
    assert verify(signed[0], key.public_key)
    assert (
        reference(sample[0]) == full_path(sample[0]) == base58.b58decode(signed[0]["proof"]["proofValue"][1:])
    )

    rounds = args.rounds
    documents_and_configs = [item for pair in zip(sample, configs, strict=True) for item in pair]
    rows = [
        ("sign (proofs.sign, templates warm)", rate(sign_one, credentials, rounds), len(credentials)),
        ("verify (proofs.verify)", rate(lambda s: verify(s, key.public_key), signed, rounds), len(signed)),
        ("sign, full path (shape never seen)", rate(full_path, sample, rounds), len(sample)),
        (
            "  to_rdf: pyld JSON-LD -> RDF, doc + config",
            rate(to_dataset, documents_and_configs, rounds) / 2,
            len(sample),
        ),
        (
            "  RDFC-1.0: pyoxigraph, doc + config",
            # Canonicalising a canonical dataset again costs the same: no fresh copies needed.
            rate(lambda pair: [canonical_nquads(dataset) for dataset in pair], datasets, rounds),
            len(sample),
        ),
        ("  hash + Ed25519 sign", rate(lambda h: key.private_key.sign(h), hash_data, rounds), len(sample)),
        (
            "reference: pyld normalize (URDNA2015) + sign",
            rate(reference, sample, max(1, rounds // 2)),
            len(sample),
        ),
    ]
    report = _table(rows, args)
    print(report)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(report)


def _table(rows: list[tuple[str, float, int]], args: argparse.Namespace) -> str:
    width = max(len(name) for name, _, _ in rows)
    lines = [
        f"eddsa-rdfc-2022 signing, {args.n} distinct OpenBadgeCredentials, median of {args.rounds} rounds",
        f"python {platform.python_version()}, pyld {version('pyld')}, pyoxigraph {version('pyoxigraph')}, "
        f"cryptography {version('cryptography')}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} (noisy above the CPU count), {datetime.now(UTC):%Y-%m-%d}",
        "",
        f"{'':{width}}  {'credentials/s':>13}  {'ms each':>8}  {'over':>5}",
    ]
    lines += [
        f"{name:{width}}  {per_second:13.0f}  {1000 / per_second:8.3f}  {n:5d}"
        for name, per_second, n in rows
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
