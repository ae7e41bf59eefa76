"""Where webhooks may connect: decided on the address actually connected to, not on the name.

A webhook host is resolved, every address it resolves to is checked (`domain.address_refusal`),
and the connection is made to one of those checked addresses. The check and the connection use
the same resolution, so a name that answers a public address to the check and an internal one
to the connection (DNS rebinding) cannot slip in between. Only the TCP connection is made here,
through httpcore's network-backend hook: TLS still sends SNI for, and verifies the certificate
of, the host name in the URL, and the request carries its `Host` header, as for any request.

(httpx-secure does the same for httpx, but its global-address check cannot be relaxed, and
development and tests deliver to receivers on 127.0.0.1: `WEBHOOK_ALLOWED_PRIVATE_NETWORKS`.)
"""

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Iterable, Sequence
from typing import Any

import httpcore
import httpx

from .domain import IPAddress, IPNetwork, address_refusal


class AddressRefused(Exception):
    """A webhook host resolves to an address webhooks must not reach."""


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order; `socket.gaierror` if none."""
    found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(sockaddr[0]) for *_, sockaddr in found))


async def checked_addresses(host: str, port: int, allowed_private: Sequence[IPNetwork]) -> list[IPAddress]:
    """The addresses of `host`, all of them allowed; `AddressRefused` when any one is not (a name
    that also answers an internal address is not trusted with the others)."""
    addresses = await resolve(host, port)
    for address in addresses:
        refusal = address_refusal(address, allowed_private)
        if refusal is not None:
            raise AddressRefused(f"{host} resolves to {refusal}")
    return addresses


class CheckedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to checked addresses of the host it is asked for."""

    def __init__(self, allowed_private: Sequence[IPNetwork]) -> None:
        self._allowed_private = list(allowed_private)
        self._network = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await checked_addresses(host, port, self._allowed_private)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} took longer than {timeout} s") from None
        except (socket.gaierror, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in addresses:
            try:
                return await self._network.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks are not sent to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._network.sleep(seconds)


class CheckedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, its connection pool given the checked network backend.

    httpx takes no network backend of its own, so its pool is replaced by one built with the same
    settings httpx would use; requests, responses and errors still go through httpx's code.
    """

    def __init__(
        self, allowed_private: Sequence[IPNetwork], limits: httpx.Limits, verify: ssl.SSLContext | bool = True
    ) -> None:
        super().__init__(limits=limits, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=CheckedBackend(allowed_private),
        )
