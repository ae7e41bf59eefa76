#!/usr/bin/env python3
"""A 3-node Apache Kafka cluster (KRaft) on this machine, for the fault runs.

The deployment runs against a replicated Kafka (3 brokers, replication factor 3, min ISR 2), so
the fault runs prove their claims against one: three combined broker+controller nodes (ids 1..3,
static voters) on the same jars and JVM settings as the project's single broker (`infra.py`),
each its own process that can be SIGKILLed and restarted. It is never the broker of `make up`:
that one stays single-node on 9092.

    python scripts/harness/cluster.py up|down|status|wipe

Under the git-ignored .local/kafka-cluster/: node-<id>/ (the node's log dir), node-<id>.log
(appended across restarts, kept by `wipe`), node-<id>.properties, node-<id>.pid, cluster.id.

Environment:
    MICROCRED_CLUSTER_PORT             first broker port (default 29092: brokers 29092..29094)
    MICROCRED_CLUSTER_CONTROLLER_PORT  first controller port (default 29192: 29192..29194)
    MICROCRED_CLUSTER_HEAP             heap of each node (default 384m)

Stdlib only (the Kafka protocol spoken here is two requests), like infra.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import infra
from infra import HOST, InfraError, say

__all__ = ["CLUSTER_DIR", "ClusterPorts", "KafkaCluster"]

CLUSTER_DIR = infra.LOCAL_DIR / "kafka-cluster"
DEFAULT_HEAP = "384m"
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.1

# Two cores are shared by three JVMs and everything under test: one GC thread and one JIT thread
# each, and only the quick compiler (C1). Measured here, C2 costs more CPU than it saves within a
# fault run: 28 vs 16 CPU-s for a cold start to ready, 41 vs 18 CPU-s for the first 22,000 acks=all
# writes, 26% vs 13% of a core idling in the first minute.
JVM_OPTIONS = (
    "-XX:TieredStopAtLevel=1",
    "-XX:CICompilerCount=1",
    "-XX:ParallelGCThreads=1",
    "-XX:ConcGCThreads=1",
)

METADATA, DESCRIBE_QUORUM = 3, 55  # Kafka API keys
METADATA_TOPIC = "__cluster_metadata"
LEADER_NOT_AVAILABLE = 5  # a Kafka error code


@dataclass(frozen=True)
class ClusterPorts:
    """The first broker and controller port; node n listens on base + n - 1."""

    broker: int = 29092
    controller: int = 29192

    @classmethod
    def from_env(cls) -> ClusterPorts:
        return cls(
            broker=infra.env_port("MICROCRED_CLUSTER_PORT", cls.broker),
            controller=infra.env_port("MICROCRED_CLUSTER_CONTROLLER_PORT", cls.controller),
        )

    def broker_port(self, node_id: int) -> int:
        return self.broker + node_id - 1

    def controller_port(self, node_id: int) -> int:
        return self.controller + node_id - 1


@dataclass(frozen=True)
class _Partition:
    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


@dataclass(frozen=True)
class _Metadata:
    """What one broker's Metadata (v4) answer says: the live (registered, unfenced) brokers and
    the partitions of the topics asked for."""

    brokers: frozenset[int]
    partitions: dict[tuple[str, int], _Partition]
    topic_errors: dict[str, int]


class KafkaCluster:
    """3 combined broker+controller KRaft nodes (node ids 1..3, static voters) for the fault runs.

    Data under .local/kafka-cluster/node-<id>/, logs .local/kafka-cluster/node-<id>.log. Topics get
    3 replicas and need 2 in sync (internal topics too); no unclean leader election; topics are
    created on first use with 3 partitions; consumer groups join without delay. Each node has a
    small heap (MICROCRED_CLUSTER_HEAP, 384m) and few threads: the machine has 2 cores.

    Processes outlive the Python process that started them; their pids are found again from pid
    files (checked against the command line) or, failing that, /proc.
    """

    def __init__(self, nodes: int = 3, ports: ClusterPorts | None = None) -> None:
        if nodes < 1:
            raise ValueError("a cluster has at least one node")
        self.node_ids: tuple[int, ...] = tuple(range(1, nodes + 1))
        self.ports = ports or ClusterPorts.from_env()
        self._runtime: tuple[str, str] | None = None

    # -- where things are -------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{HOST}:{self.ports.broker_port(node)}" for node in self.node_ids)

    @staticmethod
    def data_dir(node_id: int) -> Path:
        return CLUSTER_DIR / f"node-{node_id}"

    @staticmethod
    def log(node_id: int) -> Path:
        return CLUSTER_DIR / f"node-{node_id}.log"

    @staticmethod
    def _properties_file(node_id: int) -> Path:
        return CLUSTER_DIR / f"node-{node_id}.properties"

    @staticmethod
    def _pid_file(node_id: int) -> Path:
        return CLUSTER_DIR / f"node-{node_id}.pid"

    # -- lifecycle --------------------------------------------------------------------------------

    def up(self, timeout: float = 180.0) -> str:
        """Provision, format once, start every node that is not running, and wait until the whole
        cluster serves: every node answers and lists all brokers, and a controller is active.
        Idempotent; returns the bootstrap servers."""
        started = time.monotonic()
        with infra.file_lock(CLUSTER_DIR / "cluster.lock"):
            stopped = [node for node in self.node_ids if self.pid(node) is None]
            if stopped:
                self._check_ports(stopped)
                java, version = self._prepare()
                self._format(java, stopped)
                say(f"cluster: starting Kafka {version} node(s) {', '.join(map(str, stopped))}")
                for node in stopped:
                    self._spawn(java, node)
        self._wait(lambda: self._serving(set(self.node_ids)), timeout, "the cluster to serve")
        elapsed = time.monotonic() - started
        say(f"cluster: {len(self.node_ids)} nodes ready in {elapsed:.1f}s, bootstrap {self.bootstrap}")
        return self.bootstrap

    def down(self) -> None:
        """Stop every node: SIGTERM (a controlled shutdown), SIGKILL after STOP_TIMEOUT. Data is kept."""
        with infra.file_lock(CLUSTER_DIR / "cluster.lock"):
            self._stop(graceful=True)

    def wipe(self) -> None:
        """Stop every node and delete the cluster's data: the next `up` makes a fresh cluster.

        The nodes are SIGKILLed (their data is going anyway); their logs are kept, appended to.
        """
        with infra.file_lock(CLUSTER_DIR / "cluster.lock"):
            self._stop(graceful=False)
            for path in CLUSTER_DIR.glob("node-*"):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.suffix in (".properties", ".pid"):
                    path.unlink()
            (CLUSTER_DIR / "cluster.id").unlink(missing_ok=True)
        say(f"cluster: wiped the data in {CLUSTER_DIR}")

    def pid(self, node_id: int) -> int | None:
        """The pid of the running node, or None."""
        pid_file = self._pid_file(node_id)
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            if self._is_node(pid, node_id):
                return pid
        with contextlib.suppress(OSError):
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and self._is_node(int(entry.name), node_id):
                    pid_file.write_text(f"{entry.name}\n")
                    return int(entry.name)
        return None

    def kill(self, node_id: int) -> int:
        """SIGKILL the node and wait until it is gone; returns the pid killed."""
        pid = self.pid(node_id)
        if pid is None:
            raise InfraError(f"cluster node {node_id} is not running")
        os.kill(pid, signal.SIGKILL)
        if not infra.wait_gone(pid, 30):
            raise InfraError(f"cluster node {node_id} (pid {pid}) survived SIGKILL for 30s")
        self._pid_file(node_id).unlink(missing_ok=True)
        say(f"cluster: node {node_id} (pid {pid}) killed")
        return pid

    def start(self, node_id: int) -> None:
        """Start one stopped node on its existing data (no reformat); `wait_ready` waits for it."""
        with infra.file_lock(CLUSTER_DIR / "cluster.lock"):
            if self.pid(node_id) is not None:
                return
            if not (self.data_dir(node_id) / "meta.properties").exists():
                raise InfraError(f"cluster node {node_id} has no data: bring the cluster `up` first")
            self._check_ports([node_id])
            java, _version = self._prepare()
            self._spawn(java, node_id)

    def wait_ready(self, node_id: int, timeout: float = 120.0) -> None:
        """Wait until the node answers Metadata as a live (registered, unfenced) broker and is back
        in the ISR of every partition it replicates: the cluster has its full redundancy again."""
        started = time.monotonic()
        self._wait(lambda: self._rejoined(node_id), timeout, f"node {node_id} to rejoin")
        say(f"cluster: node {node_id} rejoined in {time.monotonic() - started:.1f}s")

    async def controller(self) -> int:
        """The node id of the active KRaft controller, as the controller itself says.

        Raises InfraError when no live node is the active controller (e.g. during an election).
        """
        return await asyncio.to_thread(self._controller)

    async def leaders(self, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        """The leader's node id of every partition of these topics (-1: no leader), in the cluster's
        metadata as a live broker reports it."""
        return await asyncio.to_thread(self._leaders, topics)

    def rss_bytes(self, node_id: int) -> int | None:
        """The node's resident memory, or None when it is not running."""
        pid = self.pid(node_id)
        if pid is None:
            return None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            status = Path(f"/proc/{pid}/status").read_text()
            match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            return int(match.group(1)) * 1024 if match else None
        return None

    # -- starting -------------------------------------------------------------------------------

    def _prepare(self) -> tuple[str, str]:
        if self._runtime is None:
            with infra.file_lock(infra.LOCK_FILE):  # the jars are shared with the single broker
                self._runtime = infra.prepare_kafka()
        CLUSTER_DIR.mkdir(parents=True, exist_ok=True)
        (CLUSTER_DIR / "log4j2.properties").write_text(infra.KAFKA_LOG4J2_PROPERTIES)
        return self._runtime

    def _check_ports(self, nodes: Iterable[int]) -> None:
        for node in nodes:
            for port in (self.ports.broker_port(node), self.ports.controller_port(node)):
                if infra.port_in_use(port):
                    raise InfraError(
                        f"port {HOST}:{port} (cluster node {node}) is in use by something else "
                        f"(see `ss -ltnp 'sport = :{port}'`): stop it, or set MICROCRED_CLUSTER_PORT / "
                        "MICROCRED_CLUSTER_CONTROLLER_PORT"
                    )

    def _format(self, java: str, nodes: Sequence[int]) -> None:
        """Format the nodes not formatted yet, all with the cluster's one id (in parallel)."""
        cluster_id = self._cluster_id()
        for node in nodes:
            self._properties_file(node).write_text(self._server_properties(node))

        def format_node(node: int) -> bool:
            return infra.format_kafka_storage(
                java,
                properties=self._properties_file(node),
                data=self.data_dir(node),
                cluster_id=cluster_id,
                log=self.log(node),
                log4j=CLUSTER_DIR / "log4j2.properties",
            )

        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            formatted = [node for node, done in zip(nodes, pool.map(format_node, nodes), strict=True) if done]
        if formatted:
            say(f"cluster: formatted node(s) {', '.join(map(str, formatted))} (cluster id {cluster_id})")

    def _cluster_id(self) -> str:
        """The cluster's id: kept in cluster.id, else read back from a formatted node, else new."""
        id_file = CLUSTER_DIR / "cluster.id"
        if id_file.exists():
            return id_file.read_text().strip()
        cluster_id = None
        for node in self.node_ids:
            with contextlib.suppress(OSError):
                meta = (self.data_dir(node) / "meta.properties").read_text()
                found = re.search(r"^cluster\.id=(\S+)", meta, re.M)
                cluster_id = found.group(1) if found else None
            if cluster_id:
                break
        cluster_id = cluster_id or infra.new_cluster_id()
        id_file.write_text(cluster_id + "\n")
        return cluster_id

    def _server_properties(self, node_id: int) -> str:
        # Static voters, as the single broker: the voter endpoints come from this file on every start.
        voters = ",".join(f"{node}@{HOST}:{self.ports.controller_port(node)}" for node in self.node_ids)
        broker, controller = self.ports.broker_port(node_id), self.ports.controller_port(node_id)
        replicas = min(3, len(self.node_ids))
        min_isr = min(2, replicas)
        return f"""# Generated by scripts/harness/cluster.py on every start; edit the script, not this file.
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://{HOST}:{broker},CONTROLLER://{HOST}:{controller}
advertised.listeners=PLAINTEXT://{HOST}:{broker}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={self.data_dir(node_id)}

# Three JVMs on a 2-core machine: few threads each.
num.network.threads=2
num.io.threads=2
background.threads=2
num.recovery.threads.per.data.dir=1
num.replica.fetchers=1
log.cleaner.threads=1

# A killed broker is fenced (leaves every ISR, loses its leaderships) after 6 s without a
# heartbeat, not the default 9 s: acks=all writes wait for it until then.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=6000

# Replicated as in production: 3 replicas, 2 in sync to accept a write, no unclean elections.
default.replication.factor={replicas}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={replicas}
offsets.topic.num.partitions=10
transaction.state.log.replication.factor={replicas}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor={replicas}
share.coordinator.state.topic.min.isr={min_isr}
unclean.leader.election.enable=false

# Fault runs create topics on the fly and expect consumer groups to join without delay.
auto.create.topics.enable=true
num.partitions=3
group.initial.rebalance.delay.ms=0
delete.topic.enable=true

# Modest retention: the cluster is wiped before each fault run.
log.retention.hours=24
log.retention.bytes=268435456
log.segment.bytes=67108864
log.retention.check.interval.ms=300000
"""

    def _spawn(self, java: str, node_id: int) -> int:
        properties = self._properties_file(node_id)
        properties.write_text(self._server_properties(node_id))
        log = self.log(node_id)
        infra.rotate_log(log)
        heap = os.environ.get("MICROCRED_CLUSTER_HEAP", "").strip() or DEFAULT_HEAP
        jvm = infra.kafka_jvm(
            java, heap, log4j=CLUSTER_DIR / "log4j2.properties", logs_dir=CLUSTER_DIR, options=JVM_OPTIONS
        )
        pid = infra.spawn_detached([*jvm, "kafka.Kafka", str(properties)], log)
        self._pid_file(node_id).write_text(f"{pid}\n")
        say(f"cluster: node {node_id} started (pid {pid}, port {self.ports.broker_port(node_id)}, log {log})")
        return pid

    def _is_node(self, pid: int, node_id: int) -> bool:
        args = infra.cmdline(pid)
        return "kafka.Kafka" in args and str(self._properties_file(node_id)) in args and infra.pid_alive(pid)

    # -- stopping -------------------------------------------------------------------------------

    def _stop(self, *, graceful: bool) -> None:
        known = {int(path.stem.removeprefix("node-")) for path in CLUSTER_DIR.glob("node-*.properties")}
        running = {node: pid for node in sorted(known | set(self.node_ids)) if (pid := self.pid(node))}
        if not running:
            say("cluster: not running")
            return
        started = time.monotonic()
        how = "SIGTERM" if graceful else "SIGKILL"
        say(f"cluster: stopping node(s) {', '.join(map(str, running))} ({how})")
        for pid in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if graceful else signal.SIGKILL)
        deadline = time.monotonic() + (STOP_TIMEOUT if graceful else 10)
        for node, pid in running.items():
            if not infra.wait_gone(pid, max(0.0, deadline - time.monotonic())):
                say(f"cluster: node {node} (pid {pid}) still running, sending SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                infra.wait_gone(pid, 10)
            self._pid_file(node).unlink(missing_ok=True)
        say(f"cluster: stopped in {time.monotonic() - started:.1f}s")

    # -- asking the cluster ---------------------------------------------------------------------

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if ready():
                return
            for node in self.node_ids:
                if self._pid_file(node).exists() and self.pid(node) is None:
                    self._pid_file(node).unlink(missing_ok=True)
                    raise infra.fail_with_log(
                        f"cluster node {node} exited while waiting for {what}", self.log(node)
                    )
            if time.monotonic() > deadline:
                logs = ", ".join(str(self.log(node)) for node in self.node_ids)
                raise InfraError(f"timed out after {timeout:.0f}s waiting for {what}; see {logs}")
            time.sleep(POLL_INTERVAL)

    def _serving(self, nodes: set[int]) -> bool:
        for node in nodes:
            metadata = self._metadata(node, None)
            if metadata is None or metadata.brokers != nodes:
                return False
        with contextlib.suppress(InfraError):
            self._controller()
            return True
        return False

    def _rejoined(self, node_id: int) -> bool:
        metadata = self._metadata(node_id, None)
        if metadata is None or node_id not in metadata.brokers:
            return False
        return all(node_id in p.isr for p in metadata.partitions.values() if node_id in p.replicas)

    def _controller(self) -> int:
        request = _describe_quorum_request()
        for node in self._running():
            try:
                port = self.ports.controller_port(node)
                body = infra.kafka_request(HOST, port, DESCRIBE_QUORUM, 0, request, flexible=True)
                leader = _quorum_leader(body)
            except (OSError, struct.error):
                continue
            if leader is not None:
                return leader
        raise InfraError("no live node is the active KRaft controller")

    def _leaders(self, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        for node in self._running():
            metadata = self._metadata(node, topics)
            if metadata is None:
                continue
            failed = {t: code for t, code in metadata.topic_errors.items() if code != LEADER_NOT_AVAILABLE}
            if failed:
                raise InfraError(f"no metadata for topic(s) (Kafka error codes): {failed}")
            return {key: partition.leader for key, partition in sorted(metadata.partitions.items())}
        raise InfraError("no live cluster node answers Metadata")

    def _running(self) -> list[int]:
        return [node for node in self.node_ids if self.pid(node) is not None]

    def _metadata(self, node_id: int, topics: Sequence[str] | None) -> _Metadata | None:
        """Metadata v4 from one node (all topics when None), or None when it does not answer."""
        if topics is None:
            request = struct.pack(">i", -1)
        else:
            request = struct.pack(">i", len(topics)) + b"".join(_string(topic) for topic in topics)
        request += b"\0"  # allow_auto_topic_creation: false
        try:
            body = infra.kafka_request(HOST, self.ports.broker_port(node_id), METADATA, 4, request)
            return _decode_metadata(body)
        except (OSError, struct.error):
            return None


# --------------------------------------------------------------------------------------------------
# The two Kafka requests spoken here (https://kafka.apache.org/protocol)
# --------------------------------------------------------------------------------------------------


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">h", len(raw)) + raw


def _compact_string(text: str) -> bytes:
    raw = text.encode()
    return _uvarint(len(raw) + 1) + raw


def _compact_array(items: Sequence[bytes]) -> bytes:
    return _uvarint(len(items) + 1) + b"".join(items)


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _describe_quorum_request() -> bytes:
    """DescribeQuorum v0 (flexible) for partition 0 of the metadata log; tagged fields all empty."""
    partition = struct.pack(">i", 0) + b"\0"
    topic = _compact_string(METADATA_TOPIC) + _compact_array([partition]) + b"\0"
    return _compact_array([topic]) + b"\0"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def _unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return int(value)

    def int8(self) -> int:
        return self._unpack(">b")

    def int16(self) -> int:
        return self._unpack(">h")

    def int32(self) -> int:
        return self._unpack(">i")

    def string(self) -> str:
        """A (nullable) int16-length string; null reads as ''."""
        size = self.int16()
        return self._take(max(size, 0))

    def compact_string(self) -> str:
        size, self.offset = infra.read_uvarint(self.data, self.offset)
        return self._take(max(size - 1, 0))

    def compact_length(self) -> int:
        size, self.offset = infra.read_uvarint(self.data, self.offset)
        return max(size - 1, 0)

    def _take(self, size: int) -> str:
        if self.offset + size > len(self.data):
            raise struct.error("truncated string")
        text = self.data[self.offset : self.offset + size].decode(errors="replace")
        self.offset += size
        return text


def _decode_metadata(body: bytes) -> _Metadata:
    """A Metadata v4 response body."""
    reader = _Reader(body)
    reader.int32()  # throttle_time_ms
    brokers = set()
    for _ in range(reader.int32()):
        brokers.add(reader.int32())
        reader.string()  # host
        reader.int32()  # port
        reader.string()  # rack
    reader.string()  # cluster_id
    reader.int32()  # controller_id: in KRaft a random live broker, not the active controller
    partitions: dict[tuple[str, int], _Partition] = {}
    topic_errors: dict[str, int] = {}
    for _ in range(reader.int32()):
        error, name = reader.int16(), reader.string()
        reader.int8()  # is_internal
        if error:
            topic_errors[name] = error
        for _ in range(reader.int32()):
            reader.int16()  # partition error: LEADER_NOT_AVAILABLE shows as leader -1
            index, leader = reader.int32(), reader.int32()
            replicas = tuple(reader.int32() for _ in range(reader.int32()))
            isr = tuple(reader.int32() for _ in range(reader.int32()))
            partitions[(name, index)] = _Partition(leader, replicas, isr)
    return _Metadata(frozenset(brokers), partitions, topic_errors)


def _quorum_leader(body: bytes) -> int | None:
    """The leader in a DescribeQuorum v0 response body, when the node that answered is it.

    A controller that is not the active one answers NOT_LEADER_OR_FOLLOWER; so a dead leader,
    which no longer answers, is never reported by the survivors before they elect a new one.
    """
    reader = _Reader(body)
    if reader.int16():
        return None
    for _ in range(reader.compact_length()):
        reader.compact_string()
        for _ in range(reader.compact_length()):
            reader.int32()  # partition index
            error, leader = reader.int16(), reader.int32()
            return leader if error == 0 and leader >= 0 else None
    return None


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _status(cluster: KafkaCluster) -> bool:
    """Print one line per node and the active controller; True when every node serves."""
    ready = True
    for node in cluster.node_ids:
        pid = cluster.pid(node)
        metadata = cluster._metadata(node, None) if pid else None
        serving = metadata is not None and node in metadata.brokers
        ready = ready and serving
        rss = cluster.rss_bytes(node)
        state = "ready" if serving else ("starting" if pid else "stopped")
        print(
            f"node {node}  {state:<8} pid {pid or '-':<7} {HOST}:{cluster.ports.broker_port(node)} "
            f"(controller {cluster.ports.controller_port(node)})  "
            f"rss {f'{rss / 2**20:.0f} MiB' if rss else '-'}  log {infra.rel(cluster.log(node))}"
        )
    try:
        print(f"active controller: node {asyncio.run(cluster.controller())}")
    except InfraError:
        print("active controller: none")
        ready = False
    print(f"bootstrap: {cluster.bootstrap}")
    return ready


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster.py", description="the fault runs' 3-node Kafka cluster")
    parser.add_argument("command", choices=("up", "down", "status", "wipe"))
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds `up` waits for the cluster")
    args = parser.parse_args(argv)
    cluster = KafkaCluster()
    try:
        if args.command == "up":
            print(cluster.up(args.timeout))
        elif args.command == "down":
            cluster.down()
        elif args.command == "wipe":
            cluster.wipe()
        else:
            return 0 if _status(cluster) else 1
    except InfraError as error:
        print(f"cluster.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
