"""Data Integrity proofs checked in worker processes, so that POST /verify never holds the event loop.

Checking a proof canonicalises the credential: pure-Python CPU work that takes seconds for a
credential of VERIFY_MAX_BODY_BYTES (1.6 to 8.8 s measured for 230 KiB on two busy cores). On the
event loop it would stall issuance's consumers, outbox relay and probes for as long, and a thread
would not help (the GIL). VERIFY_WORKERS processes do it instead.

At most VERIFY_MAX_CONCURRENT verifications are admitted at a time (checking, or waiting for a
worker); one more is refused at once (`VerifierBusy`, a 503 with Retry-After) rather than queued
without bound. A worker that dies (killed, out of memory) breaks the pool: the checks it held
answer `unknown` and the next check starts a new pool.
"""

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from microcred_runtime import Runtime

from .verification import Check, check_proof, unknown
from .worker_pool import WorkerPool

log = logging.getLogger(__name__)


class VerifierBusy(Exception):
    """VERIFY_MAX_CONCURRENT verifications are under way already."""


class ProofWorkers:
    """A pool of `workers` processes and the count of verifications admitted to it."""

    def __init__(self, workers: int, max_concurrent: int) -> None:
        self._pool = WorkerPool(workers)
        self._max_concurrent = max_concurrent
        self._admitted = 0

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """One verification's turn; VerifierBusy when all VERIFY_MAX_CONCURRENT are taken."""
        if self._admitted >= self._max_concurrent:
            raise VerifierBusy
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def check(self, secured: dict[str, Any], public_key: Ed25519PublicKey, method: str) -> Check:
        """`verification.check_proof` in a worker (a `verification.CheckProof`)."""
        executor = self._pool.executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                executor, check_proof, secured, public_key.public_bytes_raw(), method
            )
        except BrokenProcessPool:
            log.error("a proof-checking worker died; the pool starts again")
            self._pool.broken(executor)
            return unknown("the proof could not be checked")

    def running(self, runtime: Runtime[Any] | None = None) -> contextlib.AbstractAsyncContextManager[None]:
        """The workers, for as long as the service runs (a `Service` background worker)."""
        return self._pool.running(runtime)
