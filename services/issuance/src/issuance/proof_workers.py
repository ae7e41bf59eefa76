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
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from microcred_runtime import Runtime
from microcred_runtime.workers import die_with

from . import jsonld
from .verification import Check, check_proof, unknown

log = logging.getLogger(__name__)


class VerifierBusy(Exception):
    """VERIFY_MAX_CONCURRENT verifications are under way already."""


def _warm() -> None:
    # The bundled contexts are parsed once per process: before the first credential, not during it.
    jsonld.canonicalize({"@context": [jsonld.VC_V2], "type": ["VerifiableCredential"]})


class ProofWorkers:
    """A pool of `workers` processes and the count of verifications admitted to it."""

    def __init__(self, workers: int, max_concurrent: int) -> None:
        self._workers = workers
        self._max_concurrent = max_concurrent
        self._admitted = 0
        self._executor: ProcessPoolExecutor | None = None

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
        executor = self._pool()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                executor, check_proof, secured, public_key.public_bytes_raw(), method
            )
        except BrokenProcessPool:
            log.error("a proof-checking worker died; the pool starts again")
            if self._executor is executor:
                self._executor = None
                executor.shutdown(wait=False, cancel_futures=True)
            return unknown("the proof could not be checked")

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # spawn, not fork: the service's process has threads (Kafka, telemetry) a fork would copy
            # mid-flight.
            self._executor = ProcessPoolExecutor(
                self._workers,
                mp_context=multiprocessing.get_context("spawn"),
                # A worker ends with the service's process: it would wait for work for ever.
                initializer=die_with,
                initargs=(os.getpid(), signal.SIGKILL),
            )
        return self._executor

    @contextlib.asynccontextmanager
    async def running(self, runtime: Runtime[Any]) -> AsyncIterator[None]:
        """The pool, its workers started and warm, for as long as the service runs (a `Service`
        background worker)."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*(loop.run_in_executor(self._pool(), _warm) for _ in range(self._workers)))
            yield
        finally:
            executor, self._executor = self._executor, None
            if executor is not None:
                # Off the loop: a worker finishes the check it is on before it exits.
                await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
