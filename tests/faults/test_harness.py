"""The shared harness (scripts/harness): processes and their readiness, the balancer in front of
replicas, the stall read from the monitor's history, the fault run's workload plan. No Kafka or
PostgreSQL: small stand-in processes and in-memory values."""

import asyncio
import contextlib
import socket
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from notifications import messages
from notifications.delivery import SmtpConnections, mime_email
from notifications.settings import Settings
from notifications.smtp_sink import smtp_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import faults
from harness import processes
from harness.balancer import Balancer, Replicas
from harness.monitor import Counts, Monitor, Progress, Stage, longest_stall
from harness.processes import NotReady, Process
from harness.sinks import JournalingHandler, MailJournal, WebhookJournal
from harness.workload import Enrolled, Learner, PathwayLearner, interleave

# A stand-in service: answers its readiness URL (GET) 503 with a reason, and a route (POST) 503
# `starting`, until READY_AFTER seconds have passed, 200 after; prints a line at start; exits with
# EXIT_WITH when set.
SERVICE = textwrap.dedent(
    """
    import http.server, os, sys, time
    print("stand-in starting", flush=True)
    if os.environ.get("EXIT_WITH"):
        print("cannot start: broken on purpose", flush=True)
        sys.exit(int(os.environ["EXIT_WITH"]))
    started = time.monotonic()
    ready_after = float(os.environ.get("READY_AFTER", "0"))

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, not_ready):
            ready = time.monotonic() - started >= ready_after
            body = b"ok" if ready else not_ready
            self.send_response(200 if ready else 503)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.answer(b'{"detail": "not ready: kafka unreachable"}')

        def do_POST(self):
            # The runtime's answer to a route while its start waits.
            self.answer(b'{"type": "urn:microcred:problem:starting"}')

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
    """
)


def stand_in(tmp_path: Path, name: str, **env: str) -> Process:
    port = processes.free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "stand_in.py"
    script.write_text(SERVICE)
    return Process(
        name,
        [sys.executable, str(script)],
        {"PORT": str(port), **env},
        f"http://127.0.0.1:{port}/health/ready",
        tmp_path / f"{name}.log",
    )


@pytest.fixture
def cleanup() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    processes.stop_all(started, timeout=5)


async def test_a_process_is_started_killed_and_started_again_with_one_log(
    tmp_path: Path, cleanup: list[Process]
) -> None:
    process = stand_in(tmp_path, "svc")
    cleanup.append(process)
    process.start()
    await processes.wait_ready([process], within=20)
    first = process.pid
    assert process.kill() == first
    assert not process.running
    assert process.exited == -9
    process.start()
    await processes.wait_ready([process], within=20)
    assert process.pid != first
    assert process.starts == 2
    assert process.tail().count("stand-in starting") == 2
    assert process.url == process.ready_url.removesuffix("/health/ready")


async def test_readiness_fails_with_the_exit_status_and_the_log_tail(
    tmp_path: Path, cleanup: list[Process]
) -> None:
    process = stand_in(tmp_path, "broken", EXIT_WITH="3")
    cleanup.append(process)
    process.start()
    with pytest.raises(NotReady) as failure:
        await processes.wait_ready([process], within=20)
    message = str(failure.value)
    assert "broken exited with 3 before it was ready" in message
    assert "cannot start: broken on purpose" in message


async def test_readiness_times_out_with_the_last_answer_and_the_log_tail(
    tmp_path: Path, cleanup: list[Process]
) -> None:
    slow = stand_in(tmp_path, "slow", READY_AFTER="600")
    cleanup.append(slow)
    slow.start()
    started = time.monotonic()
    with pytest.raises(NotReady) as failure:
        await processes.wait_ready([slow], within=3)
    assert time.monotonic() - started < 15
    message = str(failure.value)
    assert f"slow not ready after 3s (pid {slow.pid} running)" in message
    assert "HTTP 503" in message
    assert "kafka unreachable" in message
    assert "stand-in starting" in message


def test_the_blocking_wait_reports_each_process_as_it_gets_ready(
    tmp_path: Path, cleanup: list[Process]
) -> None:
    first = stand_in(tmp_path / "a", "a")
    second = stand_in(tmp_path / "b", "b", READY_AFTER="1")
    for process in (first, second):
        cleanup.append(process)
        process.start()
    seen: list[str] = []
    processes.wait_ready_blocking(
        [first, second], within=20, interval=0.1, on_ready=lambda p: seen.append(p.name)
    )
    assert sorted(seen) == ["a", "b"]


