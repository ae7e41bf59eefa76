"""SSRF through webhook URLs (issue 13, item 3): a host name on the allow-list is not enough.

The platform allows `*.partner.example` (production-like: nothing private is opened). Here DNS
answers for two such names are decided by the test (`socket.getaddrinfo`, which every resolver
in this process goes through, the services' included): one answers internal addresses, the
other a public address while it is subscribed and then this machine's loopback, where a real
receiver listens (DNS rebinding). Neither is ever called: the first is refused when subscribed
(422), the second when delivered, on the address the connection would have gone to.
"""

import socket
import uuid
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from pydantic import ValidationError

from notifications.settings import Settings

from .conftest import PROBLEM_JSON, Platform, on_loopback, wait_for

INTERNAL = "internal.partner.example"
REBINDING = "rebind.partner.example"
PUBLIC = "93.184.215.14"


class Dns:
    """What the test's names resolve to; every other name goes to the real resolver."""

    def __init__(self) -> None:
        self.answers: dict[str, str] = {}
        self._real = socket.getaddrinfo

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return self._real(host, port, *args, **kwargs)
        address = self.answers[name]
        number = int(port or 0)
        if ":" in address:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, number, 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, number))]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Dns:
    fake = Dns()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.7",
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "169.254.10.10",
        "100.100.100.200",
        "224.0.0.251",
        "0.0.0.0",  # noqa: S104  (an answer refused, not an address bound)
        "240.0.0.1",
        "::1",
        "::",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "fe80::1",
        "fd12:3456::1",
        "fd00:ec2::254",
        "ff02::1",
    ],
)
async def test_a_host_that_resolves_to_an_internal_address_is_not_subscribed(
    platform: Platform, dns: Dns, address: str
) -> None:
    dns.answers[INTERNAL] = address

    response = await platform.notifications.post(
        "/webhooks/subscriptions",
        json={"url": f"https://{INTERNAL}/hooks", "scope": {"kind": "all"}},
        headers=platform.admin(),
    )

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["type"] == "urn:microcred:problem:webhook-url-refused"
    assert response.json()["detail"].startswith(f"{INTERNAL} resolves to ")


async def test_a_host_rebound_to_loopback_after_subscribing_is_never_called(
    platform: Platform, dns: Dns
) -> None:
    received: list[bytes] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        received.append(await request.body())
        return Response(status_code=204)

    async with on_loopback(app) as port:
        dns.answers[REBINDING] = PUBLIC
        subscribed = await platform.notifications.post(
            "/webhooks/subscriptions",
            json={
                "url": f"http://{REBINDING}:{port}/hook",
                "scope": {"kind": "all"},
                "event_types": ["org.microcred.enrollment.enrollment.created.v1"],
            },
            headers=platform.admin(),
        )
        assert subscribed.status_code == 201, subscribed.text
        subscription_id = uuid.UUID(subscribed.json()["subscription_id"])
        # The name's owner points it at this machine, where a receiver listens on `port`.
        dns.answers[REBINDING] = "127.0.0.1"

        await platform.enroll("rebound-rae", await platform.published_course("Rebinding"))

        async def settled() -> Any:
            return await platform.fetchval(
                "notifications",
                "SELECT last_error FROM deliveries WHERE subscription_id = $1"
                " AND state IN ('dead', 'delivered')",
                subscription_id,
            )

        error = await wait_for(settled)

    assert received == [], "the webhook reached the loopback receiver"
    assert error is not None
    assert "loopback" in error, error
    state = await platform.fetchval(
        "notifications", "SELECT state FROM deliveries WHERE subscription_id = $1", subscription_id
    )
    assert state == "dead"


@pytest.mark.parametrize("hosts", [["*"], ["hooks.employer.example", "*"], ["*.*"]])
def test_an_allow_list_that_allows_any_host_is_refused_naming_the_setting(hosts: list[str]) -> None:
    with pytest.raises(ValidationError, match="WEBHOOK_ALLOWED_HOSTS"):
        Settings(
            database_url="postgresql://notifications@db.internal/notifications",
            kafka_bootstrap_servers="kafka-1:9092",
            auth_issuer="https://id.microcred.example",
            auth_jwks_url="https://id.microcred.example/jwks.json",
            webhook_allowed_hosts=hosts,
        )
