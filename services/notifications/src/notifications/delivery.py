"""Delivery workers: send the emails and webhooks the consumer recorded, and record every attempt.

One worker per channel, each with its own bounded concurrency, so a slow or dead SMTP server
holds up only emails, and a slow webhook endpoint only as many webhooks as it has slots; every
attempt has a timeout. A worker claims due rows (`repository.claim`: FOR UPDATE SKIP LOCKED, so
replicas share the work) for a lease, reads what they need in one go (`Prepare`: the emails'
learners and content, the webhooks' subscriptions), sends, and records the outcome: delivered,
retried after a backoff with full jitter, or parked as `dead` after the last attempt. Outcomes
that come in while one is being recorded are recorded together next (`Recorder`).

A sweep fans out, every poll interval, the webhooks that waited for their course to be known
(`service.release_waiting_webhooks`) and that the consumer did not release itself.

Workers wake at once when a transaction that recorded deliveries commits (LISTEN/NOTIFY), when
a retry falls due, or at the latest every poll interval. On shutdown a worker stops claiming,
gives attempts in flight `delivery_drain_seconds` to finish, and hands the others back (due at
once, for any replica). An attempt interrupted after the receiver got it is sent again: delivery
is at least once, and receivers deduplicate on `webhook-id` (or the email's Message-ID).
"""

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from email import quoprimime
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import compat32
from email.utils import format_datetime, formataddr, parseaddr
from typing import Any

import aiosmtplib
import asyncpg
import httpx

from microcred_runtime import Runtime
from microcred_runtime.consumers import is_outage

from . import domain, egress, messages, repository, service
from .domain import AttemptOutcome, AttemptResult, Channel, DeliveryState, RetryPolicy
from .repository import Delivery
from .settings import Settings, SmtpSecurity

log = logging.getLogger(__name__)

Attempt = Callable[[], Awaitable[AttemptResult]]
"""Makes one attempt at a delivery and says how it went; raising counts as a failed attempt."""
Prepare = Callable[[Sequence[Delivery]], Awaitable[list[Attempt]]]
"""Makes the attempts at claimed deliveries ready, one each, reading what they need (an email's
learner and content, a webhook's subscription) for them all at once."""

# A claim outlives the preparing of its batch and its attempt (each up to the attempt's timeout)
# by this much, so only a dead replica's claim runs out.
_LEASE_MARGIN_SECONDS = 60.0
# Never poll faster than this, even when rows are due but locked by another replica's claim.
_MIN_WAIT_SECONDS = 0.05
_ERROR_LIMIT = 1000
# How an email's headers are folded on the wire: CRLF, at 76 (a continuation line's space and an
# encoded word of at most 75, RFC 2047).
_WIRE = compat32.clone(linesep="\r\n", max_line_length=76)
# One address and nothing else: no name, no list, no route, none of the characters that would
# make a header or an envelope read it as more (the events' own pattern admits them).
_PLAIN_ADDRESS = re.compile(r'[^\s<>(),;:"\[\]\\@]+@[^\s<>(),;:"\[\]\\@]+')
# InternalClientError: a pooled connection that died mid-operation (PostgreSQL restarting).
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


