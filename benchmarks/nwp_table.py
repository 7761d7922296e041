"""Next-word prediction with personal parts (issue 12; Singhal et al., 2021, Section 5.2, at a small scale).

    python benchmarks/nwp_table.py --data ../shared/data/text/tinyshakespeare \\
        --out benchmarks/results/nwp_table.json

Speakers are users (``simulations.text``: ``by_speaker.json`` of a folder, a JSON file, a folder of per-user
texts, or ``synthetic``); speakers with fewer than ``--min-words`` tokens are dropped, the rest split by
seed into training, validation and unseen test speakers; the vocabulary comes from training speakers only.
Every training round shuffles each chosen speaker's sequences afresh (``FedReconConfig.shuffle_each_round``,
so the devices of the byte measurement shuffle too) before the step caps apply: without it a speaker with
more batches than ``--steps-max`` would train on its first few batches every round and never on the rest
of its text. One architecture (``core.nextword``), four rows:

- ``fedavg``: everything global, every client trains on all its batches (FedAvg with ``--server-optimizer``);
- ``fedavg_finetune``: the same trained model, fine-tuned (every variable) on each test speaker's
  reconstruction batches before scoring its held-out batches;
- ``fedrecon_local_oov``: FedRecon, the out-of-vocabulary bucket embeddings local;
- ``fedrecon_personal_layer``: FedRecon, a residual adapter after the LSTM local (starts at zero).

Every row is scored on the same held-out batches (odd batches) of every unseen test speaker; accuracy
excludes padding, out-of-vocabulary and end-of-sentence targets (the paper's convention). Hyper-parameters
are chosen on validation speakers only: for each trained variant the client learning rate from
``--client-lrs`` (for the FedRecon variants, each paired with every reconstruction rate of ``--recon-lrs``)
by validation loss after ``--tune-rounds`` rounds (loss, because so early accuracy is still flat: the
arg-max is often an excluded class such as OOV or EOS); the chosen trial then goes on to ``--rounds``
rounds (the same run as one started for the total: selection and shuffling are seeded by round), and the
round with the lowest validation loss is kept; the fine-tuning rate from ``--finetune-lrs`` by validation
accuracy. Test speakers are scored once per row.

Bytes: each trained variant's task is served by a real coordinator (``fedrecon.server``) on loopback, and
``--byte-clients`` training speakers take part in its first round with the client library
(``fedrecon.client``), each on its own TCP connection through ``simulations.wire_tap``: download is what
the coordinator sent to the client, upload what the client sent, on the socket (check-in, task and model,
report; gRPC and HTTP/2 framing included), averaged over the clients. Fine-tuning happens on the device
after download and sends nothing back, so its row carries FedAvg's measured bytes.

``reconstruction_steps``: test accuracy of the two FedRecon variants when unseen speakers reconstruct with
0, 1 or 5 steps (5 epochs capped at 5 steps: a speaker with fewer reconstruction batches revisits them) or
the training setting (``default``: one epoch over the reconstruction batches, at most ``--steps-max``
steps, as every client phase in training).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from fedrecon.client import FederatedClient
from fedrecon.core.algorithm import FedRecon, ServerState
from fedrecon.core.batching import ClientExamples
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.core.nextword import FineTuned, NextWordSizes, nextword_model, parameter_count
from fedrecon.server.app import start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.simulations.grpc_transport import simulation_task
from fedrecon.simulations.runner import Simulation, SimulationSettings, local_rng, select_clients, shuffle_rng
from fedrecon.simulations.text import FederatedText, load_texts, split_texts, text_description
from fedrecon.simulations.wire_tap import WireTap

MAX_MESSAGE_BYTES = 16 << 20
#: table row -> model variant of ``core.nextword`` (fine-tuning reuses the FedAvg model)
TRAINED = {"fedavg": "global", "fedrecon_local_oov": "local_oov", "fedrecon_personal_layer": "personal_layer"}
ROWS = ("fedavg", "fedavg_finetune", "fedrecon_local_oov", "fedrecon_personal_layer")
STEPS = ("0", "1", "5", "default")


def training_config(variant: str, lr: float, recon_lr: float, args: argparse.Namespace) -> FedReconConfig:
    """FedRecon's settings for ``variant`` at client learning rate ``lr`` and reconstruction rate
    ``recon_lr`` (unused by the all-global model, which has nothing to reconstruct). The all-global model
    trains on every batch (FedAvg); the others reconstruct on even batches, train on odd."""
    return FedReconConfig(
        reconstruction_optimizer=OptimizerSpec("sgd", recon_lr), client_optimizer=OptimizerSpec("sgd", lr),
        server_optimizer=OptimizerSpec(args.server_optimizer, args.server_lr),
        recon_epochs=1, recon_steps_max=args.steps_max, post_recon_epochs=1,
        post_recon_steps_max=args.steps_max,
        split_dataset=variant != "global", shuffle_each_round=True)


def evaluation_config(config: FedReconConfig, steps: str) -> FedReconConfig:
    """Score the held-out (odd) batches after reconstructing with ``steps`` (``STEPS``)."""
    scored = config.replace(split_dataset=True)
    if steps == "default":
        return scored
    count = int(steps)
    return scored.replace(eval_recon_epochs=max(count, 1), eval_recon_steps_max=count)


def settings_of(args: argparse.Namespace, rounds: int) -> SimulationSettings:
    return SimulationSettings(rounds=rounds, clients_per_round=args.clients_per_round,
                              batch_size=args.batch_size,
                              eval_every=max(1, rounds // args.evaluations), seed=args.seed)


def build(variant: str, sizes: NextWordSizes, data: FederatedText, seed: int) -> Any:
    return nextword_model(sizes, variant, accuracy_excludes=data.vocabulary.accuracy_excludes(), seed=seed)


def score(sim: Simulation, config: FedReconConfig, state: ServerState, users: Mapping[int, ClientExamples]
          ) -> dict[str, float]:
    """Reconstruct-then-evaluate ``users`` with ``config``'s evaluation settings, through ``sim``'s client
    step (the evaluation settings only change how batches are scheduled, so its compiled graph is reused)."""
    trained_with = sim.eval_config
    sim.eval_config = config
    try:
        return sim.evaluate(state, users)
    finally:
        sim.eval_config = trained_with


@dataclass
class Run:
    """A variant's training so far: its simulation, the last state, and the validation-best state."""

    sim: Simulation
    config: FedReconConfig
    lr: float
    recon_lr: float
    state: ServerState
    best: ServerState
    best_metrics: dict[str, float]
    seconds: list[float] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0

    def info(self) -> dict[str, Any]:
        return {"client_lr": self.lr, "reconstruction_lr": self.recon_lr, "rounds": self.state.round_num,
                "wall_seconds": self.wall_seconds,
                "seconds_per_round": statistics.mean(self.seconds[1:] or self.seconds),
                "first_round_seconds": self.seconds[0], "selected_round": int(self.best_metrics["round"]),
                "validation_accuracy": self.best_metrics["accuracy"],
                "validation_loss": self.best_metrics["loss"],
                "validation": [{k: m[k] for k in ("round", "loss", "accuracy")} for m in self.validation]}


