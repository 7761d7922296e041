"""``fedrecon simulate``: a federated simulation run locally (registered in ``cli``).

Heavy imports (TensorFlow, the engine) happen inside the command so ``fedrecon --help`` stays fast.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fedrecon.core.aggregation import AggregationConfig, NormPolicy, Reduction, Weighting

AGGREGATION_DEFAULTS = AggregationConfig()  # simulate's aggregation options default to the dataclass's
console = Console()


class Algorithm(StrEnum):
    fedrecon = "fedrecon"
    fedavg = "fedavg"
    centralized = "centralized"


class ServerOpt(StrEnum):
    sgd = "sgd"
    momentum = "momentum"
    adam = "adam"
    adagrad = "adagrad"
    yogi = "yogi"


class Backend(StrEnum):
    fedrecon = "fedrecon"
    tff = "tff"


class LocalInit(StrEnum):
    uniform = "uniform"
    shared = "shared"
    zeros = "zeros"


class Transport(StrEnum):
    inprocess = "inprocess"
    grpc = "grpc"


def simulate(
    data: Annotated[str, typer.Option(help="'synthetic' (embedded, no download) or a MovieLens folder/file")]
    = "synthetic",
    algorithm: Annotated[Algorithm, typer.Option(help="what to train")] = Algorithm.fedrecon,
    rounds: Annotated[int, typer.Option(min=1, help="training rounds (centralized: ignored)")] = 100,
    clients_per_round: Annotated[int, typer.Option(min=1)] = 100,
    batch_size: Annotated[int, typer.Option(min=1)] = 5,
    factors: Annotated[int, typer.Option(min=1, help="embedding size")] = 50,
    biases: Annotated[bool, typer.Option(help="add item/user biases and a global offset")] = False,
    recon_lr: Annotated[float, typer.Option(help="reconstruction SGD learning rate")] = 0.1,
    client_lr: Annotated[float, typer.Option(help="client SGD learning rate")] = 0.5,
    server_optimizer: Annotated[ServerOpt, typer.Option()] = ServerOpt.sgd,
    server_lr: Annotated[float, typer.Option()] = 1.0,
    server_momentum: Annotated[float, typer.Option(help="for --server-optimizer momentum")] = 0.9,
    recon_epochs: Annotated[int, typer.Option(min=0)] = 5,
    recon_steps_max: Annotated[int, typer.Option(min=0)] = 50,
    post_recon_epochs: Annotated[int, typer.Option(min=0)] = 1,
    post_recon_steps_max: Annotated[int, typer.Option(min=0)] = 50,
    split: Annotated[bool, typer.Option(help="even batches reconstruct, odd batches train/evaluate")] = True,
    joint: Annotated[bool, typer.Option(help="train local variables in the global update too")] = False,
    uniform_weights: Annotated[bool, typer.Option(help="weight clients equally, not by examples")] = False,
    clip: Annotated[bool, typer.Option(help="clip predictions to the rating range at evaluation")] = False,
    aggregator: Annotated[Reduction, typer.Option(
        help="how a round's updates are combined: mean (weighted, streaming), trimmed_mean or median "
             "(coordinate-wise, each update counting once; they buffer the round's updates)")]
    = AGGREGATION_DEFAULTS.reduction,
    trim_fraction: Annotated[float, typer.Option(
        min=0.0, max=0.49, help="with --aggregator trimmed_mean: fraction cut at each end of a coordinate")]
    = AGGREGATION_DEFAULTS.trim_fraction,
    max_update_norm: Annotated[float, typer.Option(
        help="bound on the L2 norm of one client's update (positive)")]
    = AGGREGATION_DEFAULTS.max_update_norm,
    norm_policy: Annotated[NormPolicy, typer.Option(
        help="an update above --max-update-norm is scaled down to it (clip), dropped (reject), or the bound "
             "is off (none)")] = AGGREGATION_DEFAULTS.norm_policy,
    max_client_weight: Annotated[float | None, typer.Option(
        help="cap on a client's weight (default: batch size x post-recon-steps-max)")]
    = AGGREGATION_DEFAULTS.max_client_weight,
    server_weighting: Annotated[Weighting, typer.Option(
        help="claimed: a client's weight (its examples, capped); uniform: every update counts 1")]
    = AGGREGATION_DEFAULTS.weighting,
    centralized_epochs: Annotated[int, typer.Option(min=1)] = 20,
    eval_every: Annotated[int, typer.Option(min=1)] = 25,
    seed: Annotated[int, typer.Option()] = 0,
    split_seed: Annotated[int, typer.Option(help="seed of the train/validation/test user split")] = 42,
    out: Annotated[Path, typer.Option(help="folder for metrics.json and learning_curves.png")]
    = Path("runs/latest"),
    transport: Annotated[Transport, typer.Option(
        help="inprocess: the lock-step simulator; grpc: every round through a real coordinator on "
             "loopback with the client library")] = Transport.inprocess,
    store: Annotated[str | None, typer.Option(help="with --transport grpc: the coordinator's store URL "
                                                   "(default: a temporary SQLite file)")] = None,
    init_model: Annotated[Path | None, typer.Option(exists=True, dir_okay=False,
                                                    help="start from an exported model (fedrecon export)")]
    = None,
    backend: Annotated[Backend, typer.Option(
        help="fedrecon: this project's engine; tff: TensorFlow Federated's build_fed_recon in the "
             "environment `make tff-env` builds (same data, split, selection and metrics)")]
    = Backend.fedrecon,
    local_init: Annotated[LocalInit | None, typer.Option(
        help="how a client's user factors start: uniform (a ±0.05 draw per client and round; the default "
             "of the fedrecon backend), shared (one draw for all clients: what TFF does, the tff backend's "
             "default) or zeros (deterministic rounds)")] = None,
) -> None:
    """Run a simulation locally; print validation metrics as it goes and unseen-test metrics at the end."""
    from fedrecon.core.config import ClientWeighting, FedReconConfig, OptimizerSpec
    from fedrecon.simulations.baselines import CentralizedSettings
    from fedrecon.simulations.experiment import ExperimentSpec, run_experiment
    from fedrecon.simulations.plotting import plot_learning_curves
    from fedrecon.simulations.ratings import load_dataset
    from fedrecon.simulations.runner import SimulationSettings

    config = FedReconConfig(
        reconstruction_optimizer=OptimizerSpec("sgd", recon_lr),
        client_optimizer=OptimizerSpec("sgd", client_lr),
        server_optimizer=OptimizerSpec(server_optimizer.value, server_lr,
                                       momentum=server_momentum if server_optimizer == ServerOpt.momentum
                                       else 0.0),
        recon_epochs=recon_epochs, recon_steps_max=recon_steps_max, post_recon_epochs=post_recon_epochs,
        post_recon_steps_max=post_recon_steps_max, split_dataset=split, jointly_train_variables=joint,
        client_weighting=ClientWeighting.UNIFORM if uniform_weights else ClientWeighting.NUM_EXAMPLES)
    try:
        aggregation = AggregationConfig(reduction=aggregator, trim_fraction=trim_fraction,
                                        weighting=server_weighting, max_client_weight=max_client_weight,
                                        max_update_norm=max_update_norm, norm_policy=norm_policy)
    except ValueError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from err
    settings = SimulationSettings(rounds=rounds, clients_per_round=clients_per_round, batch_size=batch_size,
                                  eval_every=eval_every, seed=seed, eval_clip=(1.0, 5.0) if clip else None)
    spec = ExperimentSpec(algorithm=algorithm.value, num_factors=factors, use_biases=biases,
                          local_init=(local_init or (LocalInit.shared if backend == Backend.tff
                                                     else LocalInit.uniform)).value, config=config,
                          settings=settings, aggregation=aggregation,
                          centralized=CentralizedSettings(epochs=centralized_epochs, seed=seed))
    initial = None
    if init_model is not None:
        from fedrecon.client.model_file import ModelFile

        initial = ModelFile.load(init_model).arrays
    with console.status(f"loading {data}"):
        dataset = load_dataset(data, seed=split_seed)
    console.print(f"[bold]{data}[/]: {len(dataset.train)} training, {len(dataset.validation)} validation, "
                  f"{len(dataset.test)} unseen test users; {dataset.num_items} items")

    total = centralized_epochs if algorithm == Algorithm.centralized else rounds
    unit = "epoch" if algorithm == Algorithm.centralized else "round"
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task(f"{algorithm.value} {unit}s", total=total, info="")

        def on_round(record, metrics):  # type: ignore[no-untyped-def]
            progress.update(task, advance=1, info=f"loss {record.train_loss:.3f}")
            if metrics is not None:
                progress.console.print(f"round {record.round_num:5d}  validation RMSE {metrics['rmse']:.4f}"
                                       f"  accuracy {metrics['accuracy']:.4f}")

        def on_epoch(epoch, rmse):  # type: ignore[no-untyped-def]
            progress.update(task, advance=1, info=f"validation RMSE {rmse:.4f}")

        try:
            result = run_experiment(spec, dataset, on_round=on_round, on_epoch=on_epoch,
                                    transport=transport.value, store_url=store, initial_globals=initial,
                                    backend=backend.value)
        except (ValueError, RuntimeError) as err:
            progress.stop()
            console.print(f"[red]{err}[/]")
            raise typer.Exit(2) from err

    out.mkdir(parents=True, exist_ok=True)
    summary = {"data": data, "backend": backend.value, "transport": transport.value, "spec": spec.to_dict(),
               **result.summary()}
    if backend == Backend.tff:
        summary["train_loss_note"] = ("TFF's loss metric: the mean over post-reconstruction batches of each "
                                      "batch's mean loss (fedrecon's backend weights by examples)")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    if algorithm != Algorithm.centralized:
        from fedrecon.client.model_file import ModelFile

        # The selected model in the export format: loads into the client library, `serve --init-model`,
        # or `simulate --init-model` (with either backend).
        ModelFile(task=f"simulate-{backend.value}", version=int(result.selected.get("round", 0)),
                  model_spec=result.model.config(), names=[v.name for v in result.model.global_variables],
                  arrays=result.globals, training=spec.config.to_dict(), batch_size=batch_size
                  ).save(out / "model.npz")
    plot_learning_curves(summary, out / "learning_curves.png")
    engine = " (TFF backend)" if backend == Backend.tff else ""
    table = Table(title=f"{algorithm.value}{engine} on unseen test users (selected {unit} "
                        f"{int(result.selected.get('round', 0))} on validation)")
    for col in ("RMSE", "accuracy", "examples", "s/round"):
        table.add_column(col, justify="right")
    spr = f"{result.seconds_per_round:.3f}" if result.seconds_per_round is not None else "-"
    table.add_row(f"{result.test['rmse']:.4f}", f"{result.test['accuracy']:.4f}",
                  f"{int(result.test['num_examples'])}", spr)
    console.print(table)
    written = "metrics.json, learning_curves.png"
    written += ", model.npz" if algorithm != Algorithm.centralized else ""
    console.print(f"wrote {written} in {out}")
