"""``fedrecon simulate``: a federated simulation run locally (registered in ``cli``).

Heavy imports (TensorFlow, the engine) happen inside the command so ``fedrecon --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fedrecon.core.aggregation import AggregationConfig, NormPolicy, Reduction, Weighting
from fedrecon.core.compression import UploadCodec
from fedrecon.core.matrix_factorization import LocalInit
from fedrecon.core.optimizers import ServerOptimizerName
from fedrecon.core.privacy import DEFAULT_DELTA, AccountantKind, Sampling
from fedrecon.simulations.algorithms import Algorithm, Backend, Transport

AGGREGATION_DEFAULTS = AggregationConfig()  # simulate's aggregation options default to the dataclass's
DEFAULT_SERVER_MOMENTUM = 0.9  # --server-optimizer momentum without --server-momentum
console = Console()


class SimulateError(ValueError):
    """Bad input to ``simulate``: printed as one line, exit 2."""


def steps_cap(value: str | None, option: str) -> int | str | None:
    """``N`` or ``none`` (no cap) for a ``--*-steps-max`` option; ``"unset"`` when not given."""
    if value is None:
        return "unset"
    if value.strip().lower() in ("none", "no", "unlimited", "inf"):
        return None
    try:
        steps = int(value)
    except ValueError:
        raise SimulateError(f"{option} takes a number of steps or 'none' (no cap), not {value!r}") from None
    if steps < 0:
        raise SimulateError(f"{option} must be non-negative (or 'none')")
    return steps


StepsCapOption = typer.Option(metavar="N|none",
                              help="at most N steps; 'none': no cap (default: the algorithm's, 50)")


def simulate(
    data: Annotated[str, typer.Option(help=(
        "'synthetic' (embedded, no download) or a MovieLens folder/file; with a --config task whose model "
        "takes text (deploy/tasks/nextword.toml): users' texts (a {user: [text, ...]} JSON file, a folder "
        "holding by_speaker.json, a folder of per-user .txt files) or 'synthetic', encoded with the task's "
        "vocabulary"))] = "synthetic",
    config: Annotated[Path | None, typer.Option(
        "--config", exists=True, dir_okay=False,
        help="a task file (TOML/JSON, as `serve --task` takes): its model, [training], [rounds], "
             "[aggregation], batch_size and seed; flags given explicitly override it. A Keras task "
             "(deploy/tasks/nextword.toml) simulates the task's own model with fedrecon")] = None,
    algorithm: Annotated[Algorithm, typer.Option(help="what to train")] = Algorithm.FEDRECON,
    rounds: Annotated[int | None, typer.Option(
        min=1, help="training rounds (default 100, or the task's max_rounds; centralized: ignored)")] = None,
    clients_per_round: Annotated[int | None, typer.Option(min=1, help="default 100")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="default 5")] = None,
    factors: Annotated[int | None, typer.Option(min=1, help="embedding size (default 50)")] = None,
    biases: Annotated[bool | None, typer.Option(help="add item/user biases and a global offset")] = None,
    recon_lr: Annotated[float | None, typer.Option(help="reconstruction SGD learning rate (default 0.1)")]
    = None,
    client_lr: Annotated[float | None, typer.Option(
        help="client SGD learning rate (default per algorithm: fedrecon 0.5, fedavg 0.05)")] = None,
    server_optimizer: Annotated[ServerOptimizerName | None, typer.Option(help="default sgd")] = None,
    server_lr: Annotated[float | None, typer.Option(help="default 1.0")] = None,
    server_momentum: Annotated[float | None, typer.Option(
        help=f"for --server-optimizer momentum (default {DEFAULT_SERVER_MOMENTUM})")] = None,
    recon_epochs: Annotated[int | None, typer.Option(min=0, help="default 5")] = None,
    recon_steps_max: Annotated[str | None, StepsCapOption] = None,
    post_recon_epochs: Annotated[int | None, typer.Option(min=0, help="default 1")] = None,
    post_recon_steps_max: Annotated[str | None, StepsCapOption] = None,
    recon_l2: Annotated[float | None, typer.Option(
        min=0.0, help="L2 penalty on a user's factors while reconstructing (default 0)")] = None,
    eval_recon_epochs: Annotated[int | None, typer.Option(
        min=0, help="reconstruction epochs when scoring unseen users (default: --recon-epochs)")] = None,
    eval_recon_steps_max: Annotated[str | None, typer.Option(
        metavar="N|none", help="reconstruction step cap when scoring unseen users (default: "
                               "--recon-steps-max; 'none': no cap)")] = None,
    split: Annotated[bool | None, typer.Option(
        help="even batches reconstruct, odd batches train/evaluate (default on)")] = None,
    joint: Annotated[bool | None, typer.Option(help="train local variables in the global update too")]
    = None,
    shuffle_each_round: Annotated[bool | None, typer.Option(
        help="put each chosen client's examples in a fresh order every training round before the step caps "
             "apply (by seed, round and user; a served task's devices draw it at random): without it a "
             "client with more batches than a cap trains on the same first ones every round (default off, "
             "or the task's [training] shuffle_each_round)")] = None,
    uniform_weights: Annotated[bool | None, typer.Option(help="weight clients equally, not by examples")]
    = None,
    clip: Annotated[bool, typer.Option(help="clip predictions to the rating range at evaluation")] = False,
    aggregator: Annotated[Reduction | None, typer.Option(
        help="how a round's updates are combined: mean (weighted, streaming; the default), trimmed_mean or "
             "median (coordinate-wise, each update counting once; they buffer the round's updates)")]
    = None,
    trim_fraction: Annotated[float | None, typer.Option(
        min=0.0, max=0.49, help="with --aggregator trimmed_mean: fraction cut at each end of a coordinate "
                                f"(default {AGGREGATION_DEFAULTS.trim_fraction})")] = None,
    max_update_norm: Annotated[float | None, typer.Option(
        help=f"bound on the L2 norm of one client's update (default {AGGREGATION_DEFAULTS.max_update_norm})")]
    = None,
    norm_policy: Annotated[NormPolicy | None, typer.Option(
        help="an update above --max-update-norm is scaled down to it (clip, the default), dropped "
             "(reject), or the bound is off (none)")] = None,
    max_client_weight: Annotated[float | None, typer.Option(
        help="cap on a client's weight (default: batch size x post-recon-steps-max)")] = None,
    server_weighting: Annotated[Weighting | None, typer.Option(
        help="claimed: a client's weight (its examples, capped; the default); uniform: every update "
             "counts 1")] = None,
    adaptive_clip_quantile: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="adaptive clipping (Andrew et al. 2021): the norm bound starts at "
                               "--max-update-norm and follows this quantile of the update norms")] = None,
    adaptive_clip_lr: Annotated[float | None, typer.Option(
        min=0.0, help="learning rate of the adaptive bound's geometric update "
                      f"(default {AGGREGATION_DEFAULTS.adaptive_clip_learning_rate})")] = None,
    dp_noise_multiplier: Annotated[float | None, typer.Option(
        min=0.0, help="user-level differential privacy: Gaussian noise of this many times --max-update-norm "
                      "on the sum of the clipped updates (weights become uniform)")] = None,
    dp_epsilon: Annotated[float | None, typer.Option(
        help="user-level differential privacy: the noise multiplier the accountant finds for this ε over "
             "--rounds rounds (also the budget)")] = None,
    dp_delta: Annotated[float, typer.Option(help="δ at which ε is stated")] = DEFAULT_DELTA,
    dp_sampling: Annotated[Sampling, typer.Option(
        help="fixed: --clients-per-round users per round, as a coordinator selects; poisson: each user "
             "with probability clients-per-round / population")] = Sampling.FIXED,
    dp_accountant: Annotated[AccountantKind, typer.Option(
        help="rdp (Rényi DP) or pld (privacy loss distributions, tighter, Poisson sampling only)")]
    = AccountantKind.RDP,
    dp_epsilon_budget: Annotated[float | None, typer.Option(
        help="stop before a round that would spend more than this ε (default: --dp-epsilon)")] = None,
    upload_codec: Annotated[UploadCodec | None, typer.Option(
        help="how each client's delta is encoded for upload: none (float32), q16 / q8 (16- or 8-bit "
             "stochastic rounding, a scale per row; unbiased), rowsparse (only the rows a client touched, "
             "lossless) or rowsparse_q16 / rowsparse_q8 (both); the same code as a coordinator's clients "
             "(default: none, or the task's)")] = None,
    secure_aggregation: Annotated[bool | None, typer.Option(
        "--secure-aggregation/--no-secure-aggregation",
        help="secure aggregation (SecAgg+, in process): each client clips and weights its update, quantises "
             "and masks it, and only the round's sum is unmasked; refused with an --upload-codec, a robust "
             "--aggregator or adaptive clipping (default: off, or the task's)")] = None,
    centralized_epochs: Annotated[int, typer.Option(min=1)] = 20,
    eval_every: Annotated[int, typer.Option(min=1)] = 25,
    xla: Annotated[bool, typer.Option(
        help="compile the in-process training rounds with XLA: same results within float rounding, "
             "several times less CPU per round after a few seconds of compilation (worth it from about "
             "a hundred rounds)")] = False,
    seed: Annotated[int | None, typer.Option(help="default 0, or the task's seed")] = None,
    split_seed: Annotated[int, typer.Option(help="seed of the train/validation/test user split")] = 42,
    out: Annotated[Path, typer.Option(help="folder for metrics.json, model.npz and learning_curves.png")]
    = Path("runs/latest"),
    transport: Annotated[Transport, typer.Option(
        help="inprocess: the lock-step simulator; grpc: every round through a real coordinator on "
             "loopback with the client library")] = Transport.INPROCESS,
    store: Annotated[str | None, typer.Option(help="with --transport grpc: the coordinator's store URL "
                                                   "(default: a temporary SQLite file)")] = None,
    init_model: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="start from a model file (fedrecon export, or a simulate run's "
                                          "model.npz): the model is built from the file's description")]
    = None,
    backend: Annotated[Backend, typer.Option(
        help="fedrecon: this project's engine; tff: TensorFlow Federated's build_fed_recon in the "
             "environment `make tff-env` builds (same data, split, selection and metrics); ray: this "
             "project's engine with each round's clients on Ray workers (the sim-ray extra; same results "
             "as fedrecon)")]
    = Backend.FEDRECON,
    address: Annotated[str | None, typer.Option(
        help="with --backend ray: the Ray cluster to join (HEAD:6379, or 'auto' for the one `ray start` "
             "began on this machine); default: a local Ray started for this run")] = None,
    ray_workers: Annotated[int | None, typer.Option(
        min=1, help="with --backend ray: worker actors, each holding its share of the users (default: one "
                    "per CPU of the Ray cluster)")] = None,
    local_init: Annotated[LocalInit | None, typer.Option(
        help="how a client's user factors start: uniform (a ±0.05 draw per client and round; the default "
             "of the fedrecon backend), shared (one draw for all clients: what TFF does, the tff backend's "
             "default) or zeros (deterministic rounds)")] = None,
) -> None:
    """Run a simulation locally; print validation metrics as it goes and unseen-test metrics at the end.

    Settings come from the algorithm's defaults, then the task file (--config), then the flags given.
    With a Keras task file the model is the task's (its factor, bias and clip options do not apply) and,
    when it takes text, --data is users' texts: users with under 100 words are dropped, the rest split by
    --split-seed, and every user's text is encoded with the task's vocabulary, as `fedrecon client` does.
    """
    flags = {k: v for k, v in locals().items()}
    try:
        run = _resolve(flags)
    except (SimulateError, ValueError, OSError) as err:
        _fail(str(err), err)
    _run(run)


def _fail(message: str, err: BaseException | None = None, code: int = 2) -> NoReturn:
    console.print(f"[red]{message}[/]", highlight=False, soft_wrap=True)
    raise typer.Exit(code) from err


@dataclass
class _Run:
    """Everything ``simulate`` resolved from defaults, the task file and the flags."""

    data: str
    spec: Any  # ExperimentSpec
    dataset: Any  # FederatedRatings, or FederatedText for a task whose model takes text
    initial: list[Any] | None
    transport: Transport
    backend: Backend
    store: str | None
    out: Path
    batch_size: int
    ray_address: str | None = None
    ray_workers: int | None = None


def _resolve(f: dict[str, Any]) -> _Run:
    from fedrecon.core.config import ClientWeighting
    from fedrecon.simulations.algorithms import training_config
    from fedrecon.simulations.baselines import CentralizedSettings
    from fedrecon.simulations.experiment import ExperimentSpec
    from fedrecon.simulations.runner import SimulationSettings

    algorithm: Algorithm = f["algorithm"]
    task: dict[str, Any] = {}
    described: dict[str, Any] | None = None  # a task's Keras model, as the coordinator would serve it
    if f["config"] is not None:
        from fedrecon.server.task import TaskSpec, read_task_table

        task = read_task_table(f["config"])
        try:  # the coordinator's own validation: a file serve refuses is refused
            task_spec = TaskSpec.from_dict(task, base=Path(f["config"]).parent)
        except ValueError as err:
            raise SimulateError(f"{f['config']}: {err}") from err
        if task_spec.model.get("kind") == "keras":
            described = dict(task_spec.model)
            given = [flag for flag in ("factors", "biases", "local_init", "init_model")
                     if f[flag] is not None]
            if f["clip"]:
                given.append("clip")
            if given:
                raise SimulateError(f"{f['config']} describes its own model: --{', --'.join(given)} "
                                    f"apply to matrix factorization only".replace("_", "-"))
            if algorithm != Algorithm.FEDRECON or f["backend"] != Backend.FEDRECON:
                raise SimulateError(f"{f['config']} describes its own model, which simulate trains with "
                                    "--algorithm fedrecon on --backend fedrecon (in process or --transport "
                                    "grpc)")
    model_table = dict(task.get("model") or {})
    rounds_table = dict(task.get("rounds") or {})

    def pick(flag: str, from_task: Any, default: Any) -> Any:
        """An explicit flag, else the task file's value, else the default."""
        if f[flag] is not None:
            return f[flag]
        return from_task if from_task is not None else default

    # Training: algorithm defaults < the task's [training] < flags.
    cli: dict[str, Any] = {}
    for flag, key in (("recon_epochs", "recon_epochs"), ("post_recon_epochs", "post_recon_epochs"),
                      ("recon_l2", "reconstruction_l2"), ("eval_recon_epochs", "eval_recon_epochs"),
                      ("split", "split_dataset"), ("joint", "jointly_train_variables"),
                      ("shuffle_each_round", "shuffle_each_round")):
        if f[flag] is not None:
            cli[key] = f[flag]
    for flag in ("recon_steps_max", "post_recon_steps_max", "eval_recon_steps_max"):
        cap = steps_cap(f[flag], "--" + flag.replace("_", "-"))
        if cap != "unset":
            cli[flag] = cap
    if f["uniform_weights"] is not None:
        cli["client_weighting"] = (ClientWeighting.UNIFORM if f["uniform_weights"]
                                   else ClientWeighting.NUM_EXAMPLES).value
    if f["recon_lr"] is not None:
        cli["reconstruction_optimizer"] = {"learning_rate": f["recon_lr"]}
    if f["client_lr"] is not None:
        cli["client_optimizer"] = {"learning_rate": f["client_lr"]}
    server: dict[str, Any] = {}
    if f["server_optimizer"] is not None:
        server["name"] = f["server_optimizer"].value
    if f["server_lr"] is not None:
        server["learning_rate"] = f["server_lr"]
    if f["server_momentum"] is not None:
        server["momentum"] = f["server_momentum"]
    if server:
        cli["server_optimizer"] = server
    training = training_config(algorithm, dict(task.get("training") or {}), cli)
    server_spec = training.server_optimizer
    if server_spec.name == ServerOptimizerName.MOMENTUM and server_spec.momentum == 0:
        training = training.replace(server_optimizer=dataclasses.replace(
            server_spec, momentum=DEFAULT_SERVER_MOMENTUM))

    # Aggregation: the dataclass's defaults < the task's [aggregation] < flags.
    aggregation_fields = dict(task.get("aggregation") or {})
    for flag, key in (("aggregator", "reduction"), ("trim_fraction", "trim_fraction"),
                      ("max_update_norm", "max_update_norm"), ("norm_policy", "norm_policy"),
                      ("max_client_weight", "max_client_weight"), ("server_weighting", "weighting"),
                      ("adaptive_clip_quantile", "adaptive_clip_quantile"),
                      ("adaptive_clip_lr", "adaptive_clip_learning_rate"), ("upload_codec", "upload_codec"),
                      ("secure_aggregation", "secure_aggregation")):
        if f[flag] is not None:
            aggregation_fields[key] = f[flag]
    privacy = None
    if f["dp_noise_multiplier"] is not None or f["dp_epsilon"] is not None:
        from fedrecon.core.privacy import DpOptions

        if f["dp_noise_multiplier"] is not None and f["dp_epsilon"] is not None:
            raise SimulateError("give --dp-noise-multiplier or --dp-epsilon, not both")
        # The accountant's sensitivity needs every update to count 1: uniform unless asked otherwise
        # (asking otherwise is refused by AggregationConfig with the reason).
        aggregation_fields.setdefault("weighting", Weighting.UNIFORM)
        privacy = DpOptions(noise_multiplier=f["dp_noise_multiplier"], target_epsilon=f["dp_epsilon"],
                            delta=f["dp_delta"], sampling=f["dp_sampling"], accountant=f["dp_accountant"],
                            epsilon_budget=f["dp_epsilon_budget"])
    elif f["dp_epsilon_budget"] is not None:
        raise SimulateError("--dp-epsilon-budget needs --dp-noise-multiplier or --dp-epsilon")
    aggregation = AggregationConfig.from_dict({**AGGREGATION_DEFAULTS.to_dict(), **aggregation_fields})

    batch_size = pick("batch_size", task.get("batch_size"), 5)
    seed = pick("seed", task.get("seed"), 0)
    settings = SimulationSettings(
        rounds=pick("rounds", rounds_table.get("max_rounds"), 100),
        clients_per_round=pick("clients_per_round", rounds_table.get("clients_per_round"), 100),
        batch_size=batch_size, eval_every=f["eval_every"], seed=seed,
        eval_clip=(1.0, 5.0) if f["clip"] else None, xla=f["xla"])
    backend: Backend = f["backend"]
    if backend != Backend.RAY and (f["address"] is not None or f["ray_workers"] is not None):
        raise SimulateError("--address and --ray-workers go with --backend ray")
    local_default = LocalInit.SHARED if backend == Backend.TFF else LocalInit.UNIFORM
    num_factors = pick("factors", model_table.get("num_factors"), 50)
    use_biases = pick("biases", model_table.get("use_biases"), False)
    local_init = LocalInit(pick("local_init", model_table.get("local_init"), local_default))

    model_file = None
    if f["init_model"] is not None:  # the model is the file's: its description decides its shape
        from fedrecon.model_file import ModelFile

        model_file = ModelFile.load(f["init_model"])
        described = model_file.model_spec
        if described.get("kind") != "matrix_factorization":
            raise SimulateError(f"{f['init_model']}: simulate trains matrix factorization models, the file "
                                f"holds {described.get('kind')!r}")
        shared = bool(described.get("shared_user", False))
        if shared != (algorithm == Algorithm.FEDAVG):
            raise SimulateError(f"{f['init_model']} holds a {'fedavg' if shared else 'fedrecon'} model "
                                f"({'a shared' if shared else 'local'} user vector): use --algorithm "
                                f"{'fedavg' if shared else 'fedrecon'}")
        for flag, key, value in (("factors", "num_factors", num_factors),
                                 ("biases", "use_biases", use_biases)):
            if f[flag] is not None and value != described.get(key):
                raise SimulateError(f"--{flag} {value} disagrees with {f['init_model']} ({key} = "
                                    f"{described.get(key)}): leave it out to use the file's model")
        num_factors = int(described.get("num_factors", num_factors))
        use_biases = bool(described.get("use_biases", use_biases))
        if f["local_init"] is None and described.get("local_init"):
            local_init = LocalInit(described["local_init"])

    spec = ExperimentSpec(algorithm=algorithm.value, num_factors=num_factors, use_biases=use_biases,
                          local_init=local_init.value, config=training, settings=settings,
                          aggregation=aggregation, privacy=privacy,
                          centralized=CentralizedSettings(epochs=f["centralized_epochs"], seed=seed),
                          model_description=described)
    if described is not None and described.get("text") is not None:
        return _Run(data=f["data"], spec=spec, dataset=_load_text(f["data"], described, f["split_seed"]),
                    initial=None, transport=f["transport"], backend=backend, store=f["store"], out=f["out"],
                    batch_size=batch_size)
    from fedrecon.simulations.ratings import load_dataset

    with console.status(f"loading {f['data']}"):
        dataset = load_dataset(f["data"], seed=f["split_seed"])
    if model_table.get("num_items") not in (None, dataset.num_items):
        console.print(f"note: the task's model has num_items = {model_table['num_items']}; {f['data']} has "
                      f"{dataset.num_items} items, which the simulation uses", highlight=False)
    initial = None
    if model_file is not None:
        from fedrecon.model_file import globals_for_model
        from fedrecon.simulations.experiment import build_model

        model = build_model(spec, dataset, shared_user=algorithm == Algorithm.FEDAVG)
        initial = globals_for_model(model_file, model, f"{f['data']} ({dataset.num_items} items)")
    return _Run(data=f["data"], spec=spec, dataset=dataset, initial=initial, transport=f["transport"],
                backend=backend, store=f["store"], out=f["out"], batch_size=batch_size,
                ray_address=f["address"], ray_workers=f["ray_workers"])


