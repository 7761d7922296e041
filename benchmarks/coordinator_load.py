"""Coordinator load: N simulated clients over loopback for a few FedRecon rounds with the MovieLens model.

    python benchmarks/coordinator_load.py --data ../shared/data/movielens/ml-1m-2998u \
        --clients 100 1000 --rounds 3 --out benchmarks/results/coordinator_load.json

For each N a fresh coordinator is started as its own process (``python -m fedrecon.cli serve`` on
127.0.0.1, port 0, the default 32 gRPC worker threads, a new SQLite store in a temporary folder), so the
memory and CPU measured are the coordinator's alone. The task is matrix factorization over the dataset's
items (``--factors`` factors, user/item biases, initial offset = mean training rating) with the paper's
reference FedRecon configuration; each round wants exactly N reports (``clients_per_round = min_reports =
N``, no over-selection, generous timeouts, ``max_rounds = R``). The first N training users
(``sorted(train)``) are N ``FederatedClient`` objects in this process, sharing a few gRPC channels; every
round all N ``participate()`` at once on a thread pool of N threads (every selected client must report for
the round to commit), and the next round starts when all have returned (the last report commits
synchronously, before its RPC returns).

Figures per N:

- ``seconds_per_round``: wall time from submitting the round's N check-ins to the last report's answer
  (the commit), median over rounds 2..R when R > 1 (round 1 includes the clients' TensorFlow tracing in the
  first run, and is excluded in every run for comparability); over all rounds when R = 1.
  ``coordinator_seconds_per_round`` is the coordinator's own figure (first check-in to commit, from the
  store), same rounds.
- ``reports_per_s``: accepted reports of those rounds / their total wall time. Clients and coordinator
  share this machine's cores, so this is bounded by their CPU together, not by the coordinator alone:
  ``coordinator_cpu_ms_per_report`` (user + system CPU of the coordinator process) and
  ``client_cpu_ms_per_report`` (this process: the clients' FedRecon work in TensorFlow and their side of
  gRPC) give the split, over the same rounds.
- ``download_bytes_per_client`` / ``upload_bytes_per_client``: serialized bytes per client per round, from
  the client library's transport counters (check-in, model download, report; protobuf framing included).
- ``global_bytes``: float32 bytes of the global variables (item embeddings and biases, global offset):
  ``(num_items·(F+1) + 1)·4``, what FedRecon moves each way per client and round, plus framing.
- ``whole_model_bytes``: float32 bytes of the whole model that a protocol without local parameters (every
  parameter on the server, e.g. FedAvg over the full matrix factorization) would ship each way per client
  and round: the global variables plus every training user's embedding and bias,
  ``(num_items·(F+1) + 1 + num_train_users·(F+1))·4``.
- ``startup_rss_mb``: the coordinator's resident memory once it listens, before any client;
  ``peak_rss_mb``: its peak resident memory (VmHWM from ``/proc/<pid>/status``, Linux) read just before it
  is stopped; ``peak_growth_mb`` = peak - startup.

After each run the store is checked: R committed rounds with N accepted reports each (else the script
fails). The last lines compare peak_rss of the largest N with the smallest (flat: within 25%).

``--lightweight`` measures the coordinator alone (``load_generator``): no client trains; generator
processes (``--generator-processes`` x ``--generator-threads``) play the clients through the real gRPC
calls with updates encoded once, before the run (shaped like real ones: the rows of ~150 items non-zero).
Each round wants N reports and over-selects (``--over-selection``, default 1.3): ceil(1.3 N) clients
check in and download, then N of them report and the rest are stragglers that never do; the round
commits at its N-th report. The coordinator's CPU (user + system, ``/proc/<pid>/stat``) is read between
the phases, so per N:

- ``coordinator_cpu_ms_per_report``: coordinator CPU of the report phases (reading, validating and folding
  every report, and the commit) / reports; ``reports_per_s_per_core`` = 1000 / that (what one core of
  this coordinator sustains); ``reports_per_s_wall``: reports / wall time of the report phases (bounded
  by the generator sharing the machine).
- ``coordinator_cpu_ms_per_selected_client``: the selection phases (check-in and a 1-version download per
  assigned client) / assigned clients.
- ``peak_rss_mb``: the coordinator's VmHWM at the end of the run; ``peak_rss_ratio`` (top level) = peak
  RSS at the largest N / at the smallest N (target: 1.5 at most from 100 to 10,000).

- ``grpc_floor`` (unless ``--no-floor``): after the coordinator, the same rounds (same N, rounds,
  over-selection, prepared reports, generator) against a bare grpc.aio server (``grpc_floor.py``: the same
  service and server options, a ReportUpdate that reads the stream and discards it, a CheckIn and a
  DownloadModel that answer with bytes made at start), its process CPU read the same way:
  ``cpu_ms_per_report`` and ``cpu_ms_per_selected_client`` are what gRPC itself costs here, and
  ``coordinator_over_floor_per_report`` / ``_per_selected_client`` = coordinator / floor. The floor's
  download must be the coordinator's, byte for byte in size, or the run fails.

Rounds per N default to enough for about 2,000 reports (CPU time is read in clock ticks of 10 ms). The
machine's load average is recorded: the CPU figures are CPU time, so other load slows the run but does
not enter them (beyond cache effects).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc
import numpy as np

from fedrecon.client import FederatedClient
from fedrecon.client.transport import CoordinatorChannel
from fedrecon.core.compression import UploadCodec
from fedrecon.core.config import FedReconConfig
from fedrecon.server.process import CoordinatorProcess
from fedrecon.server.store import SqlStore
from fedrecon.server.task import TaskSpec
from fedrecon.simulations.ratings import FederatedRatings, load_dataset
from fedrecon.tensors import DEFAULT_CHUNK_BYTES, TensorLayout

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the generator module beside this script
from grpc_floor import FloorProcess
from load_generator import Generator, PreparedUpdate, prepare_update, realistic_delta

TASK_NAME = "movielens-load"
LIGHT_REPORTS_TARGET = 2000  # default rounds per N give about this many reports
CLIENTS_PER_CHANNEL = 100
MAX_CHANNELS = 16
FLAT_TOLERANCE = 0.25

TASK_TOML = """\
# Written by benchmarks/coordinator_load.py (N = {n} clients, R = {rounds} rounds).
name = "{name}"
batch_size = 5
seed = 0

