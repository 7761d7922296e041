"""The coordinator's commands: ``serve``, ``status``, ``export`` and ``token`` (registered in ``cli``).

Heavy imports (TensorFlow, SQLAlchemy, gRPC) happen inside each command so ``fedrecon --help`` stays fast.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedrecon.server.limits import Keepalive, ServerLimits

console = Console()
DEFAULT_STORE = "sqlite:///fedrecon.db"
StoreOption = Annotated[str, typer.Option(help="SQLAlchemy URL of the store (SQLite file by default)")]


_LIMITS = ServerLimits()
_KEEPALIVE = Keepalive()


def serve(
    task: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="task description, .toml or .json")],
    store: StoreOption = DEFAULT_STORE,
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
    max_message_mb: Annotated[float, typer.Option(min=0.01, help="largest gRPC message accepted or sent")]
    = 4.0,
    port_file: Annotated[Path | None, typer.Option(help="write the bound port here once listening")] = None,
    require_token: Annotated[bool, typer.Option(help="refuse calls without a valid client token "
                                                     "(fedrecon token issue)")] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain: serve over TLS")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(help="PEM CA: demand client certificates it signed "
                                                            "(mutual TLS)")] = None,
    init_model: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False,
        help="a model file (fedrecon export, or simulate's model.npz from either backend) to start a new "
             "task from; ignored if the task exists")]
    = None,
) -> None:
    """Run a coordinator for TASK until SIGTERM/SIGINT; every round and model version goes to STORE.

    Every flag is checked (task file, model file, TLS files, limits, the port) before the store is opened:
    a mistyped flag must not cost a live round. Exits 1 if shutting down lost accepted updates."""
    from fedrecon.server.app import TlsFiles, check_bindable, start_server
    from fedrecon.server.auth import TokenAuthInterceptor
    from fedrecon.server.coordinator import Coordinator
    from fedrecon.server.store import SqlStore
    from fedrecon.server.task import TaskSpec

    def refuse(message: str, err: BaseException | None = None) -> NoReturn:
        console.print(f"[red]{message}[/]", highlight=False)
        raise typer.Exit(2) from err

    try:
        spec = TaskSpec.load(task)
    except (ValueError, OSError) as err:
        refuse(f"cannot load task {task}: {err}", err)
    initial = None
    if init_model is not None:
        from fedrecon.core.model_spec import model_from_config
        from fedrecon.model_file import ModelFile, globals_for_model

        try:
            # By name, in the task's order; the first missing or differently shaped variable is named.
            initial = globals_for_model(ModelFile.load(init_model), model_from_config(spec.model),
                                        f"task {spec.name}")
        except (ValueError, OSError) as err:
            refuse(f"cannot use model {init_model} for task {spec.name}: {err}", err)
    if (tls_cert is None) != (tls_key is None) or (tls_client_ca is not None and tls_cert is None):
        refuse("TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)")
    tls = TlsFiles(tls_cert, tls_key, tls_client_ca) if tls_cert and tls_key else None
    try:
        if tls is not None:
            tls.check()
        limits = ServerLimits(
            coordinator_threads=max_workers, max_unary_calls=max_concurrent_rpcs,
            max_report_streams=max_report_streams, max_downloads=max_downloads,
            max_streams_per_credential=max_streams_per_credential, max_streams_per_peer=max_streams_per_peer,
            first_message_s=first_message_s, chunk_gap_s=chunk_gap_s, report_s=report_s,
            download_s=download_s, retry_hint_ms=retry_hint_ms)
        keepalive = Keepalive(time_s=keepalive_s, timeout_s=keepalive_timeout_s,
                              max_idle_s=max_connection_idle_s, max_age_s=max_connection_age_s,
                              max_age_grace_s=max_connection_age_grace_s, min_client_ping_s=min_client_ping_s)
    except ValueError as err:
        refuse(str(err), err)
    try:
        check_bindable(host, port)
    except OSError as err:
        refuse(f"cannot listen on {host}:{port}: {err}", err)

    sql = SqlStore(store)
    try:
        try:
            coordinator = Coordinator(sql, spec, initial_globals=initial)
        except ValueError as err:
            refuse(str(err), err)
        running = start_server(
            coordinator, host=host, port=port, max_message_bytes=int(max_message_mb * (1 << 20)),
            interceptors=[TokenAuthInterceptor(sql, retry_hint_ms=retry_hint_ms)] if require_token else [],
            tls=tls, limits=limits, keepalive=keepalive, shutdown_grace_s=shutdown_grace_s)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        if init_model is not None:
            console.print(f"task {spec.name}: version 0 is {init_model}" if coordinator.created_task else
                          f"task {spec.name} already exists in the store: --init-model {init_model} ignored")
        elif coordinator.created_task:  # say so: a store that lost its file would otherwise restart silently
            console.print(f"[yellow]task {spec.name} was not in the store {sql.url}: created it at model "
                          "version 0[/]", highlight=False)
        if coordinator.interrupted_rounds:
            console.print(f"marked {len(coordinator.interrupted_rounds)} interrupted round(s) failed: "
                          f"{coordinator.interrupted_rounds}")
        console.print(f"coordinator for task [bold]{spec.name}[/] listening on {running.address}; "
                      f"model version {coordinator.version}; store {sql.url}"
                      + ("; client tokens required" if require_token else "")
                      + ("; TLS" + (" with client certificates" if tls_client_ca else "") if tls else ""))
        if port_file is not None:  # written whole, then renamed: a reader never sees a half-written file
            partial = port_file.with_name(port_file.name + ".tmp")
            partial.write_text(str(running.port))
            partial.replace(port_file)
        sys.stdout.flush()
        stop.wait()
        console.print("shutting down: no new calls; the open round commits if it has enough reports")
        outcome = running.stop()
    finally:
        sql.close()
    if outcome.lost_updates:
        console.print(f"[red]shutdown: {outcome.message}[/]", highlight=False)
        raise typer.Exit(1)
    console.print(f"shutdown: {outcome.message}; stopped at model version {coordinator.version}",
                  highlight=False)


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: a value that is not meaningful is null."""
    return value if math.isfinite(value) else None


