"""Processes beside the service's own for its CPU work (checking and making proofs): the GIL keeps
a thread from using another CPU, and the event loop must not stall while the work runs.

The processes are spawned, warmed (the bundled JSON-LD contexts parsed) before the service takes
work, end with the service's process however it ends, and are started again after one dies (killed,
out of memory): that breaks the pool, whose user then says what became of the work it held.
"""

import asyncio
import contextlib
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from microcred_runtime import Runtime
from microcred_runtime.workers import die_with

from . import jsonld


def _warm() -> None:
    # The bundled contexts are parsed once per process: before the first piece of work, not during it.
    jsonld.canonicalize({"@context": [jsonld.VC_V2], "type": ["VerifiableCredential"]})


class WorkerPool:
    """`workers` processes, started when the service starts (`running`) or at first use."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def executor(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # spawn, not fork: the service's process has threads (Kafka, telemetry) a fork would copy
            # mid-flight.
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                # A worker ends with the service's process: it would wait for work for ever.
                initializer=die_with,
                initargs=(os.getpid(), signal.SIGKILL),
            )
        return self._executor

    def broken(self, executor: ProcessPoolExecutor) -> None:
        """`executor` lost a worker: the next use starts a new pool."""
        if self._executor is executor:
            self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def running(self, runtime: Runtime[Any] | None = None) -> AsyncIterator[None]:
        """The pool, its workers started and warm, for as long as the service runs (a `Service`
        background worker); none when `workers` is 0."""
        loop = asyncio.get_running_loop()
        try:
            if self.workers:
                await asyncio.gather(
                    *(loop.run_in_executor(self.executor(), _warm) for _ in range(self.workers))
                )
            yield
        finally:
            executor, self._executor = self._executor, None
            if executor is not None:
                # Off the loop: a worker finishes the piece of work it is on before it exits.
                await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
