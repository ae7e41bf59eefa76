"""The proof-checking workers end with the service's process, however it ends."""

import os
import signal
import subprocess
import sys
import time

import pytest

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
