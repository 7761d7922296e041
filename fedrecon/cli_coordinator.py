"""The coordinator's commands: ``serve``, ``status``, ``export`` and ``token`` (registered in ``cli``).

Heavy imports (TensorFlow, SQLAlchemy, gRPC) happen inside each command so ``fedrecon --help`` stays fast.

What operators see: results on stdout (``token issue --quiet`` prints the token alone, for
``TOKEN=$(...)``); every error as one line on stderr and a non-zero exit, never a traceback: 2 when the
command must change (a bad flag or URL, a store or task that does not exist), 1 when the store failed at run
time (unreachable, locked, broken). ``serve`` logs to stderr (``--log-level``), a line per round event.
"""

from __future__ import annotations

import enum
import gc
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedrecon.cli_config import ConfigOption
from fedrecon.server.event_log import LogFormat, formatter
from fedrecon.server.limits import Keepalive, ServerLimits
from fedrecon.server.store.records import DEFAULT_LEASE_TTL_S, SchemaPolicy

if TYPE_CHECKING:
    from fedrecon.server.dashboard import DashboardSettings
    from fedrecon.server.store import SqlStore

console = Console()
DEFAULT_STORE = "sqlite:///fedrecon.db"
StoreOption = Annotated[str, typer.Option(
    envvar="FEDRECON_STORE",
    help="SQLAlchemy URL of the store: sqlite:///relative.db, sqlite:////absolute/path.db (four slashes) or "
         "postgresql+psycopg://USER@HOST/DATABASE")]
MigrateOption = Annotated[bool, typer.Option(
    envvar="FEDRECON_MIGRATE",
    help="bring the store's schema to this release's revision first (the default, as serve does); "
         "--no-migrate (or FEDRECON_MIGRATE=false, what a deployment that runs `fedrecon db upgrade` as a "
         "step of its own sets) changes no schema: the command refuses (exit 2) a store at another "
         "revision, and never creates one")]
"""``--migrate/--no-migrate`` of the commands besides serve that open a store (status, export, token): a
newer release's ``fedrecon status`` run by an operator in a --no-migrate deployment must not migrate the
database behind the coordinators' backs, nor create one."""


def _schema_policy(migrate: bool) -> SchemaPolicy:
    return SchemaPolicy.MIGRATE if migrate else SchemaPolicy.REQUIRE_HEAD
log = logging.getLogger("fedrecon.serve")


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def _fail(problem: BaseException | str, code: int = 1) -> NoReturn:
    """Print an error for people as ONE line on stderr (newlines in a driver's message are joined; any
    text in it, e.g. a label, is printed as is) and exit with ``code``."""
    text = " ".join(str(problem).split()) or type(problem).__name__
    typer.secho(text, err=True, fg=typer.colors.RED)
    raise typer.Exit(code) from (problem if isinstance(problem, BaseException) else None)


def _exit_code(err: BaseException) -> int:
    """2 when the command itself must change (the URL names no usable store, or a task, version or
    credential that does not exist), 1 when the store failed at run time (retrying may help)."""
    from fedrecon.server.store import (
        StoreUnopenable,
        UnknownCredential,
        UnknownTask,
        UnknownVersion,
    )

    return 2 if isinstance(err, StoreUnopenable | UnknownTask | UnknownVersion | UnknownCredential) else 1


@contextmanager
def _store(url: str, *, create: bool = False, schema: SchemaPolicy = SchemaPolicy.MIGRATE
           ) -> Iterator[SqlStore]:
    """The store at ``url`` for one command, closed afterwards. Opening it (see ``open_store``) or any
    store error in the body ends the command with one line and `_exit_code`. The store's own error logs
    (a fault is logged with its traceback, for a coordinator's log) are kept out of the command's output:
    the one line says it."""
    from fedrecon.server.store import StoreError, open_store

    quiet = logging.NullHandler()
    logging.getLogger("fedrecon.server").addHandler(quiet)
    try:
        sql = open_store(url, create=create, schema=schema)
        try:
            yield sql
        finally:
            sql.close()
    except StoreError as err:
        _fail(err, _exit_code(err))
    finally:
        logging.getLogger("fedrecon.server").removeHandler(quiet)


