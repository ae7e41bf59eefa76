"""HTTP_WORKERS: several processes of one service on one port, under a supervisor.

A service's process is one event loop, so it uses one CPU at most. With HTTP_WORKERS=N above 1,
`Service.run` binds the HTTP port once and forks N workers, each a whole copy of the service (its
own pool, producer, consumers, outbox relay and background work) accepting connections on the
shared socket. That is safe because a service runs as several replicas anyway: the consumers are
members of one group, the outbox relay elects one leader (an advisory lock), migrations take turns.

The supervisor, the process that was started, forks before any thread or event loop exists, and
then only waits:
- SIGTERM or SIGINT to it goes on to every worker as SIGTERM (a graceful stop); once they have
  all ended, it ends by the same signal, as a service of one process does;
- a worker that ends on its own (it gave up at start, it was killed) ends the service: the others
  are stopped and the supervisor exits with 1, for the orchestrator to start it again whole;
- a worker ends with the supervisor, even a SIGKILLed one (Linux's PR_SET_PDEATHSIG).

Metrics use prometheus_client's multiprocess mode: each worker keeps its series in files under
PROMETHEUS_MULTIPROC_DIR (a folder made for the run and removed after it, unless the operator
names one, which is emptied at start), and a scrape, of any worker's /metrics or of METRICS_PORT
(served by the supervisor), reads them all: counters and histograms are summed over the workers,
the runtime's gauges give the value set last, other gauges one series per worker (`pid`).
"""

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess, values

from .metrics import every_worker, serving
from .settings import ServiceSettings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
_STOPPING = (signal.SIGTERM, signal.SIGINT)

Serve = Callable[[list[socket.socket]], None]
"""Serves the service on the sockets given until it is told to stop (uvicorn's `Server.run`)."""


def die_with(parent: int, signum: signal.Signals) -> None:
    """A child process's first act: be sent `signum` when `parent` ends, even by SIGKILL. Else
    it lives on, and a restart of its service leaves it behind (outside a container, whose end
    takes its processes along)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def supervise(settings: ServiceSettings, serve: Serve) -> None:
    """Run HTTP_WORKERS workers of `serve` on HTTP_HOST:HTTP_PORT until SIGTERM, or until one ends."""
    try:
        listening = _bind(settings.http_host, settings.http_port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.http_host, settings.http_port, exc)
        raise SystemExit(1) from None
    with _shared_metrics(), contextlib.ExitStack() as stack:
        supervisor = os.getpid()
        fork = multiprocessing.get_context("fork")
        workers = [
            fork.Process(target=_work, args=(supervisor, serve, listening), name=f"http-worker-{number}")
            for number in range(1, settings.http_workers + 1)
        ]
        stopped_by: signal.Signals | None = None

        def stop(signum: int, _: FrameType | None) -> None:
            nonlocal stopped_by
            stopped_by = stopped_by or signal.Signals(signum)
            for worker in workers:
                if worker.pid is not None and worker.exitcode is None:
                    os.kill(worker.pid, signal.SIGTERM)

        for signum in _STOPPING:
            signal.signal(signum, stop)
        for worker in workers:
            if stopped_by is None:
                worker.start()
        listening.close()  # the workers have it
        try:
            if settings.metrics_port is not None:
                # After the fork: the server is a thread, and a fork copies no thread.
                stack.enter_context(serving(every_worker(), settings.http_host, settings.metrics_port))
            log.info("HTTP workers started", extra={"workers": [worker.pid for worker in workers]})
            failed = _wait(workers, lambda: stopped_by is not None, stop)
        except BaseException:
            # Whatever goes wrong here (METRICS_PORT taken), no worker is left running alone.
            stop(signal.SIGTERM, None)
            _wait(workers, lambda: True, stop)
            raise
    if failed:
        raise SystemExit(1)
    if stopped_by is not None:
        signal.signal(stopped_by, signal.SIG_DFL)
        signal.raise_signal(stopped_by)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind((host, port))
    return listening


def _work(supervisor: int, serve: Serve, listening: socket.socket) -> None:
    # The supervisor's handlers came along with the fork; uvicorn installs its own, and restores
    # these to end the process by the signal once it has stopped.
    for signum in _STOPPING:
        signal.signal(signum, signal.SIG_DFL)
    die_with(supervisor, signal.SIGTERM)
    serve([listening])


def _wait(
    workers: Sequence[multiprocessing.process.BaseProcess],
    stopping: Callable[[], bool],
    stop: Callable[[int, FrameType | None], None],
) -> bool:
    """Wait until every worker has ended; whether one ended unasked (then the rest are stopped)."""
    failed = False
    running = [worker for worker in workers if worker.pid is not None]
    while running:
        ended = wait([worker.sentinel for worker in running])
        for worker in [worker for worker in running if worker.sentinel in ended]:
            worker.join()
            running.remove(worker)
            assert worker.pid is not None
            multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]  # untyped library
            if not stopping():
                log.error(
                    "an HTTP worker ended (exit status %s): the service stops",
                    worker.exitcode,
                    extra={"worker": worker.pid, "exit_status": worker.exitcode},
                )
                failed = True
                stop(signal.SIGTERM, None)
    return failed


@contextlib.contextmanager
def _shared_metrics() -> Iterator[Path]:
    """The folder the workers keep their series in, with prometheus_client in multiprocess mode."""
    with contextlib.ExitStack() as stack:
        named = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if named:
            folder = Path(named)
            for stale in folder.glob("*.db"):  # a previous run's
                stale.unlink()
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="microcred-metrics-")))
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
        # prometheus_client chooses its value class on import, from this variable; the workers
        # make their series after the fork, with the class chosen again here.
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # untyped library
        yield folder
