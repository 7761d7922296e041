"""User-level differential privacy for the global deltas: settings, accounting and the privacy ledger.

What is protected (the unit is the user). A round releases only the noisy sum of the selected users'
clipped global deltas (the Gaussian mechanism of DP-FedAvg, McMahan et al. 2018): each user's update has
L2 norm at most ``clip`` (``NormBound`` in clip mode), every update counts 1 (uniform weighting, so a user's
example count cannot raise its sensitivity), and the sum gets N(0, (z·clip)²) per coordinate before it is
divided by a fixed denominator, the expected number of users per round. Local variables (the user's
embedding) never leave the device at all and are not part of any release. Evaluation reports (loss and
metric sums) are *outside* this guarantee: they are not noised, and a deployment that needs them covered
must not collect them (or must aggregate them with their own mechanism).

Accounting uses Google's ``dp-accounting`` library; nothing here re-derives a bound by hand:

- Poisson sampling (each user takes part in a round independently with probability q = K / N) is the
  add-or-remove-one relation with sensitivity ``clip``: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``,
  accounted by RDP or PLD.
- Fixed-size sampling (exactly K of N users) is the replace-one relation, under which the sum's sensitivity
  is 2·clip, so the Gaussian event carries z / 2: ``SampledWithoutReplacementDpEvent(N, K,
  GaussianDpEvent(z/2))``; only the RDP accountant supports it.

The ``dp-accounting`` dependency is imported lazily: a device never needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dp_accounting


class Sampling(StrEnum):
    POISSON = "poisson"  # each user independently with probability K / N (add-or-remove-one)
    FIXED = "fixed"  # exactly K users without replacement (replace-one)


class AccountantKind(StrEnum):
    RDP = "rdp"  # Rényi DP (Mironov 2017): fast, slightly loose
    PLD = "pld"  # privacy loss distributions: tight, Poisson sampling only


#: δ a run states when none is given: below 1/N for any population this project expects to meet.
DEFAULT_DELTA = 1e-6


class AccountingError(ValueError):
    """Settings the accountant cannot account for (e.g. PLD with fixed-size sampling)."""


@dataclass(frozen=True)
class PrivacyParameters:
    """What the accountant needs about a run: the noise, the sampling and δ."""

    noise_multiplier: float  # z: noise std / clip
    population: int  # N: users selection draws from
    clients_per_round: int  # K: expected (Poisson) or exact (fixed) users per round
    delta: float = DEFAULT_DELTA
    sampling: Sampling = Sampling.POISSON
    accountant: AccountantKind = AccountantKind.RDP

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampling", Sampling(self.sampling))
        object.__setattr__(self, "accountant", AccountantKind(self.accountant))
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise AccountingError("the noise multiplier must be finite and non-negative")
        if self.population < 1 or not 1 <= self.clients_per_round <= self.population:
            raise AccountingError(f"clients per round ({self.clients_per_round}) must be between 1 and the "
                                  f"population ({self.population})")
        if not 0 < self.delta < 1:
            raise AccountingError("delta must be in (0, 1)")
        if self.sampling == Sampling.FIXED and self.accountant == AccountantKind.PLD:
            raise AccountingError("the PLD accountant supports Poisson sampling only; use the RDP "
                                  "accountant with fixed-size sampling")

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.population

    def epsilon_after(self, rounds: int) -> float:
        """ε at ``delta`` after ``rounds`` rounds (0 rounds: 0; no noise: infinite)."""
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        accountant = _accountant(self.accountant, self.sampling)
        accountant.compose(_round_event(self.noise_multiplier, self), rounds)
        return float(accountant.get_epsilon(self.delta))

    def to_dict(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "population": self.population,
                "clients_per_round": self.clients_per_round, "sampling_rate": self.sampling_rate,
                "delta": self.delta, "sampling": str(self.sampling), "accountant": str(self.accountant)}


def noise_multiplier_for(epsilon: float, *, rounds: int, population: int, clients_per_round: int,
                         delta: float = DEFAULT_DELTA, sampling: Sampling = Sampling.POISSON,
                         accountant: AccountantKind = AccountantKind.RDP) -> float:
    """The smallest noise multiplier z that keeps ``rounds`` rounds within (ε, δ); no training needed."""
    import dp_accounting

    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise AccountingError("epsilon must be positive and finite")
    template = PrivacyParameters(1.0, population, clients_per_round, delta, sampling, accountant)

    def event(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(_round_event(z, template), rounds)

    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(template.accountant, template.sampling), event, epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-3))


def _round_event(z: float, p: PrivacyParameters) -> dp_accounting.DpEvent:
    import dp_accounting

    if p.sampling == Sampling.POISSON:
        return dp_accounting.PoissonSampledDpEvent(p.sampling_rate, dp_accounting.GaussianDpEvent(z))
    # Replace-one: the sum moves by up to 2·clip, so the noise is z/2 times that sensitivity.
    return dp_accounting.SampledWithoutReplacementDpEvent(p.population, p.clients_per_round,
                                                          dp_accounting.GaussianDpEvent(z / 2))


def _accountant(kind: AccountantKind, sampling: Sampling) -> dp_accounting.PrivacyAccountant:
    import dp_accounting
    from dp_accounting import pld, rdp

    relation = (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if sampling == Sampling.POISSON
                else dp_accounting.NeighboringRelation.REPLACE_ONE)
    if kind == AccountantKind.PLD:
        return pld.PLDAccountant(neighboring_relation=relation)
    return rdp.RdpAccountant(neighboring_relation=relation)


@dataclass
class PrivacyLedger:
    """ε spent so far, and whether one more round fits the budget (checked *before* the round runs)."""

    parameters: PrivacyParameters
    epsilon_budget: float | None = None
    rounds: int = 0
    epsilon: float = 0.0
    _next: dict[int, float] = field(default_factory=dict, repr=False)

    def epsilon_if_another_round(self) -> float:
        n = self.rounds + 1
        if n not in self._next:
            self._next[n] = self.parameters.epsilon_after(n)
        return self._next[n]

    def next_round_fits(self) -> bool:
        return self.epsilon_budget is None or self.epsilon_if_another_round() <= self.epsilon_budget

    def record_round(self, epsilon: float | None = None) -> float:
        """Count a released round; returns ε after it (``epsilon``: already computed by the caller with
        ``parameters.epsilon_after(rounds + 1)``, e.g. outside a lock)."""
        self.epsilon = self.epsilon_if_another_round() if epsilon is None else epsilon
        self.rounds += 1
        self._next.clear()
        return self.epsilon


@dataclass(frozen=True)
class DpOptions:
    """What a run asks for: a noise multiplier, or a target ε that the accountant turns into one for the
    run's rounds; δ, sampling, accountant, and an optional budget that stops the run before it is exceeded
    (default: the target ε when one is given)."""

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = DEFAULT_DELTA
    # Fixed-size by default: what a coordinator does (it picks K of the devices that checked in), so a
    # simulation's ε is the one a deployment would state.
    sampling: Sampling = Sampling.FIXED
    accountant: AccountantKind = AccountantKind.RDP
    epsilon_budget: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampling", Sampling(self.sampling))
        object.__setattr__(self, "accountant", AccountantKind(self.accountant))
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise AccountingError("give either a noise multiplier or a target epsilon (not both)")
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            raise AccountingError("the epsilon budget must be positive")

    def resolve(self, *, rounds: int, population: int, clients_per_round: int) -> PrivacyParameters:
        """The run's accounting parameters (calibrating z to the target ε over ``rounds`` if asked)."""
        z = self.noise_multiplier
        if z is None:
            assert self.target_epsilon is not None
            z = noise_multiplier_for(self.target_epsilon, rounds=rounds, population=population,
                                     clients_per_round=clients_per_round, delta=self.delta,
                                     sampling=self.sampling, accountant=self.accountant)
        return PrivacyParameters(z, population, clients_per_round, self.delta, self.sampling, self.accountant)

    def ledger(self, parameters: PrivacyParameters) -> PrivacyLedger:
        budget = self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon
        return PrivacyLedger(parameters, epsilon_budget=budget)

    def to_dict(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "target_epsilon": self.target_epsilon,
                "delta": self.delta, "sampling": str(self.sampling), "accountant": str(self.accountant),
                "epsilon_budget": self.epsilon_budget}