def start(variant: str, lr: float, recon_lr: float, sizes: NextWordSizes, data: FederatedText,
          args: argparse.Namespace, *, rounds: int, eval_every: int) -> Run:
    """The first ``rounds`` rounds of ``variant`` at client learning rate ``lr`` and reconstruction rate
    ``recon_lr`` (a trial)."""
    model = build(variant, sizes, data, args.seed)
    config = training_config(variant, lr, recon_lr, args)
    algorithm = FedRecon(model, config)
    sim = Simulation(algorithm, data.train, settings_of(args, 1),
                     eval_config=evaluation_config(config, "default"))
    state = algorithm.initial_state(args.seed)
    run = Run(sim, config, lr, recon_lr, state, state, {"loss": float("inf"), "accuracy": -1.0, "round": 0})
    return extend(run, data, rounds=rounds, eval_every=eval_every)


def extend(run: Run, data: FederatedText, *, rounds: int, eval_every: int) -> Run:
    """``rounds`` more rounds in process (selection continues by round number, so a trial extended is the
    same run as one started for the total); validation every ``eval_every`` rounds and after the last; the
    state with the lowest validation loss so far is kept. (Not the highest accuracy: early on, a model whose
    arg-max is the most frequent word everywhere scores about as well as a trained one, and keeping it
    would report a unigram predictor; a first run did exactly that.)"""
    if rounds <= 0:
        return run
    run.sim.settings = dataclasses.replace(run.sim.settings, rounds=rounds, eval_every=eval_every)

    def keep(_record: Any, metrics: dict[str, float] | None) -> None:
        if metrics is not None and metrics["loss"] < run.best_metrics["loss"]:
            assert run.sim.latest_state is not None
            run.best, run.best_metrics = run.sim.latest_state, metrics

    t0 = time.perf_counter()
    state, history = run.sim.run(run.state, validation=data.validation, on_round=keep, keep_best=False)
    run.wall_seconds += time.perf_counter() - t0
    run.state = state
    run.seconds += [r.seconds for r in history.rounds]
    run.validation += history.validation
    return run


