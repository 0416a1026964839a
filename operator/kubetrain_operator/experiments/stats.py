"""The statistics of an A/B experiment between two model variants: pure, stdlib only.

`decide(control, treatment, config)` is the one entry point; the operator calls it at every
look with the counts read from the router and shows the returned `Decision.reason` in
`status.experiment`. docs/experiments.md explains the method; in short:

- Decision rule: a mixture sequential probability ratio test (mSPRT; Johari, Koomen, Pekelis
  and Walsh, "Always Valid Inference: Continuous Monitoring of A/B Tests", Operations
  Research 2022) on the difference of the two rates, theta = p_treatment - p_control, with the
  normal approximation d ~ N(theta, V), d = rate_T - rate_C, V = r_C(1-r_C)/n_C +
  r_T(1-r_T)/n_T, and a normal mixing prior theta ~ N(0, tau^2) under H1. The mixture
  likelihood ratio against H0: theta = 0 is

      Lambda = sqrt(V / (V + tau^2)) * exp(d^2 tau^2 / (2 V (V + tau^2)))

  and it is a nonnegative martingale under H0 (for Gaussian data; Bernoulli counts get there
  by the CLT, hence the minimum sample count), so by Ville's inequality
  P(Lambda ever reaches 1/alpha) <= alpha: the false-positive rate holds however often the
  operator looks. The always-valid p-value of a look is min(1, 1/Lambda); a decision is
  taken at the first look where it is <= alpha, and the caller must keep it (stop the
  experiment), as the theory's running minimum does.
- tau^2 = mde^2: for a fixed estimate d, Lambda is largest at tau^2 = d^2 - V, so the
  mixture fixed in advance at the minimum detectable effect is the one that gathers evidence
  fastest when the true difference is the MDE (tau must not be tuned on the data).
- The interval on theta is the confidence sequence of the same test (the thetas it would not
  reject), so "0 outside the interval" and "p <= alpha" always agree. Per-variant intervals
  are Wilson score intervals, descriptive only (they are fixed-n intervals).
- Guardrails (`check_guardrails`) are separate and act at once, before the minimum sample
  count: a 5xx rate whose Wilson lower bound exceeds a limit, or a p95 latency above the
  control's by more than a relative margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from statistics import NormalDist
from typing import Literal

# What the operator does with a decision: the treatment gets all traffic, or the control.
Action = Literal["promote", "rollback"]


@dataclass(frozen=True)
class VariantStats:
    """What the router counted for one variant.

    n / successes: the primary metric as a proportion (rated responses / positive ratings;
    or requests / errors with `higher_is_better=False`). requests / errors: all requests and
    the 5xx among them, for the error guardrail. latency_p95_s: the variant's p95 request
    latency in seconds over the same window (the router computes it), None if unknown.
    """

    name: str
    n: int
    successes: int
    requests: int = 0
    errors: int = 0
    latency_p95_s: float | None = None

    def __post_init__(self) -> None:
        where = f"variant {self.name!r}"
        for key in ("n", "successes", "requests", "errors"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where}: {key} must be an integer count, got {value!r}")
            if value < 0:
                raise ValueError(f"{where}: {key} must be >= 0, got {value}")
        if self.successes > self.n:
            raise ValueError(f"{where}: successes ({self.successes}) > n ({self.n})")
        if self.errors > self.requests:
            raise ValueError(f"{where}: errors ({self.errors}) > requests ({self.requests})")
        p95 = self.latency_p95_s
        if p95 is not None and not (math.isfinite(p95) and p95 >= 0):
            raise ValueError(f"{where}: latency_p95_s must be a finite number >= 0, got {p95!r}")

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else 0.0


@dataclass(frozen=True)
class GuardrailConfig:
    """max_error_rate: the 5xx rate a variant may not exceed (judged by the lower end of its
    Wilson interval at `confidence`, so a few early errors do not trip it);
    max_latency_increase: the p95 latency may exceed the control's by at most this fraction;
    min_requests: requests per variant before a guardrail may act."""

    max_error_rate: float = 0.05
    max_latency_increase: float = 0.20
    min_requests: int = 20
    confidence: float = 0.95

    def __post_init__(self) -> None:
        _check_open_unit("guardrails.max_error_rate", self.max_error_rate, allow_zero=True)
        if not (math.isfinite(self.max_latency_increase) and self.max_latency_increase >= 0):
            raise ValueError(
                f"guardrails.max_latency_increase must be >= 0, got {self.max_latency_increase!r}"
            )
        _check_count("guardrails.min_requests", self.min_requests, minimum=1)
        _check_open_unit("guardrails.confidence", self.confidence)


@dataclass(frozen=True)
class ExperimentConfig:
    """alpha: the false-positive rate to keep under continuous monitoring; min_samples: per
    variant before any decision on the primary metric; mde: the minimum detectable effect,
    an absolute difference of rates (sets the mixing variance tau^2 = mde^2);
    higher_is_better: False for a metric such as an error rate."""

    alpha: float = 0.05
    min_samples: int = 100
    mde: float = 0.05
    higher_is_better: bool = True
    guardrails: GuardrailConfig = field(default_factory=GuardrailConfig)

    def __post_init__(self) -> None:
        _check_open_unit("alpha", self.alpha)
        _check_count("min_samples", self.min_samples, minimum=1)
        _check_open_unit("mde", self.mde)

    @property
    def mixing_variance(self) -> float:
        """tau^2 of the normal mixing prior on the difference of rates."""
        return self.mde**2


@dataclass(frozen=True)
class VariantSummary:
    name: str
    n: int
    successes: int
    rate: float
    interval: tuple[float, float]  # Wilson score interval at 1 - alpha (descriptive)


@dataclass(frozen=True)
class Decision:
    """winner: the variant users should get, or None to keep the experiment running.
    action: "promote" (the treatment won), "rollback" (the control won, or a guardrail broke),
    or None. p_value: the always-valid p-value of this look. difference: rate_treatment -
    rate_control; interval: its always-valid confidence sequence at 1 - alpha."""

    winner: str | None
    action: Action | None
    reason: str
    p_value: float
    difference: float
    interval: tuple[float, float]
    guardrail_breach: str | None
    variants: tuple[VariantSummary, VariantSummary]


def wilson_interval(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion; (0, 1) without data."""
    if n == 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def difference_variance(control: VariantStats, treatment: VariantStats) -> float:
    """V, the variance of rate_T - rate_C. The rates are smoothed ((s + 0.5) / (n + 1)) in
    the variance only, so that 0/n or n/n does not make V zero and the test certain."""

    def part(v: VariantStats) -> float:
        r = (v.successes + 0.5) / (v.n + 1)
        return r * (1 - r) / v.n

    return part(control) + part(treatment)