[model]
kind = "matrix_factorization"
num_items = {num_items}
num_factors = {factors}
use_biases = true
initial_offset = {offset!r}  # mean training rating

[training]  # the paper's reference configuration (the FedReconConfig defaults), spelled out
reconstruction_optimizer = {{ name = "sgd", learning_rate = 0.1 }}
client_optimizer = {{ name = "sgd", learning_rate = 0.5 }}
server_optimizer = {{ name = "sgd", learning_rate = 1.0 }}
recon_epochs = 5
recon_steps_max = 50
post_recon_epochs = 1
post_recon_steps_max = 50

[rounds]  # every round wants N reports; over-selection {over_selection}
clients_per_round = {n}
over_selection = {over_selection}
min_reports = {n}
selection_timeout_s = 600.0
reporting_timeout_s = 1200.0
retry_delay_s = [0.05, 0.5]
max_rounds = {rounds}
max_check_ins_per_minute = 1000000.0  # simulated clients check in back to back, round after round
max_check_ins_per_minute_per_peer = 1000000000.0  # and all of them from this one host
{aggregation}"""


# ----- the coordinator process -----------------------------------------------------------------------------
def proc_memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


# ----- one run ---------------------------------------------------------------------------------------------
def global_bytes(num_items: int, factors: int) -> int:
    return (num_items * (factors + 1) + 1) * 4


def whole_model_bytes(num_items: int, factors: int, num_train_users: int) -> int:
    return global_bytes(num_items, factors) + num_train_users * (factors + 1) * 4


def write_task(path: Path, data: FederatedRatings, n: int, rounds: int, factors: int, *,
               over_selection: float = 1.0, codec: UploadCodec = UploadCodec.NONE) -> TaskSpec:
    aggregation = "" if codec == UploadCodec.NONE else f'\n[aggregation]\nupload_codec = "{codec.value}"\n'
    path.write_text(TASK_TOML.format(n=n, rounds=rounds, name=TASK_NAME, num_items=data.num_items,
                                     factors=factors, offset=float(data.mean_rating),
                                     over_selection=over_selection, aggregation=aggregation))
    spec = TaskSpec.load(path)
    if spec.training != FedReconConfig():
        raise AssertionError("the task's training section is not the reference configuration")
    return spec


def run_clients(n: int, rounds: int, factors: int, data: FederatedRatings, workdir: Path) -> dict[str, Any]:
    users = sorted(data.train)[:n]
    if len(users) < n:
        raise SystemExit(f"the dataset has only {len(users)} training users; asked for {n} clients")
    task_file = workdir / "task.toml"
    write_task(task_file, data, n, rounds, factors)
    store_url = f"sqlite:///{workdir / 'coordinator.db'}"

    coordinator = CoordinatorProcess(task_file, store_url, workdir, timeout_s=180.0)
    pid = coordinator.proc.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"serve" not in cmdline:  # the memory and CPU read below must be the serving process's own
        raise RuntimeError(f"pid {pid} is not the serving process: {cmdline}")
    try:
        time.sleep(1.0)  # let start-up settle before the baseline reading
        startup = proc_memory_kb(pid)
        options = [("grpc.max_receive_message_length", 4 * DEFAULT_CHUNK_BYTES),
                   ("grpc.max_send_message_length", 4 * DEFAULT_CHUNK_BYTES)]
        num_channels = min(MAX_CHANNELS, max(1, math.ceil(n / CLIENTS_PER_CHANNEL)))
        # Distinct channel arguments keep gRPC from folding the channels into one shared connection.
        channels = [grpc.insecure_channel(coordinator.address,
                                          options=[*options, ("fedrecon.load.channel", i)])
                    for i in range(num_channels)]
        retries = [0]
        retries_lock = threading.Lock()

        def counting_sleep(seconds: float) -> None:
            with retries_lock:
                retries[0] += 1
            time.sleep(seconds)

        clients = [FederatedClient(None, TASK_NAME, f"user-{u}", data.train[u],
                                   channel=channels[i % num_channels], sleep=counting_sleep)
                   for i, u in enumerate(users)]
        observer = CoordinatorChannel(channel=channels[0])
        round_wall: list[float] = []
        round_cpu: list[tuple[float, float]] = []  # (coordinator, this process) CPU seconds per round
        rss_after_round_mb: list[float] = []

        def play(client: FederatedClient, user: int) -> bool:
            report = client.participate(
                rng_for=lambda a: np.random.default_rng([user, a.round_num]), max_wait_s=600.0)
            return report.accepted

        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="load-client") as pool:
            for k in range(1, rounds + 1):
                cpu0 = proc_cpu_s(pid), time.process_time()
                t0 = time.perf_counter()
                accepted = list(pool.map(play, clients, users))
                round_wall.append(time.perf_counter() - t0)
                round_cpu.append((proc_cpu_s(pid) - cpu0[0], time.process_time() - cpu0[1]))
                if not all(accepted):
                    raise RuntimeError(f"round {k}: {accepted.count(False)} reports were not accepted")
                version = observer.latest_model(TASK_NAME).model_version
                if version != k:
                    raise RuntimeError(f"after round {k} the coordinator is at model version {version}")
                rss_after_round_mb.append(proc_memory_kb(pid)["VmRSS"] / 1024)
                print(f"  N={n} round {k}/{rounds}: {round_wall[-1]:.2f} s, coordinator RSS "
                      f"{rss_after_round_mb[-1]:.0f} MB", flush=True)
        peak = proc_memory_kb(pid)
        loads_tensorflow = "tensorflow" in Path(f"/proc/{pid}/maps").read_text()
        downloaded = sum(c.transport.bytes_downloaded for c in clients)
        uploaded = sum(c.transport.bytes_uploaded for c in clients)
        for channel in channels:
            channel.close()
    except BaseException:
        print(coordinator.log_text()[-3000:], file=sys.stderr)
        raise
    finally:
        code = coordinator.stop()
    if code != 0:
        raise RuntimeError(f"the coordinator exited with status {code}:\n{coordinator.log_text()[-3000:]}")

    # The store must hold R committed rounds of N accepted reports each.
    store = SqlStore(store_url)
    try:
        stored = store.list_rounds(TASK_NAME)
        latest = store.latest_version(TASK_NAME, with_payload=False).version
    finally:
        store.close()
    committed = sorted((r for r in stored if str(r.state) == "committed"), key=lambda r: r.round_num)
    bad = [(r.round_num, str(r.state), r.num_accepted) for r in stored
           if str(r.state) != "committed" or r.num_accepted != n]
    if len(committed) != rounds or bad or latest != rounds:
        raise RuntimeError(f"store check failed for N={n}: {len(committed)} of {rounds} rounds committed, "
                           f"latest version {latest}, unexpected rounds {bad}")

    measured = slice(1, None) if rounds > 1 else slice(None)
    wall = round_wall[measured]
    coordinator_seconds = [float(r.metrics["seconds"]) for r in committed][measured]
    reports = n * len(wall)
    coordinator_cpu = sum(c for c, _ in round_cpu[measured])
    client_cpu = sum(c for _, c in round_cpu[measured])
    return {
        "clients": n,
        "rounds": rounds,
        "rounds_committed": len(committed),
        "measured_rounds": f"{2 if rounds > 1 else 1}..{rounds}",
        "reports_per_s": reports / sum(wall),
        "seconds_per_round": statistics.median(wall),
        "coordinator_seconds_per_round": statistics.median(coordinator_seconds),
        "round_seconds": round_wall,
        "download_bytes_per_client": downloaded / (n * rounds),
        "upload_bytes_per_client": uploaded / (n * rounds),
        "global_bytes": global_bytes(data.num_items, factors),
        "whole_model_bytes": whole_model_bytes(data.num_items, factors, len(data.train)),
        "startup_rss_mb": startup["VmRSS"] / 1024,
        "peak_rss_mb": peak["VmHWM"] / 1024,
        "peak_growth_mb": (peak["VmHWM"] - startup["VmRSS"]) / 1024,
        "rss_after_round_mb": rss_after_round_mb,
        "coordinator_cpu_ms_per_report": 1000 * coordinator_cpu / reports,
        "client_cpu_ms_per_report": 1000 * client_cpu / reports,
        "client_retry_waits": retries[0],
        "coordinator_loads_tensorflow": loads_tensorflow,
        "grpc_channels": num_channels,
    }


def delta_layouts(spec: TaskSpec) -> list[TensorLayout]:
    """What a report carries for this task: the global trainable variables, float32 (as the coordinator's
    ``delta_layouts``)."""
    from fedrecon.core.model_spec import model_from_config

    model = model_from_config(spec.model)
    return [TensorLayout(model.global_variables[i].name, np.dtype(np.float32),
                         tuple(model.global_variables[i].shape)) for i in model.global_trainable]


@dataclass
class PhaseTotals:
    """CPU (of the serving process) and wall seconds of the selection and report phases of a run's rounds."""

    select_cpu: float = 0.0
    report_cpu: float = 0.0
    select_wall: float = 0.0
    report_wall: float = 0.0
    downloaded: int = 0
    retries: int = 0
    rss_after_round_mb: list[float] = field(default_factory=list)


