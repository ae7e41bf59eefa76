"""The fault run's accounting: it must tell a redelivery from a second email or webhook, and a clean
run from one that lost or doubled something, or a green fault run would prove nothing."""

import collections
import dataclasses
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from harness.accounting import FaultRecord, Result, sweeper_finds
from harness.sinks import MailJournal, WebhookJournal

from issuance.sweeper import FOUND
from microcred_runtime.telemetry import configure_logging

HEADER = [
    "replicas per consuming service: 2",
    "kafka brokers: 3",
    "postgresql fault: SIGKILL",
    "completions: 30",
    "pathway credentials expected: 3   issued: 3   duplicated: 0",
    "lost: 0",
    "duplicated: 0",
    "dead letters without a reason: 0",
    "webhooks received: 33   expected: 33",
    "result: PASS",
]


def clean() -> Result:
    """30 completions, 3 of the learners took the 3-course pathway: 33 credentials."""
    n, k = 30, 3
    return Result(
        completions=n,
        seed=1,
        prefix="faults-test.",
        replicas=2,
        brokers=3,
        postgres_fault="SIGKILL",
        reports=n,
        report_records=n,
        course_expected=n,
        issued=n,
        credential_rows=n + k,
        pathway_expected=k,
        pathway_issued=k,
        payments_expected=3 * k,
        payments_settled=3 * k,
        in_app_unique=n + k,
        in_app_rows=n + k,
        emails_unique=n + k,
        emails_messages=n + k,
        emails_received=n + k,
        webhooks_unique=n + k,
        webhooks_ids=n + k,
        webhooks_received=n + k,
        outbox_backlog=dict.fromkeys(("catalog", "enrollment", "billing", "issuance", "notifications"), 0),
    )


def test_a_clean_run_passes_and_its_report_begins_with_the_summary() -> None:
    assert clean().ok
    assert clean().render().splitlines()[: len(HEADER)] == HEADER


def test_resends_under_the_same_message_id_or_webhook_id_are_allowed() -> None:
    assert dataclasses.replace(clean(), emails_received=35, webhooks_received=37).ok


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"issued": 29, "lost": 1}, "1 lost"),
        ({"duplicates": 1}, "1 doubled"),
        ({"strangers": 1}, "1 unexpected"),
        ({"reports": 29}, "only 29 of 30"),
        ({"pathway_issued": 2, "pathway_lost": 1}, "pathway credentials: 1 lost"),
        ({"pathway_duplicates": 1}, "pathway credentials: 0 lost, 1 doubled"),
        ({"payments_settled": 8}, "payments: 8 of 9 settled"),
        ({"payments_doubled": 1}, "1 doubled"),
        ({"in_app_rows": 34}, "in-app"),
        ({"in_app_unique": 32}, "in-app: 32 unique"),
        ({"emails_messages": 34}, "emails: 33 unique, 1 doubled"),
        ({"emails_unique": 32}, "emails: 32 unique"),
        ({"emails_misaddressed": 1}, "1 misaddressed"),
        ({"webhooks_ids": 34}, "webhooks: 33 unique, 1 doubled"),
        ({"webhooks_unique": 30}, "webhooks: 30 unique"),
        ({"bad_signatures": 1}, "1 badly signed"),
        ({"webhooks_unreadable": 1}, "without a credential id"),
        ({"outbox_backlog": {"catalog": 0, "issuance": 2}}, "outbox backlog"),
        ({"dead_lettered": 1, "dead_letters_without_reason": 1}, "without a reason"),
        ({"diagnosis": "nothing moved"}, "did not drain"),
    ],
)
def test_a_loss_or_a_double_fails_the_run(change: dict[str, Any], complaint: str) -> None:
    result = dataclasses.replace(clean(), **change)
    assert not result.ok
    assert any(complaint in failure for failure in result.failures), result.failures
    assert "\nresult: FAIL: " in result.render()


def test_the_header_counts_pathway_credentials_in_lost_duplicated_and_webhooks_expected() -> None:
    result = dataclasses.replace(
        clean(), issued=29, lost=1, pathway_issued=2, pathway_lost=1, duplicates=2, webhooks_ids=31
    )
    lines = result.render().splitlines()
    assert lines[4] == "pathway credentials expected: 3   issued: 2   duplicated: 0"
    assert lines[5:7] == ["lost: 2", "duplicated: 2"]
    assert lines[8] == "webhooks received: 31   expected: 33"


def test_a_dead_letter_is_reported_with_its_reason() -> None:
    result = dataclasses.replace(
        clean(),
        dead_lettered=1,
        dead_letter_reasons={"issuance.dlq: handler-failed": 1},
        dead_letter_details={"issuance.dlq: handler-failed": "KeyError 'x'"},
    )
    assert result.ok  # a dead letter with its reason is the design working, not a loss
    assert "    1 x issuance.dlq: handler-failed: KeyError 'x'" in result.render().splitlines()


