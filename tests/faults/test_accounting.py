"""The fault run's accounting: it must tell a redelivery from a second email or webhook, and a clean
run from one that lost or doubled something, or a green fault run would prove nothing."""

import collections
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import faults


def clean(n: int = 3) -> faults.Result:
    return faults.Result(
        completions=n,
        seed=1,
        prefix="faults-test.",
        sent=n,
        issued=n,
        credential_rows=n,
        in_app_unique=n,
        in_app_rows=n,
        emails_unique=n,
        emails_messages=n,
        emails_received=n,
        webhooks_unique=n,
        webhooks_ids=n,
        webhooks_received=n,
        outbox_backlog={"enrollment": 0, "issuance": 0, "notifications": 0},
    )


def test_a_clean_run_passes() -> None:
    assert clean().ok
    assert "result: PASS" in clean().render()


def test_resends_under_the_same_message_id_or_webhook_id_are_allowed() -> None:
    assert dataclasses.replace(clean(), emails_received=5, webhooks_received=7).ok


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"issued": 2, "lost": 1}, "1 lost"),
        ({"credential_rows": 4, "duplicates": 1}, "1 doubled"),
        ({"sent": 2}, "only 2 of 3"),
        ({"in_app_rows": 4}, "in-app"),
        ({"emails_messages": 4}, "emails: 3 unique, 1 doubled"),
        ({"emails_unique": 2}, "emails: 2 unique"),
        ({"emails_misaddressed": 1}, "1 misaddressed"),
        ({"webhooks_ids": 4}, "webhooks: 3 unique, 1 doubled"),
        ({"bad_signatures": 1}, "1 badly signed"),
        ({"outbox_backlog": {"enrollment": 0, "issuance": 2, "notifications": 0}}, "outbox backlog"),
        ({"dead_lettered": 1, "dead_letters_without_reason": 1}, "without a reason"),
        ({"diagnosis": "nothing moved"}, "did not drain"),
    ],
)
def test_a_loss_or_a_double_fails_the_run(change: dict[str, Any], complaint: str) -> None:
    result = dataclasses.replace(clean(), **change)
    assert not result.ok
    assert any(complaint in failure for failure in result.failures), result.failures
    assert "result: FAIL" in result.render()


def test_the_mail_journal_counts_a_resend_once_and_a_second_email_twice(tmp_path: Path) -> None:
    credential = "0b6b5c1e-3f5a-4f4e-9a49-8d2f4c6e7a10"
    lines = [
        {"message_id": "<a@x>", "to": ["ada@example.org"], "subject": "s", "credential_id": credential},
        {"message_id": "<a@x>", "to": ["ada@example.org"], "subject": "s", "credential_id": credential},
        {"message_id": "<b@x>", "to": ["ada@example.org"], "subject": "s", "credential_id": credential},
        {"message_id": "<c@x>", "to": ["ada@example.org"], "subject": "welcome", "credential_id": None},
    ]
    path = tmp_path / "mail.jsonl"
    # The last line is still being written: it is read once complete, not before.
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"message_id": "<d')
    journal = faults.MailJournal(path)
    journal.refresh()
    assert journal.by_credential == {credential: collections.Counter({"<a@x>": 2, "<b@x>": 1})}
    assert journal.recipients == {credential: {"ada@example.org"}}
    assert journal.others == collections.Counter({"<c@x>": 1})
    assert journal.received == 4