def drive_rounds(label: str, pid: int, generator: Generator, ids: list[str], n: int, rounds: int
                 ) -> PhaseTotals:
    """``rounds`` rounds against the server ``pid``: every id checks in and downloads, then the first
    ``n`` report; its CPU read between the phases (``proc_cpu_s``), so each phase is measured alone."""
    goal, reporting = len(ids), ids[:n]
    totals = PhaseTotals()
    for k in range(1, rounds + 1):
        cpu0, t0 = proc_cpu_s(pid), time.perf_counter()
        assigned, down, waits = generator.select(ids)
        cpu1, t1 = proc_cpu_s(pid), time.perf_counter()
        if assigned != goal:
            raise RuntimeError(f"{label} round {k}: {assigned} of {goal} clients assigned")
        accepted, refused = generator.report(reporting)
        cpu2, t2 = proc_cpu_s(pid), time.perf_counter()
        if accepted != n or refused:
            raise RuntimeError(f"{label} round {k}: {accepted} of {n} reports accepted, {refused} refused")
        totals.select_cpu += cpu1 - cpu0
        totals.report_cpu += cpu2 - cpu1
        totals.select_wall += t1 - t0
        totals.report_wall += t2 - t1
        totals.downloaded += down
        totals.retries += waits
        totals.rss_after_round_mb.append(proc_memory_kb(pid)["VmRSS"] / 1024)
        print(f"  {label} N={n} round {k}/{rounds}: select {t1 - t0:.2f} s "
              f"({1000 * (cpu1 - cpu0) / goal:.2f} ms CPU/client), report {t2 - t1:.2f} s "
              f"({1000 * (cpu2 - cpu1) / n:.2f} ms CPU/report), "
              f"RSS {totals.rss_after_round_mb[-1]:.0f} MB", flush=True)
    return totals