def test_the_fault_table_shows_a_replica_kill_by_its_survivors_stall() -> None:
    replica = FaultRecord(
        target="issuance",
        victim="issuance-2 (1 of 2 left)",
        at=12.0,
        credentials_at=40,
        downtime=1.5,
        stage="credentials",
        redundant=True,
        ready_after=11.0,
        stall=2.5,
        moving_after=11.5,
    )
    outage = dataclasses.replace(replica, target="postgres", victim="PostgreSQL", redundant=False)
    assert replica.recovery == 2.5
    assert "2.5s stall" in replica.row()
    assert outage.recovery == 11.5
    assert "11.5s" in outage.row()


def _journal(path: Path, lines: list[dict[str, Any]], partial: str) -> Path:
    # The last line is still being written: it is read once complete, not before.
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + partial)
    return path


def test_the_mail_journal_counts_a_resend_once_and_a_second_email_twice(tmp_path: Path) -> None:
    credential = "0b6b5c1e-3f5a-4f4e-9a49-8d2f4c6e7a10"
    lines: list[dict[str, Any]] = [
        {"message_id": "<a@x>", "to": ["ada@example.org"], "subject": "s", "credential_id": credential},
        {"message_id": "<a@x>", "to": ["ada@example.org"], "subject": "s", "credential_id": credential},
        {"message_id": "<b@x>", "to": ["ada@example.org"], "subject": "s", "credential_id": credential},
        {"message_id": "<c@x>", "to": ["ada@example.org"], "subject": "welcome", "credential_id": None},
    ]
    journal = MailJournal(_journal(tmp_path / "mail.jsonl", lines, '{"message_id": "<d'))
    journal.refresh()
    assert journal.by_credential == {credential: collections.Counter({"<a@x>": 2, "<b@x>": 1})}
    assert journal.recipients == {credential: {"ada@example.org"}}
    assert journal.others == collections.Counter({"<c@x>": 1})
    assert journal.received == 4


def test_the_webhook_journal_keeps_only_correctly_signed_deliveries_by_credential(tmp_path: Path) -> None:
    lines: list[dict[str, Any]] = [
        {"webhook_id": "w1", "credential_id": "c1", "signed": True},
        {"webhook_id": "w1", "credential_id": "c1", "signed": True},
        {"webhook_id": "w2", "credential_id": "c2", "signed": False},
        {"webhook_id": "w3", "credential_id": None, "signed": True},
    ]
    path = _journal(tmp_path / "webhooks.jsonl", lines, '{"webhook_id": "w4"')
    journal = WebhookJournal(path)
    journal.refresh()
    assert journal.by_credential == {"c1": collections.Counter({"w1": 2})}
    assert (journal.received, journal.bad_signatures, journal.unreadable) == (4, 1, 1)
    # The line being written is read once it is complete, and only then.
    with path.open("a") as out:
        out.write(', "credential_id": "c4", "signed": true}\n')
    journal.refresh()
    assert journal.by_credential["c4"] == collections.Counter({"w4": 1})
    assert journal.received == 5


def test_the_sweepers_finds_are_counted_per_replica_from_the_service_logs(tmp_path: Path) -> None:
    """Lines as the service writes them (its own JSON logging), a restart's banner between them."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    log = logging.getLogger("issuance.sweeper")
    try:
        configure_logging("issuance", "INFO")
        for replica, finds in (("issuance-1", ["pathway", "pathway", "parked"]), ("issuance-2", [])):
            out = io.StringIO("\n=== harness: starting issuance at 2026-12-06T00:00:00+00:00\n")
            out.seek(0, io.SEEK_END)
            root.handlers[0].setStream(out)  # type: ignore[attr-defined]
            for kind in finds:
                log.warning(FOUND[kind], extra={"learner_id": "l", "pathway_id": "p"})
            log.warning("could not finish a find, the next pass tries again: %s", "deadlock detected")
            log.info("PostgreSQL is unavailable: this sweep ends here, the next one goes on")
            (tmp_path / f"{replica}.log").write_text(out.getvalue())
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])

    result = clean()
    result.sweeper = sweeper_finds(tmp_path)

    assert result.sweeper == {
        "issuance-1": {"parked": 1, "pathway": 2, "failed": 1},
        "issuance-2": {"parked": 0, "pathway": 0, "failed": 1},
    }
    assert (
        "sweeper found   issuance-1: parked 1, pathway 2, failed 1; issuance-2: parked 0, pathway 0, failed 1"
        in result.render()
    )
