"""The shortened fault run, in CI: 200 signed partner completions while every part of the pipeline
is killed once (each service, the mail sink, the Kafka broker, PostgreSQL), in a seeded order.

`make faults` runs the full form (100,000 completions) with the same runner, `scripts/faults.py`.
This module kills the project's own broker and PostgreSQL, so it provisions them itself (the
integration fixtures do not apply here) and leaves both running and ready for whatever follows
in the same session.
"""

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import faults
import infra

COMPLETIONS = 200

pytestmark = [
    pytest.mark.integration,
    # The run takes about two minutes here; a loaded 2-core CI machine gets plenty of slack.
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or os.environ.get("POSTGRES_URL")),
        reason="Kafka and PostgreSQL are external here: not this checkout's to kill",
    ),
]


@pytest.fixture
async def result(tmp_path: Path) -> AsyncIterator[faults.Result]:
    config = faults.Config(
        completions=COMPLETIONS,
        seed=20250611,
        # Publishing stays at most 20 completions ahead of the next fault, so that work is in
        # flight across every fault of so short a run.
        lead=20,
        # Generous, for a loaded machine: a failing run still ends well within the timeout.
        stall_timeout=150,
        ready_timeout=240,
        poll_interval=0.25,
        workdir=tmp_path,
        report=None,
    )
    try:
        yield await faults.run(config)
    finally:
        # The run restarts them itself; this holds even if it was interrupted half-way.
        await asyncio.to_thread(infra.ensure_up)


async def test_every_completion_gives_one_credential_notification_email_and_webhook_despite_faults(
    result: faults.Result,
) -> None:
    report = result.render()
    print(report)
    assert sorted(fault.target for fault in result.faults) == sorted(faults.TARGETS), report
    assert all(fault.ready_after is not None for fault in result.faults), report
    assert not result.diagnosis, report
    assert result.sent == COMPLETIONS, report
    assert (result.issued, result.lost, result.duplicates, result.strangers) == (COMPLETIONS, 0, 0, 0), report
    assert (result.in_app_unique, result.in_app_rows) == (COMPLETIONS, COMPLETIONS), report
    # At least once on the wire: a resend under the same Message-ID / webhook-id is allowed, a
    # second email or webhook for one credential is not.
    assert (result.emails_unique, result.email_duplicates) == (COMPLETIONS, 0), report
    assert (result.webhooks_unique, result.webhook_duplicates, result.bad_signatures) == (
        COMPLETIONS,
        0,
        0,
    ), report
    assert result.outbox_backlog == {"enrollment": 0, "issuance": 0, "notifications": 0}, report
    assert result.dead_letters_without_reason == 0, report
    assert result.ok, report