class Worker:
    """Delivers one channel's due deliveries, `concurrency` at a time, until stopped.

    Deliveries are claimed a batch at a time, once half the slots are free (or none is busy), and
    what their attempts need is read for the batch at once (`Prepare`): those statements are paid
    per batch, not per delivery, under a steady load too.
    """

    def __init__(
        self,
        *,
        channel: Channel,
        pool: asyncpg.Pool,
        dsn: str,
        prepare: Prepare,
        concurrency: int,
        attempt_timeout: float,
        retry: RetryPolicy,
        poll_interval: float,
        drain_seconds: float,
    ) -> None:
        self.channel = channel
        self.id = uuid.uuid4()
        self._pool = pool
        self._dsn = dsn
        self._prepare = prepare
        self._concurrency = concurrency
        self._batch = max(1, concurrency // 2)
        self._attempt_timeout = attempt_timeout
        self._lease = 2 * attempt_timeout + _LEASE_MARGIN_SECONDS
        self._retry = retry
        self._poll_interval = poll_interval
        self._drain_seconds = drain_seconds
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._in_flight: dict[asyncio.Task[None], Delivery] = {}
        self._recorder = Recorder(pool, self.id)
        self._listener: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.channel}-deliveries")

    async def stop(self) -> None:
        """Stop claiming; let attempts in flight finish for a while, then hand the rest back."""
        self._stopping.set()
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._in_flight:
            _, unfinished = await asyncio.wait(self._in_flight, timeout=self._drain_seconds)
            interrupted = [self._in_flight[task] for task in unfinished]
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
            # What the interrupted attempts still had recorded, before the rest is handed back.
            await self._recorder.idle()
            await self._hand_back(interrupted)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=5)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            # Cleared before claiming: a NOTIFY that arrives while we claim keeps the flag set.
            self._wakeup.clear()
            await self._listen()
            wait = self._poll_interval
            free = self._concurrency - len(self._in_flight)
            if free >= self._batch or (free and not self._in_flight):
                try:
                    wait = await self._claim_and_start(free)
                except _DB_ERRORS as exc:
                    log.warning("%s worker cannot reach PostgreSQL: %s", self.channel, exc)
                except Exception:
                    # The worker must outlive any surprise: a dead worker silently strands deliveries.
                    log.exception("%s worker failed to claim deliveries", self.channel)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=wait)

    async def _claim_and_start(self, free: int) -> float:
        """Start attempts on what is due; returns how long to wait before looking again."""
        async with self._pool.acquire() as conn:
            claimed = await repository.claim(
                conn, self.channel, self.id, limit=free, lease_seconds=self._lease
            )
            next_due = None if len(claimed) == free else await repository.next_due(conn, self.channel)
        for delivery, attempt in zip(claimed, await self._attempts(claimed), strict=True):
            task = asyncio.create_task(
                self._attempt(delivery, attempt), name=f"deliver-{delivery.delivery_id}"
            )
            self._in_flight[task] = delivery
            task.add_done_callback(self._finished)
        if len(claimed) == free:
            # Every slot is busy: a finishing attempt wakes the loop.
            return self._poll_interval
        if next_due is None:
            return self._poll_interval
        until = (next_due - datetime.now(UTC)).total_seconds()
        return min(self._poll_interval, max(_MIN_WAIT_SECONDS, until))

    async def _attempts(self, claimed: Sequence[Delivery]) -> list[Attempt]:
        """The attempts at what was claimed; each fails as preparing them did, if it did."""
        if not claimed:
            return []
        try:
            async with asyncio.timeout(self._attempt_timeout):
                return await self._prepare(claimed)
        except Exception as exc:
            failed = AttemptResult(
                AttemptOutcome.TIMED_OUT if isinstance(exc, TimeoutError) else AttemptOutcome.FAILED,
                error=f"preparing the attempt: {_describe(exc)}",
            )

            async def fail() -> AttemptResult:
                return failed

            return [fail] * len(claimed)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._wakeup.set()

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        listener = None
        try:
            listener = await asyncpg.connect(self._dsn, timeout=5)
            await listener.add_listener(repository.WAKE_CHANNEL, self._notified)
        except _DB_ERRORS as exc:
            # Polling still delivers; the next turn of the loop tries to listen again.
            log.warning("%s worker cannot listen for new deliveries: %s", self.channel, exc)
            if listener is not None:
                listener.terminate()
            listener = None
        self._listener = listener

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload == self.channel:
            self._wakeup.set()

    async def _attempt(self, delivery: Delivery, attempt: Attempt) -> None:
        started_at = datetime.now(UTC)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._attempt_timeout):
                result = await attempt()
        except TimeoutError:
            result = AttemptResult(
                AttemptOutcome.TIMED_OUT, error=f"no answer within {self._attempt_timeout:g}s"
            )
        except Exception as exc:
            result = AttemptResult(AttemptOutcome.FAILED, error=_describe(exc))
        duration_ms = round((time.monotonic() - started) * 1000)
        if result.error and "\x00" in result.error:
            # PostgreSQL's text takes no NUL, which a receiver's answer or a server's reply may hold.
            result = dataclasses.replace(result, error=result.error.replace("\x00", "\ufffd"))
        state, retry_in = self._retry.after(delivery.attempts, result)
        context = {
            "delivery_id": str(delivery.delivery_id),
            "channel": self.channel,
            "attempt": delivery.attempts,
            "outcome": result.outcome,
        }
        try:
            moved = await self._recorder.record(
                repository.Tried(
                    delivery.delivery_id, delivery.attempts, started_at, duration_ms, result, state, retry_in
                )
            )
        except _DB_ERRORS as exc:
            # The claim's lease runs out and the delivery is tried again: at least once, never lost.
            log.warning("cannot record a delivery attempt: %s", exc, extra=context)
            return
        if not moved:
            log.info(
                "delivery changed hands during the attempt (cancelled, or its lease ran out)", extra=context
            )
        elif state is DeliveryState.DEAD:
            log.warning("delivery is dead: %s", result.error, extra=context)
        elif state is DeliveryState.PENDING:
            log.info("delivery attempt failed, retrying in %.1fs: %s", retry_in, result.error, extra=context)

    async def _hand_back(self, interrupted: list[Delivery]) -> None:
        try:
            async with self._pool.acquire() as conn:
                await repository.hand_back(
                    conn,
                    self.id,
                    [delivery.delivery_id for delivery in interrupted],
                    "the service shut down mid-attempt",
                )
        except _DB_ERRORS as exc:
            log.warning("cannot hand back interrupted deliveries (their leases will run out): %s", exc)