def _unknown_task(sql: SqlStore, name: str) -> NoReturn:
    """Exit 2 naming the tasks the store does hold: the usual cause is a typo or the wrong --store."""
    names = [t.name for t in sql.list_tasks()]
    held = f"it holds {', '.join(repr(n) for n in names)}" if names else "it holds no task yet"
    _fail(f"task {name!r} is not in the store {sql.url}; {held}", 2)


@contextmanager
def _serve_logging(level: LogLevel, kind: LogFormat = LogFormat.TEXT) -> Iterator[None]:
    """``serve``'s log: the package's records at ``level`` to stderr, one line each (text with the time, or
    one JSON object: ``event_log``), for as long as the command runs (then the handler goes: tests run
    several commands in one process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(kind))
    package = logging.getLogger("fedrecon")
    previous = package.level
    package.addHandler(handler)
    package.setLevel(level.upper())
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(previous)


_LIMITS = ServerLimits()
_KEEPALIVE = Keepalive()


def serve(
    task: Annotated[Path, typer.Option(help="task description, .toml or .json")],
    store: StoreOption = DEFAULT_STORE,
    config: ConfigOption = None,
    migrate: Annotated[bool, typer.Option(
        help="migrate the store's schema on start (the default); --no-migrate for deployments that run "
             "`fedrecon db upgrade` as a step of their own: serve then changes no schema and refuses to "
             "start (exit 2) unless the store is at this release's revision")] = True,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="0 picks a free port")] = 50051,
    max_workers: Annotated[int, typer.Option(
        min=1, help="threads running coordinator calls (a call waiting on the store holds one)")]
    = _LIMITS.coordinator_threads,
    max_concurrent_rpcs: Annotated[int, typer.Option(
        min=1, help="unary calls (CheckIn, GetLatestModel, ReportEvaluation) in progress or queued beyond "
                    "which new ones are refused with RESOURCE_EXHAUSTED and a retry hint; streams have "
                    "their own limits")] = _LIMITS.max_unary_calls,
    max_report_streams: Annotated[int, typer.Option(
        min=1, help="ReportUpdate streams open at once (each may hold an update in memory)")]
    = _LIMITS.max_report_streams,
    max_downloads: Annotated[int, typer.Option(min=1, help="DownloadModel streams open at once")]
    = _LIMITS.max_downloads,
    max_streams_per_credential: Annotated[int, typer.Option(
        min=1, help="streams one client token or certificate may hold open")]
    = _LIMITS.max_streams_per_credential,
    max_streams_per_peer: Annotated[int | None, typer.Option(
        min=1, help="streams one network address may hold open when no credential is required "
                    "(trusted-network mode); default: no limit")] = _LIMITS.max_streams_per_peer,
    first_message_s: Annotated[float, typer.Option(
        min=0.001, help="a report stream must send its header within this")] = _LIMITS.first_message_s,
    chunk_gap_s: Annotated[float, typer.Option(
        min=0.001, help="and each next message within this")] = _LIMITS.chunk_gap_s,
    report_s: Annotated[float, typer.Option(
        min=0.001, help="and be complete within this")] = _LIMITS.report_s,
    download_s: Annotated[float, typer.Option(
        min=0.001, help="a download must be read to its end within this")] = _LIMITS.download_s,
    retry_hint_ms: Annotated[int, typer.Option(
        min=0, help="retry hint sent with RESOURCE_EXHAUSTED (no slot) and UNAVAILABLE (store outage)")]
    = _LIMITS.retry_hint_ms,
    keepalive_s: Annotated[float, typer.Option(
        min=0.001, help="ping a quiet connection after this")] = _KEEPALIVE.time_s,
    keepalive_timeout_s: Annotated[float, typer.Option(
        min=0.001, help="drop it if the ping is not answered within this")] = _KEEPALIVE.timeout_s,
    max_connection_idle_s: Annotated[float, typer.Option(
        min=0.001, help="close a connection without calls after this")] = _KEEPALIVE.max_idle_s,
    max_connection_age_s: Annotated[float, typer.Option(
        min=0.001, help="retire any connection after this (clients reconnect)")] = _KEEPALIVE.max_age_s,
    max_connection_age_grace_s: Annotated[float, typer.Option(
        min=0, help="time a retired connection's calls get to finish")] = _KEEPALIVE.max_age_grace_s,
    min_client_ping_s: Annotated[float, typer.Option(
        min=0.001, help="clients pinging more often than this without data are warned, then dropped")]
    = _KEEPALIVE.min_client_ping_s,
    shutdown_grace_s: Annotated[float, typer.Option(
        min=0, help="on SIGTERM, how long a due commit is retried while the store is unavailable; after "
                    "it, the process exits 1 and says which accepted updates were lost")] = 30.0,
    drain_s: Annotated[float, typer.Option(
        min=0, help="on SIGTERM, first let the open round finish: no client is assigned any more and health "
                    "says NOT_SERVING, but the clients already selected may report for up to this long, so "
                    "a restart does not fail a round about to complete (0: close it at once)")] = 20.0,
    max_message_mb: Annotated[float, typer.Option(min=0.01, help="largest gRPC message accepted or sent")]
    = 4.0,
    port_file: Annotated[Path | None, typer.Option(help="write the bound port here once listening")] = None,
    replica_id: Annotated[str | None, typer.Option(
        help="this coordinator's name in the task's lease: one coordinator leads a task at a time, others "
             "stand by and take over when its lease runs out. Give a restarted coordinator the same name "
             "(e.g. the host or pod name) to lead again at once; default: host, process id and a random "
             "part, so a restart after a crash waits for the old lease to run out")] = None,
    lease_ttl_s: Annotated[float, typer.Option(
        min=1.0, help="how long a lead lasts without renewal (renewed every third of it): a standby "
                      "takes over within this long of a dead leader's last renewal")] = DEFAULT_LEASE_TTL_S,
    require_token: Annotated[bool, typer.Option(help="refuse calls without a valid client token "
                                                     "(fedrecon token issue)")] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain: serve over TLS")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(help="PEM CA: demand client certificates it signed "
                                                            "(mutual TLS)")] = None,
    init_model: Annotated[Path | None, typer.Option(
        help="a model file (fedrecon export, or simulate's model.npz from either backend; for a keras "
             "task also a saved .keras model) to start a new task from; ignored if the task exists")]
    = None,
    log_level: Annotated[LogLevel, typer.Option(
        help="what to log on stderr: info shows a line per round event (opened, selected, committed or "
             "failed, with figures)")] = LogLevel.INFO,
    log_format: Annotated[LogFormat, typer.Option(
        help="text: readable lines; json: one JSON object per line with the event's name and figures (no "
             "secret, token or raw client id in either)")] = LogFormat.TEXT,
    metrics_port: Annotated[int | None, typer.Option(
        min=0, max=65535, help="serve Prometheus metrics on this port at /metrics (default: off)")] = None,
    metrics_host: Annotated[str, typer.Option(
        help="address of the metrics endpoint (it has no authentication: keep it on a private network)")]
    = "127.0.0.1",
    health_probe_s: Annotated[float, typer.Option(
        min=0.05, help="the gRPC health service says SERVING while a store probe this often succeeds "
                       "(grpc.health.v1.Health, no token needed)")] = 5.0,
    reflection: Annotated[bool, typer.Option(
        help="offer gRPC server reflection (for grpcurl and similar tools)")] = False,
    dashboard_port: Annotated[int | None, typer.Option(
        min=0, max=65535, help="serve the read-only web dashboard on this port (0 picks a free one; "
                               "default: no dashboard)")] = None,
    dashboard_host: Annotated[str, typer.Option(
        help="address the dashboard listens on; any but a loopback one needs --dashboard-credential-file")]
    = "127.0.0.1",
    dashboard_credential_file: Annotated[Path | None, typer.Option(
        help="file holding the dashboard's admin credential (one line, at least 16 characters): every "
             "request must give it, as the password of HTTP Basic (any user name) or as a Bearer token")]
    = None,
) -> None:
    """Run a coordinator for TASK until SIGTERM/SIGINT; every round and model version goes to STORE.

    Every option can also be set by a FEDRECON_<OPTION> environment variable (FEDRECON_STORE,
    FEDRECON_PORT, FEDRECON_TLS_KEY, ...) or a key of --config FILE.toml (store, port, tls_key, ...); a flag
    wins over the environment, which wins over the file.

    Every flag is checked (task file, model file, TLS files, limits, the port) before the store is opened:
    a mistyped flag must not cost a live round. Exits 1 if shutting down lost accepted updates."""
    del config  # read by its callback: its values are the other options' defaults
    with _serve_logging(log_level, log_format):  # the log goes to stderr while serving, a line per event
        from fedrecon.server.app import TlsFiles, check_bindable, start_server
        from fedrecon.server.auth import TokenAuthInterceptor
        from fedrecon.server.coordinator import Coordinator
        from fedrecon.server.task import TaskSpec

        def refuse(message: str) -> NoReturn:
            _fail(message, 2)

        if not task.is_file():
            refuse(f"task file {task} {'is a folder' if task.is_dir() else 'does not exist'}")
        try:
            spec = TaskSpec.load(task)
        except (ValueError, OSError, KeyError, TypeError) as err:
            refuse(f"cannot load task {task}: {err}")
        initial = None
        if init_model is not None:
            from fedrecon.core.model_spec import model_from_config
            from fedrecon.model_file import ModelFile, globals_for_model

            if not init_model.is_file():
                what = "is a folder" if init_model.is_dir() else "does not exist"
                refuse(f"model file {init_model} {what}")
            try:
                if init_model.suffix == ".keras":  # a saved Keras model of the task's architecture
                    from fedrecon.core.keras_spec import globals_from_keras_file

                    if spec.model.get("kind") != "keras":
                        raise ValueError(f"the task's model is {spec.model.get('kind')!r}, not keras")
                    initial = globals_from_keras_file(spec.model, init_model)
                else:
                    # By name, in the task's order; the first missing or differently shaped variable is named.
                    initial = globals_for_model(ModelFile.load(init_model), model_from_config(spec.model),
                                                f"task {spec.name}")
            except (ValueError, OSError) as err:
                refuse(f"cannot use model {init_model} for task {spec.name}: {err}")
        if (tls_cert is None) != (tls_key is None) or (tls_client_ca is not None and tls_cert is None):
            refuse("TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)")
        tls = TlsFiles(tls_cert, tls_key, tls_client_ca) if tls_cert and tls_key else None
        try:
            if tls is not None:
                tls.check()
            limits = ServerLimits(
                coordinator_threads=max_workers, max_unary_calls=max_concurrent_rpcs,
                max_report_streams=max_report_streams, max_downloads=max_downloads,
                max_streams_per_credential=max_streams_per_credential,
                max_streams_per_peer=max_streams_per_peer,
                first_message_s=first_message_s, chunk_gap_s=chunk_gap_s, report_s=report_s,
                download_s=download_s, retry_hint_ms=retry_hint_ms)
            keepalive = Keepalive(time_s=keepalive_s, timeout_s=keepalive_timeout_s,
                                  max_idle_s=max_connection_idle_s, max_age_s=max_connection_age_s,
                                  max_age_grace_s=max_connection_age_grace_s,
                                  min_client_ping_s=min_client_ping_s)
        except ValueError as err:
            refuse(str(err))
        try:
            check_bindable(host, port)
        except OSError as err:
            refuse(f"cannot listen on {host}:{port}: {err}")
        if metrics_port is not None:
            try:
                check_bindable(metrics_host, metrics_port)
            except OSError as err:
                refuse(f"cannot serve metrics on {metrics_host}:{metrics_port}: {err}")
        dashboard = _dashboard_settings(dashboard_port, dashboard_host, dashboard_credential_file)

        with _store(store, create=migrate, schema=_schema_policy(migrate)) as sql:
            try:
                coordinator = Coordinator(sql, spec, initial_globals=initial, replica_id=replica_id,
                                          lease_ttl_s=lease_ttl_s)
            except ValueError as err:
                refuse(str(err))
            if coordinator.created_task:  # the coordinator logged it; a wrong --store is the usual cause
                others = [t.name for t in sql.list_tasks() if t.name != spec.name]
                if others:
                    log.warning("the store %s holds other tasks (%s): is it the store you meant?", sql.url,
                                ", ".join(others))
            auth = [TokenAuthInterceptor(sql, retry_hint_ms=retry_hint_ms)] if require_token else []
            try:
                running = start_server(
                    coordinator, host=host, port=port, max_message_bytes=int(max_message_mb * (1 << 20)),
                    interceptors=auth, tls=tls, limits=limits, keepalive=keepalive,
                    shutdown_grace_s=shutdown_grace_s, drain_s=drain_s, health_probe_s=health_probe_s,
                    reflection=reflection,
                    metrics_port=metrics_port, metrics_host=metrics_host, dashboard=dashboard)
            except ValueError as err:  # settings no round could complete with (a masked update too large)
                refuse(str(err))
            except OSError as err:  # taken between the check and the bind
                refuse(f"cannot listen on {host}:{port} (or metrics on {metrics_host}:{metrics_port}): {err}"
                       if metrics_port is not None else f"cannot listen: {err}")
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            if init_model is not None:
                log.info(f"task {spec.name}: version 0 is {init_model}" if coordinator.created_task else
                         f"task {spec.name} already exists in the store: --init-model {init_model} ignored")
            if coordinator.interrupted_rounds:
                log.warning("marked %d interrupted round(s) failed: %s", len(coordinator.interrupted_rounds),
                            coordinator.interrupted_rounds)
            log.info("coordinator for task %s listening on %s; model version %d; store %s%s%s; %s", spec.name,
                     running.address, coordinator.version, sql.url,
                     "; client tokens required" if require_token else "",
                     ("; TLS" + (" with client certificates" if tls_client_ca else "")) if tls else "",
                     "leading as " + coordinator.replica_id if coordinator.leading
                     else "STANDING BY: " + coordinator.standby_reason,
                     extra={"event": "listening", "figures": {
                         "task": spec.name, "address": running.address, "model_version": coordinator.version,
                         "leading": coordinator.leading, "metrics": running.metrics_endpoint.url
                         if running.metrics_endpoint else None}})
            if running.metrics_endpoint is not None:
                log.info("Prometheus metrics on %s", running.metrics_endpoint.url)
            # What start-up built (imports, the coordinator, its store engine) lives as long as the process:
            # frozen out of the collector's generations, so the full collections that the per-report
            # garbage triggers do not walk it every time (they did, at a measurable share of a report's CPU).
            gc.freeze()
            if running.dashboard is not None:
                log.info("dashboard on %s%s", running.dashboard.url,
                         " (admin credential required)" if dashboard and dashboard.credential else "")
            if port_file is not None:  # written whole, then renamed: a reader never sees a half-written file
                partial = port_file.with_name(port_file.name + ".tmp")
                partial.write_text(str(running.port))
                partial.replace(port_file)
            stop.wait()
            log.info("shutting down: %s",
                     f"no new clients; the open round's may report for up to {drain_s:g} s" if drain_s > 0
                     else "no new calls; the open round commits if it has enough reports")
            outcome = running.stop()
        if outcome.lost_updates:
            log.error("shutdown: %s", outcome.message)
            raise typer.Exit(1)
        log.info("shutdown: %s; stopped at model version %d", outcome.message, coordinator.version)


def _dashboard_settings(port: int | None, host: str, credential_file: Path | None
                        ) -> DashboardSettings | None:
    """The dashboard ``serve`` was asked for, checked before the store is opened (exit 2 with one line):
    a readable credential, never an exposed page without one, a free port."""
    from fedrecon.server.app import check_bindable
    from fedrecon.server.dashboard import DashboardSettings, read_credential_file

    if port is None:
        if credential_file is not None or host != "127.0.0.1":
            _fail("--dashboard-host and --dashboard-credential-file need --dashboard-port", 2)
        return None
    try:
        credential = read_credential_file(credential_file) if credential_file is not None else None
        settings = DashboardSettings(host=host, port=port, credential=credential)
        settings.check()
    except ValueError as err:
        _fail(err, 2)
    try:
        check_bindable(host, port)
    except OSError as err:
        _fail(f"cannot listen on {host}:{port} for the dashboard: {err}", 2)
    return settings


def _live_round(store_round: dict[str, Any] | None, live: dict[str, Any] | None, name: str
                ) -> dict[str, Any] | None:
    """The live round of task ``name``: from the running coordinator when ``live`` (its metrics, see
    ``scrape_live``) is that task's leader, else the open round as the store last recorded it (None: none;
    a coordinator standing by runs no round, the leader's progress is in the store)."""
    if live is not None and live.get("task") == name and live.get("leader"):
        r = live["live_round"]
        return None if r is None else {"source": "coordinator", "url": live["url"], **r}
    if store_round is None:
        return None
    o = store_round
    return {"source": "store", "round_num": o["round_num"], "round_id": o["round_id"], "phase": o["state"],
            "base_version": o["base_version"], "selected": o["selected"], "reporting": o["reported"],
            "accepted": o["accepted"], "goal": o["target"], "min_reports": o["min_reports"],
            "opened_at": o["opened_at"], "deadline": o["deadline"], "seconds_left": o["seconds_left"]}