def _load_text(data: str, described: dict[str, Any], split_seed: int) -> Any:
    """Users' texts split by ``split_seed`` (as ``fedrecon client`` splits them) and encoded with the task's
    vocabulary: the simulation sees the ids its devices would send."""
    from fedrecon.simulations.text import encode_split, encoding_of, load_texts, split_users

    encoding = encoding_of(described)
    assert encoding is not None
    vocabulary, seq_len = encoding
    with console.status(f"loading {data}"):
        texts = load_texts(data)
        return encode_split(texts, split_users(texts, seed=split_seed), vocabulary, seq_len)


def _run(run: _Run) -> None:
    from fedrecon.simulations.experiment import ExperimentInterrupted, run_experiment

    spec, dataset = run.spec, run.dataset
    algorithm = Algorithm(spec.algorithm)
    vocabulary = getattr(dataset, "vocabulary", None)
    size = (f"{vocabulary.size} classes (the task's vocabulary)" if vocabulary is not None
            else f"{dataset.num_items} items")
    dropped = f" ({dataset.dropped_users} with under 100 words left out)" if vocabulary is not None else ""
    console.print(f"[bold]{run.data}[/]: {len(dataset.train)} training, {len(dataset.validation)} "
                  f"validation, {len(dataset.test)} unseen test users{dropped}; {size}")
    total = spec.centralized.epochs if algorithm == Algorithm.CENTRALIZED else spec.settings.rounds
    unit = "epoch" if algorithm == Algorithm.CENTRALIZED else "round"
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task(f"{algorithm.value} {unit}s", total=total, info="")

        def on_round(record, metrics):  # type: ignore[no-untyped-def]
            progress.update(task, advance=1, info=f"loss {record.train_loss:.3f}")
            if metrics is not None:
                eps = f"  ε {record.epsilon:.3f}" if record.epsilon is not None else ""
                progress.console.print(f"round {record.round_num:5d}  validation {_score(metrics)}"
                                       f"  accuracy {metrics['accuracy']:.4f}{eps}")

        def on_epoch(epoch, rmse):  # type: ignore[no-untyped-def]
            progress.update(task, advance=1, info=f"validation RMSE {rmse:.4f}")

        try:
            result = run_experiment(spec, dataset, on_round=on_round, on_epoch=on_epoch,
                                    transport=run.transport.value, store_url=run.store,
                                    initial_globals=run.initial, backend=run.backend.value,
                                    ray_address=run.ray_address, ray_workers=run.ray_workers)
        except ExperimentInterrupted as stop:
            progress.stop()
            written = _write_outputs(run, stop.partial, interrupted=stop.rounds_done)
            selected = stop.partial.selected
            kept = (f"round {int(selected['round'])}, best on validation so far" if selected
                    else f"round {stop.rounds_done}, the last completed: no validation yet")
            model_note = f" (model.npz: {kept})" if "model.npz" in written else ""
            _fail(f"interrupted after {stop.rounds_done} {unit}s: wrote {', '.join(written)} in {run.out}"
                  f"{model_note}", code=130)
        except KeyboardInterrupt:  # where no partial result exists (centralized training, start-up)
            progress.stop()
            _fail("interrupted: nothing written", code=130)
        except (ValueError, RuntimeError, ImportError) as err:
            progress.stop()
            _fail(str(err), err)

    written = _write_outputs(run, result, interrupted=None)
    engine = {Backend.TFF: " (TFF backend)", Backend.RAY: " (on Ray)"}.get(run.backend, "")
    table = Table(title=f"{algorithm.value}{engine} on unseen test users (selected {unit} "
                        f"{int(result.selected.get('round', 0))} on validation)")
    score = "rmse" if "rmse" in result.test else "loss"
    for col in (score.upper() if score == "rmse" else score, "accuracy", "examples", "s/round"):
        table.add_column(col, justify="right")
    spr = f"{result.seconds_per_round:.3f}" if result.seconds_per_round is not None else "-"
    table.add_row(f"{result.test[score]:.4f}", f"{result.test['accuracy']:.4f}",
                  f"{int(result.test['num_examples'])}", spr)
    console.print(table)
    if result.test_per_class:
        console.print(_per_class_line(result.test_per_class), highlight=False, soft_wrap=True)
    if result.privacy is not None:
        p = result.privacy
        console.print(f"user-level DP: noise multiplier {p['noise_multiplier']:.4g}, {p['rounds_run']} "
                      f"rounds "
                      f"of {p['clients_per_round']} of {p['population']} users ({p['sampling']}), ε = "
                      f"{p['epsilon_spent']:.3f} at δ = {p['delta']:g} ({p['accountant']}); the selected "
                      f"model spent ε = {p['epsilon_of_selected_round']:.3f}. Evaluation reports are not "
                      "covered.",
                      highlight=False, soft_wrap=True)
        if p["stopped"]:
            console.print(p["stopped"], highlight=False, soft_wrap=True)
    console.print(f"wrote {', '.join(written)} in {run.out}")