def _task_status(sql: Any, name: str, rounds: int) -> dict[str, Any]:
    task = sql.get_task(name)
    versions = sql.list_versions(name)
    all_rounds = sql.list_rounds(name)
    states = Counter(str(r.state) for r in all_rounds)
    return {
        "name": task.name,
        "created_at": task.created_at.isoformat(),
        "spec": task.spec,
        "latest_version": versions[-1].version if versions else None,
        "versions": [{"version": v.version, "parent": v.parent, "round_id": v.round_id,
                      "created_at": v.created_at.isoformat()} for v in versions],
        "rounds": {s: states.get(s, 0) for s in ("open", "aggregating", "committed", "failed")},
        "recent_rounds": [{
            "round_num": r.round_num, "round_id": r.round_id, "state": str(r.state),
            "base_version": r.base_version, "new_version": r.new_version, "selected": r.num_selected,
            "reported": r.num_reported, "accepted": r.num_accepted, "refused": r.num_refused,
            "total_weight": r.total_weight, "opened_at": r.opened_at.isoformat(),
            "closed_at": r.closed_at.isoformat() if r.closed_at else None,
            "failure_reason": r.failure_reason, "metrics": r.metrics} for r in all_rounds[-rounds:]],
        # Pooled over the version's evaluations; null where not meaningful (no examples, or sums stored
        # before the counts were bounded that overflow the float range).
        "evaluations": [{"version": e.version, "clients": e.num_clients, "examples": _finite_or_none(
            e.num_examples), **{k: _finite_or_none(v) for k, v in e.metrics().items()}}
                        for e in sql.evaluation_summaries(name)],
    }


