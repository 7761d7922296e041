"""Keras models through the platform: a task names a Keras model, the coordinator serves its globals over
real gRPC on loopback, devices rebuild it from the description (or bring their own, checked), ``export``
writes a model an app loads, and descriptions that would run code are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.client import FederatedClient
from fedrecon.core.algorithm import FedRecon
from fedrecon.core.batching import ClientExamples
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.core.keras_model import KerasReconstructionModel
from fedrecon.core.keras_spec import (
    UnsafeModelDescription,
    _describe_in_subprocess,
    build_keras_model,
    globals_from_keras_file,
    keras_model_from_file,
    resolve_task_model,
)
from fedrecon.core.model_spec import model_from_config
from fedrecon.model_file import ModelFile
from fedrecon.server.app import start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.server.task import TaskSpec
from fedrecon.simulations.grpc_transport import GrpcRounds, simulation_task
from fedrecon.simulations.runner import Simulation, SimulationSettings

NUM_ITEMS, FACTORS = 12, 3
CONFIG = FedReconConfig(client_optimizer=OptimizerSpec("sgd", 0.3), reconstruction_optimizer=OptimizerSpec(
    "sgd", 0.2), recon_epochs=2, server_optimizer=OptimizerSpec("adam", 0.05))


def _model(seed: int = 0) -> KerasReconstructionModel:
    """Item embeddings and a hidden layer (global) and a personal output layer (local)."""
    keras.utils.set_random_seed(seed)
    items = keras.Input(shape=(), dtype="int32", name="item")
    vectors = keras.layers.Embedding(NUM_ITEMS, FACTORS, name="items")(items)
    hidden = keras.layers.Dense(4, activation="tanh", name="hidden")(vectors)
    rating = keras.layers.Dense(1, name="personal")(hidden)
    return KerasReconstructionModel(keras.Model(items, rating), ["personal"])


def _users(n: int = 6) -> dict[int, ClientExamples]:
    rng = np.random.default_rng(1)
    return {u: ClientExamples(x=rng.integers(0, NUM_ITEMS, 9).astype(np.int32),
                              y=rng.integers(1, 6, 9).astype(np.float32)) for u in range(n)}


def test_the_description_rebuilds_the_same_model_with_the_same_variables() -> None:
    model = _model()
    description = json.loads(json.dumps(model.config()))  # what crosses the wire
    assert [v["name"] for v in description["variables"]] == [
        "items/embeddings", "hidden/kernel", "hidden/bias", "personal/kernel", "personal/bias"]
    rebuilt = model_from_config(description)
    assert rebuilt.global_variables == model.global_variables
    assert rebuilt.local_variables == model.local_variables
    # Keras' own seeded initialisation: the same seed, the same version 0, whoever builds it.
    a, b = rebuilt.initial_globals(5), model_from_config(description).initial_globals(5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_lambda_layer_or_foreign_code_in_a_description_is_refused() -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(2,))
    doubled = keras.layers.Lambda(lambda t: t * 2, name="doubler")(inputs)
    outputs = keras.layers.Dense(1, name="out")(doubled)
    lam = KerasReconstructionModel(keras.Model(inputs, outputs), ["out"])
    description = json.loads(json.dumps(lam.config()))
    with pytest.raises(UnsafeModelDescription, match="Lambda layer \\('doubler'\\)"):
        build_keras_model(description)
    with pytest.raises(UnsafeModelDescription, match="Lambda"):
        model_from_config(description).predict([], [], None)  # a device builds on first use
    foreign = json.loads(json.dumps(_model().config()))
    foreign["architecture"]["config"]["layers"][2]["config"]["activation"] = {
        "module": "os", "class_name": "function", "config": "system", "registered_name": "system"}
    with pytest.raises(UnsafeModelDescription, match="'os'"):
        build_keras_model(foreign)


def test_an_apps_own_model_must_have_the_tasks_variables() -> None:
    description = _model().config()
    keras.utils.set_random_seed(0)
    items = keras.Input(shape=(), dtype="int32")
    vectors = keras.layers.Embedding(NUM_ITEMS, FACTORS + 1, name="items")(items)
    rating = keras.layers.Dense(1, name="personal")(vectors)
    other = KerasReconstructionModel(keras.Model(items, rating), ["personal"])
    client = FederatedClient("127.0.0.1:1", "t", "d", _users()[0], model=other)
    with pytest.raises(ValueError) as refused:
        client.step_for(json.dumps(description), json.dumps(CONFIG.to_dict()))
    text = str(refused.value)
    assert "items/embeddings: the task has shape [12, 3], the model [12, 4]" in text
    assert "hidden/kernel: the task has global [3, 4], the model has no such variable" in text
    client.close()


def test_grpc_rounds_equal_in_process_rounds_and_export_loads(tmp_path: Path) -> None:
    """Three rounds of three clients: through a real coordinator over gRPC on loopback (the description
    rebuilt by each client) and in process give the same globals; the versions commit; ``export`` writes
    a model file and a .keras file that load back to the same values."""
    users = _users()
    settings = SimulationSettings(rounds=3, clients_per_round=3, batch_size=3, eval_every=100, seed=4)
    model = _model()
    algorithm = FedRecon(model, CONFIG)
    start = algorithm.initial_state(settings.seed)
    in_process, _ = Simulation(algorithm, users, settings).run(start)
    store_url = f"sqlite:///{tmp_path / 'keras.db'}"
    # Version 0 is the app's model; every client rebuilds the model from the assignment's description.
    with GrpcRounds(model, CONFIG, users, settings, store_url=store_url, task_name="kerastask") as rounds:
        over_grpc, _ = Simulation(algorithm, users, settings, round_runner=rounds).run(start)
        assert rounds.store.latest_version("kerastask").version == 3
    for a, b in zip(in_process.globals, over_grpc.globals, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(in_process.globals[0], start.globals[0], atol=1e-3)  # it did train

    runner = CliRunner()
    for out in ("model.npz", "model.keras"):
        done = runner.invoke(app, ["export", "--store", store_url, "--task", "kerastask", "--out",
                                   str(tmp_path / out)])
        assert done.exit_code == 0, done.output
    loaded = keras_model_from_file(ModelFile.load(tmp_path / "model.npz"))
    saved = keras.saving.load_model(tmp_path / "model.keras")  # plain Keras, as an app loads it
    names = [v.name for v in model.global_variables]
    by_path = {v.path: v.numpy() for v in saved.weights}
    for name, value, exported in zip(names, over_grpc.globals, loaded.initial_globals(0), strict=True):
        np.testing.assert_allclose(exported, value, atol=1e-6)
        np.testing.assert_allclose(by_path[name], value, atol=1e-6)
    # serve --init-model takes the .keras file: its globals, by name
    from_file = globals_from_keras_file(model.config(), tmp_path / "model.keras")
    for a, b in zip(from_file, over_grpc.globals, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_device_trains_a_task_file_model_against_a_served_coordinator(tmp_path: Path) -> None:
    """A task file names the architecture (a JSON file) and its local layer; the coordinator serves it; a
    device with only the task's name builds the model from the assignment and its report commits."""
    (tmp_path / "model.json").write_text(_model().keras_model.to_json())
    (tmp_path / "task.toml").write_text(
        'name = "kt"\nbatch_size = 3\n[model]\nkind = "keras"\narchitecture = "model.json"\n'
        'local_layers = ["personal"]\nobjective = "mse"\n[rounds]\nclients_per_round = 2\n'
        'min_reports = 2\nretry_delay_s = [0.05, 0.2]\n')
    spec = TaskSpec.load(tmp_path / "task.toml")
    assert spec.model["architecture"]["class_name"] == "Functional"
    store = SqlStore(f"sqlite:///{tmp_path / 'kt.db'}")
    coordinator = Coordinator(store, spec)
    server = start_server(coordinator, host="127.0.0.1", port=0)
    try:
        users = _users(2)
        outcomes = []
        from concurrent.futures import ThreadPoolExecutor

        def play(u: int) -> bool:
            with FederatedClient(server.address, "kt", f"device-{u}", users[u]) as client:
                return client.participate(max_wait_s=120).accepted

        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(play, [0, 1]))
        assert outcomes == [True, True]
        assert coordinator.wait_for_version(1, timeout=120)
        v1 = store.latest_version("kt")
        assert v1.version == 1
    finally:
        server.stop()
        store.close()


