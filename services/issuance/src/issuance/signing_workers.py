"""A batch's credentials signed on more than one CPU: worker processes sign a share of them.

Signing canonicalises each credential (pure-Python RDFC work, about 0.4 ms a credential) and
holds the GIL, so a thread would not help; SIGNING_WORKERS processes each take a share of a
batch's credentials while this process signs the rest. Signing is a pure function of the
document, the key and the time, so where it runs changes nothing else: the batch is recorded in
the consumer's one transaction once every signature is back.

It pays where a CPU is free: a batch of 100 signs in about 24 ms with one worker against 39 ms
without, on an idle two-CPU machine. Where every CPU is busy already (the whole pipeline on two
CPUs, `make bench`), it changes neither the rate nor the latency, and each worker costs some
80 MB: SIGNING_WORKERS defaults to 0.

A worker that dies (killed, out of memory) breaks the pool: the share it held is signed here
instead, and the next batch starts a new pool.
"""

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microcred_runtime import Runtime

from . import proofs
from .keys import SigningKey
from .worker_pool import WorkerPool

log = logging.getLogger(__name__)

Job = tuple[dict[str, Any], str]
"""A document to sign, and the verification method (DID URL) its proof names."""

# The smallest share handed to a worker: below it, handing over (pickling both ways, a wake-up)
# costs about what it saves.
_MIN_SHARE = 8
# A worker's signing keys by id, made from the raw bytes once, not per batch.
_keys: dict[str, SigningKey] = {}


def _sign_share(key: tuple[str, bytes, datetime], jobs: list[Job], created: datetime) -> list[str]:
    """In a worker: `proofs.signed_json` of each job, with the key (id, raw private bytes, created)."""
    key_id, raw, key_created = key
    signing = _keys.get(key_id)
    if signing is None:
        private_key = Ed25519PrivateKey.from_private_bytes(raw)
        signing = _keys[key_id] = SigningKey(key_id=key_id, private_key=private_key, created=key_created)
    return [
        proofs.signed_json(document, signing, verification_method=method, created=created)
        for document, method in jobs
    ]


class SigningWorkers:
    """Signs batches here and in `workers` processes (none: all here)."""

    def __init__(self, workers: int) -> None:
        self._pool = WorkerPool(workers)

    async def sign(self, key: SigningKey, jobs: Sequence[Job], created: datetime) -> list[str]:
        """Each job's document signed with `key` as `proofs.signed_json` signs it, in order."""
        shares = min(self._pool.workers + 1, len(jobs) // _MIN_SHARE)
        if shares <= 1:
            return await _sign_here(key, jobs, created)
        size = -(-len(jobs) // shares)  # rounded up: this process's share, the last, is the smallest
        handed = [list(jobs[start : start + size]) for start in range(0, size * (shares - 1), size)]
        executor = self._pool.executor()
        loop = asyncio.get_running_loop()
        sent = (key.key_id, key.private_key.private_bytes_raw(), key.created)
        try:
            futures = [loop.run_in_executor(executor, _sign_share, sent, share, created) for share in handed]
        except BrokenProcessPool:  # a worker died since the last batch
            self._broken(executor)
            return await _sign_here(key, jobs, created)
        own = await _sign_here(key, jobs[size * (shares - 1) :], created)
        signed: list[str] = []
        for share, future in zip(handed, futures, strict=True):
            try:
                signed += await future
            except BrokenProcessPool:
                self._broken(executor)
                signed += await _sign_here(key, share, created)
        return signed + own

    def _broken(self, executor: ProcessPoolExecutor) -> None:
        log.error("a signing worker died; this batch is signed here and the pool starts again")
        self._pool.broken(executor)

    def running(self, runtime: Runtime[Any] | None = None) -> contextlib.AbstractAsyncContextManager[None]:
        """The workers, for as long as the service runs (a `Service` background worker)."""
        return self._pool.running(runtime)


async def _sign_here(key: SigningKey, jobs: Sequence[Job], created: datetime) -> list[str]:
    signed = []
    for document, method in jobs:
        signed.append(proofs.signed_json(document, key, verification_method=method, created=created))
        # Signing is CPU work: between two, the event loop's other work goes on (the consumer
        # group's heartbeats among it, which a large batch would otherwise hold up for seconds).
        await asyncio.sleep(0)
    return signed
