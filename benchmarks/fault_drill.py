"""A scripted fault drill against a live coordinator process facing hostile clients; writes what held.

    python benchmarks/fault_drill.py --out benchmarks/results/fault_drill.json [--store URL]

``fedrecon serve --require-token`` runs as its own process (SQLite in a temporary folder unless ``--store``
is given) with a task of 8 reports per round, over-selection 1.25 (10 assigned), minimum 6, 5 s selection
and 15 s reporting windows (generous, so rounds hold on a busy machine), and the default aggregation
settings (weight cap, update-norm bound). Every client, honest or hostile, holds its own token, as a phone
would. The phases:

1. normal: two rounds with 10 clients each (2 over-selected reports are told the round is over); the
   first is tried up to three times (``warm_up_rounds_failed``), since its clients trace the client step;
2. dropouts: 10 assigned, 3 vanish after downloading; the round commits from 7 at its deadline;
3. bad input: 200 malformed or hostile messages from "mallory" (garbage streams, local-variable names,
   wrong shapes, forged assignment tokens and credentials, wrong rounds, non-finite weights, oversized
   messages, wrong protocol, unknown and 3 MiB task names, NaN deltas, 100,000 metric entries, poisoned
   evaluations). Mallory's credential may speak for three devices, so each refusal that uses up a
   device's one answer for the round (bad weight, NaN, metrics) is reached by a device of its own: the
   JSON says which status each kind met first (``cases``). Then a normal round must still commit;
4. outweigh: 7 honest reports (computed by the real client step, sent as precomputed updates so the drill
   knows each one) and one hostile report claiming weight 1e9 with a delta of norm 1e6. The committed step
   minus the step the 7 honest updates alone give (the same aggregation code) is the hostile client's
   contribution; ``max_single_client_share`` is its share of the round's update mass, next to the bound
   the settings state;
5. huge: two rounds each with one finite but huge update (every value 3e38); ``nonfinite_commits`` counts
   committed versions holding any non-finite value, over the whole drill;
6. impersonation: an attacker with its own token checks in 26 ids and the victim's id, reports with the
   victim's stolen assignment token, and checks in a dozen times as the victim;
   ``impersonations_accepted`` counts every way that worked (victim's token handed out, stolen token
   accepted, victim's report refused, victim rate-limited), ``hoarded_assignments`` the attacker's slots;
7. idle streams: 200 credentials each hold a report stream open without sending anything while 50 honest
   check-ins are timed (``honest_checkin_p99_ms_with_idle_streams``);
8. evaluation poisoning: 8 honest devices evaluate a version; one hostile evaluator posts the largest
   evaluation a device may (10,000 examples, zero error; it counts as the task's weight cap) and 500
   attempts at 1e9 examples: ``evaluation_poisoning_shift`` is the change of the reported RMSE, next to
   the bound the cap gives; ``fedrecon status --json`` must still work (sums near 1e308 are stored too);
9. late: 3 assigned clients report after the round committed at its deadline;
10. kill: SIGKILL while a round holds 4 reports; restart on the same store and port; a full round commits.

Figures: rounds committed and failed (from the store); reports accepted (acknowledged with accepted=True)
and refused by reason (as the clients saw them); ``versions_verified``: every committed version's bytes
equal before and after the kill; ``updates_lost``: acknowledged reports of committed rounds minus the
reports the store says those rounds folded (must be 0); ``unknown_statuses``: UNKNOWN answers over every
hostile call of the drill (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fedrecon.client import FederatedClient, RetryPolicy
from fedrecon.server.auth import issue_token
from fedrecon.server.evaluations import MAX_EVALUATION_EXAMPLES
from fedrecon.server.process import CoordinatorProcess
from fedrecon.server.store import RoundState, SqlStore
from fedrecon.server.task import TaskSpec
from fedrecon.simulations.ratings import load_dataset
from fedrecon.tensors import chunks, manifest
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

TASK = """
name = "drill"
batch_size = 5
[model]
kind = "matrix_factorization"
num_items = 600
num_factors = 8
[rounds]
clients_per_round = 8
over_selection = 1.25
min_reports = 6
selection_timeout_s = 5.0
reporting_timeout_s = 15.0
retry_delay_s = [0.05, 0.3]
max_check_ins_per_minute = 600.0
"""
NAMES = ["item_embedding"]
Update = tuple[list[np.ndarray], float]  # a delta and the weight claimed for it
SHAPE = (600, 8)


class Drill:
    def __init__(self, store_url: str, folder: Path) -> None:
        self.store_url = store_url
        self.folder = folder
        self.task = folder / "task.toml"
        self.task.write_text(TASK)
        self.spec = TaskSpec.load(self.task)
        self.data = load_dataset("synthetic", seed=42)
        self.users = iter(sorted(self.data.train))
        self.acknowledged: Counter[int] = Counter()  # round id -> reports acknowledged as accepted
        self.refused: Counter[str] = Counter()
        self.warm_up_rounds_failed = 0
        self.hostile_statuses: Counter[str] = Counter()  # every hostile call's status, over the drill
        self.cases: dict[str, Counter[str]] = {}
        self.figures: dict[str, object] = {}
        self.lock = threading.Lock()
        self.coordinator: CoordinatorProcess | None = None
        self.retry = RetryPolicy(initial_s=0.05, max_s=0.5, give_up_after_s=60.0)
        self._store: SqlStore | None = None
        self._issued = 0

    # ----- the coordinator process ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the coordinator; a restart keeps the port, so clients find it where it was."""
        port = self.coordinator.port if self.coordinator else 0
        self.coordinator = CoordinatorProcess(self.task, self.store_url, self.folder, port=port,
                                              # SIGTERM only ends the drill: nothing to drain for.
                                              extra_args=["--require-token", "--drain-s", "0"])

    @property
    def address(self) -> str:
        assert self.coordinator is not None
        return self.coordinator.address

    @property
    def store(self) -> SqlStore:
        if self._store is None:
            self._store = SqlStore(self.store_url)
        return self._store

    def token(self, label: str, *, max_devices: int = 1) -> str:
        """A credential of its own for each device, as every phone would have."""
        self._issued += 1
        return issue_token(self.store, f"{label}-{self._issued}", max_devices=max_devices)[1]

    def snapshot(self) -> dict[int, bytes]:
        return {v.version: self.store.get_version("drill", v.version).parameters
                for v in self.store.list_versions("drill")}

    def globals_of(self, version: int) -> np.ndarray:
        raw = self.store.get_version("drill", version).parameters
        from fedrecon.server.checkpoints import globals_from_bytes
        return globals_from_bytes(raw, NAMES)[0]

    # ----- clients -------------------------------------------------------------------------------------
    def client(self, label: str = "honest") -> FederatedClient:
        user = next(self.users)
        return FederatedClient(self.address, "drill", f"user-{user}", self.data.train[user], retry=self.retry,
                               token=self.token(label))

    def stub(self, token: str) -> tuple[grpc.Channel, pb_grpc.CoordinatorStub, tuple[tuple[str, str]]]:
        channel = grpc.insecure_channel(self.address)
        return channel, pb_grpc.CoordinatorStub(channel), (("authorization", f"Bearer {token}"),)

    def _note(self, round_id: int, accepted: bool, status: str, message: str) -> None:
        with self.lock:
            if accepted:
                self.acknowledged[round_id] += 1
            elif status != "OK":
                reason = "late" if "deadline" in message else "round_over" if "is over" in message else status
                self.refused[reason] += 1

    def hostile(self, kind: str, call: Callable[[], object]) -> str:
        """Make one hostile call; its status (OK if it went through) is counted under ``kind``."""
        try:
            call()
            code = "OK"
        except grpc.RpcError as err:
            code = err.code().name
        with self.lock:
            self.hostile_statuses[code] += 1
            self.cases.setdefault(kind, Counter())[code] += 1
        return code

    def honest(self, client: FederatedClient, assignment: pb.Assignment | None = None) -> None:
        try:
            if assignment is None:
                report = client.participate(max_wait_s=60)
            else:
                client.check_in = lambda **_: assignment  # type: ignore[method-assign]
                report = client.participate()
        except grpc.RpcError as err:
            self._note(-1, False, err.code().name, err.details() or "")
            return
        self._note(report.round_id, report.accepted, report.status, report.message)

    def send(self, client: FederatedClient, assignment: pb.Assignment, delta: list[np.ndarray],
             weight: float) -> None:
        """Report a precomputed update (the drill knows exactly what each client sent)."""
        try:
            r = client.transport.report(assignment, client.client_id, NAMES, delta, weight, {})
            self._note(assignment.round_id, r.accepted, "OK", r.message)
        except grpc.RpcError as err:
            self._note(assignment.round_id, False, err.code().name, err.details() or "")

    def together(self, jobs: list) -> None:  # type: ignore[type-arg]
        threads = [threading.Thread(target=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

    def version(self) -> int:
        return self.store.latest_version("drill", with_payload=False).version

    def wait_for_version(self, version: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.version() < version:
            if time.monotonic() > deadline:
                rounds = [(r.round_id, r.state.value) for r in self.store.list_rounds("drill", limit=5)]
                raise RuntimeError(f"version {version} never came; latest rounds {rounds}; refused "
                                   f"{dict(self.refused)}; coordinator log ends:\n"
                                   f"{self.coordinator.log_text()[-3000:] if self.coordinator else ''}")
            time.sleep(0.1)

    def wait_for_no_open_round(self, timeout: float = 60.0) -> None:
        """Until the coordinator has closed its round (committed or failed), so the next phase starts a
        fresh one."""
        deadline = time.monotonic() + timeout
        while any(r.state in (RoundState.OPEN, RoundState.AGGREGATING)
                  for r in self.store.list_rounds("drill", limit=3)):
            if time.monotonic() > deadline:
                raise RuntimeError("a round stayed open")
            time.sleep(0.1)

    # ----- phases --------------------------------------------------------------------------------------
    def normal_round(self) -> None:
        self.wait_for_no_open_round()
        before = self.version()
        self.together([partial(self.honest, self.client()) for _ in range(10)])
        self.wait_for_version(before + 1)

    def warm_up(self) -> None:
        """The first normal round, tried up to three times. Its clients trace the client step in this
        process (ten threads at once), which took longer than the 15 s reporting window with a load
        average of 17, so that round failed for lateness; a failed try is recorded as such and its late
        refusals are not counted among the drill's (phase 9 expects exactly its own three)."""
        for _ in range(3):
            self.wait_for_no_open_round()
            before = self.version()
            self.together([partial(self.honest, self.client()) for _ in range(10)])
            self.wait_for_no_open_round()
            if self.version() > before:
                self.refused.pop("late", None)
                return
            self.warm_up_rounds_failed += 1
        log = self.coordinator.log_text()[-3000:] if self.coordinator else ""
        raise RuntimeError(f"no warm-up round committed in 3 tries; refused {dict(self.refused)}; "
                           f"coordinator log ends:\n{log}")

    def dropouts(self) -> None:
        self.wait_for_no_open_round()
        before = self.version()
        vanishing = [self.client() for _ in range(3)]

        def vanish(c: FederatedClient) -> None:
            a = c.check_in(max_wait_s=30)
            c.globals_for(a.model_version)

        self.together([partial(vanish, c) for c in vanishing]
                      + [partial(self.honest, self.client()) for _ in range(7)])
        self.wait_for_version(before + 1)

    def bad_input(self, count: int = 200) -> None:
        self.wait_for_no_open_round()
        mallory = self.token("mallory", max_devices=4)
        channel, stub, auth = self.stub(mallory)
        rng = np.random.default_rng(0)

        def assignment_for(device: str) -> pb.Assignment:
            a = stub.CheckIn(pb.CheckInRequest(task_name="drill", client_id=device, protocol_version=1),
                             timeout=10, metadata=auth)
            return a.assignment if a.HasField("assignment") else pb.Assignment()

        # Four devices under one credential: one for the cases refused before any answer is used up, and
        # one each for the three kinds that use up a device's one answer for the round.
        devices = {name: assignment_for(name)
                   for name in ("mallory-a", "mallory-w", "mallory-n", "mallory-m")}
        good = [np.zeros(SHAPE, np.float32)]

        def report(header_names: list[str], arrays: list[np.ndarray], device: str = "mallory-a",
                   metadata: tuple[tuple[str, str], ...] = auth, **fields: object) -> None:
            a = devices[device]
            header = pb.ReportHeader(task_name="drill", client_id=device, round_id=a.round_id,
                                     assignment_token=a.assignment_token, weight=1.0,
                                     manifest=manifest(header_names, arrays))
            for key, value in fields.items():
                if key == "metrics":
                    header.metrics.update(value)  # type: ignore[call-overload]
                else:
                    setattr(header, key, value)
            stub.ReportUpdate(iter([pb.ReportUpdateRequest(header=header),
                                    *(pb.ReportUpdateRequest(chunk=c) for c in chunks(arrays, 65536))]),
                              timeout=10, metadata=metadata)

        def evaluation(**fields: float) -> None:
            stub.ReportEvaluation(pb.ReportEvaluationRequest(task_name="drill", client_id="mallory-a",
                                                             model_version=0, **fields),  # type: ignore[arg-type]
                                  timeout=10, metadata=auth)

        nan = [good[0].copy()]
        nan[0][3, 3] = np.nan
        big_metrics = {f"m{i}": 1.0 for i in range(100_000)}
        cases: dict[str, Callable[[], object]] = {
            "garbage stream": lambda: stub.ReportUpdate(iter([pb.ReportUpdateRequest(
                chunk=pb.TensorChunk(data=rng.bytes(64)))]), timeout=10, metadata=auth),
            "local variable": lambda: report(["user_embedding"], good),
            "wrong shape": lambda: report(NAMES, [good[0][:10]]),
            "forged assignment": lambda: report(NAMES, good, assignment_token="forged"),
            "forged credential": lambda: report(NAMES, good, metadata=(("authorization", "Bearer frc_1_x"),)),
            "credential id overflow": lambda: report(
                NAMES, good, metadata=(("authorization", "Bearer frc_99999999999999999999999_x"),)),
            "wrong round": lambda: report(NAMES, good, round_id=devices["mallory-a"].round_id + 1000),
            "oversized": lambda: stub.ReportUpdate(iter([pb.ReportUpdateRequest(
                chunk=pb.TensorChunk(data=b"\0" * (5 << 20)))]), timeout=10, metadata=auth),
            "protocol": lambda: stub.CheckIn(pb.CheckInRequest(
                task_name="drill", client_id="mallory-a", protocol_version=7), timeout=10, metadata=auth),
            "unknown task": lambda: stub.CheckIn(pb.CheckInRequest(
                task_name="nope", client_id="mallory-a", protocol_version=1), timeout=10, metadata=auth),
            "3 MiB task name": lambda: stub.GetLatestModel(pb.GetLatestModelRequest(
                task_name="x" * (3 << 20)), timeout=10, metadata=auth),
            "evaluation counts over int64": lambda: evaluation(squared_error=1.0, num_correct=0.0,
                                                               num_examples=1e300),
            "evaluation near 1e308": lambda: evaluation(squared_error=1.7e308, num_correct=1.0,
                                                        num_examples=1.0),
            "bad weight": lambda: report(NAMES, good, device="mallory-w", weight=float("inf")),
            "nan": lambda: report(NAMES, nan, device="mallory-n"),
            "100,000 metrics": lambda: report(NAMES, good, device="mallory-m", metrics=big_metrics),
        }
        kinds = list(cases)
        for i in range(count):
            kind = kinds[i % len(kinds)]
            first = kind not in self.cases
            code = self.hostile(kind, cases[kind])
            if first:
                self.figures.setdefault("first_status", {})[kind] = code  # type: ignore[index]
            if code == "OK":
                self.refused["NOT REFUSED: " + kind] += 1
            else:
                self.refused[f"{kind}: {code}"] += 1
        channel.close()
        self.normal_round()  # the coordinator still works

    def _precomputed_round(self, honest: int, hostile: Callable[[pb.Assignment], Update]
                           ) -> tuple[int, list[Update], Update]:
        """One round of ``honest`` updates from the real client step plus one hostile update, all sent as
        precomputed reports; returns the base version, the honest updates and the hostile one."""
        self.wait_for_no_open_round()
        clients = [self.client() for _ in range(honest)]
        attacker = self.client("attacker")
        assignments = [c.check_in(max_wait_s=30) for c in [*clients, attacker]]
        base = assignments[0].model_version
        updates = []
        for c, a in zip(clients, assignments, strict=False):
            _, update = c.train(a)
            updates.append(([np.asarray(d) for d in update.delta], float(update.weight)))
        bad = hostile(assignments[-1])
        self.together([partial(self.send, c, a, d, w) for c, a, (d, w)
                       in zip([*clients, attacker], assignments, [*updates, bad], strict=True)])
        self.wait_for_version(base + 1)
        return base, updates, bad

    def outweigh(self) -> None:
        """A client claiming weight 1e9 with a huge delta: its measured share against the stated bound."""
        def hostile(_a: pb.Assignment) -> tuple[list[np.ndarray], float]:
            d = np.random.default_rng(7).normal(size=SHAPE).astype(np.float32)
            return [d * np.float32(1e6 / np.linalg.norm(d))], 1e9

        base, updates, bad = self._precomputed_round(7, hostile)
        step = self.globals_of(base + 1) - self.globals_of(base)  # server SGD, learning rate 1: the mean
        measured, bound = hostile_share(self.spec, step, updates, bad)
        self.figures["max_single_client_share"] = round(measured, 4)
        self.figures["single_client_share_bound"] = round(bound, 4)

    def huge(self) -> None:
        """Two rounds with one finite but huge update each (every value 3e38)."""
        for _ in range(2):
            self._precomputed_round(6, lambda _a: ([np.full(SHAPE, 3e38, np.float32)], 20.0))

    def impersonation(self) -> None:
        self.wait_for_no_open_round()
        victim = self.client("victim")
        attacker_token = self.token("attacker")
        channel, stub, auth = self.stub(attacker_token)
        tricks = 0
        got = victim.check_in(max_wait_s=30)

        def check_in_as(client_id: str) -> pb.CheckInResponse | None:
            try:
                return stub.CheckIn(pb.CheckInRequest(task_name="drill", client_id=client_id,
                                                      protocol_version=1), timeout=10, metadata=auth)
            except grpc.RpcError as err:
                with self.lock:
                    self.hostile_statuses[err.code().name] += 1
                return None

        posed = check_in_as(victim.client_id)
        if posed is not None and posed.HasField("assignment") \
                and posed.assignment.assignment_token == got.token:
            tricks += 1  # the victim's assignment handed to someone else
        hoard = [check_in_as(f"sybil-{i}") for i in range(26)]
        tokens = {r.assignment.assignment_token for r in [posed, *hoard]
                  if r is not None and r.HasField("assignment")}
        self.figures["hoarded_assignments"] = len(tokens)
        # The stolen assignment token, used with the attacker's own credential.
        header = pb.ReportHeader(task_name="drill", client_id=victim.client_id, round_id=got.round_id,
                                 assignment_token=got.token, weight=1.0,
                                 manifest=manifest(NAMES, [np.zeros(SHAPE, np.float32)]))
        if self.hostile("stolen assignment token", lambda: stub.ReportUpdate(iter(
                [pb.ReportUpdateRequest(header=header),
                 *(pb.ReportUpdateRequest(chunk=c) for c in chunks([np.zeros(SHAPE, np.float32)], 65536))]),
                timeout=10, metadata=auth)) == "OK":
            tricks += 1
        for _ in range(12):  # exhaust the victim's check-in budget, if it were shared
            check_in_as(victim.client_id)
        try:  # the victim checks in again (a retry): its budget must be its own
            victim.transport.check_in("drill", victim.client_id)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                tricks += 1
        _, update = victim.train(got)
        try:  # the victim's own report must still be accepted
            accepted = victim.transport.report(got, victim.client_id, NAMES, list(update.delta),
                                               update.weight, {}).accepted
        except grpc.RpcError:
            accepted = False
        if accepted:
            self._note(got.round_id, True, "OK", "")
        else:
            tricks += 1
        self.together([partial(self.honest, self.client()) for _ in range(7)])  # complete the round
        self.figures["impersonations_accepted"] = tricks
        channel.close()
        self.wait_for_no_open_round()

    def idle_streams(self, held: int = 200, probes: int = 50) -> None:
        self.wait_for_no_open_round()
        release = threading.Event()

        def never_first() -> Iterator[pb.ReportUpdateRequest]:
            release.wait(120)
            return
            yield  # a generator that sends nothing until released

        channels, calls = [], []
        for _ in range(held):
            channel, stub, auth = self.stub(self.token("idle"))
            channels.append(channel)
            calls.append(stub.ReportUpdate.future(never_first(), timeout=120, metadata=auth))
        time.sleep(1.0)  # let the streams open (measured below regardless of how many the server kept)
        latencies = []
        probe_channel, probe_stub, _ = self.stub("")
        for _ in range(probes):
            _, _, auth = self.stub(self.token("probe"))
            t0 = time.perf_counter()
            code = self.hostile("honest check-in beside idle streams", lambda auth=auth: probe_stub.CheckIn(
                pb.CheckInRequest(task_name="drill", client_id="probe", protocol_version=1),
                timeout=30, metadata=auth))
            latencies.append((time.perf_counter() - t0) * 1000)
            if code != "OK":
                self.refused[f"probe check-in: {code}"] += 1
        release.set()
        for call in calls:
            try:
                call.result(timeout=60)
            except grpc.RpcError as err:
                with self.lock:
                    self.hostile_statuses[err.code().name] += 1
            except grpc.FutureTimeoutError:
                pass
        for channel in [*channels, probe_channel]:
            channel.close()
        p99 = float(np.percentile(latencies, 99))
        self.figures["honest_checkin_p99_ms_with_idle_streams"] = round(p99, 1)
        self.wait_for_no_open_round()  # the probes' round fails for want of reports

    def evaluation_poisoning(self) -> None:
        version = self.version()
        evaluators = [self.client() for _ in range(8)]
        for c in evaluators:
            c.evaluate(rng=np.random.default_rng(0))
        before = _rmse(self.store, version)
        honest = next(e for e in self.store.evaluation_summaries("drill") if e.version == version)
        counted = self.spec.aggregation.weight_cap(self.spec.training, self.spec.batch_size)
        # The most one zero-error evaluator can pull the RMSE down: it counts for at most the weight cap.
        floor = float(np.sqrt(honest.squared_error / (honest.num_examples + counted)))
        channel, stub, auth = self.stub(self.token("poisoner"))
        # The largest evaluation a coordinator accepts from one device, with no error at all: the most one
        # hostile evaluator can pull the reported RMSE down.
        self.hostile("largest allowed evaluation", lambda: stub.ReportEvaluation(pb.ReportEvaluationRequest(
            task_name="drill", client_id="poison", model_version=version, squared_error=0.0,
            num_correct=MAX_EVALUATION_EXAMPLES, num_examples=MAX_EVALUATION_EXAMPLES), timeout=10,
            metadata=auth))
        for i in range(500):
            self.hostile("poisoned evaluation", lambda i=i: stub.ReportEvaluation(pb.ReportEvaluationRequest(
                task_name="drill", client_id=f"poison-{i}", model_version=version, squared_error=0.0,
                num_correct=1e9, num_examples=1e9), timeout=10, metadata=auth))
        channel.close()
        after = _rmse(self.store, version)
        self.figures["evaluation_rmse_before_after"] = [round(before, 6), round(after, 6)]
        self.figures["evaluation_poisoning_shift"] = round(abs(after - before), 6)
        self.figures["evaluation_poisoning_shift_bound"] = round(before - floor, 6)
        status = subprocess.run([sys.executable, "-m", "fedrecon.cli", "status", "--store", self.store_url,
                                 "--json"], capture_output=True, text=True, timeout=300)
        self.figures["status_exit_code"] = status.returncode

    def late(self) -> None:
        self.wait_for_no_open_round()
        before = self.version()
        stragglers = [self.client() for _ in range(3)]
        assignments = [c.check_in(max_wait_s=30) for c in stragglers]
        self.together([partial(self.honest, self.client()) for _ in range(7)])
        self.wait_for_version(before + 1)  # commits at its deadline with 7 >= 6
        self.together([partial(self.honest, c, a) for c, a in zip(stragglers, assignments, strict=True)])

    def kill(self) -> bool:
        self.wait_for_no_open_round()
        before = self.version()
        self.together([partial(self.honest, self.client()) for _ in range(4)])
        snapshot = self.snapshot()
        assert self.coordinator is not None
        self.coordinator.kill()
        self.start()
        intact = self.snapshot() == snapshot
        self.normal_round()
        return intact and self.version() == before + 1

    def nonfinite_commits(self) -> int:
        versions = self.store.list_versions("drill")
        return sum(not np.isfinite(self.globals_of(v.version)).all() for v in versions)

    def stop(self) -> None:
        if self.coordinator is not None:
            self.coordinator.stop()
        if self._store is not None:
            self._store.close()


def hostile_share(spec: TaskSpec, step: np.ndarray, honest: list[Update], hostile: Update
                  ) -> tuple[float, float]:
    """(measured, stated) share of a round's mean held by the hostile client.

    The committed step (server SGD at learning rate 1) is the aggregate mean m = (1 - a)·h + a·u, where h is
    the mean of the honest updates alone and u the hostile update after the norm bound; ``a`` is the hostile
    client's share of the round's weight. h comes from the aggregation code the coordinator runs
    (``build_aggregator`` with the task's settings), and a is read off the committed model by least
    squares. The stated bound is cap / (cap + the honest clients' capped weights)."""
    from fedrecon.core.aggregation import build_aggregator

    config = spec.aggregation
    cap = config.weight_cap(spec.training, spec.batch_size)
    aggregator = build_aggregator(config, [SHAPE], weight_cap=cap, max_clients=len(honest))
    for delta, weight in honest:
        aggregator.fold_one(delta, weight)
    h = aggregator.mean()
    assert h is not None
    u = hostile[0][0].astype(np.float64)
    if config.norm_policy == "clip" and np.linalg.norm(u) > config.max_update_norm:
        u = u * (config.max_update_norm / np.linalg.norm(u))
    direction = u - h[0]
    a = float(np.vdot(step - h[0], direction) / np.vdot(direction, direction))
    return a, cap / (cap + aggregator.total_weight)


def _rmse(store: SqlStore, version: int) -> float:
    for e in store.evaluation_summaries("drill"):
        if e.version == version:
            return float(e.metrics()["rmse"])
    return float("nan")


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="SQLAlchemy URL (default: SQLite in a temporary folder)")
    parser.add_argument("--bad-messages", type=int, default=200)
    parser.add_argument("--idle-streams", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fault_drill.json"))
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedrecon-drill-") as tmp:
        folder = Path(tmp)
        drill = Drill(args.store or f"sqlite:///{folder / 'drill.db'}", folder)
        drill.start()
        try:
            for phase in (drill.warm_up, drill.normal_round, drill.dropouts,
                          lambda: drill.bad_input(args.bad_messages), drill.outweigh, drill.huge,
                          drill.impersonation, lambda: drill.idle_streams(args.idle_streams),
                          drill.evaluation_poisoning, drill.late):
                phase()
            verified = drill.kill()
            nonfinite = drill.nonfinite_commits()
            rounds = drill.store.list_rounds("drill")
            versions = drill.store.list_versions("drill")
        finally:
            drill.stop()
    committed = [r for r in rounds if r.state == RoundState.COMMITTED]
    lost = sum(max(0, drill.acknowledged[r.round_id] - r.num_accepted) for r in committed)
    summary: dict[str, object] = {
        "rounds_committed": len(committed),
        "rounds_failed": sum(r.state == RoundState.FAILED for r in rounds),
        "reports_accepted": sum(drill.acknowledged.values()),
        "reports_folded_in_committed_rounds": sum(r.num_accepted for r in committed),
        "reports_refused": dict(sorted(drill.refused.items())),
        "warm_up_rounds_failed": drill.warm_up_rounds_failed,
        "cases": {kind: dict(sorted(c.items())) for kind, c in drill.cases.items()},
        "versions": len(versions),
        "versions_verified": verified,
        "updates_lost": lost,
        "nonfinite_commits": nonfinite,
        "unknown_statuses": drill.hostile_statuses.get("UNKNOWN", 0),
        "hostile_statuses": dict(sorted(drill.hostile_statuses.items())),
        **drill.figures,
        "seconds": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
