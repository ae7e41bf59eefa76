"""The fault runs' failures, made real: a 3-node KRaft cluster that survives the SIGKILL of its active
controller and of a partition leader (writes with acks=all, min ISR 2 go on; the node rejoins), and
a PostgreSQL crash (every process SIGKILLed) after which the server recovers what was committed.

The cluster is the fault runs' own (ports 29092-29094, not `make up`'s broker): each run here wipes
it first and leaves it stopped and wiped. The PostgreSQL crashed is a throwaway server of its own
(a temporary data dir and a free port), never the project's, which other tests are using.
"""

import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import infra
from harness.cluster import ClusterPorts, KafkaCluster

# Generous for a loaded 2-core CI machine; what they take is printed (pytest -s).
CONTROLLER_ELECTION_LIMIT = 20.0  # a new active controller (~2 s: 2 s fetch timeout + election)
LEADER_ELECTION_LIMIT = 30.0  # a new partition leader (~6 s: the broker session timeout)

own_infra = pytest.mark.skipif(
    bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or os.environ.get("POSTGRES_URL")),
    reason="Kafka and PostgreSQL are external here: this checkout provisions nothing of its own",
)


# --------------------------------------------------------------------------------------------------
# crash_postgres, on a throwaway server
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def throwaway_postgres(monkeypatch: pytest.MonkeyPatch) -> Iterator[infra.Endpoints]:
    """A PostgreSQL of its own: infra's paths pointed at a temporary folder, a free port."""
    home = Path(tempfile.mkdtemp(prefix="microcred-pgcrash-"))
    home.chmod(0o755)  # the server's user (postgres, when we are root) must reach it
    with socket.socket() as probe:
        probe.bind((infra.HOST, 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MICROCRED_PG_PORT", str(port))
    monkeypatch.setattr(infra, "PG_LOCAL", home / "postgres")
    monkeypatch.setattr(infra, "LOCK_FILE", home / "infra.lock")
    try:
        yield infra.ensure_up(kafka=False)
    finally:
        # A symlink would be infra's fallback for a folder the server's user cannot reach: a place
        # shared with the project's own server, never to be stopped from here.
        if not (home / "postgres" / "data").is_symlink():
            infra.ensure_down(kafka=False)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.integration
@own_infra
async def test_a_crashed_postgres_loses_no_committed_row_and_recovers(
    throwaway_postgres: infra.Endpoints,
) -> None:
    data = infra.PG_LOCAL / "data"
    assert data.resolve().is_relative_to(infra.PG_LOCAL.parent), "never the project's PostgreSQL"
    url = throwaway_postgres.database_url("catalog")
    writer = await asyncpg.connect(url)
    await writer.execute("CREATE TABLE survivors (id int PRIMARY KEY)")
    await writer.execute("INSERT INTO survivors SELECT generate_series(1, 1000)")
    idle = await asyncpg.connect(url)  # a backend that is only connected
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    processes = [postmaster, *_children(postmaster)]
    log = data.parent / "postgres.log"
    offset = log.stat().st_size

    killed = await asyncio.to_thread(infra.crash_postgres)

    # The postmaster, 2 backends, checkpointer, background and WAL writers, launchers (and any
    # autovacuum worker started since the count).
    assert killed >= len(processes) >= 8
    assert not any(infra.pid_alive(pid) for pid in processes)
    with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
        await idle.fetchval("SELECT 1")
    idle.terminate()
    writer.terminate()
    await asyncio.to_thread(infra.ensure_up, kafka=False)
    assert "automatic recovery in progress" in log.read_bytes()[offset:].decode(errors="replace")
    reader = await asyncpg.connect(url)
    try:
        assert await reader.fetchval("SELECT count(*) FROM survivors") == 1000
    finally:
        await reader.close()


def test_crash_postgres_refuses_when_nothing_of_ours_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("POSTGRES_URL", raising=False)
    monkeypatch.setattr(infra, "PG_LOCAL", tmp_path / "postgres")
    monkeypatch.setattr(infra, "LOCK_FILE", tmp_path / "infra.lock")
    with pytest.raises(infra.InfraError, match="not running"):
        infra.crash_postgres()


def test_crash_postgres_refuses_an_external_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_URL", "postgresql://someone@db.example.invalid:5432/postgres")
    with pytest.raises(infra.InfraError, match="POSTGRES_URL"):
        infra.crash_postgres()


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[-1].split()[1]) == parent:
                found.append(int(entry.name))
    return found


# --------------------------------------------------------------------------------------------------
# The cluster (started after the PostgreSQL tests, which then do not share the CPU with it)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[KafkaCluster]:
    cluster = KafkaCluster()
    cluster.wipe()
    try:
        started = time.monotonic()
        cluster.up()
        up = time.monotonic() - started
        rss = {node: cluster.rss_bytes(node) or 0 for node in cluster.node_ids}
        print(
            f"\ncluster up from cold in {up:.1f}s; RSS "
            + ", ".join(f"node {n} {b / 2**20:.0f} MiB" for n, b in rss.items())
        )
        yield cluster
    finally:
        cluster.wipe()  # only the fault runs use it: stopped, and no data left behind


@pytest.fixture(scope="module")
async def topic(cluster: KafkaCluster) -> str:
    name = f"cluster-test-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=3, replication_factor=3)])
    finally:
        await admin.close()
    await _until(lambda: _all_led(cluster, name), 30, f"leaders for {name}")
    return name


async def _all_led(cluster: KafkaCluster, topic: str) -> bool:
    leaders = await cluster.leaders([topic])
    return len(leaders) == 3 and all(leader in cluster.node_ids for leader in leaders.values())


async def _until(probe: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll until probe() is true; the seconds it took."""
    started = time.monotonic()
    while not await _safely(probe):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no {what} after {timeout:.0f}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _safely(probe: Callable[[], Awaitable[bool]]) -> bool:
    try:
        return await probe()
    except infra.InfraError:  # e.g. no active controller during an election
        return False


async def _write_and_read(cluster: KafkaCluster, topic: str, label: str, count: int = 30) -> None:
    """Write `count` records with acks=all (idempotent) to every partition, then read them all back
    in a consumer group of their own that commits its offsets: the offsets topic works too."""
    producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sent = [
            await producer.send(topic, key=f"{i}".encode(), value=f"{label}-{i}".encode())
            for i in range(count)
        ]
        partitions = {(await delivery).partition for delivery in sent}
    finally:
        await producer.stop()
    assert partitions == {0, 1, 2}
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=cluster.bootstrap,
        group_id=f"cluster-test-{label}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        expected = {f"{label}-{i}" for i in range(count)}
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while not expected <= seen and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                seen.update(record.value.decode() for record in records if record.value)
        assert expected <= seen, f"read back {len(expected & seen)} of {count}"
        await consumer.commit()
    finally:
        await consumer.stop()


@pytest.mark.integration
@own_infra
async def test_a_fresh_cluster_replicates_every_partition_three_times(
    cluster: KafkaCluster, topic: str
) -> None:
    first = ClusterPorts.from_env().broker  # 29092 unless the clone runs on ports of its own
    assert cluster.bootstrap == ",".join(f"127.0.0.1:{first + n}" for n in range(3))
    assert await cluster.controller() in cluster.node_ids
    await _write_and_read(cluster, topic, "all-up")
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic, "__consumer_offsets"])
    finally:
        await admin.close()
    partitions = [partition for each in described for partition in each["partitions"]]
    assert len(partitions) == 3 + 10
    assert all(sorted(p["replicas"]) == sorted(p["isr"]) == [1, 2, 3] for p in partitions), described


@pytest.mark.integration
@own_infra
async def test_killing_the_active_controller_elects_another_and_writes_go_on(
    cluster: KafkaCluster, topic: str
) -> None:
    await _write_and_read(cluster, topic, "before-controller-kill")  # offsets topic exists (RF 3)
    old = await cluster.controller()
    cluster.kill(old)

    async def another() -> bool:
        return await cluster.controller() != old

    elected = await _until(another, CONTROLLER_ELECTION_LIMIT, "new active controller")
    new = await cluster.controller()
    print(f"\nnode {old} (active controller) SIGKILLed: node {new} active after {elected:.2f}s")
    started = time.monotonic()
    await _write_and_read(cluster, topic, "controller-killed")
    print(f"write+read of 30 records (acks=all) with node {old} down: {time.monotonic() - started:.1f}s")

    cluster.start(old)
    started = time.monotonic()
    await asyncio.to_thread(cluster.wait_ready, old)
    print(f"node {old} restarted and back in every ISR after {time.monotonic() - started:.1f}s")


@pytest.mark.integration
@own_infra
async def test_killing_a_partition_leader_moves_its_partitions_and_writes_go_on(
    cluster: KafkaCluster, topic: str
) -> None:
    controller = await cluster.controller()
    leaders = await cluster.leaders([topic])
    # A leader that is not also the controller: this is the broker's failover alone.
    victim = next((node for node in leaders.values() if node != controller), controller)
    led = [partition for partition, node in leaders.items() if node == victim]
    cluster.kill(victim)

    async def moved() -> bool:
        now = await cluster.leaders([topic])
        return all(now[partition] not in (victim, -1) for partition in led)

    elected = await _until(moved, LEADER_ELECTION_LIMIT, f"new leaders for {led}")
    print(f"\nnode {victim} (leader of {led}) SIGKILLed: new leaders after {elected:.2f}s")
    await _write_and_read(cluster, topic, "leader-killed")

    cluster.start(victim)
    started = time.monotonic()
    await asyncio.to_thread(cluster.wait_ready, victim)
    print(f"node {victim} restarted and back in every ISR after {time.monotonic() - started:.1f}s")
    await _write_and_read(cluster, topic, "all-back")