def _per_class_line(rows: list[dict[str, Any]]) -> str:
    """The test users' per-class scores in one line (all of them in metrics.json's ``test_per_class``):
    RMSE per true rating, or recall and precision of the words most often targeted or predicted."""
    if "rating" in rows[0]:
        return "per rating: " + ", ".join(f"{r['rating']}: RMSE {r['rmse']:.3f} (n={r['count']})"
                                          for r in rows)

    def share(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    return "per word (recall / precision): " + ", ".join(
        f"{r.get('label', r['class'])!r} {share(r['recall'])} / {share(r['precision'])}" for r in rows[:8])


def _score(metrics: dict[str, float]) -> str:
    """The validation figure a run selects by: RMSE for rating models, the loss otherwise."""
    return f"RMSE {metrics['rmse']:.4f}" if "rmse" in metrics else f"loss {metrics['loss']:.4f}"


def _write_outputs(run: _Run, result: Any, *, interrupted: int | None) -> list[str]:
    """metrics.json, model.npz (the selected round) and the plot; the names of the files written."""
    from fedrecon.model_file import ModelFile

    spec = run.spec
    run.out.mkdir(parents=True, exist_ok=True)
    summary = {"data": run.data, "backend": run.backend.value, "transport": run.transport.value,
               "spec": spec.to_dict(), **result.summary()}
    if interrupted is not None:
        summary["interrupted_after"] = interrupted
    if run.backend == Backend.TFF:
        summary["train_loss_note"] = ("TFF's loss metric: the mean over post-reconstruction batches of each "
                                      "batch's mean loss (fedrecon's backend weights by examples)")
    (run.out / "metrics.json").write_text(json.dumps(summary, indent=2))
    written = ["metrics.json"]
    if spec.algorithm != Algorithm.CENTRALIZED and result.globals:
        # The selected model in the model-file format: loads into the client library, `serve --init-model`,
        # or `simulate --init-model` (with either backend).
        version = int(result.selected.get("round", interrupted or 0))
        ModelFile(task=f"simulate-{run.backend.value}", version=version, model_spec=result.model.config(),
                  names=[v.name for v in result.model.global_variables], arrays=list(result.globals),
                  training=spec.config.to_dict(), batch_size=run.batch_size,
                  # The dataset's own item ids: personalization then speaks in them (e.g. movie ids). A text
                  # model's encoding is in its description (model_spec) instead.
                  extra={"item_ids": [int(i) for i in run.dataset.item_ids]}
                  if hasattr(run.dataset, "item_ids") else {}).save(run.out / "model.npz")
        written.append("model.npz")
    if interrupted is None:
        from fedrecon.simulations.plotting import plot_learning_curves

        plot_learning_curves(summary, run.out / "learning_curves.png")
        written.insert(1, "learning_curves.png")
    return written