def run_floor(task_file: Path, workdir: Path, updates: list[PreparedUpdate], ids: list[str], n: int,
              rounds: int, *, processes: int, threads: int) -> dict[str, Any]:
    """The same rounds, reports and generator against the bare gRPC server (``grpc_floor``): what gRPC
    alone costs per report and per selected client on this machine, in this run."""
    floor = FloorProcess(task_file, workdir)
    generator = None
    try:
        time.sleep(1.0)  # as for the coordinator: start-up settles before the first reading
        generator = Generator(floor.address, TASK_NAME, updates, processes=processes, threads=threads)
        totals = drive_rounds("floor", floor.proc.pid, generator, ids, n, rounds)
    finally:
        if generator is not None:
            generator.close()
        code = floor.stop()
    if code != 0:
        raise RuntimeError(f"the gRPC floor server exited with status {code}")
    return {"cpu_ms_per_report": 1000 * totals.report_cpu / (n * rounds),
            "cpu_ms_per_selected_client": 1000 * totals.select_cpu / (len(ids) * rounds),
            "reports_per_s_wall": n * rounds / totals.report_wall,
            "download_bytes_per_client": totals.downloaded / (len(ids) * rounds),
            "cpu_s": {"select": totals.select_cpu, "report": totals.report_cpu}}


