"""The proof workers sign as the service's process does, survive a worker's death, and end with the
service's process, however it ends."""

import dataclasses
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import pytest

from issuance import domain
from issuance.proof_workers import ProofWorkers
from issuance.service import Platform

from .conftest import a_completion, a_course, a_learner

# A service's process in miniature: starts the pool, warms its workers, says their pids, waits.
SERVICE = """
import asyncio, multiprocessing, sys
from issuance.proof_workers import ProofWorkers

async def main() -> None:
    workers = ProofWorkers(workers=2, max_concurrent=2)
    async with workers.running(None):
        children = multiprocessing.active_children()
        print(*(child.pid for child in children), flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it waits only for its (new) parent to read its status.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signals are Linux's")
def test_the_workers_end_when_the_service_is_killed() -> None:
    service = subprocess.Popen([sys.executable, "-c", SERVICE], stdout=subprocess.PIPE, text=True)  # noqa: S603
    try:
        assert service.stdout is not None
        workers = [int(pid) for pid in service.stdout.readline().split()]
        assert len(workers) == 2
        assert all(alive(pid) for pid in workers)
    finally:
        service.send_signal(signal.SIGKILL)
        service.wait()

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers)


def unsigned(platform: Platform, count: int) -> list[tuple[dict[str, object], str]]:
    course, now, list_id = a_course(), datetime.now(UTC), uuid.uuid4()
    documents = []
    for index in range(count):
        issuance = platform.issuance(course.issuer.issuer_id, list_id, index, now)
        documents.append(
            (
                domain.course_credential(issuance, course, a_completion(course, a_learner())),
                issuance.issuer_did,
            )
        )
    return documents


async def test_a_batch_is_signed_in_the_workers_as_in_the_service_s_process(platform: Platform) -> None:
    documents, now = unsigned(platform, 7), datetime.now(UTC)
    workers = ProofWorkers(workers=2, max_concurrent=2)
    others = set(multiprocessing.active_children())  # another test's pool, if any
    async with workers.running(None):  # type: ignore[arg-type]  # the runtime is not used
        in_workers = await dataclasses.replace(platform, signer=workers).sign_all(documents, now)
        pids = {
            child.pid for child in set(multiprocessing.active_children()) - others if child.pid is not None
        }
        # Ed25519 is deterministic: the same bytes, signature included, in the same order.
        assert in_workers == [platform.sign(document, controller, now) for document, controller in documents]
        assert len(pids) == 2

        # A worker dies (the OOM killer, an operator). Every batch is still signed: on the broken
        # pool's turn in the service's process, and after it by a new pool's two workers.
        os.kill(min(pids), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len({child.pid for child in set(multiprocessing.active_children()) - others} - pids) < 2:
            assert time.monotonic() < deadline, "no new pool after the worker died"
            assert await dataclasses.replace(platform, signer=workers).sign_all(documents, now) == in_workers
        assert not alive(min(pids))