def test_stop_all_ends_them_gracefully(tmp_path: Path) -> None:
    process = stand_in(tmp_path, "svc")
    process.start()
    assert processes.stop_all([process], timeout=10) == []
    assert process.exited is not None
    assert process.exited != -9


def test_replicas_get_a_port_a_log_and_a_name_each(tmp_path: Path) -> None:
    made = processes.replicas("enrollment", 2, env=lambda replica, port: {"N": str(replica)}, logs=tmp_path)
    assert [process.name for process in made] == ["enrollment-1", "enrollment-2"]
    assert made[0].url != made[1].url
    assert [process.log.name for process in made] == ["enrollment-1.log", "enrollment-2.log"]
    assert made[1].env["N"] == "2"
    assert made[1].env["HTTP_PORT"] == made[1].url.rsplit(":", 1)[1]
    assert made[0].argv[1:] == ["-m", "enrollment"]


async def test_the_balancer_skips_a_killed_replica(tmp_path: Path, cleanup: list[Process]) -> None:
    one, two = stand_in(tmp_path / "1", "svc-1"), stand_in(tmp_path / "2", "svc-2")
    # Listening, yet still starting (503 `starting`): the balancer moves on to the next.
    starting = stand_in(tmp_path / "4", "svc-4", READY_AFTER="60")
    # Running, yet not listening (killed): the balancer moves on to the next too.
    mute = Process(
        "svc-3",
        [sys.executable, "-c", "import time; time.sleep(60)"],
        {},
        "http://127.0.0.1:9/",
        tmp_path / "3.log",
    )
    for process in (one, two, mute, starting):
        cleanup.append(process)
        process.start()
    await processes.wait_ready([one, two], within=20)
    async with httpx.AsyncClient(timeout=5) as http:
        for _ in range(200):  # until it listens
            with contextlib.suppress(httpx.TransportError):
                assert (await http.post(starting.url + "/")).status_code == 503
                break
            await asyncio.sleep(0.1)
    replicas = Replicas("svc", [one, two])
    assert {replicas.next_url() for _ in range(4)} == {one.url, two.url}
    one.kill()
    assert {replicas.next_url() for _ in range(4)} == {two.url}
    balancer = Balancer(Replicas("svc", [one, mute, starting, two]))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=balancer.app()), base_url="http://svc"
    ) as client:
        answers = [await client.post("/webhooks/provider", content=b"{}") for _ in range(8)]
    await balancer.close()
    assert [answer.status_code for answer in answers] == [200] * 8
    mute.kill()
    two.kill()
    balancer = Balancer(Replicas("svc", [one, two]))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=balancer.app()), base_url="http://svc"
    ) as client:
        assert (await client.get("/")).status_code == 503
    await balancer.close()


def test_a_stall_is_the_longest_time_without_progress_while_work_was_left() -> None:
    stage = Stage("credentials", lambda counts: counts.credentials >= counts.credentials_due)

    def at(credentials: int, sent: int = 100) -> Counts:
        return Counts(progress=Progress(sent=sent), credentials=credentials)

    history = [(0.0, at(10)), (1.0, at(12)), (2.0, at(12)), (6.0, at(12)), (7.0, at(15)), (9.0, at(18))]
    # Killed at 1.5: still from 1.0 (the last progress before) ... 7.0 is 6 s, counted from the kill.
    assert longest_stall(history, stage, 1.5, 9.0) == pytest.approx(5.5)
    # Time spent caught up (nothing left to do) is no stall.
    idle = [(0.0, at(10, sent=10)), (5.0, at(10, sent=10)), (6.0, at(10, sent=12)), (7.0, at(12, sent=12))]
    assert longest_stall(idle, stage, 0.0, 7.0) == pytest.approx(2.0)
    # Standing still up to the end of the window counts.
    assert longest_stall(history[:3], stage, 1.0, 10.0) == pytest.approx(9.0)


def test_pathway_learners_are_spread_among_the_singles() -> None:
    singles = [Enrolled(f"e{n}", f"l{n}", "c", "active") for n in range(20)]
    pathway = [PathwayLearner(Learner(f"p{n}", n)) for n in range(4)]
    units = interleave(singles, pathway)
    assert len(units) == 24
    positions = [index for index, unit in enumerate(units) if isinstance(unit, PathwayLearner)]
    assert positions == [3, 9, 15, 21]
    assert [unit for unit in units if isinstance(unit, Enrolled)] == singles
    assert interleave(singles, []) == singles