def msprt_log_likelihood_ratio(difference: float, variance: float, tau2: float) -> float:
    """log Lambda of the normal-mixture SPRT of theta = 0 (see the module docstring)."""
    return 0.5 * math.log(variance / (variance + tau2)) + difference**2 * tau2 / (
        2 * variance * (variance + tau2)
    )


def confidence_sequence_half_width(variance: float, tau2: float, alpha: float) -> float:
    """Half-width of {theta : Lambda(theta) < 1/alpha}, the always-valid interval."""
    return math.sqrt(
        2
        * variance
        * (variance + tau2)
        / tau2
        * (math.log(1 / alpha) + 0.5 * math.log((variance + tau2) / variance))
    )


def quantile_from_histogram(
    upper_bounds: Sequence[float], cumulative_counts: Sequence[int], q: float
) -> float | None:
    """The q-quantile of a cumulative histogram the way Prometheus' histogram_quantile reads
    it (linear inside the bucket, the first bucket starting at 0, a quantile in the +Inf
    bucket reported as the highest finite bound), so a router that exports a latency
    histogram can fill `VariantStats.latency_p95_s`. None without observations."""
    if len(upper_bounds) != len(cumulative_counts) or not upper_bounds:
        raise ValueError("histogram: upper_bounds and cumulative_counts must be equally long")
    if not 0 < q < 1:
        raise ValueError(f"histogram: q must be in (0, 1), got {q!r}")
    if any(b <= a for a, b in pairwise(upper_bounds)):
        raise ValueError("histogram: upper_bounds must increase")
    if any(c < 0 for c in cumulative_counts) or any(b < a for a, b in pairwise(cumulative_counts)):
        raise ValueError("histogram: cumulative_counts must be >= 0 and non-decreasing")
    total = cumulative_counts[-1]
    if total == 0:
        return None
    rank = q * total
    lower, below = 0.0, 0
    for bound, count in zip(upper_bounds, cumulative_counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower  # unreachable: the last cumulative count is the total


def check_guardrails(
    control: VariantStats, treatment: VariantStats, config: GuardrailConfig
) -> str | None:
    """The treatment's first broken guardrail as a sentence, or None."""
    if treatment.requests >= config.min_requests:
        low, _ = wilson_interval(treatment.errors, treatment.requests, config.confidence)
        if low > config.max_error_rate:
            return (
                f"{treatment.name} 5xx rate {treatment.errors / treatment.requests:.2f} "
                f"({treatment.errors}/{treatment.requests}, {config.confidence:.0%} lower bound "
                f"{low:.2f}) exceeds the limit {config.max_error_rate:.2f}"
            )
    enough = min(control.requests, treatment.requests) >= config.min_requests
    p95_c, p95_t = control.latency_p95_s, treatment.latency_p95_s
    if enough and p95_c is not None and p95_t is not None:
        limit = p95_c * (1 + config.max_latency_increase)
        if p95_t > limit:
            return (
                f"{treatment.name} p95 latency {p95_t * 1000:.0f} ms exceeds {control.name}'s "
                f"{p95_c * 1000:.0f} ms by more than {config.max_latency_increase:.0%}"
            )
    return None


def decide(control: VariantStats, treatment: VariantStats, config: ExperimentConfig) -> Decision:
    """One look at the experiment: guardrails first, then the always-valid test."""
    if control.name == treatment.name:
        raise ValueError(f"control and treatment have the same name {control.name!r}")

    def summary(v: VariantStats) -> VariantSummary:
        interval = wilson_interval(v.successes, v.n, 1 - config.alpha)
        return VariantSummary(v.name, v.n, v.successes, v.rate, interval)

    variants = (summary(control), summary(treatment))
    difference = treatment.rate - control.rate
    breach = check_guardrails(control, treatment, config.guardrails)
    if control.n == 0 or treatment.n == 0:
        p_value, interval = 1.0, (-1.0, 1.0)
    else:
        variance = difference_variance(control, treatment)
        tau2 = config.mixing_variance
        log_lr = msprt_log_likelihood_ratio(difference, variance, tau2)
        p_value = min(1.0, math.exp(-log_lr))
        half = confidence_sequence_half_width(variance, tau2, config.alpha)
        interval = (max(-1.0, difference - half), min(1.0, difference + half))

    def result(winner: str | None, action: Action | None, reason: str) -> Decision:
        return Decision(winner, action, reason, p_value, difference, interval, breach, variants)

    if breach is not None:
        return result(
            control.name, "rollback", f"guardrail: {breach}; rolling back to {control.name}"
        )

    def numbers(first: VariantStats, second: VariantStats, compare: str) -> str:
        return (
            f"rate {first.rate:.2f} vs {second.rate:.2f}, always-valid p {_p(p_value)} "
            f"{compare} {config.alpha:g} after {first.n} and {second.n} samples"
        )

    if min(control.n, treatment.n) < config.min_samples:
        return result(
            None,
            None,
            f"collecting samples: {control.name} {control.n}, {treatment.name} {treatment.n} "
            f"of the {config.min_samples} each needs before a decision",
        )
    if p_value > config.alpha:
        return result(
            None,
            None,
            f"no difference yet between {treatment.name} and {control.name}: "
            + numbers(treatment, control, ">")
            + f"; difference in [{interval[0]:+.3f}, {interval[1]:+.3f}]",
        )
    treatment_better = (difference > 0) == config.higher_is_better
    best, other = (treatment, control) if treatment_better else (control, treatment)
    reason = f"{best.name} beats {other.name}: " + numbers(best, other, "<=")
    if treatment_better:
        return result(treatment.name, "promote", reason)
    return result(control.name, "rollback", reason)


def _p(p_value: float) -> str:
    return f"{p_value:.3f}" if p_value >= 0.001 else f"{p_value:.1e}"


def _check_open_unit(name: str, value: float, allow_zero: bool = False) -> None:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not ((value >= 0 if allow_zero else value > 0) and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
