"""The coordinator's read-only web dashboard: one HTML page and the JSON it polls (``/api/state``).

Why it looks like this:

* **Off by default, its own port.** An operator opts in with ``fedrecon serve --dashboard-port N``; the
  page never shares the gRPC port, so a load balancer in front of the clients never exposes it.
* **Read-only.** Only GET and HEAD are served; nothing on the page changes the coordinator or the store.
* **An admin credential when exposed.** Bound to a non-loopback address it refuses to start without one
  (`DashboardSettings.check`); with one, every request (the page too) needs it as HTTP Basic (any user
  name, the credential as password: what a browser prompts for) or ``Authorization: Bearer`` (scripts),
  compared in constant time; anything else is 401.
* **History from the store, the live round from the coordinator.** Committed rounds, versions,
  evaluations and privacy spent are read from the store by ``task_report`` (the same report
  ``fedrecon status --json`` prints); the round in flight is read from the coordinator's memory through a
  ``LiveSource`` callable, so the page shows counts as they change, not as last written.
* **Nothing from the network, nothing executed from data.** The page, its script and its styles are
  package data served from here (no CDN: deployments are often offline); charts are inline SVG drawn by
  the script; every value, task names included (operator input), reaches the page as JSON and is set as
  text, never as markup. A strict Content-Security-Policy forbids inline scripts and foreign origins.
* **The stdlib HTTP server in a thread.** A page polled every few seconds by an operator or two needs no
  framework; the server is threaded with short socket timeouts so a slow client cannot hold it, and
  ``/api/state`` is computed at most once a second whatever the number of open pages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrecon.server.store import SqlStore, StoreError
from fedrecon.server.task_report import task_report

if TYPE_CHECKING:
    from fedrecon.server.coordinator import Coordinator

log = logging.getLogger(__name__)

LiveSource = Callable[[], Mapping[str, Any] | None]
"""What the coordinator knows now that the store does not yet: its task, model version, whether it leads,
and the round in flight (``"round"``: None between rounds). None when there is no coordinator to ask."""

TIMELINE_ROUNDS = 60  # rounds of each task sent to the page (the timeline and participation chart)
VERSIONS_SHOWN = 20  # latest versions listed per task
STATE_MAX_AGE_S = 1.0  # /api/state is recomputed at most this often, however many pages poll it
MIN_CREDENTIAL_CHARS = 16
REQUEST_TIMEOUT_S = 10.0  # a connection that sends nothing for this long is closed
STATIC_FILES = {"/": "index.html", "/index.html": "index.html", "/static/dashboard.js": "dashboard.js",
                "/static/dashboard.css": "dashboard.css", "/static/favicon.svg": "favicon.svg"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (a name that does not resolve is not).
    ``0.0.0.0`` and ``::`` listen on every interface: not loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def read_credential_file(path: Path) -> str:
    """The admin credential in ``path``: its one line, surrounding whitespace removed. Raises ``ValueError``
    with a message for operators when the file cannot be read or holds no usable credential (empty, several
    words or lines, or shorter than ``MIN_CREDENTIAL_CHARS``: a guessable password is no protection)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the dashboard credential file {path}: {err}") from err
    credential = text.strip()
    if not credential or len(credential.split()) != 1:
        raise ValueError(f"the dashboard credential file {path} must hold one credential on one line")
    if len(credential) < MIN_CREDENTIAL_CHARS:
        raise ValueError(f"the dashboard credential in {path} is {len(credential)} characters: use at least "
                         f"{MIN_CREDENTIAL_CHARS} random ones (e.g. python -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))')")
    return credential


@dataclass(frozen=True)
class DashboardSettings:
    """Where the dashboard listens (port 0 picks a free one) and the admin credential it demands (None: no
    credential, allowed on loopback only)."""

    host: str = "127.0.0.1"
    port: int = 0
    credential: str | None = None

    def check(self) -> None:
        """Raise ``ValueError`` when the settings would expose the coordinator's state unauthenticated."""
        if self.credential is None and not is_loopback(self.host):
            raise ValueError(
                f"the dashboard on {self.host} would be reachable from other machines: give it an admin "
                "credential with --dashboard-credential-file FILE, or bind it to 127.0.0.1")


