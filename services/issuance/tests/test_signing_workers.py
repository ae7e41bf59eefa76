"""Credentials signed in worker processes are the ones this process would sign, in order, even
when a worker dies mid-batch."""

import asyncio
import json
import multiprocessing
import os
import signal
import uuid
from datetime import UTC, datetime

from issuance import domain, proofs
from issuance.service import Platform
from issuance.signing_workers import SigningWorkers

from .conftest import a_completion, a_course, a_learner

COURSE = a_course()


def documents(platform: Platform, count: int) -> list[tuple[dict[str, object], str]]:
    """`count` different course credentials to sign, each with its issuer's DID."""
    now = datetime.now(UTC)
    status_list = uuid.uuid4()
    made = []
    for index in range(count):
        issuance = platform.issuance(COURSE.issuer.issuer_id, status_list, index, now)
        made.append(
            (
                domain.course_credential(issuance, COURSE, a_completion(COURSE, a_learner())),
                issuance.issuer_did,
            )
        )
    return made


async def test_a_batch_signed_with_workers_is_the_batch_signed_here(platform: Platform) -> None:
    batch = documents(platform, 37)
    now = datetime.now(UTC)
    here = await platform.sign_all(batch, now)
    workers = SigningWorkers(2)
    async with workers.running():
        shared = await Platform(platform.base_url, platform.keyring, signers=workers).sign_all(batch, now)
        children = multiprocessing.active_children()
    assert len(children) == 2
    # Ed25519 signatures are deterministic: the same document, key and time sign to the same bytes.
    assert shared == here
    key = platform.keyring.signing.public_key
    assert all(proofs.verify(json.loads(document), key) for document in shared)


async def test_a_dead_worker_s_share_is_signed_here_and_the_pool_starts_again(platform: Platform) -> None:
    batch = documents(platform, 24)
    now = datetime.now(UTC)
    here = await platform.sign_all(batch, now)
    workers = SigningWorkers(1)
    sharing = Platform(platform.base_url, platform.keyring, signers=workers)
    async with workers.running():
        (worker,) = multiprocessing.active_children()
        os.kill(worker.pid or 0, signal.SIGKILL)
        worker.join(10)
        await asyncio.sleep(0.5)  # the pool has seen it die: handing a share over fails at once
        assert await sharing.sign_all(batch, now) == here
        assert await sharing.sign_all(batch, now) == here
        (again,) = multiprocessing.active_children()
    assert again.pid != worker.pid
