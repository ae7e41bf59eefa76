"""The shortened fault run, in CI: 200 signed partner completions, a tenth of the learners taking a
three-course paid pathway, through the deployment the design defends (every service as 2 replicas,
a 3-broker KRaft cluster, PostgreSQL) while every target is SIGKILLed once in a seeded order: one
replica of each service, the mail sink, the active controller, a partition leader, PostgreSQL.

`make faults` runs the full form (100,000 completions) with the same runner, `scripts/faults.py`.
This module crashes the project's PostgreSQL, so it provisions it itself (the integration fixtures
do not apply here) and leaves it running for whatever follows in the same session; the cluster is
the run's own (`harness.cluster`, wiped at the start, stopped at the end), and the project's single
broker is not touched.
"""

import asyncio
import dataclasses
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import faults
import infra
from harness.accounting import Result
from harness.deployment import SERVICES

COMPLETIONS = 200
CONFIG = faults.Config(
    completions=COMPLETIONS,
    seed=20250611,
    # The workload stays at most 20 reports ahead of the next fault, so that work is in flight
    # across every fault of so short a run.
    lead=20,
    # Generous, for a loaded machine: a failing run still ends well within the timeout.
    stall_timeout=150,
    ready_timeout=240,
    poll_interval=0.25,
    report=None,
)

pytestmark = [
    pytest.mark.integration,
    # About five minutes on a loaded 2-core machine (a third of it starting 3 brokers and 10
    # service processes); the slack is for a slower CI machine.
    pytest.mark.timeout(1500),
    pytest.mark.skipif(
        bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or os.environ.get("POSTGRES_URL")),
        reason="Kafka and PostgreSQL are external here: not this checkout's to kill",
    ),
]


@pytest.fixture(scope="module")
async def result(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Result]:
    config = dataclasses.replace(CONFIG, workdir=tmp_path_factory.mktemp("faults"))
    try:
        outcome = await faults.run(config)
        print(outcome.render())
        yield outcome
    finally:
        # The run restarts it itself; this holds even if it was interrupted half-way.
        await asyncio.to_thread(infra.ensure_up)


async def test_every_fault_hit_what_the_plan_named_and_the_deployment_came_back(
    result: Result,
) -> None:
    report = result.render()
    assert sorted(fault.target for fault in result.faults) == sorted(faults.TARGETS), report
    # A replica's twin kept running, the controller and the partition's leadership moved to
    # another broker, PostgreSQL ran crash recovery: each fault did what its name says.
    assert [fault.row() for fault in result.faults if not fault.confirmed] == [], report
    assert result.postgres_fault == "SIGKILL", report
    # No process died on its own (the supervisor would have restarted it, as an orchestrator does).
    assert result.incidents == [], report
    assert not result.diagnosis, report


async def test_every_completion_gives_exactly_one_credential(result: Result) -> None:
    report = result.render()
    assert (result.reports, result.course_expected) == (COMPLETIONS, COMPLETIONS), report
    assert (result.issued, result.lost, result.duplicates, result.strangers) == (COMPLETIONS, 0, 0, 0), report


async def test_every_pathway_learner_gets_exactly_one_pathway_credential(result: Result) -> None:
    report = result.render()
    learners = CONFIG.pathway_learners
    # Read back from the partner's topic: so many learners reported every part of the pathway.
    assert result.pathway_expected == learners >= 10, report
    assert (result.pathway_issued, result.pathway_lost, result.pathway_duplicates) == (learners, 0, 0), report
    assert result.pathway_strangers == 0, report
    # Their courses are paid: each payment went through billing and the provider's webhook, once.
    paid = learners * faults.PATHWAY_COURSES
    assert (result.payments_expected, result.payments_settled, result.payments_doubled) == (paid, paid, 0), (
        report
    )


async def test_every_credential_gives_one_notification_email_and_webhook(result: Result) -> None:
    report = result.render()
    credentials = COMPLETIONS + CONFIG.pathway_learners
    assert (result.in_app_unique, result.in_app_rows) == (credentials, credentials), report
    # At least once on the wire: a resend under the same Message-ID / webhook-id is allowed, a
    # second email or webhook for one credential is not.
    assert (result.emails_unique, result.email_duplicates, result.emails_misaddressed) == (
        credentials,
        0,
        0,
    ), report
    assert (result.webhooks_unique, result.webhook_duplicates) == (credentials, 0), report
    assert (result.bad_signatures, result.webhooks_unreadable) == (0, 0), report


async def test_nothing_is_left_behind(result: Result) -> None:
    report = result.render()
    assert result.outbox_backlog == dict.fromkeys(SERVICES, 0), report
    assert result.dead_letters_without_reason == 0, report
    assert result.ok, report
