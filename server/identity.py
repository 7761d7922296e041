"""Who is calling: the identity a coordinator gives a client, derived from its credential when there is one.

A client id in a request is only a claim. With authentication on, the identity comes from what the client
proved: the id of its bearer token's credential, or the fingerprint of its mutual-TLS certificate. One
credential is one device unless it was issued for more (``max_devices``, a gateway or test harness); then
the devices are told apart by their client ids *within* that credential, so no one can take another
credential's identity, assignment or rate limit by asserting its id.

Without authentication (the trusted-network mode) the client id is taken at its word and limits apply per
network peer (the caller's IP address), which is all a coordinator can tell apart there.

``Caller.key`` is what the coordinator treats as one client (its assignment, its report, its pseudonym in
the store); ``Caller.group`` is whose limits apply (open assignments, check-in rate, open streams).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

MAX_CLIENT_ID_CHARS = 256


@dataclass(frozen=True)
class Caller:
    """One client as the coordinator sees it."""

    key: str  # one client: "cred:17", "cred:17/id:<client id>", "cert:<sha256>" or "id:<client id>"
    group: str  # whose limits apply: "cred:17", "cert:<sha256>" or "peer:<address>"
    max_assignments: int = 1  # open assignments the group may hold in one round
    authenticated: bool = False

    @classmethod
    def trusted(cls, client_id: str, peer: str = "local", *, max_assignments: int | None = None) -> Caller:
        """The trusted-network mode: the asserted id is the client, limits are per ``peer``. In-process
        callers (tests, simulations) use this with one peer for all clients and no assignment cap."""
        return cls(key=f"id:{client_id}", group=f"peer:{peer}",
                   max_assignments=max_assignments if max_assignments is not None else 1 << 30)


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string (``ipv4:127.0.0.1:5555`` -> ``ipv4:127.0.0.1``): a client's
    port changes with every connection, its address does not."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":  # ipv6:[::1]:5555
        return f"{kind}:{rest.rsplit(':', 1)[0]}" if "]" in rest else peer
    if kind == "ipv4":
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


class Identifier:
    """Derives the ``Caller`` of a request from what the transport verified.

    ``tokens``: bearer tokens were checked (by ``auth.TokenAuthInterceptor``) before the handler runs, so the
    token's credential id can be trusted here. ``client_certs``: mutual TLS demanded a client certificate
    signed by the configured CA. ``devices_of(credential_id)`` says how many devices a credential may speak
    for (``max_devices`` in the store). With neither, the coordinator runs in the trusted-network mode.
    """

    def __init__(self, *, tokens: bool = False, client_certs: bool = False,
                 devices_of: Callable[[int], int] | None = None) -> None:
        self.tokens = tokens
        self.client_certs = client_certs
        self._devices_of = devices_of or (lambda _credential_id: 1)

    @property
    def authenticated(self) -> bool:
        return self.tokens or self.client_certs

    def identify(self, claimed_id: str, *, token: str | None, client_cert_pem: bytes | None, peer: str
                 ) -> Caller:
        """The caller of one request. ``token`` is the bearer token sent (already verified when ``tokens``);
        ``client_cert_pem`` the certificate mutual TLS verified."""
        if self.tokens:
            credential_id = credential_id_of(token or "")
            if credential_id is None:  # the interceptor refuses these before any handler runs
                raise ValueError("a verified token is required")
            return self._for_group(f"cred:{credential_id}", claimed_id, self._devices_of(credential_id))
        if self.client_certs:
            if not client_cert_pem:
                raise ValueError("a verified client certificate is required")
            return self._for_group(f"cert:{hashlib.sha256(client_cert_pem).hexdigest()}", claimed_id, 1)
        return Caller.trusted(claimed_id, peer_host(peer), max_assignments=None)

    @staticmethod
    def _for_group(group: str, claimed_id: str, devices: int) -> Caller:
        key = group if devices <= 1 else f"{group}/id:{claimed_id}"
        return Caller(key=key, group=group, max_assignments=max(1, devices), authenticated=True)


def credential_id_of(token: str) -> int | None:
    """The credential id of a ``frc_<id>_<secret>`` token, or None when it cannot be one (so an id that
    does not fit the store's integer column is refused as a bad credential, not a database error)."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "frc" or not parts[1].isdigit() or len(parts[1]) > 18:
        return None
    return int(parts[1])