def test_resolving_a_task_reads_files_only(tmp_path: Path) -> None:
    model = _model()
    model.keras_model.save(tmp_path / "m.keras")
    resolved = resolve_task_model({"kind": "keras", "file": "m.keras", "local_layers": ["personal"]},
                                  tmp_path)
    assert resolved["architecture"]["class_name"] == "Functional" and "file" not in resolved
    with pytest.raises(ValueError, match="cannot read the keras model's architecture"):
        resolve_task_model({"kind": "keras", "architecture": "missing.json", "local_layers": []}, tmp_path)


def test_the_coordinator_serves_a_keras_task_without_importing_tensorflow(tmp_path: Path) -> None:
    """Names, shapes and the seeded version 0 come from a child interpreter; the coordinator's own process
    never loads TensorFlow or Keras."""
    description = {k: v for k, v in _model().config().items() if k != "variables"}
    (tmp_path / "d.json").write_text(json.dumps(description))
    expected = model_from_config(description).initial_globals(0)
    np.savez(tmp_path / "expected.npz", *expected)
    code = (
        "import json, sys, numpy as np\n"
        "from fedrecon.server.coordinator import Coordinator\n"
        "from fedrecon.server.store import SqlStore\n"
        "from fedrecon.server.task import TaskSpec\n"
        f"d = json.load(open({str(tmp_path / 'd.json')!r}))\n"
        "spec = TaskSpec(name='k', model=d)\n"
        f"store = SqlStore('sqlite:///{tmp_path / 'c.db'}')\n"
        "c = Coordinator(store, spec)\n"
        "from fedrecon.server.checkpoints import globals_from_bytes\n"
        "names = [v.name for v in c.model.global_variables]\n"
        "got = globals_from_bytes(store.latest_version('k').payload()[0], names)\n"
        f"want = np.load({str(tmp_path / 'expected.npz')!r})\n"
        "assert all(np.array_equal(g, want[f'arr_{i}']) for i, g in enumerate(got))\n"
        "print(names, 'tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("False False"), out.stdout
    assert "items/embeddings" in out.stdout and "personal" not in out.stdout


def test_the_child_interpreter_ignores_a_fedrecon_folder_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fedrecon serve`` started at the root of a checkout: its working directory holds the source tree's
    ``fedrecon/`` folder, which the child building the model must not import in place of the installed
    package (it did, and a checkout without generated protocol modules could not serve a Keras task)."""
    decoy = tmp_path / "fedrecon"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the working directory fedrecon was imported')\n")
    description = {k: v for k, v in _model().config().items() if k != "variables"}
    monkeypatch.chdir(tmp_path)
    table, arrays = _describe_in_subprocess(description, 0)
    assert [v["name"] for v in table if not v["local"]] == ["items/embeddings", "hidden/kernel",
                                                            "hidden/bias"]
    assert len(arrays) == 3


def test_simulation_task_of_a_keras_model_is_a_valid_task() -> None:
    task = simulation_task("t", _model(), CONFIG, SimulationSettings(clients_per_round=2), 4)
    assert TaskSpec.from_dict(task.to_dict()).model == task.model