def _task_status(sql: SqlStore, name: str, rounds: int, live: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    from fedrecon.server.store import UnknownTask
    from fedrecon.server.task_report import task_report

    try:
        report = task_report(sql, name, recent_rounds=rounds)
    except UnknownTask:
        _unknown_task(sql, name)
    report["live_round"] = _live_round(report["open_round"], live, name)
    return report


def _privacy_line(p: dict[str, Any]) -> str:
    budget = f" of the budget {p['epsilon_budget']:g}" if p.get("epsilon_budget") is not None else ""
    sampling = ("no amplification by sampling" if p.get("population") is None
                else f"population {p['population']}, sampling assumed uniformly random")
    return (f"  privacy: epsilon {p['epsilon']:.4g}{budget} spent at delta {p['delta']:g} after "
            f"{p['rounds_accounted']} rounds (noise multiplier {p['noise_multiplier']:g}, clip "
            f"{p['clip']:g}, {sampling}, {p['accountant']} accountant)")


def _open_round_line(o: dict[str, Any]) -> str:
    """The live round in one line; a deadline long past means no coordinator is running it any more."""
    left = o["seconds_left"]
    if left >= 0:
        when = f"deadline {o['deadline'][11:19]} UTC (in {left:.0f} s)"
    else:
        when = (f"deadline {o['deadline'][11:19]} UTC passed {-left:.0f} s ago: is the coordinator running? "
                "(it marks the round failed when it starts again)")
    return (f"  open round {o['round_num']} ({o['state']}, on version {o['base_version']}): {o['selected']} "
            f"selected, {o['reported']} reported ({o['accepted']} accepted, {o['refused']} refused) of the "
            f"{o['target']} it commits at, at least {o['min_reports']} by the {when}")


def _live_round_line(o: dict[str, Any]) -> str:
    """The live round as the running coordinator holds it, in one line."""
    return (f"  live round {o['round_num']} ({o['phase']}, on version {o['base_version']}): {o['selected']} "
            f"selected, {o['reporting']} reported ({o['accepted']} accepted) of the {o['goal']} it commits "
            f"at, at least {o['min_reports']} by the deadline {o['deadline'][11:19]} UTC (in "
            f"{o['seconds_left']:.0f} s); from the coordinator at {o['url']}")


def status(
    store: StoreOption = DEFAULT_STORE,
    task: Annotated[str | None, typer.Option(help="one task (default: all)")] = None,
    rounds: Annotated[int, typer.Option(min=0, help="how many recent rounds to list")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for machines")] = False,
    metrics_url: Annotated[str | None, typer.Option(
        help="the running coordinator's metrics endpoint (serve --metrics-port), HOST:PORT or a URL: the "
             "live round is read from it, and from the store when it cannot be reached")] = None,
    migrate: MigrateOption = True,
) -> None:
    """Show tasks, model versions, the live round, recent rounds and evaluation metrics held in STORE.

    A store that does not exist is an error (exit 2): status never creates one."""
    live, unreachable = None, None
    if metrics_url is not None:
        from fedrecon.server.metrics import scrape_live

        try:
            live = scrape_live(metrics_url)
        except (OSError, ValueError) as err:  # the coordinator is down or not there: the store tells
            unreachable = f"{metrics_url}: {' '.join(str(err).split())[:200]}"
    with _store(store, schema=_schema_policy(migrate)) as sql:
        names = [task] if task else [t.name for t in sql.list_tasks()]
        report: dict[str, Any] = {"store": sql.url,
                                  "tasks": [_task_status(sql, n, rounds, live) for n in names]}
    if metrics_url is not None:
        report["coordinator"] = ({"url": live["url"], "task": live["task"], "leader": live["leader"],
                                  "model_version": live["model_version"]} if live is not None
                                 else {"url": metrics_url, "unreachable": unreachable})
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    if unreachable is not None:
        console.print(f"coordinator not reachable ({unreachable}): the live round is the store's last record",
                      markup=False, highlight=False, soft_wrap=True)
    if not report["tasks"]:
        console.print(f"no tasks in {report['store']}", markup=False)
    for t in report["tasks"]:
        r = t["rounds"]
        console.print(f"[bold]{escape(t['name'])}[/]: model version {t['latest_version']}; rounds committed "
                      f"{r['committed']}, failed {r['failed']}, open {r['open'] + r['aggregating']}")
        live_round = t["live_round"]
        if live_round is not None and live_round["source"] == "coordinator":
            console.print(_live_round_line(live_round), markup=False, highlight=False, soft_wrap=True)
        elif t["open_round"] is not None:
            console.print(_open_round_line(t["open_round"]), markup=False, highlight=False, soft_wrap=True)
        if t["privacy"] is not None:
            console.print(_privacy_line(t["privacy"]), markup=False, highlight=False, soft_wrap=True)
        table = Table(title=Text(f"recent rounds of {t['name']}"))
        for col in ("round", "state", "version", "selected", "accepted", "refused", "train loss", "note"):
            table.add_column(col, justify="right" if col not in ("state", "note") else "left")
        for x in t["recent_rounds"]:
            loss = x["metrics"].get("train_loss")
            table.add_row(str(x["round_num"]), x["state"],
                          f"{x['base_version']}->{x['new_version']}" if x["new_version"] is not None
                          else str(x["base_version"]), str(x["selected"]), str(x["accepted"]),
                          str(x["refused"]), f"{loss:.4f}" if loss is not None else "-",
                          Text(x["failure_reason"] or ""))
        console.print(table)
        for e in t["evaluations"][-5:]:
            console.print(f"  evaluation of version {e['version']}: {e['clients']} clients, "
                          f"{_number(e['examples'], '.0f')} examples, RMSE {_number(e['rmse'], '.4f')}, "
                          f"accuracy {_number(e['accuracy'], '.4f')}", markup=False, highlight=False)


def _number(value: float | None, spec: str) -> str:
    """A metric for people: "n/a" when it is not meaningful (see ``EvaluationSummary.metrics``)."""
    return "n/a" if value is None else format(value, spec)


def export(
    out: Annotated[Path, typer.Option(help="file to write: .npz (a fedrecon model file), or .keras for a "
                                           "keras task (a Keras model an app loads with keras.saving)")],
    task: Annotated[str, typer.Option(help="task name")],
    store: StoreOption = DEFAULT_STORE,
    version: Annotated[int | None, typer.Option(help="model version (default: latest)")] = None,
    migrate: MigrateOption = True,
) -> None:
    """Write a model version to a file the client library (personalize) and the simulator can load."""
    from fedrecon.server.store import UnknownTask, UnknownVersion

    if out.is_dir():
        _fail(f"--out {out} is a folder: name the file to write, e.g. {out / 'model.npz'}", 2)
    if not out.parent.is_dir():
        _fail(f"cannot write {out}: the folder {out.parent} does not exist", 2)
    with _store(store, schema=_schema_policy(migrate)) as sql:
        try:
            spec = sql.get_task(task).spec
            record = sql.latest_version(task) if version is None else sql.get_version(task, version)
        except UnknownTask:
            _unknown_task(sql, task)
        except UnknownVersion as err:
            latest = sql.latest_version(task, with_payload=False).version
            _fail(f"{err} (its versions are 0 to {latest})", 2)
    # TensorFlow only now: its start-up lines on stderr must not come before a one-line store error.
    from fedrecon.core.model_spec import model_from_config
    from fedrecon.model_file import ModelFile
    from fedrecon.server.checkpoints import globals_from_bytes

    model = model_from_config(spec["model"])
    names = [v.name for v in model.global_variables]
    arrays = globals_from_bytes(record.payload()[0], names)
    from fedrecon.core.keras_spec import KerasDescribedModel

    # A keras description is exported with its variable table, so an app needs no build to read it.
    described = model.config() if isinstance(model, KerasDescribedModel) else spec["model"]
    try:
        if out.suffix == ".keras":
            from fedrecon.core.keras_spec import save_keras_file

            if spec["model"].get("kind") != "keras":
                _fail(f"--out {out}: task {task} trains {spec['model'].get('kind')!r}, not a keras model; "
                      "write a .npz", 2)
            save_keras_file(described, arrays, out)
        else:
            ModelFile(task=task, version=record.version, model_spec=described, names=names, arrays=arrays,
                      training=spec["training"], batch_size=spec["batch_size"],
                      extra={"item_ids": list(spec["item_ids"])} if spec.get("item_ids") else {}).save(out)
    except OSError as err:
        _fail(f"cannot write {out}: {err.strerror or err}", 2)
    console.print(f"wrote version {record.version} of {task} to {out}", markup=False, highlight=False)


token_app = typer.Typer(help="Client tokens: issue, revoke, list (kept in the store as salted hashes).",
                        no_args_is_help=True, rich_markup_mode=None)


@token_app.command("issue")
def token_issue(
    label: Annotated[str, typer.Option(help="who or what the token is for (shown by 'token list'): 1 to 200 "
                                            "printable characters")],
    store: StoreOption = DEFAULT_STORE,
    max_devices: Annotated[int, typer.Option(
        min=1, max=2**31 - 1, help="devices this token may speak for: 1 (default) is one device; more for a "
                                   "gateway, whose devices are told apart by their client ids")] = 1,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="print the token alone on stdout, for TOKEN=$(fedrecon token issue ... -q)")]
    = False,
    migrate: MigrateOption = True,
) -> None:
    """Issue a client token; it is printed once and cannot be recovered later.

    Like serve, it creates the store when there is none yet (tokens are often issued before the
    coordinator first starts), and says so on stderr: serve --require-token must name the same store.
    With --no-migrate it creates none (run `fedrecon db upgrade` first), as serve --no-migrate."""
    from fedrecon.server.auth import issue_token
    from fedrecon.server.store import StoreError, StoreNotFound, open_store, require_label

    try:
        require_label(label)  # before the store is opened: a bad label stores nothing
    except ValueError as err:
        _fail(err, 2)
    try:  # does it exist? (creating and changing nothing: the notice below must be true)
        probe = open_store(store, create=False, schema=SchemaPolicy.AS_FOUND)
        try:
            created = probe.schema_revision() is None  # an empty PostgreSQL database gets its tables
        finally:
            probe.close()
    except StoreNotFound:
        created = True
    except StoreError:  # any other problem is told by _store below
        created = False
    with _store(store, create=migrate, schema=_schema_policy(migrate)) as sql:
        try:
            credential_id, token = issue_token(sql, label, max_devices=max_devices)
        except ValueError as err:
            _fail(err, 2)
        url = sql.url
    if created:
        typer.echo(f"there was no store at {url}: created it (serve --require-token must use the same "
                   "--store)", err=True)
    if not quiet:
        devices = f", {max_devices} devices" if max_devices > 1 else ""
        console.print(Text(f"credential {credential_id} ({label}{devices}); the token, shown only now:"),
                      soft_wrap=True)
    typer.echo(token)


