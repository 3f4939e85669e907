"""The SSRF guard of outbound webhooks: which URLs and addresses the hub may call.

A webhook URL must be ``http`` or ``https`` with a host name or an IP literal, no user
info, at most :data:`MAX_URL_LENGTH` characters. Its host is resolved with the system
resolver (``getaddrinfo``), which also reads numeric forms the way ``inet_aton`` does
(``0x7f000001``, ``2130706433``, ``127.1``, ``0177.0.0.1`` are all 127.0.0.1), and
**every** address it yields must be public: loopback, private (RFC 1918), link-local,
shared/CGNAT (100.64/10), unique-local (fc00::/7), IPv4-mapped (::ffff:0:0/96), NAT64,
6to4, Teredo, unspecified, multicast, documentation, benchmarking and reserved
addresses are refused. ``allow_private=True`` (``WEBHOOK_ALLOW_PRIVATE``, tests only)
lifts the address rule, not the syntax rules.

The check runs at registration and again before every attempt; the sender then
connects to an address that was just checked (see :mod:`bridge.webhook_http`), so a
DNS answer that changes between check and connect cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import httpx
import trio

__all__ = [
    "ALLOWED_SCHEMES",
    "MAX_URL_LENGTH",
    "RESOLVE_TIMEOUT_S",
    "IPAddress",
    "UrlRefused",
    "WebhookTarget",
    "address_problem",
    "check_webhook_url",
    "checked_addresses",
    "parse_webhook_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
#: Longest accepted webhook URL (the storage column holds this much).
MAX_URL_LENGTH = 2048
#: Seconds a registration waits for DNS.
RESOLVE_TIMEOUT_S = 5.0
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")

# Checked in order; the first match names the reason.
_BLOCKED: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), label)
    for net, label in (
        ("0.0.0.0/8", "an unspecified ('this network') address"),
        ("10.0.0.0/8", "a private address"),
        ("100.64.0.0/10", "a shared (CGNAT) address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address"),
        ("172.16.0.0/12", "a private address"),
        ("192.0.0.0/24", "an IETF protocol address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay address"),
        ("192.168.0.0/16", "a private address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved address"),
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("::ffff:0:0/96", "an IPv4-mapped address"),
        ("::/96", "an IPv4-compatible address"),
        ("64:ff9b::/96", "a NAT64 address"),
        ("64:ff9b:1::/48", "a NAT64 address"),
        ("100::/64", "a discard address"),
        ("2001::/32", "a Teredo address"),
        ("2001::/23", "an IETF protocol address"),
        ("2001:db8::/32", "a documentation address"),
        ("2002::/16", "a 6to4 address"),
        ("fc00::/7", "a unique-local address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
    )
)


class UrlRefused(ValueError):
    """The URL may not be called; ``reason`` says why (safe to show to an admin)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where a webhook URL points: ``host`` is a name or an IP literal (IPv6 without
    brackets), ``port`` is explicit or the scheme's default."""

    url: httpx.URL
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        """The ``Host`` header value: the host, with the port when not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == DEFAULT_PORTS[self.scheme]:
            return host
        return f"{host}:{self.port}"


def address_problem(address: IPAddress) -> str | None:
    """Why the hub must not connect to ``address`` (``"a loopback address"``…), or
    ``None`` when it is a public unicast address."""
    for network, label in _BLOCKED:
        if address.version == network.version and address in network:
            return label
    if not address.is_global:
        return "a non-public address"
    return None


def parse_webhook_url(url: str) -> WebhookTarget:
    """Check the syntax rules and split ``url`` into scheme, host and port.

    Raises:
        UrlRefused: not an http(s) URL with a host, too long, with user info, spaces or
            control characters, or a host that is neither a name nor an IP literal.
    """
    if len(url) > MAX_URL_LENGTH:
        raise UrlRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise UrlRefused("the URL must not contain spaces or control characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise UrlRefused(f"not a valid URL: {exc}") from None
    scheme = parsed.scheme
    if scheme not in ALLOWED_SCHEMES:
        raise UrlRefused("the URL must start with http:// or https://")
    if parsed.userinfo:
        raise UrlRefused("the URL must not contain a user name or password")
    host = parsed.raw_host.decode("ascii", "replace").lower()
    if not host:
        raise UrlRefused("the URL has no host")
    if ":" in host:  # an IPv6 literal
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UrlRefused("the URL's IPv6 address is not valid") from None
    elif not set(host) <= _HOST_CHARS or host.startswith((".", "-")):
        raise UrlRefused("the URL's host is not a valid host name")
    port = parsed.port if parsed.port is not None else DEFAULT_PORTS[scheme]
    return WebhookTarget(parsed, scheme, host, port)


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlRefused(f"the host {host!r} does not resolve ({exc})") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UrlRefused(f"the host {host!r} does not resolve")
    return addresses


async def checked_addresses(host: str, port: int, *, allow_private: bool) -> list[IPAddress]:
    """Resolve ``host`` and return its addresses, in resolver order, after checking
    every one of them.

    Raises:
        UrlRefused: the host does not resolve, or (unless ``allow_private``) one of its
            addresses is not public.

    Cancellation:
        Cancellable: the resolver thread is abandoned (trio's ``getaddrinfo``).
    """
    addresses = await _resolve(host, port)
    if not allow_private:
        for address in addresses:
            problem = address_problem(address)
            if problem is not None:
                shown = "" if host == str(address) else f" resolves to {address}, which"
                raise UrlRefused(f"{host}{shown} is {problem}")
    return addresses


async def check_webhook_url(url: str, *, allow_private: bool) -> WebhookTarget:
    """Everything a registration checks: the syntax, then the resolved addresses.

    Raises:
        UrlRefused: see :func:`parse_webhook_url` and :func:`checked_addresses`; also
            when DNS does not answer within :data:`RESOLVE_TIMEOUT_S`.
    """
    target = parse_webhook_url(url)
    with trio.move_on_after(RESOLVE_TIMEOUT_S):
        await checked_addresses(target.host, target.port, allow_private=allow_private)
        return target
    raise UrlRefused(f"the host {target.host!r} did not resolve in time")