def status(
    store: StoreOption = DEFAULT_STORE,
    task: Annotated[str | None, typer.Option(help="one task (default: all)")] = None,
    rounds: Annotated[int, typer.Option(min=0, help="how many recent rounds to list")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for machines")] = False,
) -> None:
    """Show tasks, model versions, rounds and evaluation metrics held in STORE."""
    from fedrecon.server.store import StoreError

    try:
        with _open_store(store) as sql:
            names = [task] if task else [t.name for t in sql.list_tasks()]
            report = {"store": sql.url, "tasks": [_task_status(sql, n, rounds) for n in names]}
    except StoreError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    if not report["tasks"]:
        console.print(f"no tasks in {report['store']}", markup=False)
    for t in report["tasks"]:
        r = t["rounds"]
        console.print(f"[bold]{escape(t['name'])}[/]: model version {t['latest_version']}; rounds committed "
                      f"{r['committed']}, failed {r['failed']}, open {r['open'] + r['aggregating']}")
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


@contextmanager
def _open_store(url: str) -> Iterator[Any]:
    """The store at ``url`` for one command, closed afterwards; opening it may raise ``StoreError``."""
    from fedrecon.server.store import SqlStore

    sql = SqlStore(url)
    try:
        yield sql
    finally:
        sql.close()


def _fail(err: Exception, code: int = 1) -> NoReturn:
    """Print an error for people (any text in it, e.g. a label, is printed as is, never as markup)."""
    console.print(Text(str(err), style="red"))
    raise typer.Exit(code) from err


def export(
    out: Annotated[Path, typer.Option(help="file to write (.npz)")],
    task: Annotated[str, typer.Option(help="task name")],
    store: StoreOption = DEFAULT_STORE,
    version: Annotated[int | None, typer.Option(help="model version (default: latest)")] = None,
) -> None:
    """Write a model version to a file the client library (personalize) and the simulator can load."""
    from fedrecon.model_file import ModelFile
    from fedrecon.server.checkpoints import globals_from_bytes
    from fedrecon.server.store import SqlStore, StoreError

    sql = SqlStore(store)
    try:
        spec = sql.get_task(task).spec
        record = sql.latest_version(task) if version is None else sql.get_version(task, version)
    except StoreError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(1) from err
    finally:
        sql.close()
    from fedrecon.core.model_spec import model_from_config

    names = [v.name for v in model_from_config(spec["model"]).global_variables]
    ModelFile(task=task, version=record.version, model_spec=spec["model"], names=names,
              arrays=globals_from_bytes(record.payload()[0], names), training=spec["training"],
              batch_size=spec["batch_size"]).save(out)
    console.print(f"wrote version {record.version} of {task} to {out}")


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
) -> None:
    """Issue a client token; it is printed once and cannot be recovered later."""
    from fedrecon.server.auth import issue_token
    from fedrecon.server.store import StoreError, require_label

    try:
        require_label(label)  # before the store is opened: a bad label stores nothing
    except ValueError as err:
        _fail(err, 2)
    try:
        with _open_store(store) as sql:
            credential_id, token = issue_token(sql, label, max_devices=max_devices)
    except (StoreError, ValueError) as err:
        _fail(err)
    devices = f", {max_devices} devices" if max_devices > 1 else ""
    console.print(Text(f"credential {credential_id} ({label}{devices}); the token, shown only now:"))
    typer.echo(token)


@token_app.command("revoke")
def token_revoke(
    credential_id: Annotated[int, typer.Argument(help="the credential id ('token list')")],
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Revoke a client token: calls with it are refused from then on."""
    from fedrecon.server.store import StoreError

    try:
        with _open_store(store) as sql:
            record = sql.revoke_credential(credential_id)
    except StoreError as err:  # UnknownCredential among them
        _fail(err)
    console.print(Text(f"credential {record.credential_id} ({record.label}) revoked at {record.revoked_at}"))


@token_app.command("list")
def token_list(store: StoreOption = DEFAULT_STORE) -> None:
    """List credentials (ids, labels, devices, state); secrets are not stored and cannot be shown."""
    from fedrecon.server.store import StoreError

    try:
        with _open_store(store) as sql:
            records = sql.list_credentials()
    except StoreError as err:
        _fail(err)
    table = Table(title="client credentials")
    for col in ("id", "label", "devices", "created", "state"):
        table.add_column(col)
    for r in records:  # a label is text, never markup (Text cells)
        table.add_row(str(r.credential_id), Text(r.label), str(r.max_devices),
                      r.created_at.isoformat(timespec="seconds"),
                      "active" if r.active else f"revoked {r.revoked_at:%Y-%m-%d %H:%M}")
    console.print(table)
