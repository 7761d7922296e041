"""Aggregation of client updates into the round's mean delta, as composable stages.

The simulator and the coordinator use this module and nothing else to turn client updates into the delta
that ``FedRecon.server_update`` applies, so a round gives the same step whichever side runs it. A round's
aggregation is (after TensorFlow Federated's aggregation factories):

1. Per-client transforms, in order (``ClientTransform``). Each sees every client's claimed weight and the
   L2 norm of its update (all tensors together) and may change the weight, scale the update down, or
   refuse the client. Built in: the weight policy (``WeightCap``: a claimed weight above the task's cap is
   clipped to the cap; or ``UniformWeights``: every report counts 1) and the norm bound (``NormBound``:
   scale an update down to norm S, or refuse it); with ``AdaptiveClip`` the bound follows a target quantile
   of the update norms from round to round (``Aggregator.next_clip_bound``).
2. A reducer (``Reducer``) folds the transformed updates: ``WeightedMean`` streams Σ w·s·Δ and Σ w (memory:
   one model, however many clients); ``TrimmedMean`` and ``Median`` (coordinate-wise, every report
   counting once) must see all updates, so they buffer them in one preallocated array whose size is bounded
   by ``AggregationConfig.max_buffer_bytes``; ``GaussianSum`` is the DP release (noise on the clipped sum).
3. ``Aggregator.result`` gives the mean delta (or None when nothing was folded) and an
   ``AggregationReport`` of what ran: the stages, how many updates were folded, clipped, capped, refused,
   and the largest share of the round's weight one client held.

A round may also be folded in shards (the Ray backend: each worker folds its clients through the round's
own stages, where the per-client norms and weights are) and the shards merged (``Aggregator.partial`` and
``merge``): counts add, the streaming sums add, the buffering reducers' rows concatenate, and only the
merged aggregator releases the mean (DP noise once) and moves the adaptive bound.

Updates reach the stages through ``ClientDeltas``: the coordinator passes one dense update at a time
(``StackedDeltas``, C = 1); the simulator passes a whole round straight from the TensorFlow client step
(per-client norms computed in the graph, the weighted sum reduced in the graph), so clipping costs the
simulator almost nothing.

Guarantee of the default (clipped weighted mean, weight cap W, norm bound S, K folded reports with capped
weights w_1..w_K): the mean is Σ_k w_k s_k Δ_k / Σ_k w_k with ‖s_k Δ_k‖ ≤ S, so client k moves the mean by at
most S · w_k / Σ_j w_j ≤ S · W / (W + Σ_{j≠k} w_j); with ``weighting = "uniform"`` exactly S / K. The whole
mean has norm at most S.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

from fedrecon.core.compression import (
    DecodedUpdates,
    RowSparse,
    UpdateTensor,
    UploadCodec,
    add_scaled_into,
)
from fedrecon.core.config import FedReconConfig
from fedrecon.core.secagg.updates import SecureEncoding

#: Default bound S on the L2 norm of one client's update (all trainable tensors together), from the honest
#: norms of 500 unclipped rounds (``benchmarks/update_norms.py``): MovieLens (2,998 users) with the paper's
#: reference configuration has median 5.7, 99th percentile 16, 99.9th 30; with the tuned configuration
#: (biases, server lr 3) median 1.8, maximum 7.1; the embedded synthetic data median 2.9, 99.9th 20. At 20,
#: 0.47% (reference), 0% (tuned) and 0.1% (synthetic) of honest updates are clipped, and the README's
#: MovieLens test RMSEs move by at most 0.0003, while one client moves a round's mean by at most S times its
#: share of the round's weight.
DEFAULT_MAX_UPDATE_NORM = 20.0
#: Weight cap when the task's configuration does not bound a client's examples (no ``post_recon_steps_max``).
DEFAULT_WEIGHT_CAP = 1000.0
#: Memory the buffering reducers (trimmed mean, median) may take for one round's updates.
DEFAULT_MAX_BUFFER_BYTES = 1 << 30


class Reduction(StrEnum):
    MEAN = "mean"  # weighted mean of the (clipped) updates, streaming
    TRIMMED_MEAN = "trimmed_mean"  # coordinate-wise: drop the trim fraction at both ends, average the rest
    MEDIAN = "median"  # coordinate-wise median


class Weighting(StrEnum):
    CLAIMED = "claimed"  # the client's own weight (its examples), clipped to the cap
    UNIFORM = "uniform"  # every accepted report counts 1


class NormPolicy(StrEnum):
    CLIP = "clip"  # scale an update above the bound down to it (as in DP-FedAvg)
    REJECT = "reject"  # refuse an update above the bound
    NONE = "none"  # no bound (any finite update is folded as it is)


@dataclass(frozen=True)
class AggregationConfig:
    """How a round's updates become its mean delta; the ``[aggregation]`` table of a task file and the
    aggregation options of ``fedrecon simulate``."""

    reduction: Reduction = Reduction.MEAN
    trim_fraction: float = 0.1  # trimmed mean: fraction dropped at *each* end of every coordinate
    weighting: Weighting = Weighting.CLAIMED
    # Cap on a claimed weight; None: batch_size × post_recon_steps_max (the most examples an honest client
    # of this task can train on), or DEFAULT_WEIGHT_CAP when the configuration does not bound steps.
    max_client_weight: float | None = None
    max_update_norm: float = DEFAULT_MAX_UPDATE_NORM
    norm_policy: NormPolicy = NormPolicy.CLIP
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES
    # User-level DP (``core.privacy``): Gaussian noise of std noise_multiplier × max_update_norm on the sum
    # of the clipped updates, divided by the expected number of clients. None: no noise.
    noise_multiplier: float | None = None
    # Adaptive clipping (Andrew et al., NeurIPS 2021): the bound starts at max_update_norm and follows the
    # target quantile γ of the update norms, C ← C·exp(−η(b̄ − γ)), where b̄ is the fraction of a round's
    # updates within the bound, noised (std clipped_count_stddev on the count; default K/20 with DP noise,
    # 0 without) when the round is differentially private. None: a fixed bound.
    adaptive_clip_quantile: float | None = None
    adaptive_clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    # How clients encode their delta for upload (``core.compression``): quantised (q16, q8), row-sparse
    # (rowsparse) or both. The coordinator names it in every assignment; the simulator applies it too.
    upload_codec: UploadCodec = UploadCodec.NONE
    # Secure aggregation (``core.secagg``): clients clip and weight their own update (``secagg.updates``),
    # quantise and mask it, and the coordinator learns only the round's sum. ``secure_neighbours`` is the
    # SecAgg+ neighbourhood size k (even; None: the size recommended for 30% dropouts, the full graph for
    # small rounds), ``secure_threshold`` the shares t that recover a secret (None: a majority of k), and
    # ``secure_phase_timeout_s`` how long each stage after key advertisement waits for the clients.
    secure_aggregation: bool = False
    secure_neighbours: int | None = None
    secure_threshold: int | None = None
    secure_phase_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        # Coerce strings from task files and the CLI, so equal settings compare equal however given.
        object.__setattr__(self, "reduction", Reduction(self.reduction))
        object.__setattr__(self, "weighting", Weighting(self.weighting))
        object.__setattr__(self, "norm_policy", NormPolicy(self.norm_policy))
        try:
            object.__setattr__(self, "upload_codec", UploadCodec(self.upload_codec))
        except ValueError:
            raise ValueError(f"upload_codec {self.upload_codec!r} is not one of "
                             f"{', '.join(c.value for c in UploadCodec)}") from None
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError("trim_fraction must be in [0, 0.5)")
        if self.max_client_weight is not None and not (math.isfinite(self.max_client_weight)
                                                       and self.max_client_weight > 0):
            raise ValueError("max_client_weight must be positive and finite (or absent)")
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm > 0):
            raise ValueError("max_update_norm must be positive and finite (norm_policy = 'none' disables it)")
        if self.max_buffer_bytes < 1:
            raise ValueError("max_buffer_bytes must be positive")
        if self.noise_multiplier is not None:
            if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
                raise ValueError("noise_multiplier must be finite and non-negative")
            # The accountant's sensitivity holds only if every update is clipped to the bound and counts 1.
            if (self.reduction != Reduction.MEAN or self.weighting != Weighting.UNIFORM
                    or self.norm_policy != NormPolicy.CLIP):
                raise ValueError("noise_multiplier (differential privacy) needs reduction 'mean', weighting "
                                 "'uniform' and norm_policy 'clip': only then is one user's influence on the "
                                 "sum bounded by max_update_norm")
        if self.adaptive_clip_quantile is not None:
            if not 0.0 < self.adaptive_clip_quantile < 1.0:
                raise ValueError("adaptive_clip_quantile must be in (0, 1)")
            if self.norm_policy != NormPolicy.CLIP:
                raise ValueError("adaptive_clip_quantile needs norm_policy 'clip'")
            if not (math.isfinite(self.adaptive_clip_learning_rate) and self.adaptive_clip_learning_rate > 0):
                raise ValueError("adaptive_clip_learning_rate must be positive")
        if self.clipped_count_stddev is not None:
            if self.adaptive_clip_quantile is None:
                raise ValueError("clipped_count_stddev is the noise of adaptive clipping: set "
                                 "adaptive_clip_quantile too")
            if not (math.isfinite(self.clipped_count_stddev) and self.clipped_count_stddev >= 0):
                raise ValueError("clipped_count_stddev must be finite and non-negative")
        self._check_secure_aggregation()

    def _check_secure_aggregation(self) -> None:
        """Refuse what cannot run when the coordinator sees only the sum of a round's updates."""
        if not (math.isfinite(self.secure_phase_timeout_s) and self.secure_phase_timeout_s > 0):
            raise ValueError("secure_phase_timeout_s must be positive and finite")
        if not self.secure_aggregation:
            if self.secure_neighbours is not None or self.secure_threshold is not None:
                raise ValueError("secure_neighbours and secure_threshold need secure_aggregation = true")
            return
        if self.upload_codec != UploadCodec.NONE:
            raise ValueError(f"upload_codec {self.upload_codec.value!r} cannot be used with "
                             "secure_aggregation: masking needs every client's dense vector of one fixed "
                             "length, which compressed and row-sparse uploads are not; set upload_codec "
                             "'none' (the masked vector is already 32-bit fixed point)")
        if self.reduction != Reduction.MEAN:
            raise ValueError(f"reduction {self.reduction.value!r} cannot be used with secure_aggregation: "
                             "a trimmed mean or median needs every individual update, and with secure "
                             "aggregation the coordinator sees only their sum; use reduction 'mean'")
        if self.norm_policy != NormPolicy.CLIP:
            raise ValueError(f"norm_policy {self.norm_policy.value!r} cannot be used with "
                             "secure_aggregation: each client clips its own update to max_update_norm "
                             "before masking (the coordinator cannot see a norm to reject on, and the "
                             "quantiser needs the bound); use norm_policy 'clip'")
        if self.adaptive_clip_quantile is not None:
            raise ValueError("adaptive_clip_quantile cannot be used with secure_aggregation: adapting the "
                             "bound needs each update's norm at the coordinator; use a fixed "
                             "max_update_norm")
        if self.secure_neighbours is not None and (self.secure_neighbours < 2 or self.secure_neighbours % 2):
            raise ValueError("secure_neighbours must be even and at least 2 (each client's neighbours are "
                             "the k/2 nearest on either side of a ring)")
        if self.secure_threshold is not None:
            if self.secure_threshold < 1:
                raise ValueError("secure_threshold must be at least 1")
            if self.secure_neighbours is not None and self.secure_threshold > self.secure_neighbours:
                raise ValueError("secure_threshold cannot exceed secure_neighbours (a secret is split "
                                 "among the k neighbours)")

    def noise_split(self, expected_clients: int) -> tuple[float, float]:
        """(noise multiplier of the sum, std of the noise on the within-bound count).

        With adaptive clipping under DP the round releases two Gaussian queries, the sum (sensitivity C)
        and the count of updates within the bound (sensitivity 1/2 after centring each indicator), and
        together they must spend what ``noise_multiplier`` z alone would: z_sum = (z⁻² − (2σ_b)⁻²)^(−1/2)
        (Andrew et al. 2021, Theorem 1), which needs 2σ_b > z."""
        z = self.noise_multiplier
        if self.adaptive_clip_quantile is None:
            return (z or 0.0, 0.0)
        sigma_b = self.clipped_count_stddev
        if sigma_b is None:
            sigma_b = expected_clients / 20.0 if z is not None else 0.0
        if z is None or z == 0:
            return (0.0, sigma_b)
        if not 2 * sigma_b > z:
            raise ValueError(f"adaptive clipping under DP needs 2 x clipped_count_stddev > noise_multiplier "
                             f"(got {sigma_b:g} and {z:g}; the default is clients per round / 20)")
        return ((z ** -2 - (2 * sigma_b) ** -2) ** -0.5, sigma_b)

    def weight_cap(self, training: FedReconConfig, batch_size: int) -> float:
        """The cap in force: explicit, else derived from the task's own bound on a client's examples."""
        if self.max_client_weight is not None:
            return float(self.max_client_weight)
        if training.post_recon_steps_max is not None and training.post_recon_steps_max > 0:
            return float(batch_size * training.post_recon_steps_max)
        return DEFAULT_WEIGHT_CAP

    def secure_encoding(self, weight_cap: float) -> SecureEncoding:
        """What a client of a secure round encodes with (``secagg.updates``): this task's norm bound and
        weight policy, applied on the client because the coordinator never sees one update."""
        uniform = self.weighting == Weighting.UNIFORM
        return SecureEncoding(self.max_update_norm, 1.0 if uniform else weight_cap, uniform)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("reduction", "weighting", "norm_policy", "upload_codec"):
            data[key] = str(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AggregationConfig:
        """Read the ``[aggregation]`` table; an explicit null means the default, as if absent."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown aggregation fields {sorted(unknown)}; known: {sorted(known)}")
        values = {k: v for k, v in data.items() if v is not None}
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad aggregation settings: {err}") from err


#: TensorFlow Federated's aggregation in ``build_fed_recon``: the weighted mean of the claimed weights, with
#: no cap and no norm bound. For like-with-like comparisons with TFF only (parity, side by side); a task
#: facing devices keeps the bounded defaults.
UNBOUNDED_MEAN = AggregationConfig(norm_policy=NormPolicy.NONE, max_client_weight=1e30)


class ClientDeltas(Protocol):
    """C client updates as the stages need them; how they are held is the producer's business."""

    @property
    def num_clients(self) -> int: ...

    def norms(self) -> np.ndarray:
        """[C] float64: the L2 norm of each client's update over all its tensors."""

    def weighted_sum(self, coefficients: np.ndarray) -> list[np.ndarray]:
        """Σ_c a_c Δ_c per tensor, in the global shapes."""

    def stacked(self) -> list[np.ndarray]:
        """Per tensor, the updates stacked on a leading client axis: [C, *shape]."""


@dataclass(frozen=True)
class StackedDeltas:
    """Dense updates with a leading client axis (the coordinator: one report, C = 1)."""

    tensors: Sequence[np.ndarray]

    @classmethod
    def one(cls, delta: Sequence[np.ndarray]) -> StackedDeltas:
        return cls([np.asarray(d)[None] for d in delta])

    @property
    def num_clients(self) -> int:
        return int(self.tensors[0].shape[0]) if self.tensors else 0

    def norms(self) -> np.ndarray:
        c = self.num_clients
        squares = np.zeros(c, np.float64)
        for t in self.tensors:
            flat = np.asarray(t).reshape(c, -1)
            for i in range(c):
                row = flat[i]
                with np.errstate(over="ignore"):
                    sq = float(np.dot(row, row))  # BLAS in the tensor's dtype: fast
                if not math.isfinite(sq):  # a huge finite update overflowed float32: redo in float64
                    row64 = row.astype(np.float64)
                    sq = float(np.dot(row64, row64))
                squares[i] += sq
        return np.sqrt(squares)

    def weighted_sum(self, coefficients: np.ndarray) -> list[np.ndarray]:
        a = np.asarray(coefficients, np.float64)
        if self.num_clients == 1:  # one report: a scaled copy, no float64 copy of the update first
            return [np.asarray(t[0]) * a[0] for t in self.tensors]
        return [np.tensordot(a, np.asarray(t, np.float64), axes=1) for t in self.tensors]

    def stacked(self) -> list[np.ndarray]:
        return [np.asarray(t) for t in self.tensors]


@dataclass
class ClientFactors:
    """What the per-client transforms decide: each client's weight and the factor its update is scaled by;
    a client with a reason in ``refused`` is not folded at all."""

    weights: np.ndarray  # [C] float64
    norms: np.ndarray  # [C] float64, before scaling
    scales: np.ndarray  # [C] float64 in [0, 1]
    refused: dict[int, tuple[str, str]] = field(default_factory=dict)  # client index -> (reason, message)


@dataclass
class AggregationReport:
    """What ran in a round and what it did (for the round's metrics)."""

    stages: tuple[str, ...]
    updates_folded: int = 0
    weights_capped: int = 0
    updates_clipped: int = 0
    updates_refused: int = 0
    total_weight: float = 0.0
    max_client_weight: float = 0.0  # the largest weight one folded client held (after the transforms)
    max_norm: float = 0.0  # the largest update norm seen (before clipping)
    updates_within_bound: int = 0  # updates whose norm was at most the bound (adaptive clipping counts them)
    clip_bound: float | None = None  # the norm bound in force this round

    @property
    def max_single_client_share(self) -> float:
        """The largest fraction of the round's weight one client held (1/K for the robust reducers)."""
        return self.max_client_weight / self.total_weight if self.total_weight > 0 else 0.0

    def merge(self, other: AggregationReport) -> None:
        """Add what another fold of the same round's stages did (a shard of the round's clients): counts
        add, maxima take the larger."""
        if other.stages != self.stages or other.clip_bound != self.clip_bound:
            raise ValueError(f"cannot merge a shard folded by {other.stages} (bound {other.clip_bound}) into "
                             f"{self.stages} (bound {self.clip_bound}): a round's shards share its stages")
        self.updates_folded += other.updates_folded
        self.weights_capped += other.weights_capped
        self.updates_clipped += other.updates_clipped
        self.updates_refused += other.updates_refused
        self.total_weight += other.total_weight
        self.max_client_weight = max(self.max_client_weight, other.max_client_weight)
        self.max_norm = max(self.max_norm, other.max_norm)
        self.updates_within_bound += other.updates_within_bound

    def metrics(self) -> dict[str, float]:
        return {"updates_folded": float(self.updates_folded),
                "weights_capped": float(self.weights_capped),
                "updates_clipped": float(self.updates_clipped),
                "updates_refused": float(self.updates_refused),
                "max_single_client_share": self.max_single_client_share,
                "max_update_norm_seen": self.max_norm,
                **({"clip_bound": self.clip_bound} if self.clip_bound is not None else {})}


class ClientTransform(abc.ABC):
    """A per-client stage: changes weights, scales or refuses clients, and counts what it did."""

    name: str

    @abc.abstractmethod
    def apply(self, factors: ClientFactors, report: AggregationReport) -> None:
        """Update ``factors`` in place."""


@dataclass(frozen=True)
class WeightCap(ClientTransform):
    """A claimed weight above ``cap`` counts as ``cap`` (clipped: neither refused nor trusted)."""

    cap: float
    name: str = "weight_cap"

    def apply(self, factors: ClientFactors, report: AggregationReport) -> None:
        over = factors.weights > self.cap
        report.weights_capped += int(over.sum())
        factors.weights = np.minimum(factors.weights, self.cap)


@dataclass(frozen=True)
class UniformWeights(ClientTransform):
    """Every report counts 1, whatever it claims: one client is exactly 1/K of the mean. A report of weight
    0 (no examples, or zeroed by the client step's non-finite guard) still counts 0."""

    name: str = "uniform_weights"

    def apply(self, factors: ClientFactors, report: AggregationReport) -> None:
        factors.weights = np.where(factors.weights > 0, 1.0, 0.0)


@dataclass(frozen=True)
class NormBound(ClientTransform):
    """An update with L2 norm above ``bound`` is scaled down to it (``clip``) or refused (``reject``)."""

    bound: float
    reject: bool = False

    @property
    def name(self) -> str:  # type: ignore[override]
        return "norm_reject" if self.reject else "norm_clip"

    def apply(self, factors: ClientFactors, report: AggregationReport) -> None:
        over = factors.norms > self.bound
        report.updates_within_bound += int((~over).sum())
        if self.reject:
            for c in np.flatnonzero(over):
                factors.refused[int(c)] = ("norm_too_large", f"the update's L2 norm {factors.norms[c]:.4g} "
                                                             f"exceeds the bound {self.bound:g}")
            return
        report.updates_clipped += int(over.sum())
        with np.errstate(divide="ignore"):
            factors.scales = np.where(over, self.bound / np.maximum(factors.norms, 1e-300), factors.scales)


class Reducer(abc.ABC):
    """Folds transformed updates; ``mean`` is the round's delta (None: nothing folded)."""

    name: str

    @abc.abstractmethod
    def fold(self, deltas: ClientDeltas, keep: np.ndarray, factors: ClientFactors) -> None:
        """Fold the clients where ``keep`` is true, each Δ_c scaled by ``factors.scales[c]``."""

    @abc.abstractmethod
    def mean(self) -> list[np.ndarray] | None: ...

    @abc.abstractmethod
    def partial(self) -> ReducedPart:
        """What this reducer folded so far, to be merged into another reducer of the same round."""

    @abc.abstractmethod
    def merge(self, part: ReducedPart) -> None:
        """Fold in what another reducer of the same kind and shapes folded (``partial``), exactly as if
        its clients had been folded here."""


@dataclass(frozen=True)
class ReducedPart:
    """A reducer's folded state: the running weighted sums and their total weight (streaming reducers), or
    the buffered scaled updates and their count (trimmed mean, median). Small for the streaming reducers
    (one model), so a shard of a round's clients sends this rather than its clients' updates."""

    arrays: list[np.ndarray]
    total: float


class WeightedMean(Reducer):
    """Σ w·s·Δ / Σ w with float64 accumulators: memory is one model whatever the number of clients."""

    name = "weighted_mean"

    def __init__(self, shapes: Sequence[tuple[int, ...]]) -> None:
        self._sums = [np.zeros(s, np.float64) for s in shapes]
        self._total = 0.0

    def fold(self, deltas: ClientDeltas, keep: np.ndarray, factors: ClientFactors) -> None:
        weights = np.where(keep, factors.weights, 0.0)
        if not weights.any():
            return
        if isinstance(deltas, DecodedUpdates):  # row-sparse updates add their rows into the sums in place
            deltas.add_weighted_into(self._sums, weights * factors.scales)
        elif isinstance(deltas, StackedDeltas) and deltas.num_clients == 1:  # one report: into the sums
            a = float(weights[0] * factors.scales[0])
            for acc, t in zip(self._sums, deltas.tensors, strict=True):
                add_scaled_into(acc, np.asarray(t)[0], a)
        else:
            for acc, s in zip(self._sums, deltas.weighted_sum(weights * factors.scales), strict=True):
                acc += s
        self._total += float(weights.sum())

    def add_sum(self, sums: Sequence[np.ndarray], total_weight: float) -> None:
        """Add sums that were formed elsewhere (a secure round's unmasked Σ w·s·Δ and Σ w)."""
        for acc, s in zip(self._sums, sums, strict=True):
            acc += s
        self._total += total_weight

    def mean(self) -> list[np.ndarray] | None:
        if self._total <= 0:
            return None
        return [(s / self._total).astype(np.float32) for s in self._sums]

    def partial(self) -> ReducedPart:
        return ReducedPart(self._sums, self._total)

    def merge(self, part: ReducedPart) -> None:
        for acc, s in zip(self._sums, part.arrays, strict=True):
            acc += s
        self._total += part.total


class GaussianSum(WeightedMean):
    """The Gaussian mechanism of DP-FedAvg: Σ s·Δ over uniformly weighted, clipped updates, plus
    N(0, (z·S)²) per coordinate, divided by the *expected* number of clients K (a fixed denominator: the
    count itself would reveal who took part). The noise is released even when nobody reported, so the
    output never depends on whether a given user was selected. It folds as ``WeightedMean`` does (the
    weights are all 1 here); only the release differs."""

    name = "gaussian_sum"

    def __init__(self, shapes: Sequence[tuple[int, ...]], *, clip: float, noise_multiplier: float,
                 expected_clients: int, rng: np.random.Generator) -> None:
        if expected_clients < 1:
            raise ValueError("expected_clients must be at least 1")
        super().__init__(shapes)
        self.noise_std = noise_multiplier * clip
        self.expected_clients = expected_clients
        self._rng = rng

    def mean(self) -> list[np.ndarray] | None:
        out = []
        for s in self._sums:
            noisy = s + self._rng.normal(0.0, self.noise_std, size=s.shape) if self.noise_std > 0 else s
            out.append((noisy / self.expected_clients).astype(np.float32))
        return out


class _Buffered(Reducer):
    """Keeps every folded update (scaled) in one preallocated float32 array per tensor."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], capacity: int) -> None:
        self._buffers = [np.zeros((capacity, *s), np.float32) for s in shapes]
        self._count = 0

    @staticmethod
    def buffer_bytes(shapes: Sequence[tuple[int, ...]], capacity: int) -> int:
        return 4 * capacity * sum(math.prod(s) for s in shapes)

    def fold(self, deltas: ClientDeltas, keep: np.ndarray, factors: ClientFactors) -> None:
        rows = np.flatnonzero(keep)
        if not len(rows):
            return
        if self._count + len(rows) > len(self._buffers[0]):
            raise ValueError(f"more than {len(self._buffers[0])} updates in one round")
        scales = factors.scales[rows].astype(np.float32)
        for buf, t in zip(self._buffers, deltas.stacked(), strict=True):
            chosen = np.asarray(t, np.float32)[rows]
            buf[self._count:self._count + len(rows)] = chosen * scales.reshape(-1, *([1] * (chosen.ndim - 1)))
        self._count += len(rows)

    def mean(self) -> list[np.ndarray] | None:
        if self._count == 0:
            return None
        return [self._reduce(buf[:self._count]).astype(np.float32) for buf in self._buffers]

    def partial(self) -> ReducedPart:
        return ReducedPart([buf[:self._count] for buf in self._buffers], float(self._count))

    def merge(self, part: ReducedPart) -> None:
        count = int(part.total)
        if self._count + count > len(self._buffers[0]):
            raise ValueError(f"more than {len(self._buffers[0])} updates in one round")
        for buf, rows in zip(self._buffers, part.arrays, strict=True):
            buf[self._count:self._count + count] = rows
        self._count += count

    @abc.abstractmethod
    def _reduce(self, stacked: np.ndarray) -> np.ndarray: ...


class TrimmedMean(_Buffered):
    """Coordinate-wise: sort the K values of each coordinate, drop ⌊βK⌋ at each end, average the rest."""

    name = "trimmed_mean"

    def __init__(self, shapes: Sequence[tuple[int, ...]], capacity: int, trim_fraction: float) -> None:
        super().__init__(shapes, capacity)
        self.trim_fraction = trim_fraction

    def _reduce(self, stacked: np.ndarray) -> np.ndarray:
        k = len(stacked)
        cut = math.floor(self.trim_fraction * k)
        ordered = np.sort(stacked, axis=0)
        return ordered[cut:k - cut].mean(axis=0, dtype=np.float64)


class Median(_Buffered):
    """Coordinate-wise median of the K folded updates."""

    name = "median"

    def _reduce(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0)


@dataclass(frozen=True)
class PartialAggregate:
    """A shard's fold of part of a round: its report and its reducer's state (``Aggregator.partial``)."""

    report: AggregationReport
    reduced: ReducedPart


@dataclass(frozen=True)
class FoldResult:
    """Which clients of a fold a stage refused (index -> (reason, message)); the others were folded, and
    ``clipped`` of them were scaled down."""

    refused: dict[int, tuple[str, str]]
    clipped: int


@dataclass
class AdaptiveClip:
    """How the norm bound moves between rounds (Andrew et al., "Differentially private learning with
    adaptive clipping", NeurIPS 2021): geometric updates toward the target quantile γ of the update norms,
    C ← C·exp(−η(b̄ − γ)), with b̄ the fraction of the round's updates within the bound. Under DP the count is
    released with Gaussian noise (std ``count_stddev``) over the fixed ``denominator``, and the sum's noise
    is lowered so that the two releases together spend what the task's noise multiplier states."""

    bound: float
    quantile: float
    learning_rate: float
    count_stddev: float = 0.0
    denominator: int | None = None  # DP: the expected number of clients; None: the updates folded
    rng: np.random.Generator | None = None

    def next_bound(self, report: AggregationReport) -> float:
        denominator = self.denominator if self.denominator is not None else report.updates_folded
        if denominator <= 0:
            return self.bound
        count = float(report.updates_within_bound)
        if self.count_stddev > 0:
            rng = self.rng if self.rng is not None else np.random.default_rng()
            count += float(rng.normal(0.0, self.count_stddev))
        fraction = count / denominator
        return float(self.bound * math.exp(-self.learning_rate * (fraction - self.quantile)))


class Aggregator:
    """One round's aggregation: the transforms, then the reducer; ``result`` is what the round commits."""

    def __init__(self, transforms: Sequence[ClientTransform], reducer: Reducer, *, weighted: bool,
                 adaptive: AdaptiveClip | None = None) -> None:
        self.transforms = tuple(transforms)
        self.reducer = reducer
        self.adaptive = adaptive
        self._weighted = weighted  # False: the reducer counts every report once, whatever its weight
        self.report = AggregationReport(stages=(*(t.name for t in self.transforms), reducer.name))
        bounds = [t.bound for t in self.transforms if isinstance(t, NormBound)]
        self.report.clip_bound = bounds[0] if bounds else None

    def next_clip_bound(self) -> float | None:
        """The bound for the next round: adapted from this round's norms, or None for a fixed bound."""
        return self.adaptive.next_bound(self.report) if self.adaptive is not None else None

    @property
    def num_updates(self) -> int:
        return self.report.updates_folded

    @property
    def total_weight(self) -> float:
        """Σ of the folded clients' weights after the transforms (capped, or 1 each)."""
        return self.report.total_weight

    def fold(self, deltas: ClientDeltas, weights: np.ndarray) -> FoldResult:
        """Fold C updates with their claimed weights (finite, non-negative: the caller validated them)."""
        w = np.asarray(weights, np.float64)
        if w.shape != (deltas.num_clients,) or not (np.isfinite(w).all() and (w >= 0).all()):
            raise ValueError("weights must be C finite, non-negative values")
        norms = deltas.norms()
        clipped_before = self.report.updates_clipped
        factors = ClientFactors(weights=w.copy(), norms=norms, scales=np.ones_like(w))
        for t in self.transforms:
            t.apply(factors, self.report)
        accepted = np.ones(len(w), bool)
        accepted[list(factors.refused)] = False
        if not self._weighted:
            factors.weights = np.where(factors.weights > 0, 1.0, 0.0)
        # A zero-weight update (no examples, or the client step's non-finite guard) is accepted and counted
        # but contributes nothing: not to a mean, and not to a median's or trimmed mean's buffer either.
        contributing = accepted & (factors.weights > 0)
        self.reducer.fold(deltas, contributing, factors)
        r = self.report
        r.updates_folded += int(accepted.sum())
        r.updates_refused += len(factors.refused)
        if contributing.any():
            r.total_weight += float(factors.weights[contributing].sum())
            r.max_client_weight = max(r.max_client_weight, float(factors.weights[contributing].max()))
            r.max_norm = max(r.max_norm, float(norms[contributing].max()))
        return FoldResult(dict(factors.refused), r.updates_clipped - clipped_before)

    def fold_one(self, delta: Sequence[UpdateTensor], weight: float) -> FoldResult:
        """Fold one report (the coordinator). A row-sparse tensor is added into a streaming sum row by
        row; a buffering reducer (trimmed mean, median) needs the dense update and makes it."""
        weights = np.array([weight], np.float64)
        if any(isinstance(d, RowSparse) for d in delta):
            return self.fold(DecodedUpdates([delta]), weights)
        return self.fold(StackedDeltas.one(delta), weights)  # type: ignore[arg-type]  # all dense here

    def fold_secure_sum(self, sums: Sequence[np.ndarray], total_weight: float, count: int) -> None:
        """Fold a secure round's unmasked sum of ``count`` clients (``SecureEncoding.decode_sum``): the
        weight policy and the norm clip already ran on each client, so only the reducer's accumulators
        move, and nothing per client is known here (no norms, no per-client weights)."""
        if not isinstance(self.reducer, WeightedMean):
            raise ValueError(f"a secure sum folds into a streaming mean, not into {self.reducer.name}")
        if count < 0 or not (math.isfinite(total_weight) and total_weight >= 0):
            raise ValueError("a secure sum has a non-negative count and total weight")
        self.reducer.add_sum(sums, total_weight)
        self.report.updates_folded += count
        self.report.total_weight += total_weight

    def mean(self) -> list[np.ndarray] | None:
        """The round's delta; None when nothing was folded (the model must stay unchanged)."""
        return self.reducer.mean()

    def partial(self) -> PartialAggregate:
        """What this aggregator folded, for ``merge`` into the round's own aggregator elsewhere.

        This is how a round's clients are folded in shards (``simulations.ray_backend``): each shard folds
        its clients through the round's stages (the per-client transforms need each client's norm and
        weight, so they run where the update is), and the driver merges the shards' partial sums. Only
        the driver's aggregator releases the mean, so DP noise is drawn once per round, and the adaptive
        clip bound moves on the merged counts."""
        return PartialAggregate(dataclasses.replace(self.report), self.reducer.partial())

    def merge(self, partial: PartialAggregate) -> None:
        """Fold in a shard's ``partial`` of this round, as if its clients had been folded here."""
        self.report.merge(partial.report)
        self.reducer.merge(partial.reduced)


def build_aggregator(config: AggregationConfig, shapes: Sequence[tuple[int, ...]], *, weight_cap: float,
                     max_clients: int, expected_clients: int | None = None,
                     noise_rng: np.random.Generator | None = None,
                     clip_bound: float | None = None) -> Aggregator:
    """The stages ``config`` asks for; ``max_clients`` bounds what a buffering reducer keeps. With a noise
    multiplier, ``expected_clients`` is the DP mean's fixed denominator (default ``max_clients``) and
    ``noise_rng`` draws the noise (default: seeded from the operating system's entropy). ``clip_bound`` is
    the bound an adaptive clip reached (default ``max_update_norm``)."""
    bound = clip_bound if clip_bound is not None and config.adaptive_clip_quantile is not None \
        else config.max_update_norm
    transforms: list[ClientTransform] = []
    if config.weighting == Weighting.UNIFORM:
        transforms.append(UniformWeights())
    else:
        transforms.append(WeightCap(weight_cap))
    if config.norm_policy != NormPolicy.NONE:
        transforms.append(NormBound(bound, reject=config.norm_policy == NormPolicy.REJECT))
    denominator = expected_clients or max_clients
    rng = noise_rng if noise_rng is not None else np.random.default_rng()
    z_sum, count_stddev = config.noise_split(denominator)
    adaptive = None
    if config.adaptive_clip_quantile is not None:
        adaptive = AdaptiveClip(bound, config.adaptive_clip_quantile, config.adaptive_clip_learning_rate,
                                count_stddev, denominator if config.noise_multiplier is not None else None,
                                rng)
    if config.noise_multiplier is not None:  # __post_init__ guarantees uniform weights, clip and mean
        return _secure_stages(config, Aggregator(transforms, GaussianSum(
            shapes, clip=bound, noise_multiplier=z_sum, expected_clients=denominator, rng=rng),
            weighted=True, adaptive=adaptive))
    if config.reduction == Reduction.MEAN:
        return _secure_stages(config, Aggregator(transforms, WeightedMean(shapes), weighted=True,
                                                 adaptive=adaptive))
    check_buffer(config, shapes, max_clients)
    reducer: Reducer
    if config.reduction == Reduction.TRIMMED_MEAN:
        reducer = TrimmedMean(shapes, max_clients, config.trim_fraction)
    else:
        reducer = Median(shapes, max_clients)
    return Aggregator(transforms, reducer, weighted=False, adaptive=adaptive)


def _secure_stages(config: AggregationConfig, aggregate: Aggregator) -> Aggregator:
    """With secure aggregation the per-client stages run on the clients, before masking, and the round's
    record says so: ``client_weight_cap, client_norm_clip, secure_sum, weighted_mean`` (or
    ``gaussian_sum``: central DP noise added by the coordinator to the unmasked sum)."""
    if config.secure_aggregation:
        aggregate.report.stages = (*(f"client_{t.name}" for t in aggregate.transforms), "secure_sum",
                                   aggregate.reducer.name)
    return aggregate


def check_buffer(config: AggregationConfig, shapes: Sequence[tuple[int, ...]], max_clients: int) -> None:
    """Refuse a configuration whose buffering reducer would keep more than ``max_buffer_bytes``."""
    if config.reduction == Reduction.MEAN:
        return
    need = _Buffered.buffer_bytes(shapes, max_clients)
    if need > config.max_buffer_bytes:
        raise ValueError(f"{config.reduction} keeps every update of a round: {max_clients} times the model "
                         f"= {need} bytes, above max_buffer_bytes = {config.max_buffer_bytes}")