def run_lightweight(n: int, rounds: int, factors: int, data: FederatedRatings, workdir: Path, *,
                    over_selection: float, processes: int, threads: int, codec: UploadCodec,
                    floor: bool = True) -> dict[str, Any]:
    """One coordinator process, ``rounds`` rounds of N reports from the lightweight generator; then (with
    ``floor``) the same against the bare gRPC server."""
    task_file = workdir / "task.toml"
    spec = write_task(task_file, data, n, rounds, factors, over_selection=over_selection, codec=codec)
    goal = spec.rounds.selection_goal
    layouts = delta_layouts(spec)
    rng = np.random.default_rng(0)
    updates = [prepare_update(layouts, realistic_delta(layouts, rng), codec, rng=rng) for _ in range(8)]
    store_url = f"sqlite:///{workdir / 'coordinator.db'}"
    ids = [f"load-{i}" for i in range(goal)]

    coordinator = CoordinatorProcess(task_file, store_url, workdir, timeout_s=180.0)
    pid = coordinator.proc.pid
    generator = None
    try:
        time.sleep(1.0)  # let start-up settle before the baseline reading
        startup = proc_memory_kb(pid)
        generator = Generator(coordinator.address, TASK_NAME, updates, processes=processes, threads=threads)
        totals = drive_rounds("coordinator", pid, generator, ids, n, rounds)
        peak = proc_memory_kb(pid)
    except BaseException:
        print(coordinator.log_text()[-3000:], file=sys.stderr)
        raise
    finally:
        if generator is not None:
            generator.close()
        code = coordinator.stop()
    if code != 0:
        raise RuntimeError(f"the coordinator exited with status {code}:\n{coordinator.log_text()[-3000:]}")
    store = SqlStore(store_url)
    try:
        stored = store.list_rounds(TASK_NAME)
    finally:
        store.close()
    committed = [r for r in stored if str(r.state) == "committed" and r.num_accepted == n]
    if len(committed) != rounds or len(stored) != rounds:
        seen = [(r.round_num, str(r.state), r.num_accepted) for r in stored]
        raise RuntimeError(f"store check failed for N={n}: {len(committed)} of {rounds} rounds committed "
                           f"with {n} reports; rounds {seen}")
    reports = n * rounds
    cpu_ms = 1000 * totals.report_cpu / reports
    result = {
        "clients": n,
        "selected_per_round": goal,
        "stragglers_per_round": goal - n,
        "rounds": rounds,
        "rounds_committed": len(committed),
        "upload_codec": codec.value,
        "report_bytes": updates[0].payload_bytes,
        "coordinator_cpu_ms_per_report": cpu_ms,
        "reports_per_s_per_core": 1000 / cpu_ms if cpu_ms > 0 else None,
        "reports_per_s_wall": reports / totals.report_wall,
        "coordinator_cpu_ms_per_selected_client": 1000 * totals.select_cpu / (goal * rounds),
        "selected_per_s_wall": goal * rounds / totals.select_wall,
        "download_bytes_per_client": totals.downloaded / (goal * rounds),
        "coordinator_seconds_per_round": statistics.median(float(r.metrics["seconds"]) for r in committed),
        "startup_rss_mb": startup["VmRSS"] / 1024,
        "peak_rss_mb": peak["VmHWM"] / 1024,
        "peak_growth_mb": (peak["VmHWM"] - startup["VmRSS"]) / 1024,
        "rss_after_round_mb": totals.rss_after_round_mb,
        "client_retry_waits": totals.retries,
        "coordinator_cpu_s": {"select": totals.select_cpu, "report": totals.report_cpu},
    }
    if floor:
        result["grpc_floor"] = floor_figures = run_floor(task_file, workdir, updates, ids, n, rounds,
                                                         processes=processes, threads=threads)
        if floor_figures["download_bytes_per_client"] != result["download_bytes_per_client"]:
            raise RuntimeError(f"the floor server's download "
                               f"({floor_figures['download_bytes_per_client']} B) is not the "
                               f"coordinator's ({result['download_bytes_per_client']} B)")
        result.update(ratios(result, floor_figures))
    return result


