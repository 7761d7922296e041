"""Who is calling: the identity a coordinator gives a client, derived from its credential when there is one.

A client id in a request is only a claim. With authentication on, the identity comes from what the client
proved: the id of its bearer token's credential, or the fingerprint of its mutual-TLS certificate. Within a
credential, devices are told apart by the client ids they assert, but one credential is one device unless
it was issued for more (``max_devices``, a gateway or test harness): it holds one assignment per round per
device, however many ids it asserts. No one can take another credential's identity, assignment or rate
limit by asserting its id: the id only ever names a client *inside* the caller's own credential.

Without authentication (the trusted-network mode) the client id is taken at its word and limits apply per
network peer (the caller's IP address), which is all a coordinator can tell apart there. Anyone on that
network can pose as any client id: the mode is for networks where every device is trusted (a lab, a test
harness, simulations), never for devices on the open internet.

``Caller.key`` is what the coordinator treats as one client (its assignment, its report, its pseudonym in
the store); ``Caller.group`` is whose limits apply (open assignments, check-in rate, open streams).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from fedrecon.server.refusals import Refusal, Status

MAX_CLIENT_ID_CHARS = 256


@dataclass(frozen=True)
class Caller:
    """One client as the coordinator sees it."""

    key: str  # one client: "cred:17/id:<client id>", "cert:<sha256>/id:<client id>" or "id:<client id>"
    group: str  # whose limits apply: "cred:17", "cert:<sha256>" or "peer:<address>"
    # With authentication: the devices the credential speaks for, i.e. the assignments its group may hold in
    # one round and the multiple of one device's check-in budget it gets. Without, unused (the task's
    # per-peer settings apply).
    max_assignments: int = 1
    authenticated: bool = False

    @classmethod
    def trusted(cls, client_id: str, peer: str = "local") -> Caller:
        """The trusted-network mode: the asserted id is the client, limits are per ``peer``. In-process
        callers (tests, simulations) use this with one peer for all clients."""
        check_client_id(client_id)
        return cls(key=f"id:{client_id}", group=f"peer:{peer}", max_assignments=1 << 30)


def check_client_id(client_id: str) -> None:
    """Refuse (INVALID_ARGUMENT) a client id the protocol does not allow, whether or not it names the
    client: requests look the same with and without authentication."""
    if not 1 <= len(client_id) <= MAX_CLIENT_ID_CHARS:
        raise Refusal(Status.INVALID_ARGUMENT, "bad_client_id",
                      f"client_id must be 1 to {MAX_CLIENT_ID_CHARS} characters")


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
    for (``max_devices`` in the store); it may raise ``StoreUnavailable``, which the servicer answers
    UNAVAILABLE. With neither, the coordinator runs in the trusted-network mode.

    ``devices_of`` is remembered per credential (up to ``cache_size`` of them): ``max_devices`` is fixed when
    a credential is issued and nothing changes it later, and revocation is the interceptor's business, so a
    store query per RPC would buy nothing. Failures are not remembered: a store outage is retried by the
    next call.
    """

    def __init__(self, *, tokens: bool = False, client_certs: bool = False,
                 devices_of: Callable[[int], int] | None = None, cache_size: int = 100_000) -> None:
        self.tokens = tokens
        self.client_certs = client_certs
        self._devices_of = functools.lru_cache(maxsize=cache_size)(devices_of or (lambda _credential_id: 1))
        self._known_devices: dict[int, int] = {}  # what _devices_of answered (read without calling it)
        self._cache_size = cache_size

    @property
    def authenticated(self) -> bool:
        return self.tokens or self.client_certs

    def group_of(self, *, token: str | None, client_cert_pem: bytes | None, peer: str) -> tuple[str, bool]:
        """(group, authenticated) of a caller before it says who it is: what per-caller stream limits are
        counted against. Reads no store (it runs for every stream, before any message)."""
        if self.tokens:
            credential_id = credential_id_of(token or "")
            if credential_id is None:
                raise ValueError("a verified token is required")
            return f"cred:{credential_id}", True
        if self.client_certs:
            if not client_cert_pem:
                raise ValueError("a verified client certificate is required")
            return f"cert:{hashlib.sha256(client_cert_pem).hexdigest()}", True
        return f"peer:{peer_host(peer)}", False

    def identify(self, claimed_id: str, *, token: str | None, client_cert_pem: bytes | None, peer: str
                 ) -> Caller:
        """The caller of one request. ``token`` is the bearer token sent (already verified when ``tokens``);
        ``client_cert_pem`` the certificate mutual TLS verified."""
        check_client_id(claimed_id)
        group, authenticated = self.group_of(token=token, client_cert_pem=client_cert_pem, peer=peer)
        if not authenticated:
            return Caller.trusted(claimed_id, peer_host(peer))
        devices = 1
        if group.startswith("cred:"):
            credential_id = int(group.removeprefix("cred:"))
            devices = self._devices_of(credential_id)
            if len(self._known_devices) >= self._cache_size:
                self._known_devices.clear()  # rare (that many credentials): they are looked up again
            self._known_devices[credential_id] = devices
        return self._for_group(group, claimed_id, devices)

    def identify_known(self, claimed_id: str, *, token: str | None, client_cert_pem: bytes | None, peer: str
                       ) -> Caller | None:
        """``identify`` without any store query: None when it would need one (a credential whose number
        of devices was not looked up yet). Lets the servicer identify a caller on its event loop."""
        check_client_id(claimed_id)
        group, authenticated = self.group_of(token=token, client_cert_pem=client_cert_pem, peer=peer)
        if not authenticated:
            return Caller.trusted(claimed_id, peer_host(peer))
        if not group.startswith("cred:"):
            return self._for_group(group, claimed_id, 1)
        devices = self._known_devices.get(int(group.removeprefix("cred:")))
        return None if devices is None else self._for_group(group, claimed_id, devices)

    @staticmethod
    def _for_group(group: str, claimed_id: str, devices: int) -> Caller:
        """A client inside ``group``. The id is part of the key even for a one-device credential, so a
        second id it asserts is refused a second assignment (a retry window that says why) rather than
        handed the first one, which would make it train an update the round can no longer accept."""
        return Caller(key=f"{group}/id:{claimed_id}", group=group, max_assignments=max(1, devices),
                      authenticated=True)


def credential_id_of(token: str) -> int | None:
    """The credential id of a ``frc_<id>_<secret>`` token, or None when it cannot be one (so an id that
    does not fit the store's integer column is refused as a bad credential, not a database error)."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "frc" or not parts[1].isdigit() or len(parts[1]) > 18:
        return None
    return int(parts[1])
