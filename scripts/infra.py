#!/usr/bin/env python3
"""Local Kafka + PostgreSQL for microcred, without Docker.

Provisions and runs, under the git-ignored ``.local/`` folder at the repo root:

* Apache Kafka 4.x, single node, KRaft combined mode (broker + controller), from the Apache Kafka
  jars on Maven Central (resolved with ``mvn``), on 127.0.0.1:9092 (controller 127.0.0.1:9093);
* PostgreSQL from the machine's server binaries on 127.0.0.1:5432, with a ``microcred`` login role
  (password ``microcred``, CREATEDB) and one database per service.

CLI::

    python3 scripts/infra.py up [kafka|postgres]      # idempotent; waits until ready
    python3 scripts/infra.py down [kafka|postgres]
    python3 scripts/infra.py status                    # exit 0 only when both are ready
    python3 scripts/infra.py env                       # eval "$(python3 scripts/infra.py env)"
    python3 scripts/infra.py logs [kafka|postgres] [-n LINES]

Importable (test fixtures)::

    from infra import ensure_up
    endpoints = ensure_up()            # -> Endpoints(kafka_bootstrap=..., postgres_url=...)
    endpoints.database_url("catalog")
    crash_postgres()                   # fault injection: SIGKILL the server and all its processes

Environment:
    KAFKA_BOOTSTRAP_SERVERS          use this Kafka; provision/start nothing for Kafka
    POSTGRES_URL                     use this server (role must be allowed to create databases);
                                     the service databases are still created there
    MICROCRED_KAFKA_PORT             default 9092
    MICROCRED_KAFKA_CONTROLLER_PORT  default 9093
    MICROCRED_KAFKA_VERSION          default see DEFAULT_KAFKA_VERSION
    MICROCRED_KAFKA_HEAP             default 1g
    MICROCRED_PG_PORT                default 5432
    MICROCRED_PG_BINDIR              directory with initdb/pg_ctl/postgres (default: auto-detect)

Stdlib only: it must run before the project's venv exists.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = ["SERVICES", "Endpoints", "InfraError", "crash_postgres", "endpoints", "ensure_down", "ensure_up"]

# --------------------------------------------------------------------------------------------------
# Constants and paths
# --------------------------------------------------------------------------------------------------

SERVICES: tuple[str, ...] = ("catalog", "enrollment", "billing", "issuance", "notifications")
HOST = "127.0.0.1"

# Newest Kafka on Maven Central when written; its broker jars target Java 17 (checked at start by
# _check_class_version). 4.1.1 works the same: MICROCRED_KAFKA_VERSION=4.1.1.
DEFAULT_KAFKA_VERSION = "4.4.0"
LOG4J_VERSION = "2.24.3"  # Kafka 4.x logs through slf4j 1.7 -> log4j2 (same as its distribution)
DEPENDENCY_PLUGIN_VERSION = "3.8.1"  # pinned: Maven 3.8's built-in default (2.8) is ancient
MIN_JAVA = 17

PG_ROLE = "microcred"
PG_PASSWORD = "microcred"  # noqa: S105 - a documented dev-only credential
PG_SUPERUSER = "postgres"

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_DIR = REPO_ROOT / ".local"
KAFKA_DIR = LOCAL_DIR / "kafka"
KAFKA_LIBS = KAFKA_DIR / "libs"
KAFKA_DATA = KAFKA_DIR / "data"
KAFKA_LOG = KAFKA_DIR / "kafka.log"
KAFKA_PID = KAFKA_DIR / "kafka.pid"
KAFKA_PROPS = KAFKA_DIR / "server.properties"
KAFKA_LOG4J = KAFKA_DIR / "log4j2.properties"
KAFKA_CLUSTER_ID = KAFKA_DIR / "cluster.id"
MAVEN_LOG = KAFKA_DIR / "maven.log"
LIBS_MARKER = KAFKA_LIBS / ".resolved"
PG_LOCAL = LOCAL_DIR / "postgres"
LOCK_FILE = LOCAL_DIR / "infra.lock"

KAFKA_STARTED_LINE = "Kafka Server started"
KAFKA_STOP_TIMEOUT = 60.0
LOG_ROTATE_BYTES = 20 * 1024 * 1024
TAIL_LINES = 30


class InfraError(RuntimeError):
    """A problem the user can act on; the CLI prints the message and exits non-zero."""


@dataclass(frozen=True)
class Endpoints:
    """Where the services and tests find Kafka and PostgreSQL."""

    kafka_bootstrap: str
    postgres_url: str

    def database_url(self, service: str) -> str:
        """URL of one service's own database (same server and credentials as ``postgres_url``)."""
        if service not in SERVICES:
            raise KeyError(f"unknown service {service!r}; expected one of {', '.join(SERVICES)}")
        return _with_database(self.postgres_url, service)

    @property
    def database_urls(self) -> dict[str, str]:
        return {service: self.database_url(service) for service in SERVICES}

    def env(self) -> dict[str, str]:
        """The environment variables the services read."""
        variables = {"KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap, "POSTGRES_URL": self.postgres_url}
        for service, url in self.database_urls.items():
            variables[f"{service.upper()}_DATABASE_URL"] = url
        return variables


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def say(message: str) -> None:
    # Progress goes to stderr so that stdout stays clean for `env` (eval) and machine use.
    print(message, file=sys.stderr, flush=True)


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def env_port(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise InfraError(f"{name}={raw!r} is not a valid TCP port")
    return int(raw)


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def fail_with_log(message: str, log: Path) -> InfraError:
    return InfraError(f"{message}\n--- last {TAIL_LINES} lines of {log} ---\n{_tail(log)}\n---")


def _run(
    cmd: Sequence[str],
    *,
    user: PgUser | None = None,
    check: bool = True,
    input_text: str | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run a command (optionally as the unprivileged PostgreSQL user) and capture its output."""
    kwargs: dict[str, object] = {}
    if user is not None and os.geteuid() == 0 and user.uid != 0:
        kwargs = {"user": user.uid, "group": user.gid, "extra_groups": []}
    full_env = dict(os.environ if env is None else env)
    if user is not None:
        full_env.update(HOME=str(user.home), USER=user.name, LOGNAME=user.name)
    # Arguments come from this module, never from untrusted input.
    result: subprocess.CompletedProcess[str] = subprocess.run(  # noqa: S603
        list(cmd),
        input=input_text,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise InfraError(f"command failed ({result.returncode}): {shlex.join(cmd)}\n{output}")
    return result


def port_in_use(port: int) -> bool:
    """True when something listens on HOST:port (or the port cannot be bound for another reason)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as the JVM and PostgreSQL use it: TIME_WAIT leftovers do not count as "taken".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def pid_alive(pid: int) -> bool:
    """Alive, or still exiting; a zombie is dead (an orphaned, killed child may linger unreaped in
    containers). A killed JVM's main thread turns zombie while its other threads still exit, and
    its files (listening sockets) close only with the last one: until then it counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return True  # no procfs: trust kill(0)
    state, threads = fields[0], int(fields[17])
    return state != "Z" or threads > 1


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def rotate_log(log: Path) -> None:
    # Foreground logs are appended across restarts; keep one generation so they stay small.
    if log.exists() and not log.is_symlink() and log.stat().st_size > LOG_ROTATE_BYTES:
        log.replace(log.with_name(log.name + ".1"))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes, held for the block (the file is created when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock() -> contextlib.AbstractContextManager[None]:
    """Serialise up/down across processes (e.g. several pytest-xdist workers calling ensure_up)."""
    return file_lock(LOCK_FILE)


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


# --------------------------------------------------------------------------------------------------
# Kafka: toolchain and jars
# --------------------------------------------------------------------------------------------------


def _kafka_version() -> str:
    return os.environ.get("MICROCRED_KAFKA_VERSION", "").strip() or DEFAULT_KAFKA_VERSION


def _find_java() -> tuple[str, int]:
    """The java executable (JAVA_HOME first, then PATH) and its major version, at least 17."""
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    java = str(candidate) if candidate and candidate.exists() else shutil.which("java")
    install = f"apt-get install openjdk-{MIN_JAVA}-jre-headless"
    if java is None:
        raise InfraError(f"Java {MIN_JAVA}+ not found (needed to run Kafka): {install}")
    output = _run([java, "-version"], check=False).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', output)
    if not match:
        raise InfraError(f"cannot tell the version of {java}: {output.strip()}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0" style
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise InfraError(f"Java {MIN_JAVA}+ needed for Kafka 4, found Java {major} at {java}: {install}")
    return java, major


def _find_maven() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError("Maven not found (needed once to download the Kafka jars): apt-get install maven")
    return mvn


def _pom(version: str) -> str:
    log4j = "".join(
        f"""
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>{artifact}</artifactId>
      <version>{LOG4J_VERSION}</version>
      <scope>runtime</scope>
    </dependency>"""
        for artifact in ("log4j-api", "log4j-core", "log4j-slf4j-impl")
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/infra.py: the runtime classpath of a Kafka {version} broker. -->
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 https://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>org.microcred.local</groupId>
  <artifactId>kafka-broker-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>{log4j}
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>{DEPENDENCY_PLUGIN_VERSION}</version>
      </plugin>
    </plugins>
  </build>
</project>
"""


_DOWNLOADED = re.compile(r"Downloaded from \S+: (\S+) \(([^)]*?)(?: at [^)]*)?\)")


def _resolve_jars(version: str) -> None:
    """Download the broker's jars into .local/kafka/libs (once per version)."""
    pom = _pom(version)
    fingerprint = hashlib.sha256(pom.encode()).hexdigest()
    if LIBS_MARKER.exists() and LIBS_MARKER.read_text().strip() == fingerprint:
        return
    mvn = _find_maven()
    KAFKA_DIR.mkdir(parents=True, exist_ok=True)
    (KAFKA_DIR / "pom.xml").write_text(pom)
    shutil.rmtree(KAFKA_LIBS, ignore_errors=True)  # never mix jars of two versions
    say(f"kafka: resolving Kafka {version} jars with Maven (first run downloads ~65 MB)")
    say(f"kafka: full Maven output in {rel(MAVEN_LOG)}")
    started = time.monotonic()
    cmd = [
        mvn, "-B", "-f", str(KAFKA_DIR / "pom.xml"),
        "dependency:copy-dependencies", f"-DoutputDirectory={KAFKA_LIBS}", "-DincludeScope=runtime",
    ]  # fmt: skip
    jars = _stream_maven(cmd)
    if not any(KAFKA_LIBS.glob(f"kafka_2.13-{version}.jar")):
        raise fail_with_log(f"Maven did not produce kafka_2.13-{version}.jar", MAVEN_LOG)
    LIBS_MARKER.write_text(fingerprint + "\n")
    count = len(list(KAFKA_LIBS.glob("*.jar")))
    elapsed = time.monotonic() - started
    say(f"kafka: {count} jars in {rel(KAFKA_LIBS)} ({jars} downloaded) in {elapsed:.1f}s")


def _stream_maven(cmd: list[str]) -> int:
    """Run Maven, log everything to maven.log, print one line per downloaded jar; return the count."""
    jars = 0
    with MAVEN_LOG.open("w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        # Arguments come from this module.
        process = subprocess.Popen(  # noqa: S603
            cmd, cwd=KAFKA_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            match = _DOWNLOADED.search(line)
            if match and match.group(1).endswith(".jar"):
                jars += 1
                say(f"  mvn [{jars:3d}] {match.group(1).rsplit('/', 1)[-1]} ({match.group(2)})")
        code = process.wait()
    if code != 0:
        raise fail_with_log(
            f"Maven failed (exit {code}); check network access to Maven Central or ~/.m2/settings.xml",
            MAVEN_LOG,
        )
    return jars


def _check_class_version(version: str, java_major: int) -> None:
    """Fail early and clearly when the chosen Kafka was compiled for a newer Java than we have.

    Otherwise the broker dies with an UnsupportedClassVersionError deep in its log.
    """
    needed = 0
    for jar in KAFKA_LIBS.glob(f"kafka*-{version}.jar"):
        with zipfile.ZipFile(jar) as archive:
            name = next((n for n in archive.namelist() if n.endswith(".class")), None)
            if name is not None:
                major = struct.unpack(">H", archive.read(name)[6:8])[0]
                needed = max(needed, major - 44)  # class file major 61 == Java 17
    if needed > java_major:
        raise InfraError(
            f"Kafka {version} needs Java {needed}+, found Java {java_major}: install "
            f"openjdk-{needed}-jre-headless or set MICROCRED_KAFKA_VERSION to an older 4.x"
        )


# --------------------------------------------------------------------------------------------------
# Kafka: configuration, storage, process
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KafkaPorts:
    broker: int
    controller: int

    @classmethod
    def from_env(cls) -> KafkaPorts:
        return cls(
            broker=env_port("MICROCRED_KAFKA_PORT", 9092),
            controller=env_port("MICROCRED_KAFKA_CONTROLLER_PORT", 9093),
        )


def _server_properties(ports: KafkaPorts) -> str:
    # Static voters (not KIP-853 dynamic quorum): the voter endpoint then comes from this file on
    # every start, so changing the controller port later does not break the formatted log.
    return f"""# Generated by scripts/infra.py on every start; edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{HOST}:{ports.controller}
listeners=PLAINTEXT://{HOST}:{ports.broker},CONTROLLER://{HOST}:{ports.controller}
advertised.listeners=PLAINTEXT://{HOST}:{ports.broker}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={KAFKA_DATA}

# Small footprint for a 2-core dev machine / CI runner.
num.network.threads=2
num.io.threads=2
background.threads=4
num.recovery.threads.per.data.dir=1
num.replica.fetchers=1
log.cleaner.threads=1

# Single node: every internal topic has one replica.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Tests create topics on the fly and expect consumer groups to join without delay.
auto.create.topics.enable=true
num.partitions=3
group.initial.rebalance.delay.ms=0
delete.topic.enable=true

# Modest retention: this is a dev box.
log.retention.hours=24
log.retention.bytes=268435456
log.segment.bytes=67108864
log.retention.check.interval.ms=300000
"""


KAFKA_LOG4J2_PROPERTIES = """# Generated by scripts/infra.py: Kafka logs to stdout, appended to its log file.
status = warn
name = microcred-kafka
# Kafka logs its own orderly shutdown from a JVM shutdown hook; log4j2 must not stop first.
shutdownHook = disable
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
"""


def new_cluster_id() -> str:
    """A fresh Kafka cluster id (base64url of 16 random bytes)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not cluster_id.startswith("-"):  # Kafka's own generator avoids ids that look like flags
            return cluster_id


def _cluster_id() -> str:
    """This checkout's single-node cluster id, persisted so re-formatting is stable."""
    if KAFKA_CLUSTER_ID.exists():
        return KAFKA_CLUSTER_ID.read_text().strip()
    cluster_id = new_cluster_id()
    KAFKA_CLUSTER_ID.write_text(cluster_id + "\n")
    return cluster_id


def prepare_kafka() -> tuple[str, str]:
    """(java executable, Kafka version): the jars resolved into .local/kafka/libs, Java checked.

    Every Kafka this project runs (the single broker, the fault runs' cluster) shares these jars;
    callers hold the infra lock, since a version change replaces the folder.
    """
    java, java_major = _find_java()
    version = _kafka_version()
    _resolve_jars(version)
    _check_class_version(version, java_major)
    return java, version


def kafka_jvm(
    java: str,
    heap: str,
    *,
    log4j: Path = KAFKA_LOG4J,
    logs_dir: Path = KAFKA_DIR,
    options: Sequence[str] = (),
) -> list[str]:
    """The JVM command line of a Kafka process on the shared jars, up to (not including) its main class."""
    return [
        java, f"-Xms{heap}", f"-Xmx{heap}",
        "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
        *options,
        f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={logs_dir}",
        "-cp", f"{KAFKA_LIBS}/*",
    ]  # fmt: skip


def format_kafka_storage(
    java: str, *, properties: Path, data: Path, cluster_id: str, log: Path, log4j: Path = KAFKA_LOG4J
) -> bool:
    """Format a KRaft node's log dir (`kafka-storage format`) unless it already is; True when it was.

    The tool's output is appended to the node's log.
    """
    if (data / "meta.properties").exists():
        return False
    data.mkdir(parents=True, exist_ok=True)
    cmd = [*kafka_jvm(java, "256m", log4j=log4j, logs_dir=log.parent),
           "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(properties)]  # fmt: skip
    result = _run(cmd, check=False, timeout=120)
    with log.open("a") as handle:
        handle.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise fail_with_log(f"formatting the KRaft storage in {data} failed", log)
    return True


def _is_our_kafka(pid: int) -> bool:
    args = cmdline(pid)
    return "kafka.Kafka" in args and str(KAFKA_PROPS) in args and pid_alive(pid)


def _kafka_pid() -> int | None:
    """The pid of this checkout's broker: the pid file first, then a /proc scan (lost pid file)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(KAFKA_PID.read_text().strip())
        if _is_our_kafka(pid):
            return pid
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _is_our_kafka(int(entry.name)):
                KAFKA_PID.write_text(f"{entry.name}\n")
                return int(entry.name)
    return None


def _running_kafka_ports() -> KafkaPorts | None:
    """The ports in the properties file the running broker was started with."""
    try:
        text = KAFKA_PROPS.read_text()
    except OSError:
        return None
    broker = re.search(r"^advertised\.listeners=PLAINTEXT://[^:]+:(\d+)", text, re.M)
    controller = re.search(r"^controller\.quorum\.voters=1@[^:]+:(\d+)", text, re.M)
    if not broker or not controller:
        return None
    return KafkaPorts(int(broker.group(1)), int(controller.group(1)))


def spawn_detached(cmd: list[str], log: Path) -> int:
    """Start cmd in its own session, detached from us, output appended to log; return its pid.

    A throwaway `sh` backgrounds the JVM and exits at once, so the broker is re-parented to init:
    it survives the CLI, gets no Ctrl-C meant for a test run, and never lingers as our zombie.
    """
    script = '"$@" </dev/null >>"$MICROCRED_LOG" 2>&1 & echo $!'
    env = {**os.environ, "MICROCRED_LOG": str(log)}
    # Arguments come from this module.
    result = subprocess.run(  # noqa: S603
        ["/bin/sh", "-c", script, "sh", *cmd],
        env=env,
        capture_output=True,
        text=True,
        start_new_session=True,
        check=True,
    )
    return int(result.stdout.strip())


def _start_kafka(ports: KafkaPorts, timeout: float) -> int:
    for port in (ports.broker, ports.controller):
        if port_in_use(port):
            raise InfraError(
                f"port {HOST}:{port} is already in use by something that is not this checkout's Kafka "
                f"(see `ss -ltnp 'sport = :{port}'`); stop it or set MICROCRED_KAFKA_PORT / "
                "MICROCRED_KAFKA_CONTROLLER_PORT, or point KAFKA_BOOTSTRAP_SERVERS at an existing broker"
            )
    java, version = prepare_kafka()
    KAFKA_PROPS.write_text(_server_properties(ports))
    KAFKA_LOG4J.write_text(KAFKA_LOG4J2_PROPERTIES)
    rotate_log(KAFKA_LOG)
    cluster_id = _cluster_id()
    formatted = format_kafka_storage(
        java, properties=KAFKA_PROPS, data=KAFKA_DATA, cluster_id=cluster_id, log=KAFKA_LOG
    )
    if formatted:
        say(f"kafka: formatted KRaft storage in {rel(KAFKA_DATA)} (cluster id {cluster_id})")

    offset = KAFKA_LOG.stat().st_size if KAFKA_LOG.exists() else 0
    heap = os.environ.get("MICROCRED_KAFKA_HEAP", "").strip() or "1g"
    say(f"kafka: starting Kafka {version} on {HOST}:{ports.broker} (controller {ports.controller})")
    started = time.monotonic()
    pid = spawn_detached([*kafka_jvm(java, heap), "kafka.Kafka", str(KAFKA_PROPS)], KAFKA_LOG)
    KAFKA_PID.write_text(f"{pid}\n")
    _wait_kafka_ready(pid, ports.broker, offset, timeout)
    say(f"kafka: ready in {time.monotonic() - started:.1f}s (pid {pid}, log {rel(KAFKA_LOG)})")
    return pid


def _wait_kafka_ready(pid: int, port: int, log_offset: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            KAFKA_PID.unlink(missing_ok=True)
            raise fail_with_log("Kafka exited during startup", KAFKA_LOG)
        if log_has(KAFKA_LOG, KAFKA_STARTED_LINE, log_offset) and _kafka_metadata_ok(HOST, port):
            return
        time.sleep(0.25)
    raise fail_with_log(
        f"Kafka (pid {pid}) not ready after {timeout:.0f}s; it is still running, "
        "check the log or `infra.py down kafka`",
        KAFKA_LOG,
    )


def log_has(log: Path, needle: str, offset: int) -> bool:
    try:
        with log.open("rb") as handle:
            handle.seek(offset)
            return needle.encode() in handle.read()
    except OSError:
        return False


def _kafka_metadata_ok(host: str, port: int, timeout: float = 2.0) -> bool:
    """A real protocol round trip: Metadata v4 must list at least one (unfenced) broker.

    v4 is non-flexible (simple encoding) and still supported by Kafka 4.x (KIP-896 removed v0-v3).
    """
    try:
        body = kafka_request(host, port, 3, 4, struct.pack(">ib", -1, 0), timeout=timeout)  # all topics
        _throttle, brokers = struct.unpack_from(">ii", body)
    except (OSError, struct.error):
        return False
    return bool(brokers >= 1)


def kafka_request(
    host: str,
    port: int,
    api_key: int,
    api_version: int,
    body: bytes,
    *,
    flexible: bool = False,
    timeout: float = 2.0,
) -> bytes:
    """One Kafka protocol round trip on a fresh connection: the response body, after its header.

    ``flexible``: that API version uses request header v2 and response header v1 (tagged fields).
    Raises OSError (or struct.error on a garbled answer) when the broker does not answer properly.
    """
    client_id = b"microcred-infra"
    correlation_id = secrets.randbits(31)
    request = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id)) + client_id
    request += (b"\0" if flexible else b"") + body  # no tagged fields
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        size = struct.unpack(">i", _recv_exact(sock, 4))[0]
        response = _recv_exact(sock, size)
    (received_id,) = struct.unpack_from(">i", response)
    if received_id != correlation_id:
        raise OSError(f"Kafka answered correlation id {received_id}, expected {correlation_id}")
    offset = 4
    if flexible:
        fields, offset = read_uvarint(response, offset)
        for _ in range(fields):
            _tag, offset = read_uvarint(response, offset)
            size, offset = read_uvarint(response, offset)
            offset += size
    return response[offset:]


def read_uvarint(data: bytes, offset: int) -> tuple[int, int]:
    """An unsigned varint of the Kafka protocol at data[offset:]: (value, offset after it)."""
    value = shift = 0
    while True:
        if offset >= len(data):
            raise struct.error("truncated varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise OSError("connection closed")
        chunks += chunk
    return bytes(chunks)


def _stop_kafka() -> None:
    pid = _kafka_pid()
    if pid is None:
        say("kafka: not running")
        KAFKA_PID.unlink(missing_ok=True)
        return
    say(f"kafka: stopping (pid {pid})")
    started = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)  # the broker shuts down cleanly on SIGTERM (controlled shutdown)
    if not wait_gone(pid, KAFKA_STOP_TIMEOUT):
        say(f"kafka: still running after {KAFKA_STOP_TIMEOUT:.0f}s, sending SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10)
    KAFKA_PID.unlink(missing_ok=True)
    say(f"kafka: stopped in {time.monotonic() - started:.1f}s")


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.2)
    return not pid_alive(pid)


def _kafka_up(timeout: float) -> str:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        say(f"kafka: using KAFKA_BOOTSTRAP_SERVERS={external} (nothing started)")
        return external
    ports = KafkaPorts.from_env()
    KAFKA_DIR.mkdir(parents=True, exist_ok=True)
    pid = _kafka_pid()
    if pid is not None:
        running = _running_kafka_ports()
        if running is not None and running != ports:
            raise InfraError(
                f"Kafka is running on {HOST}:{running.broker} (controller {running.controller}) but "
                f"{ports.broker}/{ports.controller} were requested; run `infra.py down kafka` first"
            )
        if _kafka_metadata_ok(HOST, ports.broker):
            say(f"kafka: already running (pid {pid}) on {HOST}:{ports.broker}")
        else:
            say(f"kafka: running (pid {pid}) but not ready yet, waiting")
            _wait_kafka_ready(pid, ports.broker, 0, timeout)
    else:
        _start_kafka(ports, timeout)
    return f"{HOST}:{ports.broker}"


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PgUser:
    """The OS user that owns the data directory and runs the server."""

    name: str
    uid: int
    gid: int
    home: Path


@dataclass(frozen=True)
class PgLayout:
    """Where this checkout's PostgreSQL lives (normally .local/postgres, see _pg_layout)."""

    home: Path

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def log(self) -> Path:
        return self.home / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        # Unix socket paths are limited to ~107 bytes; deep checkouts fall back to /tmp.
        run = self.home / "run"
        return run if len(str(run)) < 90 else Path("/tmp")  # noqa: S108


def _pg_bindir() -> Path:
    """The newest PostgreSQL server binaries on this machine (or MICROCRED_PG_BINDIR)."""
    candidates: list[Path] = []
    override = os.environ.get("MICROCRED_PG_BINDIR", "").strip()
    if override:
        candidates.append(Path(override))
    else:
        pg_config = shutil.which("pg_config")
        if pg_config:
            result = _run([pg_config, "--bindir"], check=False)
            if result.returncode == 0:
                candidates.append(Path(result.stdout.strip()))
        versioned = [*Path("/usr/lib/postgresql").glob("*/bin"), *Path("/usr").glob("pgsql-*/bin")]
        candidates += sorted(versioned, key=_pg_dir_version, reverse=True)
        initdb = shutil.which("initdb")
        if initdb:
            candidates.append(Path(initdb).parent)
    usable = [d for d in candidates if all((d / tool).exists() for tool in ("initdb", "pg_ctl", "postgres"))]
    if not usable:
        raise InfraError(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: apt-get install postgresql "
            "(or postgresql-15), or set MICROCRED_PG_BINDIR, or set POSTGRES_URL to an existing server"
        )
    # pg_config may name an older client-only install: prefer the newest usable version.
    return max(usable, key=_pg_dir_version)


def _pg_dir_version(bindir: Path) -> int:
    match = re.search(r"(\d+)", bindir.parent.name)
    if match:
        return int(match.group(1))
    result = _run([str(bindir / "postgres"), "--version"], check=False)
    found = re.search(r"(\d+)", result.stdout)
    return int(found.group(1)) if found else 0


def _psql(bindir: Path | None = None) -> str:
    if bindir is not None and (bindir / "psql").exists():
        return str(bindir / "psql")
    psql = shutil.which("psql")
    if psql is None:
        raise InfraError("psql not found: apt-get install postgresql-client")
    return psql


def _pg_user(existing_data: Path | None) -> PgUser | None:
    """None when not root (we run everything as ourselves); else the unprivileged server user.

    An existing data directory decides (the server must run as its owner); otherwise `postgres`,
    created as a system user when missing.
    """
    if os.geteuid() != 0:
        return None
    if existing_data is not None and existing_data.exists() and existing_data.stat().st_uid != 0:
        entry = pwd.getpwuid(existing_data.stat().st_uid)
    else:
        try:
            entry = pwd.getpwnam(PG_SUPERUSER)
        except KeyError:
            _create_system_user(PG_SUPERUSER)
            entry = pwd.getpwnam(PG_SUPERUSER)
    return PgUser(entry.pw_name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))


def _create_system_user(name: str) -> None:
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    if not Path(useradd).exists():
        raise InfraError(f"no `{name}` user and no useradd to create one: create an unprivileged `{name}`")
    say(f"postgres: creating system user {name!r} (PostgreSQL refuses to run as root)")
    _run([useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
          "--shell", "/usr/sbin/nologin", name])  # fmt: skip


def _chown(path: Path, user: PgUser | None) -> None:
    if user is not None:
        os.chown(path, user.uid, user.gid)


def _user_can_write(path: Path, user: PgUser) -> bool:
    # access(2) as that user walks the whole path, so an untraversable ancestor (e.g. /root) fails too.
    probe = _run(["/usr/bin/test", "-w", str(path), "-a", "-x", str(path)], user=user, check=False)
    return probe.returncode == 0


def _pg_layout(user: PgUser | None) -> PgLayout:
    """.local/postgres, unless the server user cannot reach it: then /var/tmp/microcred-<hash>.

    The fallback is recorded as symlinks .local/postgres/{data,postgres.log} -> the real place.
    """
    PG_LOCAL.mkdir(parents=True, exist_ok=True)
    link = PG_LOCAL / "data"
    if link.is_symlink():
        return PgLayout(Path(os.readlink(link)).parent)
    if user is None:
        return PgLayout(PG_LOCAL)
    _chown(PG_LOCAL, user)
    if _user_can_write(PG_LOCAL, user):
        return PgLayout(PG_LOCAL)
    digest = hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:10]
    fallback = PgLayout(Path("/var/tmp") / f"microcred-{digest}" / "postgres")  # noqa: S108
    fallback.home.mkdir(parents=True, exist_ok=True)
    fallback.home.parent.chmod(0o755)
    _chown(fallback.home, user)
    link.symlink_to(fallback.data)
    (PG_LOCAL / "postgres.log").symlink_to(fallback.log)
    (PG_LOCAL / "README").write_text(
        f"The {user.name} user cannot reach {PG_LOCAL}, so PostgreSQL lives in {fallback.home}.\n"
    )
    say(f"postgres: {user.name} cannot reach {PG_LOCAL}; using {fallback.home} (symlinked)")
    return fallback


def _pg_port() -> int:
    return env_port("MICROCRED_PG_PORT", 5432)


def _pg_conf(layout: PgLayout, port: int) -> str:
    return f"""# Generated by scripts/infra.py on every start; edit the script, not this file.
listen_addresses = '{HOST}'
port = {port}
unix_socket_directories = '{layout.socket_dir}'
max_connections = 200
shared_buffers = 128MB
fsync = on
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'
"""


def _initdb(bindir: Path, layout: PgLayout, user: PgUser | None) -> None:
    if (layout.data / "PG_VERSION").exists():
        return
    say(f"postgres: initdb {layout.data}")
    started = time.monotonic()
    layout.home.mkdir(parents=True, exist_ok=True)
    _chown(layout.home, user)
    # Local socket: trust (admin from this machine); TCP: password (the URLs carry it, so a wrong
    # password in a service config fails here exactly as it would in production).
    _run(
        [str(bindir / "initdb"), "-D", str(layout.data), "-U", PG_SUPERUSER, "--encoding=UTF8",
         "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256"],
        user=user, cwd=layout.home,
    )  # fmt: skip
    with (layout.data / "postgresql.conf").open("a") as conf:
        conf.write("\ninclude_if_exists = 'microcred.conf'\n")
    say(f"postgres: initdb done in {time.monotonic() - started:.1f}s")


def _write_pg_conf(layout: PgLayout, user: PgUser | None, port: int) -> None:
    run = layout.socket_dir
    if run != Path("/tmp"):  # noqa: S108
        run.mkdir(exist_ok=True)
        run.chmod(0o700)  # the socket trusts everyone who can reach it: only the server user and root
        _chown(run, user)
    conf = layout.data / "microcred.conf"
    conf.write_text(_pg_conf(layout, port))
    _chown(conf, user)


def _check_pg_version(bindir: Path, layout: PgLayout) -> None:
    data_version = (layout.data / "PG_VERSION").read_text().strip()
    binary_version = str(_pg_dir_version(bindir))
    if data_version != binary_version:
        raise InfraError(
            f"{layout.data} was created by PostgreSQL {data_version} but the binaries in {bindir} are "
            f"version {binary_version}: set MICROCRED_PG_BINDIR to the {data_version} binaries, or "
            f"`infra.py down postgres` and delete {layout.data} to start over"
        )


def _postmaster(layout: PgLayout) -> tuple[int, int] | None:
    """(pid, port) of the running server of this data dir, from postmaster.pid."""
    try:
        lines = (layout.data / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    return (pid, port) if pid_alive(pid) and _is_postgres(pid) else None


def _is_postgres(pid: int) -> bool:
    args = cmdline(pid)
    return not args or Path(args[0]).name in ("postgres", "postmaster")  # no procfs: trust the pid


def _remove_stale_lock_files(layout: PgLayout) -> None:
    """Called when no server of ours runs. PostgreSQL replaces a lock file (postmaster.pid, the
    socket's .lock) whose pid does not exist, but refuses to start on one that names an existing
    process of its user: a SIGKILLed postmaster not reaped yet (a zombie: a container's init may
    reap late) or a process that got its pid since. Such lock files are stale: they go."""
    pid_file = layout.data / "postmaster.pid"
    stale = _lock_file_pid(pid_file)
    if stale is None or not Path(f"/proc/{stale}").exists():
        return
    for lock in [pid_file, *layout.socket_dir.glob(".s.PGSQL.*.lock")]:
        if _lock_file_pid(lock) == stale:
            say(f"postgres: removing the stale {lock.name} (pid {stale} is an unreaped or another process)")
            lock.unlink(missing_ok=True)


def _lock_file_pid(lock: Path) -> int | None:
    try:
        return int(lock.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pg_ready(bindir: Path | None, host: str, port: int) -> bool:
    pg_isready = (bindir / "pg_isready") if bindir else None
    tool = str(pg_isready) if pg_isready and pg_isready.exists() else shutil.which("pg_isready")
    if tool is None:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
            return True
        return False
    return _run([tool, "-q", "-h", host, "-p", str(port), "-t", "3"], check=False).returncode == 0


def _start_postgres(bindir: Path, layout: PgLayout, user: PgUser | None, port: int, timeout: float) -> None:
    if port_in_use(port):
        raise InfraError(
            f"port {HOST}:{port} is already in use by something that is not this checkout's PostgreSQL "
            f"(a system PostgreSQL? see `ss -ltnp 'sport = :{port}'`); stop it, or set MICROCRED_PG_PORT, "
            "or set POSTGRES_URL to use that server"
        )
    rotate_log(layout.log)
    say(f"postgres: starting on {HOST}:{port}")
    started = time.monotonic()
    cmd = [str(bindir / "pg_ctl"), "-D", str(layout.data), "-l", str(layout.log),
           "-w", "-t", str(int(timeout)), "start"]  # fmt: skip
    result = _run(cmd, user=user, cwd=layout.home, check=False, timeout=timeout + 30)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise fail_with_log(f"PostgreSQL failed to start: {output}", layout.log)
    say(f"postgres: ready in {time.monotonic() - started:.1f}s (log {rel(layout.log)})")


def _provision_sql(owner: str | None) -> str:
    """Idempotent SQL: the role (when we own the server) and the five service databases."""
    names = ", ".join(f"'{service}'" for service in SERVICES)
    if owner is None:  # external server: the databases belong to the POSTGRES_URL role
        create = "format('CREATE DATABASE %I', d)"
        role = ""
    else:
        create = f"format('CREATE DATABASE %I OWNER %I', d, '{owner}')"
        role = f"""DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{owner}') THEN CREATE ROLE {owner}; END IF;
END $$;
ALTER ROLE {owner} WITH LOGIN CREATEDB PASSWORD '{PG_PASSWORD}';
-- Tests drop their throwaway databases WITH (FORCE), which must end any session still in them.
GRANT pg_signal_backend TO {owner};
"""
    return f"""{role}SELECT {create} FROM unnest(ARRAY[{names}]) AS d
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = d)
\\gexec
"""


def _create_databases(psql_args: list[str], owner: str | None) -> None:
    _run([*psql_args, "-X", "-q", "-v", "ON_ERROR_STOP=1"], input_text=_provision_sql(owner))


def _local_postgres_url(port: int) -> str:
    return f"postgresql://{PG_ROLE}:{PG_PASSWORD}@{HOST}:{port}/postgres"


def _postgres_up(timeout: float) -> str:
    external = os.environ.get("POSTGRES_URL", "").strip()
    if external:
        say("postgres: using POSTGRES_URL (nothing started); ensuring the service databases exist")
        _create_databases([_psql(), "-d", external], owner=None)
        return external
    port = _pg_port()
    bindir = _pg_bindir()
    user = _pg_user(_existing_pg_data())
    layout = _pg_layout(user)
    _initdb(bindir, layout, user)
    _check_pg_version(bindir, layout)
    running = _postmaster(layout)
    if running is not None:
        pid, running_port = running
        if running_port != port:
            raise InfraError(
                f"PostgreSQL is running on port {running_port} but {port} was requested; "
                "run `infra.py down postgres` first"
            )
        say(f"postgres: already running (pid {pid}) on {HOST}:{port}")
    else:
        _remove_stale_lock_files(layout)
        _write_pg_conf(layout, user, port)
        _start_postgres(bindir, layout, user, port, timeout)
    admin = [_psql(bindir), "-h", str(layout.socket_dir), "-p", str(port), "-U", PG_SUPERUSER,
             "-d", "postgres"]  # fmt: skip
    _create_databases(admin, owner=PG_ROLE)
    return _local_postgres_url(port)


def _existing_pg_data() -> Path | None:
    link = PG_LOCAL / "data"
    return link.resolve() if link.exists() else None


def _stop_postgres() -> None:
    if os.environ.get("POSTGRES_URL", "").strip():
        say("postgres: POSTGRES_URL is set, nothing of ours to stop")
        return
    data = _existing_pg_data()  # no side effects here: `down` must not provision anything
    layout = PgLayout(data.parent) if data else None
    running = _postmaster(layout) if layout else None
    if layout is None or running is None:
        say("postgres: not running")
        return
    bindir = _pg_bindir()
    user = _pg_user(layout.data)
    say(f"postgres: stopping (pid {running[0]})")
    started = time.monotonic()
    _run([str(bindir / "pg_ctl"), "-D", str(layout.data), "-m", "fast", "-w", "-t", "60", "stop"],
         user=user, cwd=layout.home)  # fmt: skip
    say(f"postgres: stopped in {time.monotonic() - started:.1f}s")


def _crash_postgres() -> int:
    if os.environ.get("POSTGRES_URL", "").strip():
        raise InfraError("POSTGRES_URL is set: that PostgreSQL is not this checkout's to crash")
    data = _existing_pg_data()
    layout = PgLayout(data.parent) if data else None
    running = _postmaster(layout) if layout else None
    if layout is None or running is None:
        raise InfraError("this checkout's PostgreSQL is not running: there is nothing to crash")
    postmaster = running[0]
    # Frozen first, so that it forks no new backend between the scan for its children and the kill.
    os.kill(postmaster, signal.SIGSTOP)
    children = _descendants(postmaster)
    for pid in (postmaster, *children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    survivors = [pid for pid in (postmaster, *children) if not wait_gone(pid, 30)]
    if survivors:
        raise InfraError(f"PostgreSQL processes survived SIGKILL for 30s: {survivors}")
    listed = ", ".join(map(str, children)) or "none"
    say(f"postgres: crashed: SIGKILLed postmaster {postmaster} and the {len(children)} under it ({listed})")
    _remove_stale_lock_files(layout)  # when the killed postmaster lingers as a zombie
    return 1 + len(children)


def _descendants(root: int) -> list[int]:
    """Every process under root (children, their children...), from /proc."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            parent = int(stat.rsplit(")", 1)[-1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    pending = [root]
    while pending:
        for child in sorted(children.get(pending.pop(), [])):
            found.append(child)
            pending.append(child)
    return found


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def endpoints() -> Endpoints:
    """The endpoints for the current environment, without starting anything."""
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip() or f"{HOST}:{KafkaPorts.from_env().broker}"
    postgres = os.environ.get("POSTGRES_URL", "").strip() or _local_postgres_url(_pg_port())
    return Endpoints(kafka_bootstrap=kafka, postgres_url=postgres)


def ensure_up(*, kafka: bool = True, postgres: bool = True, timeout: float = 180.0) -> Endpoints:
    """Provision and start what is missing (idempotent), wait until ready, return the endpoints."""
    with _lock():
        if kafka:
            _kafka_up(timeout)
        if postgres:
            _postgres_up(timeout)
    return endpoints()


def crash_postgres() -> int:
    """Crash this checkout's PostgreSQL as a power cut would: SIGKILL the postmaster and every
    process under it (backends, checkpointer, WAL writer...) at once, and wait until they are gone.

    The next `ensure_up(kafka=False)` starts it again, and it runs crash recovery from the WAL.
    Returns how many processes were killed. Refuses (InfraError) a server given by POSTGRES_URL,
    which is not this checkout's to kill, and a server that is not running.
    """
    with _lock():
        return _crash_postgres()


def ensure_down(*, kafka: bool = True, postgres: bool = True) -> None:
    """Stop this checkout's Kafka and/or PostgreSQL (data is kept)."""
    with _lock():
        if kafka:
            if os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip():
                say("kafka: KAFKA_BOOTSTRAP_SERVERS is set, nothing of ours to stop")
            else:
                _stop_kafka()
        if postgres:
            _stop_postgres()


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _kafka_status() -> bool:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        first = urlsplit(f"//{external.split(',')[0].strip()}")  # host:port, [v6]:port or host
        ok = _tcp_open(first.hostname or HOST, first.port or 9092)
        print(f"kafka     {'reachable' if ok else 'UNREACHABLE'}  external {external}")
        return ok
    pid = _kafka_pid()
    ports = (_running_kafka_ports() if pid else None) or KafkaPorts.from_env()
    ready = pid is not None and _kafka_metadata_ok(HOST, ports.broker)
    state = "ready" if ready else ("starting/unhealthy" if pid else "stopped")
    jars = sorted(KAFKA_LIBS.glob("kafka_2.13-*.jar"))
    version = jars[0].stem.removeprefix("kafka_2.13-") if jars else "not downloaded"
    print(
        f"kafka     {state:<9} pid {pid or '-'}  {HOST}:{ports.broker} (controller {ports.controller})  "
        f"version {version}  data {rel(KAFKA_DATA)}  log {rel(KAFKA_LOG)}"
    )
    return ready


def _postgres_status() -> bool:
    external = os.environ.get("POSTGRES_URL", "").strip()
    if external:
        parts = urlsplit(external)
        ok = _tcp_open(parts.hostname or HOST, parts.port or 5432)
        state = "reachable" if ok else "UNREACHABLE"
        print(f"postgres  {state}  external {parts.hostname}:{parts.port or 5432}")
        return ok
    data = _existing_pg_data() or PG_LOCAL / "data"
    layout = PgLayout(data.parent)
    running = _postmaster(layout)
    port = running[1] if running else _pg_port()
    ready = running is not None and _pg_ready(None, HOST, port)
    state = "ready" if ready else ("unhealthy" if running else "stopped")
    owner = pwd.getpwuid(data.stat().st_uid).pw_name if data.exists() else "-"
    print(
        f"postgres  {state:<9} pid {running[0] if running else '-'}  {HOST}:{port}  "
        f"data {rel(data)} (owner {owner})  log {rel(layout.log)}"
    )
    return ready


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _cmd_logs(which: str | None, lines: int) -> None:
    logs = []
    if which in (None, "kafka"):
        logs.append(KAFKA_LOG)
    if which in (None, "postgres"):
        data = _existing_pg_data() or PG_LOCAL / "data"
        logs.append(data.parent / "postgres.log")
    for log in logs:
        print(f"==> {log} <==\n{_tail(log, lines)}\n")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="infra.py", description="microcred's local Kafka + PostgreSQL")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("up", "provision and start (idempotent)"), ("down", "stop (data is kept)")):
        command = commands.add_parser(name, help=text)
        command.add_argument("component", nargs="?", choices=("kafka", "postgres"))
        if name == "up":
            command.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for ready")
    commands.add_parser("status", help="what runs; exit 0 only when both are ready")
    commands.add_parser("env", help="print shell export lines for the endpoints")
    logs = commands.add_parser("logs", help="print the tail of the logs")
    logs.add_argument("component", nargs="?", choices=("kafka", "postgres"))
    logs.add_argument("-n", "--lines", type=int, default=50)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.command == "up":
            started = time.monotonic()
            kafka, postgres = args.component != "postgres", args.component != "kafka"
            ensure_up(kafka=kafka, postgres=postgres, timeout=args.timeout)
            say(f"up: done in {time.monotonic() - started:.1f}s")
        elif args.command == "down":
            ensure_down(kafka=args.component != "postgres", postgres=args.component != "kafka")
        elif args.command == "status":
            kafka_ok = _kafka_status()
            postgres_ok = _postgres_status()
            return 0 if kafka_ok and postgres_ok else 1
        elif args.command == "env":
            for name, value in endpoints().env().items():
                print(f"export {name}={shlex.quote(value)}")
        elif args.command == "logs":
            _cmd_logs(args.component, args.lines)
    except InfraError as error:
        print(f"infra.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
