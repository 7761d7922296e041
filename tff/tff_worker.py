"""TensorFlow Federated's Federated Reconstruction, driven one command at a time (runs in ``.venv-tff``).

TFF 0.87 needs TensorFlow 2.14 and protobuf 4, fedrecon needs TensorFlow 2.21 and protobuf 7: they cannot
share a Python environment. So this script imports nothing from fedrecon (only ``tff_interop`` beside it):
``simulations.tff_backend`` starts it with the TFF environment's interpreter and sends it one JSON command per
line on stdin; it answers one JSON line per command on stdout (TensorFlow's chatter goes to stderr). Arrays
travel as ``.npz`` files in fedrecon's variable names and shapes.

Commands:

- ``init``: build the TFF processes for a task (``tff_interop.build_processes``: matrix factorization, or a
  Keras task rebuilt by ``keras_bridge``), load every user's examples (an ``.npz`` of concatenated
  examples) as one ``tf.data.Dataset`` each, and set the global weights. ``local_start`` is the shared user
  factors of matrix factorization; ``locals`` an ``.npz`` of a Keras task's local variables' start.
- ``round``: one ``process.next`` over the datasets of the given users; write the new global weights and
  report the seconds ``next`` took and TFF's training loss (``loss``: its mean of batch losses), and for a
  Keras task also ``loss_per_target``, fedrecon's definition of the training loss (per non-padding token).
- ``evaluate``: reconstruct-then-evaluate the given users under given global weights: TFF's evaluation
  metrics by name (``mse``, ``accuracy``, ``num_examples`` for ratings; ``loss_per_target``, ``accuracy``,
  ``num_examples`` for a Keras task).
- ``get_globals``: write the training process's current global weights.
- ``quit``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tff_interop import build_processes, client_dataset, from_model_weights, to_model_weights


class Worker:
    def __init__(self) -> None:
        self.spec: dict[str, Any] = {}
        self.datasets: dict[int, tf.data.Dataset] = {}

    # -- commands -------------------------------------------------------------------------------------------
    def init(self, cmd: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.spec = dict(cmd["model"])
        local_start = cmd.get("local_start")
        if cmd.get("locals"):
            with np.load(cmd["locals"]) as f:
                local_start = {k: f[k] for k in f.files}
        self.process, self.evaluator = build_processes(self.spec, cmd["training"], cmd.get("eval_clip"),
                                                         local_start)
        batch_size = int(cmd["batch_size"])
        data = np.load(cmd["data"])
        users, offsets, xs, ys = data["users"], data["offsets"], data["x"], data["y"]
        for k, user in enumerate(users):
            a, b = int(offsets[k]), int(offsets[k + 1])
            self.datasets[int(user)] = client_dataset(self.spec, xs[a:b], ys[a:b], batch_size)
        self.state = self.process.initialize()
        self.state = self.process.set_model_weights(self.state, self._load_weights(cmd["globals"]))
        self.eval_state = self.evaluator.initialize()
        return {"users": len(self.datasets), "build_seconds": time.perf_counter() - t0,
                "tff_version": tff.__version__, "tensorflow_version": tf.__version__}

    def _load_weights(self, path: str) -> tff.learning.models.ModelWeights:
        with np.load(path) as f:
            return to_model_weights({k: f[k] for k in f.files}, self.spec)

    def _save_weights(self, weights: tff.learning.models.ModelWeights, path: str) -> None:
        np.savez(path, **from_model_weights(weights, self.spec))

    def _datasets(self, users: list[int]) -> list[tf.data.Dataset]:
        unknown = [u for u in users if u not in self.datasets]
        if unknown:
            raise ValueError(f"unknown users {unknown[:5]}")
        return [self.datasets[u] for u in users]

    def round(self, cmd: dict[str, Any]) -> dict[str, Any]:
        data = self._datasets([int(u) for u in cmd["clients"]])
        t0 = time.perf_counter()
        output = self.process.next(self.state, data)
        seconds = time.perf_counter() - t0
        self.state = output.state
        self._save_weights(self.process.get_model_weights(self.state), cmd["out"])
        train = output.metrics["client_work"]["train"]
        # TFF's loss metric: the mean over post-reconstruction batches of each batch's mean loss; a Keras
        # task's metrics add fedrecon's own definition (keras_bridge.LossPerTarget).
        return {"seconds": seconds, **{k: float(v) for k, v in train.items()}}

    def get_globals(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self._save_weights(self.process.get_model_weights(self.state), cmd["out"])
        return {}

    def evaluate(self, cmd: dict[str, Any]) -> dict[str, Any]:
        data = self._datasets([int(u) for u in cmd["users"]])
        weights = self._load_weights(cmd["globals"])
        self.eval_state = self.evaluator.set_model_weights(self.eval_state, weights)
        t0 = time.perf_counter()
        output = self.evaluator.next(self.eval_state, data)
        seconds = time.perf_counter() - t0
        metrics = output.metrics["client_work"]["eval"]["current_round_metrics"]
        return {**{k: float(v) for k, v in metrics.items()}, "seconds": seconds}


def main() -> None:
    """Serve commands until ``quit`` or end of input; every answer is one JSON line."""
    # Answers go to a private copy of the stdout descriptor; descriptor 1 itself becomes stderr, so nothing
    # TFF, TensorFlow or their native code prints can corrupt the answers.
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker = Worker()
    for line in sys.stdin:  # end of input (the driver went away) ends the worker too
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "quit":
                protocol.write(json.dumps({"ok": True}) + "\n")
                protocol.flush()
                return
            if op not in ("init", "round", "evaluate", "get_globals"):
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, **getattr(worker, op)(cmd)}
        except Exception as err:  # every failure becomes an answer the driver can raise
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


if __name__ == "__main__":
    main()
