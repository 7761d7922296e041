"""Client authentication with per-client tokens: issued and revoked from the CLI, kept as salted hashes.

A token reads ``frc_<id>_<secret>``: the id finds the credential row, and the secret (32 random bytes,
URL-safe) is checked against ``sha256(salt || secret)`` with a constant-time comparison. Only the salt and
the hash are stored, so a copy of the database gives no one a working token. Secrets are random and long,
so a fast hash is enough (there is nothing to brute-force; password hashing exists for low-entropy input).

Clients send ``authorization: Bearer <token>`` as call metadata; ``TokenAuthInterceptor`` refuses any call
without a valid, unrevoked token with UNAUTHENTICATED before it reaches the coordinator. Revocation takes
effect within ``cache_s`` seconds (verified tokens are remembered briefly so each RPC is not a query).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from fedrecon.server.store import SqlStore, UnknownCredential

PREFIX = "frc"


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
    """True when ``token`` names an active credential and its secret matches. Any malformed token (an id
    that is not ASCII digits, or no credential could have) is simply not valid; store outages and faults
    raise (`StoreUnavailable`, `StoreFault`) for the caller to answer UNAVAILABLE or INTERNAL."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not (parts[1].isascii() and parts[1].isdigit()):
        return False
    try:
        record = store.get_credential(int(parts[1]))
    except UnknownCredential:
        return False
    return record.active and hmac.compare_digest(record.secret_hash, _hash(record.salt, parts[2]))


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call that does not carry a valid token (UNAUTHENTICATED)."""

    def __init__(self, store: SqlStore, *, cache_s: float = 2.0, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._store = store
        self._cache_s = cache_s
        self._clock = clock
        self._verified: dict[str, float] = {}  # token -> time it was last verified
        self._lock = threading.Lock()

    def _valid(self, token: str) -> bool:
        now = self._clock()
        with self._lock:
            seen = self._verified.get(token)
        if seen is not None and now - seen < self._cache_s:
            return True
        ok = check_token(self._store, token)
        with self._lock:
            if ok:
                if len(self._verified) > 100_000:
                    self._verified.clear()
                self._verified[token] = now
            else:
                self._verified.pop(token, None)
        return ok

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        metadata = dict(handler_call_details.invocation_metadata or ())
        header = metadata.get("authorization", "")
        token = header[len("Bearer "):] if header.startswith("Bearer ") else ""
        if token and self._valid(token):
            return handler
        message = "a valid client token is required" if not token else "this client token is not valid"

        def deny(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler))
        for attribute, build in kinds:
            if getattr(handler, attribute) is not None:
                return build(deny, request_deserializer=handler.request_deserializer,
                             response_serializer=handler.response_serializer)
        return handler
