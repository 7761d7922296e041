"""A failover drill: coordinator replicas on one PostgreSQL database lose their leader, over and over,
while real clients train; writes what held.

    python benchmarks/failover_drill.py --store postgresql+psycopg://postgres@127.0.0.1:5432/postgres \\
        --out benchmarks/results/failover_drill.json [--repeats 3] [--replicas 3] [--lease-ttl-s 5]

``--store`` names a PostgreSQL server (any database on it the user may create databases from): the drill
creates a fresh database for the run and drops it afterwards. ``--replicas`` ``fedrecon serve`` processes
(``--replica-id replica-N``, one task, the same database) each reach the database through a TCP relay of
their own in this process, so the drill can cut one coordinator's store connection without touching the
others. ``--client-processes`` processes of the client library (``FederatedClient`` given every
coordinator's address) each run ``--clients-per-process`` devices training continuously on the synthetic
ratings data (or ``--data``, a MovieLens folder).

Each fault hits the coordinator holding the task's lease, mid-round (a round is open), and is repeated
``--repeats`` times:

- kill: SIGKILL; once a new leader committed, the killed replica restarts under its old name (a standby);
- pause: SIGSTOP until a new leader committed, then SIGCONT: the woken leader, whose lease ran out while it
  slept, must neither commit nor keep clients (fencing); a direct check-in to it must be refused;
- store cut: its relay stops carrying bytes (a partition: held, delivered when it heals) or resets every
  connection (``--store-cut-modes``, in turn; default ``partition,reset``); healed once a new leader
  committed; the old leader must then stand by. ``mid_pipeline`` is a partition at the worst moment: once
  the leader sent the database the first row of a pipelined insert (a round's participations) and not
  the rest, so its transaction holds the task's rows with no server timeout armed (the cause of a store
  cut with no takeover within 90 s, once in CI: see ``SqlStore.acquire_lease``).

Measured: ``takeover_seconds``, from the fault to the first version committed after it (its ``created_at``,
written by the new leader), median and max over all faults; ``versions_lost``: committed versions seen
during the run (their bytes hashed when first seen) that are missing or changed at the end, plus gaps in
the version numbers; ``double_commits``: store rows showing a version or a round committed twice (two rows
for one version number, two versions of one round, a version whose round is not committed into it, a
committed round without its version, a version not on top of its predecessor); ``updates_lost``: reports
acknowledged as accepted whose round the store holds neither as committed with that client's accepted
update nor as failed (an explicitly failed round tells its clients their update is not in the model:
counted apart, ``acknowledged_in_failed_rounds``); ``client_rounds_failed``: clients' rounds that did not
end in a committed version (refused, retries exhausted, or accepted in a round that failed), by cause.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc
import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from fedrecon.server.identity import Caller
from fedrecon.server.process import CoordinatorProcess, StoreRelay
from fedrecon.server.store import Outcome, RoundState, SqlStore, UnknownRound
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

TASK_NAME = "failover"
TASK = """
name = "failover"
batch_size = 5
[model]
kind = "matrix_factorization"
num_items = {num_items}
num_factors = 8
[rounds]
clients_per_round = 3
over_selection = 1.0
min_reports = 2
selection_timeout_s = 4.0
reporting_timeout_s = 20.0
retry_delay_s = [0.05, 0.3]
max_check_ins_per_minute = 600.0
"""
FAULT_WAIT_S = 90.0  # a fault with no new commit this long after it counts as a takeover that never came


# ----- a fresh database -------------------------------------------------------------------------------------
@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new database on the server of ``server_url`` for one run (SQLAlchemy URL of it), dropped after."""
    url = make_url(server_url)
    if url.get_backend_name() != "postgresql":
        raise SystemExit(f"--store must name a PostgreSQL server, got {url.get_backend_name()}")
    admin = psycopg.connect(host=url.host or "127.0.0.1", port=url.port or 5432, user=url.username,
                            password=url.password, dbname=url.database or "postgres", autocommit=True,
                            connect_timeout=10)
    name = f"fedrecon_failover_{secrets.token_hex(5)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            fresh = url.set(drivername="postgresql+psycopg", database=name)
            yield fresh.render_as_string(hide_password=False)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# ----- client processes -------------------------------------------------------------------------------------
