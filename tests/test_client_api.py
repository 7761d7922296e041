"""The client library as an app developer meets it: the protocol's own types (never protobuf), one source of
the protocol's constants, the round outcome call, and the dataset's own item ids in and out."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message

from fedrecon.client import (
    FederatedClient,
    ItemVocabulary,
    Personalization,
    ReportOutcome,
    RoundOutcome,
    RoundState,
)
from fedrecon.core.batching import ClientExamples
from fedrecon.core.config import FedReconConfig
from fedrecon.core.model_spec import model_from_config
from fedrecon.protocol import PROTOCOL_VERSION, Assignment, LatestModel
from fedrecon.server.app import start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.simulations.ratings import load_dataset

REPO = Path(__file__).resolve().parents[1]
NUM_ITEMS = 600
# A vocabulary that is nothing like the dense indices: sparse, large, not sorted.
VOCABULARY = tuple(int(i) for i in 100_000 + 7 * np.random.default_rng(5).permutation(NUM_ITEMS))


def _task(name: str, *, item_ids: tuple[int, ...] | None = None, clients: int = 2) -> TaskSpec:
    model = {"kind": "matrix_factorization", "num_items": NUM_ITEMS, "num_factors": 4}
    return TaskSpec(name=name, model=model,
                    rounds=RoundSettings(clients_per_round=clients, min_reports=clients, over_selection=1.0,
                                         selection_timeout_s=60.0, reporting_timeout_s=60.0),
                    item_ids=item_ids)


def _as_ids(examples: ClientExamples, vocabulary: tuple[int, ...]) -> ClientExamples:
    return ClientExamples(x=np.asarray(vocabulary, np.int64)[examples.x], y=examples.y)


def _no_protobuf(value: object, where: str) -> None:
    """Fail if ``value`` is, or holds anywhere inside it, a generated protobuf message."""
    assert not isinstance(value, Message), f"{where} is a protobuf {type(value).__name__}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _no_protobuf(getattr(value, f.name), f"{where}.{f.name}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_protobuf(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _no_protobuf(v, f"{where}[{i}]")


def test_public_calls_return_the_projects_dataclasses_never_protobuf(tmp_path: Path) -> None:
    data = load_dataset("synthetic", seed=42)
    users = sorted(data.train)[:2]
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store, start_server(Coordinator(store, _task("api"))
                                                                             ) as server:
        first, second = (FederatedClient(server.address, "api", f"u{u}", data.train[u]) for u in users)
        assignment = first.check_in(max_wait_s=30)
        assert type(assignment) is Assignment and dataclasses.is_dataclass(assignment)
        assert assignment.round_num == 1 and assignment.token and assignment.deadline.tzinfo is not None
        _no_protobuf(assignment, "check_in()")
        latest = first.transport.latest_model("api")
        assert type(latest) is LatestModel and latest.item_ids == ()  # no vocabulary: indices are the ids
        _no_protobuf(latest, "latest_model()")

        # The round is open until its second report: GetRound says so, then says where it went.
        names, update = first.train(assignment, np.random.default_rng(0))
        mine = first.transport.report(assignment, first.client_id, names, update.delta, update.weight,
                                      update.metrics)
        assert type(mine) is ReportOutcome and mine.accepted and mine.in_round
        assert mine.round_id == assignment.round_id and mine.committed_version is None
        open_ = first.round_outcome(assignment.round_id)
        assert type(open_) is RoundOutcome
        assert (open_.state, open_.new_version, open_.num_accepted) == (RoundState.OPEN, None, 1)
        theirs = second.participate(max_wait_s=30)
        assert type(theirs) is ReportOutcome and theirs.accepted and theirs.status == "OK"
        _no_protobuf(theirs, "participate()")
        done = second.round_outcome(assignment.round_id)
        assert (done.state, done.new_version, done.num_accepted) == (RoundState.COMMITTED, 1, 2)
        _no_protobuf(done, "round_outcome()")
        assert first.settle(mine).committed_version == 1

        # A report to a round that is over is an outcome with its status, not an exception.
        late = first.transport.report  # the same assignment again, with a different update: refused
        with pytest.raises(grpc.RpcError) as refused:
            late(assignment, first.client_id, names, [d + 1.0 for d in update.delta], update.weight, {})
        assert refused.value.code() == grpc.StatusCode.ABORTED

        with pytest.raises(grpc.RpcError) as unknown:
            first.round_outcome(assignment.round_id + 1000)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        first.close()
        second.close()


def test_the_protocol_version_has_one_source() -> None:
    """``PROTOCOL_VERSION =`` is assigned once in the source tree, in fedrecon/protocol.py, and both sides
    use that one."""
    assigned = [path.relative_to(REPO).as_posix()
                for folder in ("fedrecon", "client", "server", "core", "simulations")
                for path in (REPO / folder).rglob("*.py")
                if re.search(r"^PROTOCOL_VERSION\s*=", path.read_text(), re.MULTILINE)]
    assert assigned == ["fedrecon/protocol.py"]
    from fedrecon.client import transport
    from fedrecon.server import coordinator
    assert transport.PROTOCOL_VERSION is PROTOCOL_VERSION and coordinator.PROTOCOL_VERSION is PROTOCOL_VERSION
    assert not (REPO / "fedrecon" / "retry_hint.py").exists()


def test_importing_the_client_library_does_not_import_tensorflow() -> None:
    code = ("import sys\n"
            "import fedrecon.client\n"
            "from fedrecon.client import FederatedClient, Personalization, ReportOutcome\n"
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=REPO / "tests")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_item_ids_map_to_dense_indices_and_back() -> None:
    vocabulary = ItemVocabulary.of(VOCABULARY)
    dense = np.arange(NUM_ITEMS)
    ids = vocabulary.to_ids(dense)
    assert ids.tolist() == list(VOCABULARY)
    back, known = vocabulary.to_dense(ids)
    assert known.all() and back.tolist() == dense.tolist()
    # Examples in the dataset's ids: unknown items are dropped and counted, the rest keep their rating.
    x = np.asarray([VOCABULARY[3], 42, VOCABULARY[0], VOCABULARY[599], -1], np.int64)
    y = np.asarray([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    mapped, dropped = vocabulary.examples(ClientExamples(x=x, y=y))
    assert dropped == 2
    assert mapped.x.tolist() == [3, 0, 599] and mapped.y.tolist() == [1.0, 3.0, 4.0]
    # Without a vocabulary the ids are the indices.
    plain, none = ItemVocabulary().examples(ClientExamples(x=dense[:5], y=y))
    assert none == 0 and plain.x.tolist() == [0, 1, 2, 3, 4]


def test_a_task_vocabulary_is_served_and_recommendations_are_dataset_ids(tmp_path: Path) -> None:
    """With the task's vocabulary, clients train on examples in the dataset's ids and ``recommend`` answers
    in them: the same recommendations as a personalization on dense indices, mapped through the
    vocabulary."""
    data = load_dataset("synthetic", seed=42)
    users = sorted(data.train)[:2]
    task = _task("vocab", item_ids=VOCABULARY)
    with SqlStore(f"sqlite:///{tmp_path / 'v.db'}") as store, \
            start_server(Coordinator(store, task)) as server:
        clients = [FederatedClient(server.address, "vocab", f"u{u}", _as_ids(data.train[u], VOCABULARY))
                   for u in users]
        assert clients[0].transport.latest_model("vocab").item_ids == VOCABULARY
        reports = [c.participate(max_wait_s=30) for c in clients]
        assert [r.accepted for r in reports] == [True, True] and clients[0].dropped_examples == 0

        newcomer = data.test[sorted(data.test)[0]]
        unknown = ClientExamples(x=np.append(_as_ids(newcomer, VOCABULARY).x, 7),  # 7: not in the vocabulary
                                 y=np.append(newcomer.y, np.float32(4.0)))
        device = FederatedClient(server.address, "vocab", "newcomer", unknown)
        mine = device.personalize(rng=np.random.default_rng(3))
        assert isinstance(mine, Personalization) and mine.dropped_examples == 1 and mine.version == 1
        top = mine.recommend(10)
        assert len(top) == 10 and all(isinstance(i, int) and isinstance(s, float) for i, s in top)
        rated = set(_as_ids(newcomer, VOCABULARY).x.tolist())
        assert {i for i, _ in top} <= set(VOCABULARY) and not {i for i, _ in top} & rated
        latest = device.transport.latest_model("vocab")
        _, globals_ = device.globals_for(latest.model_version)

    # The same user on dense indices, no vocabulary: the same items, as indices.
    dense = Personalization.fit(model_from_config(task.model), FedReconConfig(), globals_, newcomer,
                                batch_size=task.batch_size, version=1, rng=np.random.default_rng(3))
    assert [VOCABULARY[i] for i, _ in dense.recommend(10)] == [i for i, _ in top]
    ids = np.asarray([i for i, _ in top[:3]])
    assert np.allclose(mine.predict(ids), dense.predict(np.asarray([i for i, _ in dense.recommend(3)])))
    with pytest.raises(ValueError, match="not in the task's item vocabulary"):
        mine.predict(np.asarray([7]))


def test_task_files_carry_an_item_vocabulary(tmp_path: Path) -> None:
    (tmp_path / "items.txt").write_text("# movie ids\n10\n20\n\n30\n")
    body = ('name = "v"\nitem_vocabulary = "items.txt"\n'
            '[model]\nkind = "matrix_factorization"\nnum_items = {n}\nnum_factors = 2\n')
    (tmp_path / "task.toml").write_text(body.format(n=3))
    task = TaskSpec.load(tmp_path / "task.toml")
    assert task.item_ids == (10, 20, 30)
    assert TaskSpec.from_dict(task.to_dict()) == task  # the ids are stored with the task, not the path
    (tmp_path / "task.toml").write_text(body.format(n=4))
    with pytest.raises(ValueError, match="has 3 ids but the model has num_items = 4"):
        TaskSpec.load(tmp_path / "task.toml")
    (tmp_path / "items.txt").write_text("10\nten\n")
    with pytest.raises(ValueError, match=r"items.txt:2: expected an integer item id"):
        TaskSpec.load(tmp_path / "task.toml")


def test_the_movielens_task_maps_movie_ids_of_its_dataset(ml_2998_dir: Path) -> None:
    """The deployed MovieLens task's vocabulary is the dataset's own movie ids in dense order."""
    task = TaskSpec.load(REPO / "deploy" / "tasks" / "movielens-2998u.toml")
    data = load_dataset(str(ml_2998_dir), seed=42)
    assert task.item_ids == tuple(int(i) for i in data.item_ids)
    assert task.model["num_items"] == data.num_items == len(task.item_ids)