def measure_bytes(variant: str, model: Any, config: FedReconConfig, data: FederatedText,
                  args: argparse.Namespace) -> dict[str, float]:
    """One real round over loopback: what each of ``--byte-clients`` clients received and sent."""
    clients = args.byte_clients
    settings = dataclasses.replace(settings_of(args, 1), clients_per_round=clients)
    # One task name for every variant: it is in every request, and the variants' bytes should differ only by
    # what the model makes them send.
    task = simulation_task("nextword", model, config, settings, len(data.train))
    users = select_clients(sorted(data.train), clients, seed=args.seed, round_num=1)
    with tempfile.TemporaryDirectory(prefix="fedrecon-nwp-") as tmp, \
            SqlStore(f"sqlite:///{Path(tmp) / 'coordinator.db'}") as store, \
            start_server(Coordinator(store, task)) as server, WireTap(server.port) as tap:
        for user in users:
            channel = tap.device_channel(MAX_MESSAGE_BYTES)  # its own connection, as a device has
            with FederatedClient(None, task.name, f"speaker-{user}", data.train[user],
                                 channel=channel) as client:
                report = client.participate(rng_for=lambda _a, u=user: local_rng(args.seed, 1, u),
                                            order_rng_for=lambda _a, u=user: shuffle_rng(args.seed, 1, u),
                                            max_wait_s=120.0)
                if not report.in_round:
                    raise RuntimeError(f"speaker {user}: {report.status} {report.message}")
        if not server.coordinator.wait_for_version(1, timeout=120.0):
            raise RuntimeError("the measured round did not commit")
        down, up = tap.received_per_connection(), tap.sent_per_connection()
    if len(down) != clients:
        raise RuntimeError(f"expected {clients} connections through the relay, saw {len(down)}")
    return {"download_bytes_per_client": sum(down) / clients, "upload_bytes_per_client": sum(up) / clients}


def most_frequent_word_baseline(data: FederatedText, batch_size: int) -> dict[str, Any]:
    """A reference for the accuracies: always predict the training speakers' most frequent counted target
    (not padding, EOS or OOV), scored on the test speakers' held-out (odd) batches as the rows are."""
    excluded = {0, *data.vocabulary.accuracy_excludes()}
    ids = np.concatenate([c.y.reshape(-1) for c in data.train.values()]).astype(np.int64)
    counts = np.bincount(ids[~np.isin(ids, list(excluded))], minlength=data.vocabulary.size)
    top = int(counts.argmax())
    hits = counted = 0
    for client in data.test.values():
        odd = np.arange(len(client)) // batch_size % 2 == 1
        y = client.y[odd].reshape(-1).astype(np.int64)
        y = y[~np.isin(y, list(excluded))]
        hits += int((y == top).sum())
        counted += len(y)
    words = data.vocabulary.words
    return {"word": words[top - 3] if 3 <= top < 3 + len(words) else str(top),
            "accuracy": hits / max(counted, 1), "targets_counted": counted}


