"""How far the next-word table's model can go at all: the same architecture trained centrally.

    python benchmarks/nwp_central.py --data ../shared/data/text/tinyshakespeare \\
        --out benchmarks/results/nwp_central.json

``nwp_table.py``'s rows sit close to the most-frequent-word predictor. Whether that is federated training
falling short or the model and encoding leaving little room is answered here: the all-global model of
``core.nextword`` (the table's sizes and data: the same speakers, split, vocabulary and sequences) trained
by plain Keras with Adam on every training speaker's sequences pooled, then scored exactly as the table
scores a row (the client step's evaluation on the held-out odd batches of 16, accuracy without padding, OOV
and EOS targets). The epoch with the lowest validation loss is kept (the table's rule for rounds) and scored
once on the unseen test speakers; every epoch's validation figures are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from fedrecon.core.algorithm import FedRecon, ServerState
from fedrecon.core.config import FedReconConfig
from fedrecon.core.nextword import NextWordSizes, nextword_model, parameter_count
from fedrecon.simulations.runner import Simulation, SimulationSettings
from fedrecon.simulations.text import PAD, load_texts, split_texts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nwp_table import machine  # a sibling script: the same machine facts in both JSONs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="text folder or JSON file, or 'synthetic'")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--lr", type=float, default=0.003, help="Adam's learning rate")
    parser.add_argument("--train-batch-size", type=int, default=32)
    # The table's data and model (nwp_table.py's defaults): change them together or not at all.
    parser.add_argument("--batch-size", type=int, default=16, help="evaluation batches (held-out: odd ones)")
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--oov-buckets", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--embedding", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--min-words", type=int, default=100)
    parser.add_argument("--max-examples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started, facts_before = time.perf_counter(), machine()

    texts = load_texts(args.data)
    data = split_texts(texts, vocab_size=args.vocab, seq_len=args.seq_len, seed=42, min_words=args.min_words,
                       oov_buckets=args.oov_buckets, max_examples_per_user=args.max_examples)
    sizes = NextWordSizes(data.vocabulary.size, seq_len=args.seq_len, embedding=args.embedding,
                          hidden=args.hidden, oov_buckets=args.oov_buckets)
    model = nextword_model(sizes, "global", accuracy_excludes=data.vocabulary.accuracy_excludes(),
                           seed=args.seed)
    x = np.concatenate([data.train[u].x for u in sorted(data.train)])
    y = np.concatenate([data.train[u].y for u in sorted(data.train)]).astype(np.int32)
    keras_model = model.keras_model
    keras_model.compile(optimizer=keras.optimizers.Adam(args.lr),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # Scored by the client step, as the table scores its rows (no locals: nothing to reconstruct).
    scorer = Simulation(FedRecon(model, FedReconConfig(split_dataset=True)), data.train,
                        SimulationSettings(batch_size=args.batch_size, seed=args.seed))

    def score(users: Any) -> dict[str, float]:
        globals_ = model.initial_globals(0)  # the Keras model's current weights
        return scorer.evaluate(ServerState(globals_, scorer.algorithm.server_optimizer.init([]), 0), users)

    epochs: list[dict[str, float]] = []
    best: tuple[float, int, list[np.ndarray]] | None = None
    for epoch in range(1, args.epochs + 1):
        fit = keras_model.fit(x, y, sample_weight=(y != PAD).astype(np.float32), epochs=1, verbose=0,
                              batch_size=args.train_batch_size, shuffle=True)
        val = score(data.validation)
        epochs.append({"epoch": epoch, "train_loss": float(fit.history["loss"][-1]),
                       "validation_loss": val["loss"], "validation_accuracy": val["accuracy"]})
        print(f"epoch {epoch:3d}  train loss {epochs[-1]['train_loss']:.4f}  validation loss "
              f"{val['loss']:.4f}  accuracy {val['accuracy']:.4f}", flush=True)
        if best is None or val["loss"] < best[0]:
            best = (val["loss"], epoch, model.initial_globals(0))
    assert best is not None
    model.set_globals(best[2])
    test = score(data.test)
    print(f"kept epoch {best[1]} (lowest validation loss): test accuracy {test['accuracy']:.4f}, loss "
          f"{test['loss']:.4f} on {int(test['num_examples'])} counted targets", flush=True)
    result = {
        "test": test, "selected_epoch": best[1], "epochs": epochs,
        "config": {"data": args.data, "training_sequences": len(x),
                   "optimizer": {"name": "adam", "lr": args.lr},
                   "train_loss": "Keras' mean over every target position, padding weighted 0 (not per word)",
                   "train_batch_size": args.train_batch_size, "eval_batch_size": args.batch_size,
                   "vocabulary_classes": data.vocabulary.size, "parameters": parameter_count(model),
                   "speakers": {"train": len(data.train), "validation": len(data.validation),
                                "test": len(data.test)},
                   "selection": "epoch with the lowest validation loss; test speakers scored once",
                   "accuracy": "held-out (odd) batches of unseen test speakers; padding, OOV and EOS "
                               "targets excluded (as nwp_table.py)"},
        "wall_seconds": time.perf_counter() - started,
        "machine": {"before": facts_before, "after": machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