def client_worker(args: argparse.Namespace) -> None:
    """A client process: ``--clients`` devices, each taking part in rounds until the stop file appears,
    writing one JSON line per round (its outcome, or the error that ended it)."""
    from fedrecon.client import FederatedClient, RetryPolicy
    from fedrecon.client.participant import NoAssignment
    from fedrecon.simulations.ratings import load_dataset

    data = load_dataset(args.data, seed=42)
    users = sorted(data.train)[args.first_user:args.first_user + args.clients]
    # Short RPC deadlines: a paused coordinator holds a call until its deadline, then the client moves on.
    retry = RetryPolicy(initial_s=0.05, max_s=0.5, give_up_after_s=60.0, rpc_timeout_s=8.0,
                        connect_timeout_s=20.0)
    stop = Path(args.stop_file)
    lock = threading.Lock()
    out = open(args.outcomes, "a", buffering=1)  # noqa: SIM115 (closed at the end of the process)

    def write(**line: object) -> None:
        with lock:
            out.write(json.dumps({"t": time.time(), **line}) + "\n")

    def device(user: int) -> None:
        client_id = f"user-{user}"
        client = FederatedClient(args.addresses, TASK_NAME, client_id, data.train[user], retry=retry)
        while not stop.exists():
            try:
                r = client.participate(max_wait_s=60)
                write(client=client_id, round_id=r.round_id, accepted=r.accepted, status=r.status,
                      message=r.message[:200])
            except grpc.RpcError as err:
                write(client=client_id, error=err.code().name, message=(err.details() or "")[:200])
            except NoAssignment as err:
                write(client=client_id, error="no_assignment", message=str(err)[:200])

    threads = [threading.Thread(target=device, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.close()


# ----- the drill --------------------------------------------------------------------------------------------
class Drill:
    def __init__(self, args: argparse.Namespace, store_url: str, folder: Path) -> None:
        from fedrecon.simulations.ratings import load_dataset

        self.args = args
        self.folder = folder
        self.store = SqlStore(store_url)  # the drill's own view, not through any relay
        url = make_url(store_url)
        self.task_file = folder / "task.toml"
        self.task_file.write_text(TASK.format(num_items=load_dataset(args.data, seed=42).num_items))
        self.relays = [StoreRelay((url.host or "127.0.0.1", url.port or 5432)) for _ in range(args.replicas)]
        # The mid-pipeline cut reads the protocol's framing: the relayed connections must not use TLS.
        clear = {"sslmode": "disable"} if "mid_pipeline" in args.store_cut_modes else {}
        self.urls = [url.set(host="127.0.0.1", port=r.port).update_query_dict(clear)
                     .render_as_string(hide_password=False) for r in self.relays]
        self.replicas: list[CoordinatorProcess | None] = [None] * args.replicas
        self.ports = [0] * args.replicas
        self.clients: list[Any] = []
        self.stop_file = folder / "stop"
        self.seen: dict[int, str] = {}  # version -> sha256 of its parameters, when first seen
        self.faults: list[dict[str, Any]] = []

    # ----- processes -----------------------------------------------------------------------------------
    def start_replica(self, i: int) -> None:
        """Start replica i (again: same name and port, so clients find it where it was)."""
        self.replicas[i] = CoordinatorProcess(
            self.task_file, self.urls[i], self.folder, port=self.ports[i], name=f"replica-{i}",
            # SIGTERM only ends the drill, when its clients are gone: no round to drain for (--drain-s 0).
            extra_args=["--replica-id", f"replica-{i}", "--lease-ttl-s", str(self.args.lease_ttl_s),
                        "--drain-s", "0"],
            timeout_s=120.0)
        self.ports[i] = self.replicas[i].port  # type: ignore[union-attr]

    def start(self) -> None:
        """The replicas, then the client processes; returns once a first version is committed (a client
        process imports TensorFlow, which takes minutes on a busy machine)."""
        self.start_replica(0)  # the first creates the task; the others find it (started side by side)
        others = [threading.Thread(target=self.start_replica, args=(i,))
                  for i in range(1, self.args.replicas)]
        for t in others:
            t.start()
        for t in others:
            t.join()
        if None in self.replicas:
            raise RuntimeError("a replica did not start")
        addresses = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        import subprocess

        for c in range(self.args.client_processes):
            self.clients.append(subprocess.Popen(
                [sys.executable, __file__, "--client-worker", "--addresses", addresses, "--data",
                 self.args.data, "--clients", str(self.args.clients_per_process), "--first-user",
                 str(c * self.args.clients_per_process), "--stop-file", str(self.stop_file), "--outcomes",
                 str(self.folder / f"clients-{c}.jsonl")],
                stdout=open(self.folder / f"clients-{c}.log", "ab"), stderr=subprocess.STDOUT))  # noqa: SIM115
        self.steady(timeout_s=1200.0)

    def stop(self) -> None:
        self.stop_file.touch()
        for p in self.clients:
            try:
                p.wait(timeout=180)
            except Exception:
                p.kill()
                p.wait()
        for r in self.relays:
            r.heal()
        for proc in self.replicas:
            if proc is not None:
                if proc.proc.poll() is None:
                    os.kill(proc.proc.pid, signal.SIGCONT)
                proc.stop()

    def close(self) -> None:
        for r in self.relays:
            r.close()
        self.store.close()

    # ----- observations --------------------------------------------------------------------------------
    def leader(self) -> int | None:
        """The replica holding an unexpired lease, if any."""
        lease = self.store.get_lease(TASK_NAME)
        if lease is None or lease.expires_at <= datetime.now(UTC):
            return None
        return int(lease.holder.rsplit("-", 1)[1])

    def latest(self) -> int:
        return self.store.latest_version(TASK_NAME, with_payload=False).version

    def remember_versions(self) -> None:
        for v in self.store.list_versions(TASK_NAME):
            if v.version not in self.seen:
                parameters = self.store.get_version(TASK_NAME, v.version).parameters or b""
                self.seen[v.version] = hashlib.sha256(parameters).hexdigest()

    def wait(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        give_up = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > give_up:
                return False
            time.sleep(0.1)
        return True

    def steady(self, timeout_s: float = 300.0) -> int:
        """Wait until one replica leads and a version was committed since now; then until a round is open
        (so the fault lands mid-round). The leader."""
        before = self.latest()
        if not self.wait(lambda: self.latest() > before and self.leader() is not None, timeout_s):
            raise RuntimeError(f"no commit within {timeout_s:g} s of steady running (version {before})")
        self.wait(lambda: any(r.state == RoundState.OPEN and r.num_reported > 0
                              for r in self.store.list_rounds(TASK_NAME, limit=2)), 20.0)
        leader = self.leader()
        assert leader is not None
        return leader

    def probe(self, i: int) -> str:
        """A direct check-in to replica i: its gRPC status and reason (the woken or healed old leader must
        answer UNAVAILABLE not_leader)."""
        with grpc.insecure_channel(f"127.0.0.1:{self.ports[i]}") as channel:
            try:
                pb_grpc.CoordinatorStub(channel).CheckIn(pb.CheckInRequest(
                    task_name=TASK_NAME, client_id=f"probe-{secrets.token_hex(3)}", protocol_version=1),
                    timeout=15)
                return "OK"
            except grpc.RpcError as err:
                return f"{err.code().name}: {(err.details() or '')[:120]}"

    # ----- faults --------------------------------------------------------------------------------------
    def fault(self, kind: str, repeat: int) -> None:
        leader = self.steady()
        self.remember_versions()
        proc = self.replicas[leader]
        assert proc is not None
        modes = self.args.store_cut_modes
        mode = modes[repeat % len(modes)] if kind == "store_cut" else None
        round_open = [r.round_num for r in self.store.list_rounds(TASK_NAME, limit=2)
                      if r.state == RoundState.OPEN]
        t0 = time.time()
        if kind == "kill":
            proc.kill()
        elif kind == "pause":
            os.kill(proc.proc.pid, signal.SIGSTOP)
        elif mode == "mid_pipeline":
            if not self.relays[leader].cut_mid_pipeline().wait(120.0):
                raise RuntimeError(f"replica-{leader} sent no pipelined insert within 120 s to cut it in")
            t0 = time.time()
        else:
            self.relays[leader].cut(mode or "partition")

        def new_commit() -> bool:
            return any(v.created_at.timestamp() > t0 for v in self.store.list_versions(TASK_NAME)[-3:])

        took_over = self.wait(new_commit, FAULT_WAIT_S)
        seconds = None
        if took_over:
            first = min(v.created_at.timestamp() for v in self.store.list_versions(TASK_NAME)
                        if v.created_at.timestamp() > t0)
            seconds = round(first - t0, 2)
        new_leader = self.leader()
        record: dict[str, Any] = {"kind": kind, "repeat": repeat, "leader": f"replica-{leader}",
                                  "mid_round": round_open, "takeover_seconds": seconds,
                                  "new_leader": None if new_leader is None else f"replica-{new_leader}"}
        if mode:
            record["cut_mode"] = mode
        # Undo the fault; the old leader must now stand by.
        if kind == "kill":
            self.start_replica(leader)
        elif kind == "pause":
            os.kill(proc.proc.pid, signal.SIGCONT)
        else:
            self.relays[leader].heal()
        if kind != "kill":
            time.sleep(1.0)  # a tick or two of the old leader after waking / healing
            record["old_leader_answers"] = self.probe(leader)
        self.faults.append(record)
        print(f"{kind:9} #{repeat + 1} replica-{leader} -> {record['new_leader']}: takeover "
              f"{seconds} s{' (' + mode + ')' if mode else ''}"
              + (f"; old leader then answers {record['old_leader_answers']}" if kind != "kill" else ""),
              flush=True)

    # ----- the audit -----------------------------------------------------------------------------------
    def audit(self) -> dict[str, Any]:
        self.remember_versions()
        versions = self.store.list_versions(TASK_NAME)
        by_number = {v.version: v for v in versions}
        versions_lost = sum(1 for number, digest in self.seen.items()
                            if number not in by_number or hashlib.sha256(
                                self.store.get_version(TASK_NAME, number).parameters or b"").hexdigest()
                            != digest)
        versions_lost += len(set(range(max(by_number) + 1)) - set(by_number))  # gaps
        rounds = {r.round_id: r for r in self.store.list_rounds(TASK_NAME)}
        numbers = Counter(v.version for v in versions)
        of_round = Counter(v.round_id for v in versions if v.round_id is not None)
        double = sum(n - 1 for n in numbers.values()) + sum(n - 1 for n in of_round.values())
        for v in versions[1:]:
            r = rounds.get(v.round_id or -1)
            if r is None or r.state != RoundState.COMMITTED or r.new_version != v.version \
                    or v.parent != v.version - 1 or r.base_version != v.version - 1:
                double += 1
        committed = [r for r in rounds.values() if r.state == RoundState.COMMITTED]
        double += sum(1 for r in committed if of_round[r.round_id] != 1)

        salt = bytes.fromhex(self.store.get_task(TASK_NAME).pseudonym_salt)
        from fedrecon.server.coordinator import pseudonym

        outcomes = [json.loads(line) for p in sorted(self.folder.glob("clients-*.jsonl"))
                    for line in p.read_text().splitlines() if line.strip()]
        lost = in_failed = 0
        failed: Counter[str] = Counter()
        for o in outcomes:
            if "error" in o:
                failed[f"error {o['error']}"] += 1
                continue
            if not o["accepted"]:
                failed[f"refused {o['status']}: {_gist(o['message'])}"] += 1
                continue
            try:
                record, participation = self.store.participation_in(
                    TASK_NAME, o["round_id"], pseudonym(salt, Caller.trusted(o["client"])))
            except UnknownRound:
                lost += 1
                continue
            if record.state == RoundState.FAILED:
                in_failed += 1
                failed[f"accepted, round then failed: {_gist(record.failure_reason or '')}"] += 1
            elif record.state != RoundState.COMMITTED or participation is None \
                    or participation.outcome != Outcome.ACCEPTED:
                lost += 1
        takeovers = [f["takeover_seconds"] for f in self.faults]
        measured = [t for t in takeovers if t is not None]
        state_counts = Counter(str(r.state) for r in rounds.values())
        return {
            "kills": sum(f["kind"] == "kill" for f in self.faults),
            "pauses": sum(f["kind"] == "pause" for f in self.faults),
            "store_cuts": sum(f["kind"] == "store_cut" for f in self.faults),
            "takeover_seconds": {"median": statistics.median(measured) if measured else None,
                                 "max": max(measured) if measured else None,
                                 "by_kind": {k: [f["takeover_seconds"] for f in self.faults if f["kind"] == k]
                                             for k in ("kill", "pause", "store_cut")}},
            "takeovers_missing": sum(t is None for t in takeovers),
            "double_commits": double,
            "versions_lost": versions_lost,
            "versions_committed": len(versions) - 1,
            "updates_lost": lost,
            "reports_acknowledged": sum(1 for o in outcomes if o.get("accepted")),
            "acknowledged_in_failed_rounds": in_failed,
            "client_rounds": len(outcomes),
            "client_rounds_failed": sum(failed.values()),
            "client_rounds_failed_by_cause": dict(failed.most_common()),
            "rounds": dict(sorted(state_counts.items())),
            "old_leader_answers": [f.get("old_leader_answers") for f in self.faults if f["kind"] != "kill"],
            "faults": self.faults,
        }


def _gist(message: str) -> str:
    """A refusal's message without its numbers, so like causes count together."""
    return "".join("#" if ch.isdigit() else ch for ch in message)[:90]


@contextmanager
def _run_folder(keep: Path | None) -> Iterator[Path]:
    """The run's working folder (task file, logs, client outcomes): ``keep`` (created, never deleted), else
    a temporary folder deleted after the run."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="fedrecon-failover-") as tmp:
        yield Path(tmp)


def machine_facts(url: str) -> dict[str, Any]:
    from coordinator_load import code_version

    with psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
                         connect_timeout=10) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "platform": platform.platform(),
            "postgresql": row[0] if row else None,
            "code": code_version()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                        help="a PostgreSQL server URL: the drill creates (and drops) its own database there")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/failover_drill.json"))
    parser.add_argument("--repeats", type=int, default=3, help="times each fault is repeated")
    parser.add_argument("--faults", default="kill,pause,store_cut", help="which faults, comma-separated")
    parser.add_argument("--store-cut-modes", default="partition,reset",
                        help="the store cuts' modes, in turn: partition, reset, mid_pipeline")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--lease-ttl-s", type=float, default=5.0)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--clients-per-process", type=int, default=3)
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a MovieLens folder")
    parser.add_argument("--keep-logs", type=Path, default=None,
                        help="a folder to keep the run's coordinator and client logs in (default: deleted)")
    # The client process's own arguments (the drill starts it as this script with --client-worker).
    parser.add_argument("--client-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--addresses", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--first-user", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stop-file", help=argparse.SUPPRESS)
    parser.add_argument("--outcomes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_worker:
        client_worker(args)
        return {}
    if args.replicas < 2:
        parser.error("--replicas must be at least 2 (a leader and a standby)")
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    if not kinds or set(kinds) - {"kill", "pause", "store_cut"}:
        parser.error(f"--faults takes kill, pause and store_cut, got {args.faults!r}")
    args.store_cut_modes = [m.strip() for m in args.store_cut_modes.split(",") if m.strip()]
    if not args.store_cut_modes or set(args.store_cut_modes) - {"partition", "reset", "mid_pipeline"}:
        parser.error("--store-cut-modes takes partition, reset and mid_pipeline")
    t_start = time.monotonic()
    with fresh_database(args.store) as url, _run_folder(args.keep_logs) as folder:
        drill = Drill(args, url, folder)
        try:
            facts = machine_facts(url)
            drill.start()
            print(f"{args.replicas} replicas (lease {args.lease_ttl_s:g} s), {args.client_processes} client "
                  f"processes x {args.clients_per_process} devices; faults: {', '.join(kinds)} x "
                  f"{args.repeats}", flush=True)
            for repeat in range(args.repeats):
                for kind in kinds:
                    drill.fault(kind, repeat)
            drill.steady()  # the task still makes progress after the last fault
        except BaseException:
            for i, proc in enumerate(drill.replicas):
                if proc is not None:
                    print(f"--- replica-{i} log (end) ---\n{proc.log_text()[-2500:]}", file=sys.stderr)
            for log in sorted(drill.folder.glob("clients-*.log")):
                print(f"--- {log.name} (end) ---\n{log.read_text()[-1500:]}", file=sys.stderr)
            raise
        finally:
            drill.stop()
        summary = drill.audit()
        drill.close()
    summary.update({"lease_ttl_s": args.lease_ttl_s, "replicas": args.replicas,
                    "client_processes": args.client_processes,
                    "clients_per_process": args.clients_per_process,
                    "data": Path(args.data).name, "seconds": round(time.monotonic() - t_start, 1),
                    "machine": facts})
    t = summary["takeover_seconds"]
    print(f"\ntakeover: median {t['median']} s, max {t['max']} s over {len(drill.faults)} faults "
          f"({summary['takeovers_missing']} without a takeover within {FAULT_WAIT_S:g} s); double commits "
          f"{summary['double_commits']}, versions lost {summary['versions_lost']} of "
          f"{summary['versions_committed']}; updates lost {summary['updates_lost']} of "
          f"{summary['reports_acknowledged']} acknowledged ({summary['acknowledged_in_failed_rounds']} in "
          f"rounds that then failed); client rounds failed {summary['client_rounds_failed']} of "
          f"{summary['client_rounds']}")
    for cause, n in summary["client_rounds_failed_by_cause"].items():
        print(f"  {n:4} {cause}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