def write_task_files(folder: Path, variant: str, sizes: NextWordSizes, data: FederatedText) -> list[Path]:
    """The files a coordinator's next-word task names (``deploy/tasks/nextword.toml``): the Keras
    architecture of ``variant`` (``nextword.json``) and the vocabulary built from the training speakers,
    one word a line in id order (``nextword.words``), so served devices encode text as this table does."""
    model = build(variant, sizes, data, 0)
    folder.mkdir(parents=True, exist_ok=True)
    architecture, words = folder / "nextword.json", folder / "nextword.words"
    architecture.write_text(json.dumps(json.loads(model.keras_model.to_json()), indent=1) + "\n")
    words.write_text("".join(f"{w}\n" for w in text_description(data.vocabulary, sizes.seq_len)["words"]))
    print(f"wrote {architecture} and {words}: local layers {model.config()['local_layers']}, objective "
          f"{json.dumps(model.config()['objective'])}")
    return [architecture, words]


def machine() -> dict[str, Any]:
    import tensorflow as tf

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "tensorflow": tf.__version__, "load_average": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="text folder or JSON file, or 'synthetic'")
    parser.add_argument("--out", type=Path, help="the table's JSON (required unless --write-task)")
    parser.add_argument("--write-task", type=Path, metavar="FOLDER",
                        help="only write the architecture and vocabulary files of a coordinator's task for "
                             "--task-variant (deploy/tasks/nextword.toml names them), then stop")
    parser.add_argument("--task-variant", default="personal_layer", choices=sorted(set(TRAINED.values())))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--tune-rounds", type=int, default=10, help="rounds of each learning-rate trial")
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--client-lrs", default="0.5,1.0", help="client learning rates tried per variant")
    parser.add_argument("--recon-lrs", default="0.1,0.5",
                        help="reconstruction rates tried with each client rate for the FedRecon variants "
                             "(empty: the client rate)")
    parser.add_argument("--finetune-lrs", default="0.1,0.5,1.0", help="fine-tuning rates tried on FedAvg")
    parser.add_argument("--server-optimizer", default="adam", choices=("sgd", "adam", "yogi", "adagrad"))
    parser.add_argument("--server-lr", type=float, default=0.03)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps-max", type=int, default=8, help="cap on each client phase's steps")
    parser.add_argument("--vocab", type=int, default=2000, help="words in the vocabulary")
    parser.add_argument("--oov-buckets", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--embedding", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--min-words", type=int, default=100, help="speakers with fewer tokens are dropped")
    parser.add_argument("--max-examples", type=int, default=256, help="sequences kept per speaker")
    parser.add_argument("--evaluations", type=int, default=8, help="validation evaluations per run")
    parser.add_argument("--byte-clients", type=int, default=5, help="clients whose bytes are counted")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out is None and args.write_task is None:
        parser.error("--out is required (or --write-task)")
    logging.getLogger("fedrecon.server").setLevel(logging.ERROR)
    started = time.perf_counter()
    facts_before = machine()

    texts = load_texts(args.data)
    data = split_texts(texts, vocab_size=args.vocab, seq_len=args.seq_len, seed=42, min_words=args.min_words,
                       oov_buckets=args.oov_buckets, max_examples_per_user=args.max_examples)
    sizes = NextWordSizes(data.vocabulary.size, seq_len=args.seq_len, embedding=args.embedding,
                          hidden=args.hidden, oov_buckets=args.oov_buckets)
    if args.write_task is not None:
        write_task_files(args.write_task, args.task_variant, sizes, data)
        return
    client_lrs = [float(v) for v in args.client_lrs.split(",")]
    recon_lrs = [float(v) for v in args.recon_lrs.split(",") if v.strip()]
    finetune_lrs = [float(v) for v in args.finetune_lrs.split(",")]
    print(f"{args.data}: {len(texts)} speakers, {data.dropped_users} under {args.min_words} tokens dropped; "
          f"{len(data.train)} train / {len(data.validation)} validation / {len(data.test)} test; "
          f"{data.vocabulary.size} classes", flush=True)

    rows: dict[str, dict[str, Any]] = {}
    tuning: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    parameters: dict[str, dict[str, int]] = {}
    steps: dict[str, dict[str, float]] = {}
    fedavg_trained = None
    for row, variant in TRAINED.items():
        grid = [(lr, lr) for lr in client_lrs] if variant == "global" else \
            [(lr, rlr) for lr in client_lrs for rlr in (recon_lrs or [lr])]
        trials = [start(variant, lr, rlr, sizes, data, args, rounds=args.tune_rounds,
                        eval_every=args.tune_rounds) for lr, rlr in grid]
        for trial in trials:
            recon = "" if variant == "global" else f", reconstruction {trial.recon_lr:g}"
            rates = f"lr {trial.lr:g}{recon}"
            print(f"  {row} trial {rates}: "
                  f"validation loss {trial.best_metrics['loss']:.4f}, "
                  f"accuracy {trial.best_metrics['accuracy']:.4f} after {args.tune_rounds} rounds",
                  flush=True)
        run = min(trials, key=lambda t: t.best_metrics["loss"])
        lr, recon_lr = run.lr, run.recon_lr
        kept = ("client_lr", "reconstruction_lr", "validation_accuracy", "validation_loss", "selected_round",
                "wall_seconds")
        tuning[row] = {"trials": [{k: t.info()[k] for k in kept} for t in trials], "client_lr": lr}
        if variant != "global":
            tuning[row]["reconstruction_lr"] = recon_lr
        del trials
        run = extend(run, data, rounds=args.rounds - args.tune_rounds,
                     eval_every=max(1, args.rounds // args.evaluations))
        sim, config, state, info = run.sim, run.config, run.best, run.info()
        model = sim.algorithm.model
        runs[row] = info
        parameters[row] = parameter_count(model)
        wire = measure_bytes(variant, model, config, data, args)
        test = score(sim, evaluation_config(config, "default"), state, data.test)
        rows[row] = {"accuracy": test["accuracy"], **wire, "loss": test["loss"],
                     "test_targets_counted": test["num_examples"]}
        if variant != "global":
            steps[row] = {s: score(sim, evaluation_config(config, s), state, data.test)["accuracy"]
                          for s in STEPS}
        else:
            fedavg_trained = (model, config, state)
        rates = f"lr {lr:g}" + ("" if variant == "global" else f", reconstruction {recon_lr:g}")
        print(f"{row}: {rates}, test accuracy {test['accuracy']:.4f}, "
              f"down {wire['download_bytes_per_client']:,.0f} B, "
              f"up {wire['upload_bytes_per_client']:,.0f} B, "
              f"{info['seconds_per_round']:.2f} s/round", flush=True)

    assert fedavg_trained is not None
    model, config, state = fedavg_trained
    finetune_trials = []
    finetuners = {}
    for ft_lr in finetune_lrs:
        tuned = FineTuned(model, state.globals)
        ft_config = config.replace(reconstruction_optimizer=OptimizerSpec("sgd", ft_lr))
        ft_algorithm = FedRecon(tuned, ft_config)
        ft_sim = Simulation(ft_algorithm, {}, settings_of(args, 1),
                            eval_config=evaluation_config(ft_config, "default"))
        ft_state = ft_algorithm.initial_state(args.seed)
        finetuners[ft_lr] = (ft_sim, ft_state)
        val = ft_sim.evaluate(ft_state, data.validation)
        finetune_trials.append({"finetune_lr": ft_lr, "validation_accuracy": val["accuracy"]})
    ft_lr = max(finetune_trials, key=lambda t: t["validation_accuracy"])["finetune_lr"]
    ft_sim, ft_state = finetuners[ft_lr]
    test = ft_sim.evaluate(ft_state, data.test)
    rows["fedavg_finetune"] = {"accuracy": test["accuracy"],
                               "download_bytes_per_client": rows["fedavg"]["download_bytes_per_client"],
                               "upload_bytes_per_client": rows["fedavg"]["upload_bytes_per_client"],
                               "loss": test["loss"], "test_targets_counted": test["num_examples"]}
    tuning["fedavg_finetune"] = {"trials": finetune_trials, "finetune_lr": ft_lr}
    print(f"fedavg_finetune: lr {ft_lr:g}, test accuracy {test['accuracy']:.4f}", flush=True)

    per_round = {row: runs[row]["seconds_per_round"] for row in TRAINED}
    per_round["fedavg_finetune"] = per_round["fedavg"]
    baseline = most_frequent_word_baseline(data, args.batch_size)
    out = {
        "rows": {row: rows[row] for row in ROWS},
        "most_frequent_word_baseline": baseline,
        "reconstruction_steps": steps,
        "seconds_per_round": {row: per_round[row] for row in ROWS},
        "config": {
            "data": args.data,
            "speakers": {"total": len(texts), "dropped": data.dropped_users, "train": len(data.train),
                         "validation": len(data.validation), "test": len(data.test),
                         "rule": f"speakers with fewer than {args.min_words} tokens dropped; split by seed "
                                 "42 (80/10/10, at least one validation and one test speaker)"},
            "vocabulary": {"words": len(data.vocabulary.words), "classes": data.vocabulary.size,
                           "oov_buckets": args.oov_buckets, "built_from": "training speakers only"},
            "model": {"seq_len": args.seq_len, "embedding": args.embedding, "lstm": args.hidden,
                      "max_sequences_per_speaker": args.max_examples, "parameters": parameters},
            "rounds": args.rounds, "tune_rounds": args.tune_rounds,
            "clients_per_round": args.clients_per_round,
            "batch_size": args.batch_size, "steps_max": args.steps_max, "seed": args.seed,
            "server_optimizer": {"name": args.server_optimizer, "learning_rate": args.server_lr},
            "client_lr_grid": client_lrs, "reconstruction_lr_grid": recon_lrs or "the client rate",
            "finetune_lr_grid": finetune_lrs,
            "client_data_order": "each chosen client's sequences shuffled afresh every training round "
                                 "(by seed, round and speaker) before the step caps apply; evaluation "
                                 "batches are never shuffled",
            "selection": "client learning rate by validation loss after tune_rounds; round by validation "
                         "loss; fine-tuning rate by validation accuracy; test speakers scored once per "
                         "row",
            "accuracy": "held-out (odd) batches of unseen test speakers; padding, OOV and EOS targets "
                        "excluded",
            "bytes_measured": f"server-to-client (download) and client-to-server (upload) bytes on each of "
                              f"{args.byte_clients} clients' TCP connections (loopback relay), whole "
                              "participation in round 1 of a real coordinator, gRPC/HTTP/2 framing included",
            "tuning": tuning, "runs": runs,
            "training": {row: training_config(variant, tuning[row]["client_lr"],
                                              tuning[row].get("reconstruction_lr", tuning[row]["client_lr"]),
                                              args).to_dict()
                         for row, variant in TRAINED.items()},
        },
        "machine": {**facts_before, "load_average_end": list(os.getloadavg())},
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, allow_nan=False))
    print(f"wrote {args.out} ({out['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