class DashboardAuth:
    """Checks a request's Authorization header against the admin credential in constant time. Both sides
    are hashed first, so neither the credential's content nor its length shows in the comparison's time."""

    def __init__(self, credential: str | None) -> None:
        self._digest = None if credential is None else hashlib.sha256(credential.encode()).digest()

    @property
    def required(self) -> bool:
        return self._digest is not None

    def allows(self, authorization: str | None) -> bool:
        if self._digest is None:
            return True
        offered = _offered_secret(authorization or "")
        # Compared even when nothing was offered, so a missing header costs the same as a wrong one.
        return hmac.compare_digest(hashlib.sha256(offered.encode()).digest(), self._digest) and bool(offered)


def _offered_secret(authorization: str) -> str:
    """The secret in ``Bearer SECRET`` or ``Basic base64(user:SECRET)``; "" when there is none."""
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return ""
        return decoded.partition(":")[2]
    return ""


def coordinator_live(coordinator: Coordinator) -> LiveSource:
    """The coordinator's live state as the dashboard shows it.

    The one place that reads a ``Coordinator``'s insides for the page: it takes the coordinator's lock for a
    consistent snapshot of the round in flight (counts, phase, times, the aggregation stages it runs). When
    ``Coordinator.view()`` (a frozen snapshot) is available, this adapter is the only code to change."""
    settings = coordinator.task.rounds

    def live() -> Mapping[str, Any]:
        with coordinator._lock:
            now = coordinator._clock()
            machine = coordinator.machine
            r = machine.round
            round_view = None if r is None else {
                "round_id": r.round_id, "round_num": r.round_num, "base_version": r.base_version,
                "phase": ("committing" if r.commit_due or r.committing or r.aggregating
                          else "selecting" if r.selecting else "reporting"),
                "selected": len(r.assigned), "reported": r.answered(), "accepted": len(r.accepted),
                "refused": len(r.refused), "total_weight": r.aggregate.total_weight,
                "selection_goal": settings.selection_goal, "goal": settings.clients_per_round,
                "min_reports": settings.minimum,
                "opened_at": _iso(r.opened), "selection_ends": _iso(r.selection_ends),
                "deadline": _iso(r.deadline),
                "seconds_to_selection_end": round(r.selection_ends - now, 1),
                "seconds_to_deadline": round(r.deadline - now, 1),
                "stages": list(r.aggregate.report.stages),
                "updates_clipped": r.aggregate.report.updates_clipped,
                "weights_capped": r.aggregate.report.weights_capped}
            return {"task": coordinator.task.name, "version": machine.version,
                    "leading": coordinator.leading, "standby_reason": coordinator.standby_reason,
                    "round": round_view}

    return live


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _json_ready(value: Any) -> Any:
    """``value`` with every non-finite float as null: JSON has no NaN, and a browser's JSON.parse rejects
    the whole document if one slips through."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def _task_for_page(report: dict[str, Any]) -> dict[str, Any]:
    """A task's report trimmed for a page polled every few seconds: the spec's settings, not its payload
    (a task's item vocabulary can be thousands of ids), and the latest versions only."""
    spec = report.pop("spec")
    report["settings"] = {"model": (spec.get("model") or {}).get("kind"), "rounds": spec.get("rounds"),
                          "aggregation": spec.get("aggregation")}
    report["version_count"] = len(report["versions"])
    report["versions"] = report["versions"][-VERSIONS_SHOWN:]
    return report


class DashboardState:
    """What ``/api/state`` answers: every task's history from the store and the live view, computed at
    most once per ``max_age_s`` (concurrent pollers share one computation)."""

    def __init__(self, store: SqlStore, live: LiveSource | None, *, max_age_s: float = STATE_MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._live = live
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, bytes] | None = None

    def json(self) -> bytes:
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached[0] >= self._max_age_s:
                self._cached = (now, json.dumps(_json_ready(self.compute()), allow_nan=False).encode())
            return self._cached[1]

    def compute(self) -> dict[str, Any]:
        live = self._live() if self._live is not None else None
        state: dict[str, Any] = {"generated_at": datetime.now(UTC).isoformat(), "live": live, "tasks": [],
                                 "store_error": None}
        try:
            names = [t.name for t in self._store.list_tasks()]
            if live is not None and live.get("task") in names:  # the coordinator's own task first
                names.remove(live["task"])
                names.insert(0, live["task"])
            state["tasks"] = [_task_for_page(task_report(self._store, n, recent_rounds=TIMELINE_ROUNDS))
                              for n in names]
        except StoreError as err:  # the page says so and keeps polling; the live round is still shown
            log.warning("dashboard: reading the store failed: %s", err)
            state["store_error"] = str(err)
        return state


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files (package data), read once at start: served from memory, never from a path a
    request names."""
    folder = resources.files("fedrecon.server") / "dashboard_static"
    files = {}
    for route, name in STATIC_FILES.items():
        files[route] = ((folder / name).read_bytes(), CONTENT_TYPES[Path(name).suffix])
    return files


class _Handler(BaseHTTPRequestHandler):
    server: _DashboardHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S
    server_version = "fedrecon-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _refuse_method(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET and HEAD only\n",
                   "text/plain; charset=utf-8", extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _answer(self, *, with_body: bool) -> None:
        if not self.server.auth.allows(self.headers.get("Authorization")):
            self._send(HTTPStatus.UNAUTHORIZED, b"the dashboard needs its admin credential\n",
                       "text/plain; charset=utf-8", with_body=with_body,
                       extra={"WWW-Authenticate": 'Basic realm="fedrecon dashboard", charset="UTF-8"'})
            return
        path = self.path.split("?", 1)[0]
        if path == "/api/state":
            try:
                body = self.server.state.json()
            except Exception:  # a bug must not kill the dashboard thread; the page shows the status
                log.exception("dashboard: computing /api/state failed")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b'{"error": "internal error"}\n',
                           "application/json", with_body=with_body)
                return
            self._send(HTTPStatus.OK, body, "application/json", with_body=with_body)
            return
        static = self.server.files.get(path)
        if static is None:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8", with_body=with_body)
            return
        self._send(HTTPStatus.OK, static[0], static[1], with_body=with_body)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, *, with_body: bool = True,
              extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests go to the debug log (not stderr): one line per poll would drown the round events."""
        log.debug("dashboard %s: " + format, self.address_string(), *args)


class _DashboardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck connection never keeps the process alive
    block_on_close = False

    def __init__(self, address: tuple[str, int], state: DashboardState, auth: DashboardAuth,
                 files: dict[str, tuple[bytes, str]]) -> None:
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[0][0]
        super().__init__(address, _Handler)
        self.state = state
        self.auth = auth
        self.files = files

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser that goes away mid-answer (a closed tab) is routine: a debug line, not a traceback on
        the coordinator's stderr. Anything else is logged with its traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("dashboard: %s went away mid-answer", client_address)
            return
        log.exception("dashboard: answering %s failed", client_address)


@dataclass
class RunningDashboard:
    """A dashboard serving on ``host:port`` until ``stop``."""

    host: str
    port: int
    _server: _DashboardHTTPServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_dashboard(settings: DashboardSettings, store: SqlStore, live: LiveSource | None
                    ) -> RunningDashboard:
    """Serve the dashboard for ``store`` (every task in it) and ``live`` (the coordinator's view) on a
    thread. Raises ``ValueError`` for settings `DashboardSettings.check` refuses, ``OSError`` when the
    address cannot be bound."""
    settings.check()
    server = _DashboardHTTPServer((settings.host, settings.port), DashboardState(store, live),
                                  DashboardAuth(settings.credential), _static_files())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                              name="coordinator-dashboard", daemon=True)
    thread.start()
    return RunningDashboard(settings.host, server.server_address[1], server, thread)
