"""The client's IP address, believing ``X-Forwarded-For`` only from trusted proxies.

Walking ``X-Forwarded-For`` from the right (the hop nearest to us), every address that
is a trusted proxy is skipped; the first one that is not is the client. A header sent by
an untrusted peer is ignored entirely, so a client cannot choose its rate-limit key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Sequence[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def _trusted(address: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def client_ip(peer: str | None, forwarded_for: str | None, trusted: Sequence[IPNetwork]) -> str:
    """The address to attribute a request to.

    Args:
        peer: the TCP peer address.
        forwarded_for: the ``X-Forwarded-For`` header (all of its values joined by ``,``).
        trusted: networks of the proxies whose header is believed.
    """
    peer = peer or "unknown"
    if not forwarded_for or not trusted or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # garbage in the chain: do not trust anything left of it
        if not _trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer
