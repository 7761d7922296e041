"""The TensorFlow Federated backend: the same simulation, with rounds and evaluation run by TFF.

``fedrecon simulate --backend tff`` keeps everything that defines the experiment on this side (data loading,
the user split, the seeded client selection of every round, validation-based model selection, metrics.json)
and hands only the computation to ``tff.learning.algorithms.build_fed_recon`` / ``build_fed_recon_eval``,
which run in their own environment (``make tff-env``) as a worker process (``tff/tff_worker.py``).
So a TFF run and a fedrecon run of the same task differ only in the engine that computes each round.

Two kinds of model cross: matrix factorization, and Keras models with local layers
(``KerasReconstructionModel``, e.g. ``core.nextword``), whose description the worker rebuilds in tf.keras 2
(``tff/keras_bridge.py``, which refuses what it cannot build exactly). ``SideBySide`` runs one task in both
engines round by round (the parity tests, ``benchmarks/tff_parity.py`` and ``tff_side_by_side.py``).

The worker's interpreter is ``$FEDRECON_TFF_PYTHON`` if set, else ``.venv-tff/bin/python`` in the working
directory or in the source checkout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedrecon.core.aggregation import UNBOUNDED_MEAN
from fedrecon.core.algorithm import FedRecon, ServerState
from fedrecon.core.batching import ClientExamples
from fedrecon.core.config import FedReconConfig
from fedrecon.core.keras_model import KerasReconstructionModel
from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.core.model import ReconstructionModel
from fedrecon.simulations.runner import RoundRecord, Simulation, SimulationSettings, select_clients
from fedrecon.tensors import arrays_from_bytes, arrays_to_bytes

# The worker and the interop module run only under the TFF environment's interpreter, so they live in the
# checkout's tff/ folder, outside the installed package (the TFF backend is a checkout-only feature).
WORKER = Path(__file__).resolve().parents[1] / "tff" / "tff_worker.py"
TFF_VENV = ".venv-tff"


class TffUnavailable(RuntimeError):
    """No TFF environment to run the worker in."""


class TffError(RuntimeError):
    """The TFF worker refused a command or died."""


def tff_python() -> Path:
    """The interpreter of the TFF environment (see the module docstring for the search order)."""
    configured = os.environ.get("FEDRECON_TFF_PYTHON")
    if configured:
        path = Path(configured)
        if not path.exists():
            raise TffUnavailable(f"FEDRECON_TFF_PYTHON={configured} does not exist")
        return path
    candidates = [Path.cwd() / TFF_VENV, Path(__file__).resolve().parents[1] / TFF_VENV]
    for venv in candidates:
        if (venv / "bin" / "python").exists():
            return venv / "bin" / "python"
    raise TffUnavailable("no TensorFlow Federated environment: run `make tff-env` in the fedrecon checkout "
                         "(or set FEDRECON_TFF_PYTHON to an interpreter with tensorflow-federated 0.87)")


def _names(model: ReconstructionModel) -> list[str]:
    return [v.name for v in model.global_variables]


def save_globals(model: ReconstructionModel, arrays: Sequence[np.ndarray], path: Path) -> None:
    """Global variables by name, as the plain ``.npz`` the worker reads (``fedrecon.tensors``, no meta)."""
    path.write_bytes(arrays_to_bytes(dict(zip(_names(model), (np.asarray(a, np.float32) for a in arrays),
                                              strict=True))))


def load_globals(model: ReconstructionModel, path: Path) -> list[np.ndarray]:
    named, _ = arrays_from_bytes(path.read_bytes())
    return [np.asarray(named[n], np.float32).reshape(v.shape)
            for n, v in zip(_names(model), model.global_variables, strict=True)]


def shared_local_start(model: KerasReconstructionModel) -> dict[str, np.ndarray]:
    """The one start every client's local variables take, by name: what TFF can run.

    TFF's ``build_fed_recon`` builds the client model once, so all clients start their locals from one
    value; fedrecon draws each client's start from the local layers' initializers. The two agree only when
    that draw does not depend on the client, which two differently seeded draws show (a zeros or constant
    initializer, like the personal adapter of ``core.nextword``); a random one is refused.
    """
    first = model.initial_locals(np.random.default_rng(0))
    second = model.initial_locals(np.random.default_rng(1))
    random = [v.name for v, a, b in zip(model.local_variables, first, second, strict=True)
              if not np.array_equal(a, b)]
    if random:
        raise ValueError(f"the local variables {random} start from a random draw per client; TFF's "
                         "build_fed_recon builds the client model once and starts every client from the same "
                         "value, so it cannot run them: give those local layers a deterministic initializer "
                         "(zeros or a constant) to compare with TFF")
    return {v.name: a for v, a in zip(model.local_variables, first, strict=True)}


class TffEngine:
    """A running TFF worker for one model, configuration and population of users.

    ``users`` is every user the run may train or evaluate (training, validation and test users alike);
    their examples are sent once, in the order this side holds them, so TFF batches exactly the same
    examples as fedrecon does. ``model`` is FedRecon matrix factorization or a Keras model with local layers.
    """

    def __init__(self, model: ReconstructionModel, config: FedReconConfig,
                 users: Mapping[int, ClientExamples], *, batch_size: int,
                 initial_globals: Sequence[np.ndarray],
                 eval_clip: tuple[float, float] | None = None, python: Path | None = None) -> None:
        keras_locals: dict[str, np.ndarray] | None = None
        if isinstance(model, KerasReconstructionModel):
            keras_locals = shared_local_start(model)
        elif not isinstance(model, MatrixFactorization) or model.shared_user:
            raise ValueError("the TFF backend runs FedRecon matrix factorization (user factors local) and "
                             "Keras models with local layers only")
        elif model.local_init == "uniform":
            raise ValueError("TFF's build_fed_recon draws the local variables' start once, when it builds "
                             "the client computation, so every client starts from the same vector: run the "
                             "TFF backend with local_init 'shared' (what TFF does) or 'zeros'")
        if config.shuffle_each_round:  # TFF batches the examples in the order sent once (see above)
            raise ValueError("the TFF backend batches each user's examples in one fixed order: it cannot "
                             "shuffle them each round: run it without shuffle_each_round "
                             "(--no-shuffle-each-round)")
        self.model = model
        interpreter = python or tff_python()  # before anything is created that would need cleaning up
        if not WORKER.is_file():
            raise TffUnavailable(f"the TFF worker is not at {WORKER}: the TFF backend runs from a fedrecon "
                                 "checkout (editable install), next to its tff/ folder")
        self._dir = tempfile.TemporaryDirectory(prefix="fedrecon-tff-")
        self.workdir = Path(self._dir.name)
        self._log: IO[bytes] = open(self.workdir / "worker.log", "wb")  # noqa: SIM115 (closed in close())
        self._busy = False  # a command was sent and its answer not read (an interrupted call)
        self._calls = 0
        try:
            # Its own session: TFF 0.87 starts a C++ executor (worker_binary) that outlives the Python
            # process that started it, however it ends; ``close`` ends the whole process group.
            self._proc = subprocess.Popen([str(interpreter), str(WORKER)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
                                          start_new_session=True)
        except BaseException:
            self._log.close()
            self._dir.cleanup()
            raise
        try:
            ids = sorted(users)
            lengths = np.array([len(users[u]) for u in ids], np.int64)
            (self.workdir / "data.npz").write_bytes(arrays_to_bytes({
                "users": np.array(ids, np.int64), "offsets": np.concatenate([[0], np.cumsum(lengths)]),
                "x": np.concatenate([np.asarray(users[u].x, np.int32) for u in ids]),
                "y": np.concatenate([np.asarray(users[u].y, np.float32) for u in ids])}))
            initial = self.workdir / "initial.npz"
            save_globals(model, initial_globals, initial)
            # The shared start, so TFF's clients begin from the very values fedrecon's do.
            local_start = None
            if isinstance(model, MatrixFactorization) and model.local_init == "shared":
                local_start = model.initial_locals(np.random.default_rng(0))[0].tolist()
            locals_file = None
            if keras_locals is not None:
                locals_file = self.workdir / "locals.npz"
                locals_file.write_bytes(arrays_to_bytes(keras_locals))
            self.info = self._call({"op": "init", "model": model.config(), "training": config.to_dict(),
                                    "local_start": local_start,
                                    "locals": str(locals_file) if locals_file else None,
                                    "batch_size": batch_size,
                                    "data": str(self.workdir / "data.npz"), "globals": str(initial),
                                    "eval_clip": list(eval_clip) if eval_clip else None})
        except BaseException:
            self.close()
            raise

    def _call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._busy = True
        try:
            self._proc.stdin.write(json.dumps(cmd) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self._proc.wait(timeout=30)
            raise TffError(f"the TFF worker exited (code {self._proc.returncode}) during {cmd['op']}:\n"
                           f"{self.log_tail()}")
        self._busy = False
        try:
            reply = json.loads(line)
        except json.JSONDecodeError as err:
            raise TffError(f"the TFF worker answered {cmd['op']} with {line[:200]!r}:\n{self.log_tail()}"
                           ) from err
        if not reply.pop("ok"):
            raise TffError(f"TFF refused {cmd['op']}: {reply['error']}\n{reply.get('trace', '')}")
        return reply

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return (self.workdir / "worker.log").read_text(errors="replace")[-chars:]

    def _scratch(self, kind: str) -> Path:
        """A fresh file name in the work folder for one command's weights."""
        self._calls += 1
        return self.workdir / f"{kind}-{self._calls}.npz"

    def _read_globals(self, op: str, **fields: Any) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Send a command that writes the current globals to ``out``; those globals and the answer."""
        out = self._scratch(op)
        reply = self._call({"op": op, **fields, "out": str(out)})
        arrays = load_globals(self.model, out)
        out.unlink()
        return arrays, reply

    def train_round(self, clients: Sequence[int]) -> tuple[list[np.ndarray], dict[str, float]]:
        """One ``build_fed_recon`` round over ``clients``: the new globals and TFF's round figures."""
        return self._read_globals("round", clients=[int(c) for c in clients])

    def current_globals(self) -> list[np.ndarray]:
        """The global weights TFF's training process holds now (read back through ``ModelWeights``)."""
        return self._read_globals("get_globals")[0]

    def evaluate(self, globals_: Sequence[np.ndarray], users: Sequence[int]) -> dict[str, float]:
        """``build_fed_recon_eval`` of ``users`` under ``globals_``, in the keys of fedrecon's evaluation:
        example-weighted MSE, RMSE and accuracy for ratings; loss per target and accuracy over counted
        targets for a Keras task."""
        path = self._scratch("eval")
        save_globals(self.model, globals_, path)
        reply = self._call({"op": "evaluate", "users": [int(u) for u in users], "globals": str(path)})
        path.unlink()
        if "loss_per_target" in reply:
            return {"loss": reply["loss_per_target"], "accuracy": reply["accuracy"],
                    "num_examples": reply["num_examples"]}
        return {"mse": reply["mse"], "rmse": float(np.sqrt(reply["mse"])), "accuracy": reply["accuracy"],
                "num_examples": reply["num_examples"]}

    def close(self) -> None:
        """Stop the worker and everything TFF started with it, whatever state the worker is in."""
        try:
            if self._proc.poll() is None and not self._busy:
                self._call({"op": "quit"})
                self._proc.wait(timeout=30)
        except (TffError, OSError, subprocess.TimeoutExpired, ValueError):
            pass
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)  # the worker (if still there) and TFF's executor
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            self._log.close()
            self._dir.cleanup()

    def __enter__(self) -> TffEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TffRounds:
    """A ``RoundRunner`` for ``Simulation``: the same seeded selection, each round computed by TFF.

    The server optimizer's state lives in the TFF process; the ``ServerState`` this side keeps carries the
    global weights (for validation-based model selection) and the round number.
    """

    def __init__(self, engine: TffEngine, user_ids: Sequence[int], settings: SimulationSettings) -> None:
        self.engine = engine
        self.user_ids = sorted(user_ids)
        self.settings = settings

    def __call__(self, state: ServerState) -> tuple[ServerState, RoundRecord]:
        s = self.settings
        round_num = state.round_num + 1
        chosen = select_clients(self.user_ids, s.clients_per_round, seed=s.seed, round_num=round_num)
        globals_, figures = self.engine.train_round(chosen)
        # A Keras task's worker also reports fedrecon's definition of the training loss; TFF's own (a mean
        # of batch means) is all there is for matrix factorization.
        record = RoundRecord(round_num=round_num, seconds=float(figures["seconds"]),
                             train_loss=float(figures.get("loss_per_target", figures["loss"])),
                             num_clients=len(chosen),
                             total_weight=float("nan"))  # TFF does not report the sum of client weights
        return ServerState(globals_, state.optimizer_state, round_num), record


def max_abs_difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Largest absolute difference between two models' variables (their shapes must agree)."""
    if [np.shape(x) for x in a] != [np.shape(y) for y in b]:
        raise ValueError("the models have different shapes")
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))


class SideBySide:
    """One task in both engines, advanced round by round from the same initial globals with the same clients.

    ``users`` is every user either engine will see (training users train; pass validation users too to
    evaluate them). Used by the parity tests and ``benchmarks/tff_parity.py``.
    """

    def __init__(self, model: ReconstructionModel, config: FedReconConfig,
                 train: Mapping[int, ClientExamples], users: Mapping[int, ClientExamples],
                 settings: SimulationSettings, *,
                 python: Path | None = None) -> None:
        algorithm = FedRecon(model, config, aggregation=UNBOUNDED_MEAN)  # what TFF's build_fed_recon does
        self.ours = Simulation(algorithm, train, settings)
        self.initial = algorithm.initial_state(settings.seed)
        self.engine = TffEngine(model, config, users, batch_size=settings.batch_size,
                                initial_globals=self.initial.globals, eval_clip=settings.eval_clip,
                                python=python)
        self.theirs = TffRounds(self.engine, list(train), settings)
        self.state_ours = self.state_theirs = self.initial
        self.records: list[tuple[RoundRecord, RoundRecord]] = []  # (fedrecon's, TFF's) per round

    def step(self) -> float:
        """One round in each engine; the max abs difference of their new global weights."""
        self.state_ours, ours = self.ours.run_round(self.state_ours)
        self.state_theirs, theirs = self.theirs(self.state_theirs)
        self.records.append((ours, theirs))
        return max_abs_difference(self.state_ours.globals, self.state_theirs.globals)

    def evaluate(self, users: Mapping[int, ClientExamples]) -> tuple[dict[str, float], dict[str, float]]:
        """Each engine's reconstruct-then-evaluate metrics of ``users`` under its own current model."""
        return (self.ours.evaluate(self.state_ours, users),
                self.engine.evaluate(self.state_theirs.globals, sorted(users)))

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> SideBySide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
