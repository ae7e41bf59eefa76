"""Webhooks connect only to checked addresses, and to the very address checked: an HTTP and an
HTTPS receiver on loopback, reached under a host name whose resolution the test decides."""

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from notifications import egress
from notifications.domain import IPAddress, IPNetwork

HOST = "hooks.partner.example"
LOOPBACK: list[IPNetwork] = [ipaddress.ip_network("127.0.0.0/8")]


@contextlib.asynccontextmanager
async def receiver(tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A one-route HTTP server on 127.0.0.1: answers 204 and keeps each request's head."""
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=tls)
    async with server:
        yield server.sockets[0].getsockname()[1], heads


def resolving(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> list[str]:
    """`HOST` resolves to `addresses`; returns the log of names resolved."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[IPAddress]:
        asked.append(host)
        return [ipaddress.ip_address(address) for address in addresses]

    monkeypatch.setattr(egress, "resolve", resolve)
    return asked


def client(allowed: list[IPNetwork], verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    transport = egress.CheckedTransport(allowed, httpx.Limits(max_connections=2), verify=verify)
    return httpx.AsyncClient(transport=transport, timeout=5)


async def test_the_connection_goes_to_the_checked_address_under_the_host_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = resolving(monkeypatch, "127.0.0.1")
    async with receiver() as (port, heads), client(LOOPBACK) as http:
        response = await http.post(f"http://{HOST}:{port}/hook", content=b"{}")

    assert response.status_code == 204
    assert asked == [HOST]
    assert f"host: {HOST}:{port}".encode() in heads[0].lower()


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.1"],
        ["10.0.0.7"],
        ["169.254.169.254"],
        ["::ffff:127.0.0.1"],
        # A name that answers one public and one internal address is not trusted with either.
        ["8.8.8.8", "127.0.0.1"],
    ],
)
async def test_an_address_not_allowed_is_never_connected_to(
    monkeypatch: pytest.MonkeyPatch, addresses: list[str]
) -> None:
    resolving(monkeypatch, *addresses)
    async with receiver() as (port, heads), client([]) as http:
        with pytest.raises(egress.AddressRefused, match=HOST):
            await http.post(f"http://{HOST}:{port}/hook", content=b"{}")

    assert heads == []


async def test_metadata_stays_refused_inside_an_allowed_network(monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(monkeypatch, "169.254.169.254")
    async with client([ipaddress.ip_network("169.254.0.0/16")]) as http:
        with pytest.raises(egress.AddressRefused, match="metadata"):
            await http.post(f"http://{HOST}/hook", content=b"{}")


def _certificates(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A CA and a certificate it signs for `HOST` only: the server's and the client's TLS contexts."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    trusting = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server, trusting


async def test_tls_sends_sni_for_and_verifies_the_host_name_not_the_address(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    resolving(monkeypatch, "127.0.0.1")
    server_tls, trusting = _certificates(tmp_path)
    names: list[str | None] = []
    server_tls.sni_callback = lambda _socket, name, _context: names.append(name)

    async with receiver(server_tls) as (port, heads), client(LOOPBACK, verify=trusting) as http:
        response = await http.post(f"https://{HOST}:{port}/hook", content=b"{}")

    assert response.status_code == 204
    assert names == [HOST]
    assert f"host: {HOST}:{port}".encode() in heads[0].lower()