def ratios(run: dict[str, Any], floor: dict[str, Any]) -> dict[str, float | None]:
    """Coordinator / floor CPU per report and per selected client (None when the floor read 0 ticks)."""
    def ratio(ours: float, theirs: float) -> float | None:
        return ours / theirs if theirs > 0 else None

    return {"coordinator_over_floor_per_report": ratio(run["coordinator_cpu_ms_per_report"],
                                                       floor["cpu_ms_per_report"]),
            "coordinator_over_floor_per_selected_client": ratio(run["coordinator_cpu_ms_per_selected_client"],
                                                                floor["cpu_ms_per_selected_client"])}


def lightweight_main(args: argparse.Namespace, data: FederatedRatings) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    runs = []
    for i, n in enumerate(args.clients):
        r = (args.rounds[i] if len(args.rounds) > 1 else args.rounds[0]) if args.rounds else \
            max(1, math.ceil(LIGHT_REPORTS_TARGET / n))
        with tempfile.TemporaryDirectory(prefix="fedrecon-load-") as tmp:
            t0 = time.perf_counter()
            runs.append(run_lightweight(n, r, args.factors, data, Path(tmp),
                                        over_selection=args.over_selection,
                                        processes=args.generator_processes, threads=args.generator_threads,
                                        codec=UploadCodec(args.upload_codec), floor=args.floor))
            runs[-1]["wall_s"] = time.perf_counter() - t0
            runs[-1]["load_average_after"] = os.getloadavg()[0]
    print_lightweight_table(runs)
    summary = ("coordinator_cpu_ms_per_report", "reports_per_s_per_core", "peak_rss_mb")
    result: dict[str, Any] = {"mode": "lightweight", "runs": runs,
                              "by_clients": {str(r["clients"]): {k: r[k] for k in summary} | floor_summary(r)
                                             for r in runs}}
    if len(runs) > 1:
        small, large = min(runs, key=lambda x: x["clients"]), max(runs, key=lambda x: x["clients"])
        result["peak_rss_ratio"] = large["peak_rss_mb"] / small["peak_rss_mb"]
        result["peak_rss_ratio_clients"] = [large["clients"], small["clients"]]
        print(f"coordinator peak RSS N={large['clients']} / N={small['clients']}: "
              f"{result['peak_rss_ratio']:.3f} (target <= 1.5)")
    result["setup"] = {"data": Path(args.data).name, "train_users": len(data.train), "items": data.num_items,
                       "factors": args.factors, "over_selection": args.over_selection,
                       "generator": {"processes": args.generator_processes,
                                     "threads": args.generator_threads},
                       "coordinator_max_workers": 32, "cpus": os.cpu_count(),
                       "python": platform.python_version(), "load_average_before": load_before,
                       "load_average_after": os.getloadavg(), "code": code_version(),
                       "wall_s": time.perf_counter() - t_start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def floor_summary(run: dict[str, Any]) -> dict[str, Any]:
    """The floor's figures beside the coordinator's in ``by_clients`` (nothing when it was not run)."""
    if "grpc_floor" not in run:
        return {}
    return {"floor_cpu_ms_per_report": run["grpc_floor"]["cpu_ms_per_report"],
            "coordinator_over_floor_per_report": run["coordinator_over_floor_per_report"],
            "coordinator_cpu_ms_per_selected_client": run["coordinator_cpu_ms_per_selected_client"],
            "floor_cpu_ms_per_selected_client": run["grpc_floor"]["cpu_ms_per_selected_client"],
            "coordinator_over_floor_per_selected_client": run["coordinator_over_floor_per_selected_client"]}


def print_lightweight_table(runs: list[dict[str, Any]]) -> None:
    def ms(value: float | None, width: int) -> str:
        return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"

    print(f"{'clients':>8} {'rounds':>6} {'report B':>10} {'CPU ms/report':>14} {'floor':>7} {'ratio':>6} "
          f"{'reports/s/core':>15} {'reports/s wall':>15} {'CPU ms/selected':>16} {'floor':>7} {'ratio':>6} "
          f"{'peak RSS MB':>12}")
    for r in runs:
        floor = r.get("grpc_floor", {})
        print(f"{r['clients']:>8} {r['rounds']:>6} {r['report_bytes']:>10,} "
              f"{r['coordinator_cpu_ms_per_report']:>14.3f} {ms(floor.get('cpu_ms_per_report'), 7)} "
              f"{ms(r.get('coordinator_over_floor_per_report'), 6)} "
              f"{r['reports_per_s_per_core'] or 0:>15.1f} {r['reports_per_s_wall']:>15.1f} "
              f"{r['coordinator_cpu_ms_per_selected_client']:>16.3f} "
              f"{ms(floor.get('cpu_ms_per_selected_client'), 7)} "
              f"{ms(r.get('coordinator_over_floor_per_selected_client'), 6)} {r['peak_rss_mb']:>12.1f}")


def code_version() -> dict[str, Any]:
    """The commit measured, and which product files differed from it (uncommitted work is measured too)."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "core", "server", "client",
                                         "fedrecon", "protos").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "uncommitted_changes": changed}


# ----- report ----------------------------------------------------------------------------------------------
def print_table(runs: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="coordinator load (loopback, coordinator in its own process)")
    columns = ("clients", "rounds", "reports/s", "s/round", "coord s/round", "down B/client/round",
               "up B/client/round", "whole-model B", "global B", "startup RSS MB", "peak RSS MB",
               "coord CPU ms/report", "client CPU ms/report")
    for col in columns:
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(str(r["clients"]), str(r["rounds"]), f"{r['reports_per_s']:.1f}",
                      f"{r['seconds_per_round']:.2f}", f"{r['coordinator_seconds_per_round']:.2f}",
                      f"{r['download_bytes_per_client']:,.0f}", f"{r['upload_bytes_per_client']:,.0f}",
                      f"{r['whole_model_bytes']:,}", f"{r['global_bytes']:,}", f"{r['startup_rss_mb']:.1f}",
                      f"{r['peak_rss_mb']:.1f}", f"{r['coordinator_cpu_ms_per_report']:.2f}",
                      f"{r['client_cpu_ms_per_report']:.2f}")
    Console(width=250).print(table)
    for r in runs:
        down, up, whole = r["download_bytes_per_client"], r["upload_bytes_per_client"], r["whole_model_bytes"]
        print(f"N={r['clients']}: per client and round FedRecon moved {down:,.0f} B down / {up:,.0f} B up; "
              f"a whole-model protocol would move {whole:,} B each way ({whole / down:.2f}x down, "
              f"{whole / up:.2f}x up); round times "
              f"{', '.join(f'{s:.2f}' for s in r['round_seconds'])} s (median over rounds "
              f"{r['measured_rounds']}); coordinator RSS {r['startup_rss_mb']:.1f} MB at start, peak "
              f"{r['peak_rss_mb']:.1f} MB (+{r['peak_growth_mb']:.1f} MB); client retry waits "
              f"{r['client_retry_waits']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/movielens/ml-1m-2998u",
                        help="a MovieLens folder or 'synthetic'")
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, nargs="+", default=None,
                        help="rounds per run: one number for every N, or one per N (default 3; with "
                             f"--lightweight about {LIGHT_REPORTS_TARGET} reports' worth)")
    parser.add_argument("--factors", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/coordinator_load.json "
                             "(coordinator_load_lightweight.json with --lightweight)")
    parser.add_argument("--lightweight", action="store_true",
                        help="no client training: generator processes send precomputed updates")
    parser.add_argument("--over-selection", type=float, default=1.3, help="--lightweight: over-selection")
    parser.add_argument("--generator-processes", type=int, default=2)
    parser.add_argument("--generator-threads", type=int, default=8, help="threads per generator process")
    parser.add_argument("--upload-codec", default="none", choices=[c.value for c in UploadCodec],
                        help="--lightweight: the task's upload codec")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="--lightweight: skip the bare gRPC server run (grpc_floor.py) after each N")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("benchmarks/results/coordinator_load_lightweight.json" if args.lightweight
                        else "benchmarks/results/coordinator_load.json")
    if args.rounds is not None and len(args.rounds) not in (1, len(args.clients)):
        parser.error("--rounds takes one number, or one per --clients value")
    if args.lightweight:
        data = load_dataset(args.data)
        print(f"{args.data}: {data.num_items} items, {args.factors} factors; lightweight generator "
              f"{args.generator_processes} x {args.generator_threads}, over-selection {args.over_selection}",
              flush=True)
        return lightweight_main(args, data)
    args.rounds = args.rounds or [3]
    rounds = args.rounds * len(args.clients) if len(args.rounds) == 1 else args.rounds

    t_start = time.perf_counter()
    data = load_dataset(args.data)
    whole = whole_model_bytes(data.num_items, args.factors, len(data.train))
    print(f"{args.data}: {len(data.train)} training users, {data.num_items} items, mean rating "
          f"{data.mean_rating:.4f}; whole model {whole:,} B, global variables "
          f"{global_bytes(data.num_items, args.factors):,} B", flush=True)
    runs = []
    for n, r in zip(args.clients, rounds, strict=True):
        with tempfile.TemporaryDirectory(prefix="fedrecon-load-") as tmp:
            t0 = time.perf_counter()
            runs.append(run_clients(n, r, args.factors, data, Path(tmp)))
            runs[-1]["wall_s"] = time.perf_counter() - t0
    print_table(runs)
    result: dict[str, Any] = {"runs": runs}
    if len(runs) > 1:
        small, large = min(runs, key=lambda x: x["clients"]), max(runs, key=lambda x: x["clients"])
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        flat = abs(ratio - 1.0) <= FLAT_TOLERANCE
        print(f"coordinator peak RSS ratio N={large['clients']} / N={small['clients']}: {ratio:.3f} -> "
              f"{'flat' if flat else 'NOT flat'} (tolerance {FLAT_TOLERANCE:.0%}); growth above start-up "
              f"{small['peak_growth_mb']:.1f} MB -> {large['peak_growth_mb']:.1f} MB")
        result["peak_rss_ratio"] = ratio
        result["memory_flat"] = flat
    result["setup"] = {"data": Path(args.data).name, "train_users": len(data.train), "items": data.num_items,
                       "factors": args.factors,
                       "coordinator_max_workers": 32,  # the `fedrecon serve` default, used here
                       "cpus": os.cpu_count(), "python": platform.python_version(),
                       "code": code_version(), "wall_s": time.perf_counter() - t_start}
    print(f"total wall time {result['setup']['wall_s']:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