@pytest.mark.parametrize(("completions", "learners", "singles"), [(200, 17, 149), (100_000, 8333, 75_001)])
def test_a_tenth_of_the_learners_take_the_pathway(completions: int, learners: int, singles: int) -> None:
    config = faults.Config(completions=completions)
    assert (config.pathway_learners, config.singles) == (learners, singles)
    assert config.singles + faults.PATHWAY_COURSES * config.pathway_learners == completions
    share = config.pathway_learners / (config.singles + config.pathway_learners)
    assert share == pytest.approx(0.1, abs=0.005)


def test_a_free_port_is_free() -> None:
    port = processes.free_port()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


def test_the_deployments_environment_is_not_the_developers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://elsewhere/db")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "elsewhere:9092")
    monkeypatch.setenv("PAYMENT_WEBHOOK_SECRET", "x" * 40)
    environment = processes.clean_environment()
    assert not {"DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "PAYMENT_WEBHOOK_SECRET"} & environment.keys()
    assert "PATH" in environment


async def test_wait_ready_waits_for_all_in_parallel(tmp_path: Path, cleanup: list[Process]) -> None:
    made = [stand_in(tmp_path / str(n), f"svc-{n}", READY_AFTER="1") for n in range(3)]
    for process in made:
        cleanup.append(process)
        process.start()
    started = time.monotonic()
    await asyncio.wait_for(processes.wait_ready(made, within=20), 30)
    assert time.monotonic() - started < 10


class _Unreadable:
    """A database whose driver fails in a way the monitor does not expect."""

    async def fetchrow(self, query: str) -> None:
        raise RuntimeError("the driver broke")


async def test_a_monitor_that_dies_fails_whoever_waits_on_it(tmp_path: Path) -> None:
    monitor = Monitor(
        dict.fromkeys(("catalog", "enrollment", "billing", "issuance", "notifications"), _Unreadable()),  # type: ignore[arg-type]
        MailJournal(tmp_path / "mail.jsonl"),
        WebhookJournal(tmp_path / "webhooks.jsonl"),
        Progress,
        interval=0.05,
        say=print,
    )
    running = asyncio.create_task(monitor.run(lambda: None))
    with pytest.raises(RuntimeError, match="the driver broke"):
        await asyncio.wait_for(monitor.until("forever", lambda counts: False, stall_timeout=600), 10)
    with pytest.raises(RuntimeError):
        await running


@pytest.mark.parametrize(
    ("name", "address"),
    [
        ("Learner 7", "learner-7@example.org"),
        ("Zoë Å", "learner-7@example.org"),
        ("Zoë", "zoe@exämple.org"),
        # Mostly not ASCII, and not an ASCII address: the text goes as base64.
        ("Ζωή Παπαδοπούλου " * 8, "zoe@exämple.org"),
    ],
)
async def test_the_mail_sink_journals_the_credential_an_email_links_to(
    tmp_path: Path, name: str, address: str
) -> None:
    # Sent as notifications sends them: quoted-printable, whose soft line breaks cut a long link,
    # or, for an address that is not ASCII, the EmailMessage path with SMTPUTF8 (8bit or base64).
    credential_id = "0b7f3c2e-5a4d-4e1b-9c8a-7d6e5f4a3b2c"
    link = f"https://issuance.example.org/{'long-path/' * 6}credentials/{credential_id}"
    earned = messages.Email(
        "Your credential", f"Hello {name},\n\nYours: {link}\n", f"<a href='{link}'>it</a>"
    )
    welcome = messages.Email("Enrolled", f"Hello {name}, welcome.\n", "<p>Welcome</p>")
    sender = "microcred <noreply@example.org>"
    journal = tmp_path / "mail.jsonl"
    async with smtp_server(JournalingHandler(journal), port=0) as port:
        connections = SmtpConnections(Settings.model_construct(smtp_port=port, smtp_from=sender))
        await connections.send(mime_email(sender, name, address, earned, "<a@example.org>"), address)
        await connections.send(mime_email(sender, name, address, welcome, "<b@example.org>"), address)
        connections.close()
    read = MailJournal(journal)
    read.refresh()
    assert read.by_credential == {credential_id: {"<a@example.org>": 1}}
    assert read.others == {"<b@example.org>": 1}
    assert read.recipients == {credential_id: {address}}