@token_app.command("revoke")
def token_revoke(
    credential_id: Annotated[int, typer.Argument(help="the credential id ('token list')")],
    store: StoreOption = DEFAULT_STORE,
    migrate: MigrateOption = True,
) -> None:
    """Revoke a client token: calls with it are refused from then on."""
    with _store(store, schema=_schema_policy(migrate)) as sql:
        record = sql.revoke_credential(credential_id)  # UnknownCredential: exit 2
    console.print(Text(f"credential {record.credential_id} ({record.label}) revoked at {record.revoked_at}"),
                  soft_wrap=True)


@token_app.command("list")
def token_list(store: StoreOption = DEFAULT_STORE, migrate: MigrateOption = True) -> None:
    """List credentials (ids, labels, devices, state); secrets are not stored and cannot be shown."""
    with _store(store, schema=_schema_policy(migrate)) as sql:
        records = sql.list_credentials()
    table = Table(title="client credentials")
    for col in ("id", "label", "devices", "created", "state"):
        table.add_column(col)
    for r in records:  # a label is text, never markup (Text cells)
        table.add_row(str(r.credential_id), Text(r.label), str(r.max_devices),
                      r.created_at.isoformat(timespec="seconds"),
                      "active" if r.active else f"revoked {r.revoked_at:%Y-%m-%d %H:%M}")
    console.print(table)
