"""A task: what the coordinator trains (model, FedRecon hyper-parameters) and how it runs rounds.

Written by people as TOML (or JSON), for example::

    name = "movielens"
    batch_size = 5
    seed = 0

    [model]
    kind = "matrix_factorization"
    num_items = 3706
    num_factors = 50

    [training]                       # FedReconConfig fields; omitted ones keep the reference defaults
    recon_epochs = 5
    server_optimizer = { name = "sgd", learning_rate = 1.0 }
    shuffle_each_round = true        # devices put their examples in a fresh order every round (default false)

    [rounds]
    clients_per_round = 100
    over_selection = 1.3

    item_vocabulary = "movielens.items"  # optional: the dataset's own item ids, one a line, in model order

A Keras model instead (``core.keras_spec``; the architecture is read from the file and stored with the task)::

    [model]
    kind = "keras"
    architecture = "nextword.json"   # model.to_json(); or file = "nextword.keras" (a saved model)
    local_layers = ["oov_embedding"] # their variables are local: reconstructed on devices, never sent
    objective = { name = "sparse_categorical_crossentropy", pad_id = 0, accuracy_excludes = [1, 2] }

    [aggregation]                    # AggregationConfig fields; omitted ones keep the defaults
    max_update_norm = 20.0           # each update is clipped to this L2 norm (norm_policy = "clip")
    reduction = "mean"               # or "trimmed_mean" (trim_fraction) or "median"

    # User-level differential privacy: noise_multiplier in [aggregation] (with weighting = "uniform" and
    # the clip above) adds Gaussian noise to each round's sum; [privacy] says how it is accounted.
    [privacy]
    delta = 1e-6
    epsilon_budget = 8.0             # no round is committed that would take epsilon past this
    population = 1000000             # optional: see PrivacySettings (absent: no sampling amplification)

The whole description is stored with the task, so ``fedrecon status`` and a restarted coordinator see what
was run; a coordinator refuses to serve a task whose stored description differs from the one it is given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrecon.core.aggregation import AggregationConfig
from fedrecon.core.config import FedReconConfig
from fedrecon.core.keras_spec import resolve_task_model
from fedrecon.core.privacy import DEFAULT_DELTA, AccountantKind, PrivacyParameters, Sampling

#: Fields of ``[rounds]`` written by older releases, now settings of ``[aggregation]``.
LEGACY_ROUND_FIELDS = ("max_update_norm", "norm_policy")


@dataclass(frozen=True)
class RoundSettings:
    """How rounds are run (after Bonawitz et al., 2019: selection, configuration, reporting).

    A round opens when the first client checks in. It assigns up to ``ceil(clients_per_round ·
    over_selection)`` clients during ``selection_timeout_s``; with fewer than ``min_reports`` assigned by
    then it fails. It commits as soon as ``clients_per_round`` reports are accepted (later ones are told the
    round is over), or once every assigned client has answered, or at the reporting deadline
    (``selection_timeout_s + reporting_timeout_s`` after opening) if at least ``min_reports`` were
    accepted; otherwise it fails and the model stays as it was.
    """

    clients_per_round: int = 100
    over_selection: float = 1.3
    min_reports: int | None = None  # default: 80% of clients_per_round
    selection_timeout_s: float = 30.0
    reporting_timeout_s: float = 120.0
    retry_delay_s: tuple[float, float] = (1.0, 10.0)  # the window a refused client waits in
    max_rounds: int | None = None  # stop assigning work after this many committed rounds
    # At most this many check-ins per client per minute (a token bucket); more are RESOURCE_EXHAUSTED, so
    # one misbehaving device cannot keep the coordinator busy. Retry windows keep honest clients far below.
    # With authentication the budget is per credential (times its max_devices), whatever ids it asserts.
    max_check_ins_per_minute: float = 60.0
    # The trusted-network mode (no tokens, no client certificates) cannot tell devices apart, only network
    # addresses: these limits apply per peer address on top of the per-client-id budget above. The rate is
    # generous so that many clients behind one address (a NAT, a test harness on loopback) keep working;
    # lower it to bound what one host can ask. ``max_assignments_per_peer`` caps the assignments one
    # address may hold in a round (absent: no cap; set it to the devices behind the busiest address).
    # Neither applies with authentication, where limits are per credential.
    max_check_ins_per_minute_per_peer: float = 6000.0
    max_assignments_per_peer: int | None = None

    def __post_init__(self) -> None:
        if self.clients_per_round < 1:
            raise ValueError("clients_per_round must be at least 1")
        if self.over_selection < 1.0:
            raise ValueError("over_selection must be at least 1.0")
        if not 1 <= self.minimum <= self.clients_per_round:
            raise ValueError("min_reports must be between 1 and clients_per_round")
        if self.selection_timeout_s <= 0 or self.reporting_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        for name in ("max_check_ins_per_minute", "max_check_ins_per_minute_per_peer"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_assignments_per_peer is not None and self.max_assignments_per_peer < 1:
            raise ValueError("max_assignments_per_peer must be at least 1 (or absent)")
        lo, hi = self.retry_delay_s
        if not 0 <= lo <= hi:
            raise ValueError("retry_delay_s must be (min, max) with 0 <= min <= max")

    @property
    def minimum(self) -> int:
        if self.min_reports is not None:
            return self.min_reports
        return max(1, math.ceil(0.8 * self.clients_per_round))

    @property
    def selection_goal(self) -> int:
        return math.ceil(self.clients_per_round * self.over_selection)


@dataclass(frozen=True)
class PrivacySettings:
    """How the coordinator accounts for a task's DP noise (``[aggregation] noise_multiplier``).

    Every committed round releases one noisy sum; ε at ``delta`` after the rounds committed so far is
    computed by the ``dp-accounting`` library and stored with each round. Without ``population`` each round
    is accounted as the plain Gaussian mechanism on every user (no amplification by sampling: the honest
    default, since a coordinator takes the devices that check in first, not a random sample). With
    ``population`` = N the accountant assumes the K reporting devices of a round are a uniform random
    sample of N devices (fixed-size sampling, replace-one; the RDP accountant): state it only if check-ins
    are randomised (devices check in at random times) and N is the eligible population."""

    delta: float = DEFAULT_DELTA
    epsilon_budget: float | None = None  # no round commits that would take ε past it
    population: int | None = None
    accountant: AccountantKind = AccountantKind.RDP

    def __post_init__(self) -> None:
        object.__setattr__(self, "accountant", AccountantKind(self.accountant))
        if not 0 < self.delta < 1:
            raise ValueError("[privacy] delta must be in (0, 1)")
        if self.epsilon_budget is not None and not (self.epsilon_budget > 0 and math.isfinite(
                self.epsilon_budget)):
            raise ValueError("[privacy] epsilon_budget must be positive and finite (or absent)")
        if self.population is not None and self.population < 1:
            raise ValueError("[privacy] population must be at least 1 (or absent)")

    def parameters(self, noise_multiplier: float, clients_per_round: int) -> PrivacyParameters:
        """The accountant's view of a round: K of N users (N = K, q = 1, without a population)."""
        if self.population is None:
            return PrivacyParameters(noise_multiplier, clients_per_round, clients_per_round, self.delta,
                                     Sampling.POISSON, self.accountant)
        return PrivacyParameters(noise_multiplier, self.population, clients_per_round, self.delta,
                                 Sampling.FIXED, self.accountant)

    def to_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "epsilon_budget": self.epsilon_budget, "population": self.population,
                "accountant": str(self.accountant)}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    model: dict[str, Any]
    training: FedReconConfig = field(default_factory=FedReconConfig)
    rounds: RoundSettings = field(default_factory=RoundSettings)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    batch_size: int = 5
    seed: int = 0  # initial global variables
    # The item vocabulary: item_ids[i] is the dataset's own id (a MovieLens movie id) of the model's item i.
    # Served with the model, so clients speak their dataset's ids and recommendations come back in them.
    # None: the model's item indices are the ids. Part of the stored description (another vocabulary is
    # another task).
    item_ids: tuple[int, ...] | None = None
    # Set (defaults filled in) whenever the aggregation adds DP noise; None for a task without noise.
    privacy: PrivacySettings | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"task name {self.name!r} must be letters, digits, '-' or '_'")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        z = self.aggregation.noise_multiplier
        if z is None and self.privacy is not None:
            raise ValueError("[privacy] accounts for DP noise, but [aggregation] sets no noise_multiplier")
        if z is not None:
            if self.privacy is None:  # noise is always accounted: the defaults, stated in the description
                object.__setattr__(self, "privacy", PrivacySettings())
            assert self.privacy is not None
            try:
                self.privacy.parameters(z, self.rounds.clients_per_round)
            except ValueError as err:
                raise ValueError(f"[privacy] {err}") from err
        if self.item_ids is not None:
            _check_vocabulary(self.item_ids, self.model.get("num_items"))

    def to_dict(self) -> dict[str, Any]:
        rounds = dataclasses.asdict(self.rounds)
        rounds["retry_delay_s"] = list(self.rounds.retry_delay_s)
        return {"name": self.name, "model": dict(self.model), "training": self.training.to_dict(),
                "rounds": rounds, "aggregation": self.aggregation.to_dict(), "batch_size": self.batch_size,
                "seed": self.seed, **({"item_ids": list(self.item_ids)} if self.item_ids is not None else {}),
                **({"privacy": self.privacy.to_dict()} if self.privacy is not None else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: Path | None = None) -> TaskSpec:
        """``base``: the folder a relative ``item_vocabulary`` path is read from (the task file's)."""
        known = {"name", "model", "training", "rounds", "aggregation", "batch_size", "seed", "item_ids",
                 "item_vocabulary", "privacy"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown task fields {sorted(unknown)}; known: {sorted(known)}")
        if "name" not in data or "model" not in data:
            raise ValueError("a task needs at least 'name' and [model]")
        rounds = dict(data.get("rounds", {}))
        if "retry_delay_s" in rounds:
            rounds["retry_delay_s"] = tuple(rounds["retry_delay_s"])
        aggregation = _with_legacy_bound(dict(data.get("aggregation") or {}),
                                         {k: rounds.pop(k) for k in LEGACY_ROUND_FIELDS if k in rounds})
        try:
            return cls(name=data["name"], model=resolve_task_model(dict(data["model"]), base),
                       training=FedReconConfig.from_dict(dict(data.get("training", {}))),
                       rounds=RoundSettings(**rounds), aggregation=AggregationConfig.from_dict(aggregation),
                       batch_size=int(data.get("batch_size", 5)), seed=int(data.get("seed", 0)),
                       item_ids=_item_ids(data, base),
                       privacy=(PrivacySettings(**data["privacy"]) if data.get("privacy") is not None
                                else None))
        except TypeError as err:  # an unknown field in a sub-table
            raise ValueError(f"bad task description: {err}") from err

    @classmethod
    def load(cls, path: Path) -> TaskSpec:
        """Read a ``.toml`` or ``.json`` task description."""
        return cls.from_dict(read_task_table(path), base=Path(path).parent)


def read_vocabulary(path: Path) -> tuple[int, ...]:
    """Item ids from a text file, one a line in model order (blank lines and ``#`` comments skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ValueError(f"cannot read the item vocabulary {path}: {err.strerror or err}") from err
    ids = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise ValueError(f"{path}:{number}: expected an integer item id, got {text!r}") from None
    return tuple(ids)


def _item_ids(data: Mapping[str, Any], base: Path | None) -> tuple[int, ...] | None:
    if "item_ids" in data and "item_vocabulary" in data:
        raise ValueError("give the item vocabulary once: item_ids (inline) or item_vocabulary (a file)")
    if "item_vocabulary" in data:
        path = Path(str(data["item_vocabulary"]))
        return read_vocabulary(path if path.is_absolute() or base is None else base / path)
    if data.get("item_ids") is None:
        return None
    return tuple(int(i) for i in data["item_ids"])


def _check_vocabulary(item_ids: tuple[int, ...], num_items: object) -> None:
    if len(set(item_ids)) != len(item_ids):
        raise ValueError("the item vocabulary lists an item id twice")
    if isinstance(num_items, int) and len(item_ids) != num_items:
        raise ValueError(f"the item vocabulary has {len(item_ids)} ids but the model has num_items = "
                         f"{num_items}")


def read_task_table(path: Path) -> dict[str, Any]:
    """A task file's tables as written (``.toml``, or ``.json`` by suffix), before defaults are filled in,
    so a reader can tell what the file sets from what it leaves out (``simulate --config`` lays the file's
    ``[training]`` over an algorithm's own defaults). Needs no store and no network. Raises ``OSError`` if
    the file cannot be read and ``ValueError`` (naming the file) if it is not valid TOML/JSON."""
    text = Path(path).read_text()
    try:
        data = json.loads(text) if Path(path).suffix == ".json" else tomllib.loads(text)
    except ValueError as err:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a task file holds a table, not {type(data).__name__}")
    return data


def _with_legacy_bound(aggregation: dict[str, Any], legacy: Mapping[str, Any]) -> dict[str, Any]:
    """Map ``rounds.max_update_norm`` / ``rounds.norm_policy`` (older task files and stored specs) onto
    ``[aggregation]``.

    Older releases stored both fields always, ``max_update_norm = null`` with ``norm_policy = "reject"``
    meaning "no bound": a null bound now means the default bound (clipped), and the old policy is
    honoured only together with an explicit bound (absent, it was "reject")."""
    bound = legacy.get("max_update_norm")
    if bound is None:
        return aggregation
    if "max_update_norm" in aggregation or "norm_policy" in aggregation:
        raise ValueError("the update-norm bound is set both in [rounds] (an older field) and in "
                         "[aggregation]; keep it in [aggregation] only")
    return {**aggregation, "max_update_norm": bound, "norm_policy": legacy.get("norm_policy") or "reject"}
