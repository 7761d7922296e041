"""Client authentication with per-client tokens: issued and revoked from the CLI, kept as salted hashes.

A token reads ``frc_<id>_<secret>``: the id finds the credential row, and the secret (32 random bytes,
URL-safe) is checked against ``sha256(salt || secret)`` with a constant-time comparison. Only the salt and
the hash are stored, so a copy of the database gives no one a working token. Secrets are random and long,
so a fast hash is enough (there is nothing to brute-force; password hashing exists for low-entropy input).

Clients send ``authorization: Bearer <token>`` as call metadata; ``TokenAuthInterceptor`` refuses any call
without a valid, unrevoked token with UNAUTHENTICATED before it reaches the coordinator. Revocation takes
effect within ``cache_s`` seconds (verified tokens are remembered briefly so each RPC is not a query).
A store that cannot answer is UNAVAILABLE (with a retry hint), not a verdict on the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from fedrecon.server.identity import credential_id_of
from fedrecon.server.statuses import CallStatus, status_of
from fedrecon.server.store import SqlStore, UnknownCredential

PREFIX = "frc"
OPEN_SERVICES = ("/grpc.health.v1.Health/",)
"""Method prefixes that need no token: health probes (a load balancer or kubelet carries none, and the
answer, SERVING or not, tells nothing about the task)."""


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def issue_token(store: SqlStore, label: str, *, max_devices: int = 1) -> tuple[int, str]:
    """A new credential; returns (id, token). The token is shown once and never stored. ``ValueError``
    (nothing stored) for a label that is not 1 to 200 printable characters or ``max_devices`` < 1."""
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    record = store.add_credential(label, salt=salt, secret_hash=_hash(salt, secret), max_devices=max_devices)
    return record.credential_id, f"{PREFIX}_{record.credential_id}_{secret}"


def check_token(store: SqlStore, token: str) -> bool:
    """True when ``token`` names an active credential and its secret matches. A token whose id cannot be a
    credential id (not digits, or too large for the store's integer) is simply not valid; a store that
    cannot answer raises ``StoreUnavailable`` or ``StoreFault`` (the interceptor says UNAVAILABLE or
    INTERNAL)."""
    # ASCII first: "²".isdigit() is True, yet int("²") raises.
    credential_id = credential_id_of(token) if token.isascii() else None
    if credential_id is None:
        return False
    try:
        record = store.get_credential(credential_id)
    except UnknownCredential:
        return False
    secret = token.split("_", 2)[2]
    return record.active and hmac.compare_digest(record.secret_hash, _hash(record.salt, secret))


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call that does not carry a valid token (UNAUTHENTICATED) before any handler runs.

    The store is queried on the event loop's executor (the coordinator's thread pool), never on the loop.
    A store that cannot answer makes the call UNAVAILABLE with a retry hint, and any other failure INTERNAL
    (``statuses``): never gRPC's UNKNOWN, and never a valid client told its token is bad.
    """

    def __init__(self, store: SqlStore, *, cache_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 retry_hint_ms: int = 1000, open_services: tuple[str, ...] = OPEN_SERVICES) -> None:
        """``open_services``: method prefixes let through without a token (the health service)."""
        self._store = store
        self._open = open_services
        self._cache_s = cache_s
        self._clock = clock
        self._retry_hint_ms = retry_hint_ms
        self._verified: dict[str, float] = {}  # token -> time it was last verified
        self._lock = threading.Lock()

    def _recently_verified(self, token: str) -> bool:
        with self._lock:
            seen = self._verified.get(token)
        return seen is not None and self._clock() - seen < self._cache_s

    def _valid(self, token: str) -> bool:
        now = self._clock()
        ok = check_token(self._store, token)
        with self._lock:
            if ok:
                if len(self._verified) > 100_000:
                    self._verified.clear()
                self._verified[token] = now
            else:
                self._verified.pop(token, None)
        return ok

    async def _refusal(self, token: str) -> CallStatus | None:
        """None if ``token`` is valid; else how the call ends."""
        if not token:
            return CallStatus(grpc.StatusCode.UNAUTHENTICATED, "a valid client token is required")
        if self._recently_verified(token):
            return None
        try:
            ok = await asyncio.get_running_loop().run_in_executor(None, self._valid, token)
        except Exception as err:  # a store outage or fault: a status of its own, not "bad token"
            return status_of(err, retry_hint_ms=self._retry_hint_ms)
        return None if ok else CallStatus(grpc.StatusCode.UNAUTHENTICATED, "this client token is not valid")

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or str(handler_call_details.method).startswith(self._open):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        header = str(metadata.get("authorization", ""))
        refusal = await self._refusal(header[len("Bearer "):] if header.startswith("Bearer ") else "")
        return handler if refusal is None else _refusing(handler, refusal)


def _refusing(handler: Any, status: CallStatus) -> Any:
    """A handler of ``handler``'s kind that ends the call with ``status`` without reading the request."""
    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(status.code, status.details, status.trailing)

    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
             ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for attribute, build in kinds:
        if getattr(handler, attribute) is not None:
            return build(deny, request_deserializer=handler.request_deserializer,
                         response_serializer=handler.response_serializer)
    return handler
