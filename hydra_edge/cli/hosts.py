"""Which addresses only this machine can reach: the UI and the API server bind loopback by
default and refuse any other address without a secret (--auth, --api-key)."""

from __future__ import annotations

import ipaddress

from hydra_edge.errors import UserError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; everything else (0.0.0.0, a LAN address, a host name) is reachable."""
    host = host.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, has_secret: bool, service: str, secret: str) -> None:
    """The rule the UI and the API server share: an empty --host is refused, and an address other
    machines can reach needs the secret (`secret` is the flag and its value, e.g. "--auth USER:PASS")."""
    flag = secret.split()[0]
    if not host.strip():
        raise UserError(f"--host: empty; use 127.0.0.1 (this machine only) or an address with {flag}")
    if not has_secret and not is_loopback(host):
        raise UserError(
            f"--host {host} makes the {service} reachable from other machines; add {secret} "
            "(or keep the default --host 127.0.0.1)"
        )