class Recorder:
    """Records a worker's attempts as they finish. Those that finish while a write is under way go
    together in the next one: a statement for many attempts under load, no wait for a lone one."""

    def __init__(self, pool: asyncpg.Pool, worker: uuid.UUID) -> None:
        self._pool = pool
        self._worker = worker
        self._waiting: list[tuple[repository.Tried, asyncio.Future[bool]]] = []
        self._writing: asyncio.Task[None] | None = None

    async def record(self, tried: repository.Tried) -> bool:
        """Record an attempt; whether it moved its delivery on (`repository.record_attempts`)."""
        moved: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((tried, moved))
        if self._writing is None:
            self._writing = asyncio.create_task(self._write(), name="record-delivery-attempts")
        return await moved

    async def idle(self) -> None:
        """Wait for what is being recorded."""
        if self._writing is not None:
            await asyncio.wait([self._writing])

    async def _write(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                await self._settle(batch)
        finally:
            self._writing = None

    async def _settle(self, batch: list[tuple[repository.Tried, asyncio.Future[bool]]]) -> None:
        try:
            async with self._pool.acquire() as conn:
                moved = await repository.record_attempts(conn, self._worker, [tried for tried, _ in batch])
        except Exception as exc:
            if len(batch) > 1 and not is_outage(exc):
                # PostgreSQL refused a row of the statement: each on its own, so that the others
                # are recorded (rather than sent again once their leases run out).
                log.warning("recording %d attempts together failed, one by one: %s", len(batch), exc)
                for item in batch:
                    await self._settle([item])
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for tried, future in batch:
            if not future.done():
                future.set_result(tried.delivery_id in moved)


# --- the channels ----------------------------------------------------------------------------


class SmtpConnections:
    """Open SMTP sessions kept for the next email, as a mail client does.

    A new session costs a TCP connect, the greeting, EHLO (and STARTTLS and AUTH where set) before
    the first MAIL FROM: several round trips per email and the server's CPU besides. A session is
    reused only after a send went through on it; one that failed in any way is dropped, since its
    state is unknown. One left idle longer than `idle_seconds` is dropped too rather than probed:
    servers hang up on idle clients (RFC 5321 asks them to wait 5 minutes; some wait less).
    """

    def __init__(self, settings: Settings, *, idle_seconds: float = 30.0, uses: int = 100) -> None:
        self._settings = settings
        self._password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        self._sender = parseaddr(settings.smtp_from)[1]
        self._idle_seconds = idle_seconds
        self._uses = uses  # then a new session: spreads the load over a pool of servers behind a name
        self._idle: list[tuple[aiosmtplib.SMTP, float, int]] = []  # client, idle since, emails sent

    async def send(self, message: bytes | EmailMessage, recipient: str) -> None:
        """Send `message` to `recipient` alone: the envelope is given, never read off the headers."""
        client, sent = await self._take()
        try:
            if isinstance(message, EmailMessage):
                await client.send_message(message, recipients=[recipient])
            else:
                await client.sendmail(self._sender, [recipient], message)
        except BaseException:
            client.close()
            raise
        if sent + 1 < self._uses:
            self._idle.append((client, time.monotonic(), sent + 1))
        else:
            client.close()

    async def _take(self) -> tuple[aiosmtplib.SMTP, int]:
        while self._idle:
            client, since, sent = self._idle.pop()
            if client.is_connected and time.monotonic() - since < self._idle_seconds:
                return client, sent
            client.close()
        settings = self._settings
        client = aiosmtplib.SMTP(
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            timeout=settings.smtp_timeout_seconds,
            use_tls=settings.smtp_security is SmtpSecurity.TLS,
            start_tls=settings.smtp_security is SmtpSecurity.STARTTLS,
            username=settings.smtp_username,
            password=self._password,
        )
        try:
            await client.connect()
        except BaseException:
            client.close()
            raise
        return client, 0

    def close(self) -> None:
        # Dropped rather than QUIT: aiosmtplib's polite QUIT waits (up to the timeout) for a
        # server that may not be answering, and would hold up a shutdown.
        for client, _, _ in self._idle:
            client.close()
        self._idle.clear()


def mime_email(
    sender: str, name: str, address: str, email: messages.Email, message_id: str
) -> bytes | EmailMessage:
    """The email as MIME, a text and an HTML alternative, UTF-8: as it goes on the wire.

    Written out here rather than by the `email` package's generator, which took 0.32 ms of an
    email's 0.40 to flatten a message it had built (an `EmailMessage`, whose policy parses each
    header into objects and folds it again, took 1 ms): each header folded by compat32's rules
    (`_WIRE.fold`: encoded words, 76 characters), each part quoted-printable as `email.charset`
    encodes UTF-8, under a boundary that quoted-printable cannot contain ("=_", where "=" is
    always followed by two hex digits or a line break). An address that is not ASCII takes the
    `EmailMessage` path, which aiosmtplib sends with SMTPUTF8.
    """
    name = " ".join(name.split())  # a header is one line, whatever the learner's name holds
    if not _PLAIN_ADDRESS.fullmatch(address):
        raise ValueError(f"{address!r} is not a single plain address")
    date = format_datetime(datetime.now(UTC))
    if not (address.isascii() and sender.isascii()):
        modern = EmailMessage()
        modern["From"] = sender
        modern["To"] = Address(display_name=name, addr_spec=address)
        modern["Subject"] = email.subject
        modern["Message-ID"] = message_id
        modern["Date"] = date
        modern["Auto-Submitted"] = "auto-generated"
        modern.set_content(email.text)
        modern.add_alternative(email.html, subtype="html")
        return modern
    if name.isascii():
        to: str | Header = formataddr((name, address))
    else:
        # Encoded words of at most 75 characters, folded (RFC 2047), then the address as is.
        to = Header(name, "utf-8", header_name="To")
        to.append(f"<{address}>", "us-ascii")
    charset = "us-ascii" if email.subject.isascii() else "utf-8"
    boundary = f"=_{secrets.token_hex(16)}"
    headers: list[tuple[str, str | Header]] = [
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/alternative; boundary="{boundary}"'),
        ("From", sender),
        ("To", to),
        ("Subject", Header(email.subject, charset, header_name="Subject")),
        ("Message-ID", message_id),
        ("Date", date),
        ("Auto-Submitted", "auto-generated"),
    ]
    wire = [_WIRE.fold(header, value) for header, value in headers]  # type: ignore[arg-type]  # compat32 folds a Header too
    for text, subtype in ((email.text, "plain"), (email.html, "html")):
        wire += [
            f"\r\n--{boundary}\r\n",
            f'Content-Type: text/{subtype}; charset="utf-8"\r\n',
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n",
            # What `email.charset` does for UTF-8 bodies: the UTF-8 bytes, each as a Latin-1 character.
            quoprimime.body_encode(text.encode().decode("latin-1"), eol="\r\n"),
        ]
    wire.append(f"\r\n--{boundary}--\r\n")
    # Everything is ASCII by now: the headers are encoded words, the bodies quoted-printable.
    return "".join(wire).encode("ascii")


def email_sender(pool: asyncpg.Pool, settings: Settings, connections: SmtpConnections) -> Prepare:
    _, sender = parseaddr(settings.smtp_from)
    message_domain = sender.rpartition("@")[2]

    async def prepare(deliveries: Sequence[Delivery]) -> list[Attempt]:
        async with pool.acquire() as conn:
            composed = await service.compose_emails(conn, deliveries)
        return [functools.partial(send, delivery, composed[delivery.delivery_id]) for delivery in deliveries]

    async def send(
        delivery: Delivery, composed: tuple[messages.Email, str, str] | service.Unreadable | None
    ) -> AttemptResult:
        if composed is None:
            return AttemptResult(AttemptOutcome.FAILED, error="the learner's address is not known")
        if isinstance(composed, service.Unreadable):
            return AttemptResult(AttemptOutcome.REFUSED, error=composed.detail[:_ERROR_LIMIT])
        email, address, name = composed
        # The same on every attempt, so a mail system can recognise a resend of the same email.
        message_id = f"<{delivery.delivery_id}@{message_domain}>"
        try:
            message = mime_email(settings.smtp_from, name, address, email, message_id)
        except ValueError as exc:
            return AttemptResult(AttemptOutcome.REFUSED, error=str(exc))
        try:
            await connections.send(message, address)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [refusal.code for refusal in exc.recipients]
            # 5xx for the recipient (no such mailbox) will not change; a 4xx (greylisting) may.
            permanent = all(500 <= code < 600 for code in codes)
            outcome = AttemptOutcome.REFUSED if permanent else AttemptOutcome.FAILED
            return AttemptResult(outcome, status_code=codes[0] if codes else None, error=_describe(exc))
        except aiosmtplib.SMTPTimeoutError as exc:
            return AttemptResult(AttemptOutcome.TIMED_OUT, error=_describe(exc))
        except aiosmtplib.SMTPResponseException as exc:
            # Other refusals (authentication, size, policy) are often the sender's configuration,
            # which an operator can fix while the retries last.
            return AttemptResult(AttemptOutcome.FAILED, status_code=exc.code, error=_describe(exc))
        except aiosmtplib.SMTPException as exc:
            return AttemptResult(AttemptOutcome.FAILED, error=_describe(exc))
        return AttemptResult(AttemptOutcome.DELIVERED, status_code=250)

    return prepare


def webhook_sender(pool: asyncpg.Pool, settings: Settings, client: httpx.AsyncClient) -> Prepare:
    async def prepare(deliveries: Sequence[Delivery]) -> list[Attempt]:
        # A webhook delivery always has a subscription (migration 003).
        ids = [delivery.subscription_id for delivery in deliveries if delivery.subscription_id]
        assert len(ids) == len(deliveries)
        async with pool.acquire() as conn:
            subscriptions = await repository.subscriptions(conn, ids)
        return [
            functools.partial(send, delivery, subscriptions.get(subscription_id))
            for delivery, subscription_id in zip(deliveries, ids, strict=True)
        ]

    async def send(delivery: Delivery, subscription: repository.Subscription | None) -> AttemptResult:
        if subscription is None or subscription.disabled_at is not None:
            return AttemptResult(AttemptOutcome.REFUSED, error="the subscription is disabled")
        try:
            domain.check_webhook_url(subscription.url, settings.webhook_allowed_hosts)
        except domain.WebhookUrlRefused as exc:
            return AttemptResult(AttemptOutcome.REFUSED, error=str(exc))
        body = delivery.payload.encode()
        msg_id = domain.message_id(delivery.delivery_id)
        # Signed afresh on every attempt: receivers refuse a timestamp that is too old.
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "microcred-notifications",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": domain.sign(subscription.secret, msg_id, timestamp, body),
        }
        try:
            async with client.stream("POST", subscription.url, content=body, headers=headers) as response:
                if response.is_success:
                    return AttemptResult(AttemptOutcome.DELIVERED, status_code=response.status_code)
                answer = await _read_some(response)
        except egress.AddressRefused as exc:
            # Checked on the address connected to: the host's DNS may have changed since it was
            # subscribed (rebinding), or WEBHOOK_ALLOWED_PRIVATE_NETWORKS was narrowed.
            return AttemptResult(AttemptOutcome.REFUSED, error=str(exc)[:_ERROR_LIMIT])
        except httpx.TimeoutException as exc:
            return AttemptResult(AttemptOutcome.TIMED_OUT, error=_describe(exc))
        except httpx.HTTPError as exc:
            return AttemptResult(AttemptOutcome.FAILED, error=_describe(exc))
        return AttemptResult(
            AttemptOutcome.FAILED,
            status_code=response.status_code,
            error=f"HTTP {response.status_code}: {answer}" if answer else f"HTTP {response.status_code}",
        )

    return prepare


async def _read_some(response: httpx.Response, limit: int = 500) -> str:
    """The start of a receiver's answer, for the attempt's record; the rest is not read."""
    received = b""
    async for chunk in response.aiter_bytes():
        received += chunk
        if len(received) >= limit:
            break
    return received[:limit].decode(errors="replace").strip()


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"[:_ERROR_LIMIT]


@contextlib.asynccontextmanager
async def workers(runtime: Runtime[Any]) -> AsyncIterator[list[Worker]]:
    """The email and webhook workers, running for as long as the service does."""
    settings: Settings = runtime.settings
    retry = RetryPolicy(
        max_attempts=settings.delivery_max_attempts,
        base_seconds=settings.delivery_retry_base_seconds,
        cap_seconds=settings.delivery_retry_cap_seconds,
    )
    common: dict[str, Any] = {
        "pool": runtime.pool,
        "dsn": str(settings.database_url),
        "retry": retry,
        "poll_interval": settings.delivery_poll_interval_seconds,
        "drain_seconds": settings.delivery_drain_seconds,
    }
    connections = SmtpConnections(settings)
    # Redirects are not followed: a receiver could otherwise bounce us to a host that is not allowed.
    # Every connection goes to an address checked as it is made (egress); no proxy from the
    # environment is used, since it would connect in our stead, unchecked.
    async with httpx.AsyncClient(
        timeout=settings.webhook_timeout_seconds,
        follow_redirects=False,
        trust_env=False,
        transport=egress.CheckedTransport(
            settings.webhook_allowed_private_networks,
            httpx.Limits(max_connections=settings.webhook_concurrency),
        ),
    ) as client:
        running = [
            Worker(
                channel=Channel.EMAIL,
                prepare=email_sender(runtime.pool, settings, connections),
                concurrency=settings.email_concurrency,
                attempt_timeout=settings.smtp_timeout_seconds,
                **common,
            ),
            Worker(
                channel=Channel.WEBHOOK,
                prepare=webhook_sender(runtime.pool, settings, client),
                concurrency=settings.webhook_concurrency,
                attempt_timeout=settings.webhook_timeout_seconds,
                **common,
            ),
        ]
        for worker in running:
            worker.start()
        sweep = asyncio.create_task(
            sweep_waiting_webhooks(runtime.pool, settings.delivery_poll_interval_seconds),
            name="notifications-waiting-webhooks",
        )
        try:
            yield running
        finally:
            sweep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweep
            await asyncio.gather(*(worker.stop() for worker in running))
            connections.close()


async def sweep_waiting_webhooks(pool: asyncpg.Pool, interval: float) -> None:
    """Every `interval`, fan out the webhooks that waited for a course now known.

    The consumer releases them itself when the enrollment or course arrives; but two replicas
    reading the waiting event and the one it waits for side by side each miss what the other has
    not committed yet, and this finds what they left behind.
    """
    while True:
        released = 0
        try:
            async with pool.acquire() as conn, conn.transaction():
                released = await service.release_waiting_webhooks(conn)
                if not released:
                    await service.drop_stale_waiting_webhooks(conn)
        except _DB_ERRORS as exc:
            log.warning("cannot release the webhooks waiting for their course: %s", exc)
        if released:
            log.info("released %d webhooks that waited for their course", released)
        else:
            await asyncio.sleep(interval)
