"""What an evaluation report may claim: bounds that keep one evaluator from moving a version's metrics far.

A device reports reconstruct-then-evaluate *sums* for a model version (squared error, correct predictions,
examples), and the coordinator pools them example-weighted. Pooling is what makes them poisonable: before
these bounds, one caller claiming 1e9 perfect examples turned the reported RMSE into 0.0003. So a report
must be:

* whole counts (the wire carries doubles, but examples and correct predictions are counted);
* ``0 <= num_correct <= num_examples <= max_examples`` (`EvaluationLimits.max_examples`, per task);
* ``0 <= squared_error``, finite, and at most ``num_examples · max_squared_error_per_example`` when the
  model's output range bounds the error of one prediction (ratings 1..5 with predictions clipped to
  1..5: 16); without a known range only finiteness and sign are checked.

A valid report claiming more than ``counted_examples`` (the task's weight cap) counts as that many, with
its per-example sums kept. With these, one hostile evaluator adds at most ``n_h <= counted_examples``
examples with a squared-error sum
``s_h`` in ``[0, n_h · B]``. Over honest sums ``S`` (squared error) and ``N`` (examples), the pooled MSE
goes from ``S / N`` to ``(S + s_h) / (N + n_h)``, so

    S / (N + n_h)  <=  reported MSE  <=  (S + n_h · B) / (N + n_h)

and RMSE can be pulled down by at most a factor ``sqrt(N / (N + n_h))`` and up to at most
``sqrt((S + n_h · B) / (N + n_h))``; with no known bound B the upward shift is unbounded (finite).
One evaluation per caller per version (a unique constraint) and the per-group rate limit keep ``n_h``
to one report's worth per identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedrecon.server.refusals import Refusal, Status

MAX_EVALUATION_EXAMPLES = 10_000
"""Default cap on the examples one evaluation may claim. A device evaluates its own held-out ratings: the
most active of MovieLens-1M's 6,040 users rated 2,314 movies, so 10,000 leaves room for real devices
while limiting one report to 10,000 examples' worth of influence."""

MAX_EVALUATIONS_PER_MINUTE = 6.0
"""Evaluation reports per device per minute (a credential's group gets this times its devices). An honest
device evaluates each version once; versions come at most once a round."""


@dataclass(frozen=True)
class EvaluationLimits:
    """Bounds on one evaluation report (see the module docstring for what they guarantee)."""

    max_examples: int = MAX_EVALUATION_EXAMPLES
    # The most examples one evaluation *counts* for: a larger (valid) report is scaled down to this many,
    # keeping its per-example error and accuracy, as a claimed training weight is capped. The coordinator
    # uses the task's weight cap (``AggregationConfig.weight_cap``): one device weighs at most as much in
    # a version's metrics as in its training. None: counted as claimed.
    counted_examples: float | None = None
    # The largest squared error one prediction can have, when the model's outputs and the labels share a
    # known range [lo, hi]: (hi - lo) ** 2. None: unknown (predictions are not clipped), not checked.
    max_squared_error_per_example: float | None = None

    def __post_init__(self) -> None:
        if self.max_examples < 1:
            raise ValueError("max_examples must be at least 1")
        bound = self.max_squared_error_per_example
        if bound is not None and not (math.isfinite(bound) and bound > 0):
            raise ValueError("max_squared_error_per_example must be positive and finite (or None)")

    @classmethod
    def for_output_range(cls, lo: float, hi: float, *, max_examples: int = MAX_EVALUATION_EXAMPLES
                         ) -> EvaluationLimits:
        """Limits for a model whose predictions and labels lie in ``[lo, hi]`` (ratings 1..5: B = 16)."""
        return cls(max_examples=max_examples, max_squared_error_per_example=(hi - lo) ** 2)

    def counted(self, squared_error: float, num_correct: float, num_examples: float
                ) -> tuple[float, float, float]:
        """The sums as they count: scaled down to ``counted_examples`` when the report claims more."""
        cap = self.counted_examples
        if cap is None or num_examples <= cap:
            return squared_error, num_correct, num_examples
        scale = cap / num_examples
        return squared_error * scale, num_correct * scale, float(cap)

    def check(self, squared_error: float, num_correct: float, num_examples: float) -> None:
        """Raise ``Refusal(INVALID_ARGUMENT, "bad_evaluation")`` unless the sums are a possible report."""
        values = (squared_error, num_correct, num_examples)
        if not all(math.isfinite(v) and v >= 0 for v in values):
            _refuse("evaluation sums must be finite and non-negative")
        if not (float(num_correct).is_integer() and float(num_examples).is_integer()):
            _refuse("num_correct and num_examples are counts: they must be whole numbers")
        if num_examples > self.max_examples:
            _refuse(f"num_examples {num_examples:g} is above this task's limit of {self.max_examples} "
                    "per evaluation")
        if num_correct > num_examples:
            _refuse("num_correct cannot exceed num_examples")
        bound = self.max_squared_error_per_example
        if bound is not None and squared_error > num_examples * bound:
            _refuse(f"squared_error {squared_error:g} is more than {num_examples:g} examples can have "
                    f"(at most {bound:g} each)")


def _refuse(message: str) -> None:
    raise Refusal(Status.INVALID_ARGUMENT, "bad_evaluation", message)
