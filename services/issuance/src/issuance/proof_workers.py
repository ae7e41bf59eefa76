"""Data Integrity proofs made and checked in worker processes, off the event loop.

Minting signs each credential: canonicalisation and Ed25519, about a CPU-millisecond each. A batch
of completions is signed here in as many parts as there are workers, so its signatures take the
cores there are while the event loop goes on (the consumers' heartbeats, the outbox relay, the
probes). A worker that dies, a pool that is busy with POST /verify's checks or not warm yet,
leaves the batch to be signed in the service's process: a completion must not wait long for it
(its transaction is open), nor fail, let alone be dead-lettered.

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
import functools
import logging
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from microcred_runtime import Runtime
from microcred_runtime.workers import die_with

from . import jsonld, proofs
from .keys import SigningKey
from .service import SignedHere
from .verification import Check, check_proof, unknown

log = logging.getLogger(__name__)


# The longest a minting batch waits for the workers to sign it before it signs in-process; a
# 200-credential chunk takes them about a tenth of a second.
SIGN_WAIT_SECONDS = 5.0


class VerifierBusy(Exception):
    """VERIFY_MAX_CONCURRENT verifications are under way already."""


def _warm() -> None:
    # The bundled contexts are parsed once per process: before the first credential, not during it.
    jsonld.canonicalize({"@context": [jsonld.VC_V2], "type": ["VerifiableCredential"]})


@functools.lru_cache(maxsize=8)
def _private_key(raw: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(raw)


def _sign_part(
    documents: list[tuple[dict[str, Any], str]],
    key_id: str,
    raw_key: bytes,
    key_created: datetime,
    created: datetime,
) -> list[str]:
    """In a worker: `SignedHere`'s work for one part of a batch."""
    key = SigningKey(key_id, _private_key(raw_key), key_created)
    return [
        proofs.signed_json(document, key, verification_method=method, created=created)
        for document, method in documents
    ]


class ProofWorkers:
    """A pool of `workers` processes and the count of verifications admitted to it."""

    def __init__(self, workers: int, max_concurrent: int) -> None:
        self._workers = workers
        self._max_concurrent = max_concurrent
        self._admitted = 0
        self._executor: ProcessPoolExecutor | None = None
        self._warm = False  # from the end of `running`'s warm-up to its exit: signing may use the pool

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
            self._forget(executor)
            return unknown("the proof could not be checked")

    async def sign_all(
        self, key: SigningKey, documents: Sequence[tuple[dict[str, Any], str]], created: datetime
    ) -> list[str]:
        """Each (document, verification method) as `proofs.signed_json` makes it, in order (a
        `service.Signer`). The key's raw bytes go to the workers over their pipes: they are this
        process's children, which hold nothing else.

        The minting transaction waits meanwhile, idle, and must stay far from
        `repository.IDLE_HOLDER_TIMEOUT`: the batch is signed in-process instead when the pool is
        not warm (starting, stopped), when POST /verify holds it (a check takes seconds), and
        when the workers have not answered within SIGN_WAIT_SECONDS."""
        if not documents:
            return []
        if not self._warm or self._admitted:
            return await SignedHere().sign_all(key, documents, created)
        size = -(-len(documents) // self._workers)
        parts = [list(documents[start : start + size]) for start in range(0, len(documents), size)]
        raw = key.private_key.private_bytes_raw()
        executor = self._pool()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(SIGN_WAIT_SECONDS):
                signed = await asyncio.gather(
                    *(
                        loop.run_in_executor(
                            executor, _sign_part, part, key.key_id, raw, key.created, created
                        )
                        for part in parts
                    )
                )
        except BrokenProcessPool:
            log.error("a proof worker died; the pool starts again, and this batch is signed in-process")
            self._forget(executor)
        except TimeoutError:
            log.warning("the proof workers did not sign within %gs; signed in-process", SIGN_WAIT_SECONDS)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is None or current.cancelling():
                raise
            # Not this batch's cancellation: the pool's, shut down as the service stops.
        else:
            return [document for part in signed for document in part]
        return await SignedHere().sign_all(key, documents, created)

    def _forget(self, executor: ProcessPoolExecutor) -> None:
        if self._executor is executor:
            self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)

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
            self._warm = True
            yield
        finally:
            self._warm = False
            executor, self._executor = self._executor, None
            if executor is not None:
                # Off the loop: a worker finishes the check it is on before it exits.
                await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
