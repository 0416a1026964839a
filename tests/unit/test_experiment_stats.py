"""The experiment statistics (kubetrain_operator/experiments/stats.py) by simulation and by
case. `pytest -s` prints the measured numbers that docs/experiments.md quotes.

The A/A simulation is the proof that continuous monitoring keeps alpha: 1,000 experiments,
decide() called after every batch of 20 samples per variant up to 2,000, and the naive
fixed-horizon z-test peeked at the same looks, which does NOT keep alpha (the contrast shows
the check can fail)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from kubetrain_operator.experiments.stats import (
    Decision,
    ExperimentConfig,
    GuardrailConfig,
    VariantStats,
    check_guardrails,
    decide,
    quantile_from_histogram,
)

EXPERIMENTS = 1000
BATCH = 20  # samples per variant between two looks
LOOKS = 100  # horizon: 2,000 samples per variant
CONFIG = ExperimentConfig(alpha=0.05, min_samples=100, mde=0.05)


def _simulate(
    rate_a: float, rate_b: float, experiments: int, seed: int
) -> tuple[list[Decision | None], list[int]]:
    """Run `experiments` monitored experiments; per experiment the first decision with a
    winner (None if none by the horizon) and the samples per variant it took."""
    rng = np.random.default_rng(seed)
    cum_a = rng.binomial(BATCH, rate_a, size=(experiments, LOOKS)).cumsum(axis=1)
    cum_b = rng.binomial(BATCH, rate_b, size=(experiments, LOOKS)).cumsum(axis=1)
    decisions: list[Decision | None] = []
    samples: list[int] = []
    for e in range(experiments):
        found: Decision | None = None
        for look in range(LOOKS):
            n = (look + 1) * BATCH
            d = decide(
                VariantStats("A", n, int(cum_a[e, look])),
                VariantStats("B", n, int(cum_b[e, look])),
                CONFIG,
            )
            if d.winner is not None:
                found = d
                break
        decisions.append(found)
        samples.append(n)
    return decisions, samples


def _naive_peeking_false_positives(rate: float, experiments: int, seed: int) -> int:
    """A two-sided pooled z-test at level alpha, evaluated at every look from min_samples on
    as if each look were the planned horizon: the mistake the mSPRT exists to avoid."""
    rng = np.random.default_rng(seed)
    cum_a = rng.binomial(BATCH, rate, size=(experiments, LOOKS)).cumsum(axis=1)
    cum_b = rng.binomial(BATCH, rate, size=(experiments, LOOKS)).cumsum(axis=1)
    n = BATCH * np.arange(1, LOOKS + 1)
    pooled = (cum_a + cum_b) / (2 * n)
    se = np.sqrt(pooled * (1 - pooled) * 2 / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(cum_b - cum_a) / n / se
    z_crit = NormalDist().inv_cdf(1 - CONFIG.alpha / 2)
    rejected = (z > z_crit) & (n >= CONFIG.min_samples)
    return int(rejected.any(axis=1).sum())


@pytest.mark.parametrize("rate", [0.5, 0.1])
def test_aa_continuous_monitoring_keeps_alpha(rate: float) -> None:
    decisions, _ = _simulate(rate, rate, EXPERIMENTS, seed=16)
    false_positives = sum(d is not None for d in decisions)
    alpha = CONFIG.alpha
    bound = alpha * EXPERIMENTS + 3 * math.sqrt(EXPERIMENTS * alpha * (1 - alpha))
    naive = _naive_peeking_false_positives(rate, EXPERIMENTS, seed=16)
    print(
        f"\nA/A, {EXPERIMENTS} experiments, rate {rate}, a look every {BATCH} samples per variant "
        f"up to {BATCH * LOOKS}: mSPRT false positives {false_positives} "
        f"({false_positives / EXPERIMENTS:.3f}); naive z-test peeked at the same looks "
        f"{naive} ({naive / EXPERIMENTS:.3f}); allowed <= {bound:.0f}"
    )
    assert false_positives <= bound
    # The contrast: the same looks with a fixed-horizon test blow through alpha.
    assert naive > bound


def test_ab_true_lift_is_detected_with_its_power() -> None:
    experiments = 200
    decisions, samples = _simulate(0.6, 0.4, experiments, seed=61)
    detected = [(d, n) for d, n in zip(decisions, samples, strict=True) if d is not None]
    power = len(detected) / experiments
    median = float(np.median([n for _, n in detected]))
    print(
        f"\nA/B 0.6 vs 0.4, {experiments} experiments: power {power:.3f} by "
        f"{BATCH * LOOKS} samples per variant, median {median:.0f} samples per variant "
        f"to the decision; e.g. {detected[0][0].reason!r}"
    )
    assert power >= 0.95
    # Every decision picks the better variant A; B is the treatment, so A wins by rollback.
    assert all(d.winner == "A" and d.action == "rollback" for d, _ in detected)
    assert median <= 400


def test_mde_sized_lift_power_is_reported() -> None:
    """A lift equal to the MDE (0.55 vs 0.50) with the same horizon: informative, and the
    test must at least beat chance clearly."""
    experiments = 200
    decisions, samples = _simulate(0.50, 0.55, experiments, seed=55)
    detected = [n for d, n in zip(decisions, samples, strict=True) if d is not None]
    power = len(detected) / experiments
    wrong = sum(d is not None and d.winner != "B" for d in decisions)
    median = float(np.median(detected)) if detected else float("nan")
    print(
        f"\nA/B 0.55 vs 0.50 (lift = MDE), {experiments} experiments: power {power:.3f} by "
        f"{BATCH * LOOKS} samples per variant, median {median:.0f} to the decision, "
        f"{wrong} wrong-way decisions"
    )
    assert power >= 0.3
    assert wrong == 0


def test_reason_and_numbers_of_a_win() -> None:
    d = decide(VariantStats("A", 790, 316), VariantStats("B", 812, 495), CONFIG)
    assert (d.winner, d.action, d.guardrail_breach) == ("B", "promote", None)
    assert d.reason.startswith("B beats A: rate 0.61 vs 0.40, always-valid p ")
    assert d.reason.endswith("<= 0.05 after 812 and 790 samples")
    assert d.p_value < 1e-6
    assert d.interval[0] > 0 < d.difference < d.interval[1]
    a, _ = d.variants
    assert (a.name, a.n, a.successes) == ("A", 790, 316)
    assert a.interval[0] < 0.4 < a.interval[1]


@pytest.mark.parametrize("seed", range(5))
def test_interval_excludes_zero_exactly_when_p_is_below_alpha(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(200):
        n_a, n_b = (int(x) for x in rng.integers(100, 3000, size=2))
        a = VariantStats("A", n_a, int(rng.binomial(n_a, 0.5)))
        b = VariantStats("B", n_b, int(rng.binomial(n_b, rng.uniform(0.45, 0.6))))
        d = decide(a, b, CONFIG)
        excludes_zero = d.interval[0] > 0 or d.interval[1] < 0
        assert excludes_zero == (d.p_value <= CONFIG.alpha), d


def test_no_decision_before_min_samples_or_without_difference() -> None:
    early = decide(VariantStats("A", 60, 10), VariantStats("B", 99, 90), CONFIG)
    assert (early.winner, early.action) == (None, None)
    assert early.reason == "collecting samples: A 60, B 99 of the 100 each needs before a decision"
    same = decide(VariantStats("A", 500, 250), VariantStats("B", 500, 255), CONFIG)
    assert same.winner is None
    assert same.reason.startswith("no difference yet between B and A: rate 0.51 vs 0.50")
    assert same.interval[0] < 0 < same.interval[1]
    empty = decide(VariantStats("A", 0, 0), VariantStats("B", 0, 0), CONFIG)
    assert (empty.winner, empty.p_value, empty.interval) == (None, 1.0, (-1.0, 1.0))
    # All or nothing is no certainty: the smoothed variance keeps V > 0 and the interval wide.
    extreme = decide(VariantStats("A", 100, 0), VariantStats("B", 100, 100), CONFIG)
    assert extreme.winner == "B"
    assert extreme.interval[0] < 0.99


def test_lower_is_better_metric() -> None:
    config = ExperimentConfig(higher_is_better=False)
    d = decide(VariantStats("A", 1000, 100), VariantStats("B", 1000, 40), config)
    assert (d.winner, d.action) == ("B", "promote")
    assert d.reason.startswith("B beats A: rate 0.04 vs 0.10")


# Guardrails ---------------------------------------------------------------------------------


def _v(name: str, requests: int, errors: int, p95: float | None = 0.2) -> VariantStats:
    return VariantStats(name, 10, 5, requests=requests, errors=errors, latency_p95_s=p95)


def test_dead_engine_rolls_back_at_once_before_min_samples() -> None:
    d = decide(_v("A", 40, 0), _v("B", 30, 30), CONFIG)
    assert (d.winner, d.action) == ("A", "rollback")
    assert d.guardrail_breach is not None
    assert d.reason == (
        "guardrail: B 5xx rate 1.00 (30/30, 95% lower bound 0.89) exceeds the limit 0.05; "
        "rolling back to A"
    )


@pytest.mark.parametrize(
    ("requests", "errors", "breach"),
    [
        (20, 2, False),  # 10% observed, but the Wilson lower bound (0.03) is under 5%
        (19, 19, False),  # below min_requests: not yet judged
        (20, 20, True),
        (1000, 80, True),  # 8%, lower bound 0.065
        (1000, 50, False),
    ],
)
def test_error_rate_guardrail(requests: int, errors: int, breach: bool) -> None:
    found = check_guardrails(_v("A", 1000, 0), _v("B", requests, errors), GuardrailConfig())
    assert (found is not None) == breach, found


@pytest.mark.parametrize(
    ("p95_a", "p95_b", "requests", "breach"),
    [
        (0.200, 0.300, 100, True),
        (0.200, 0.239, 100, False),  # within the 20% margin
        (0.200, 0.300, 10, False),  # too few requests to judge
        (0.200, None, 100, False),  # unknown latency is no evidence
        (0.300, 0.100, 100, False),  # faster is fine
    ],
)
def test_latency_guardrail(p95_a: float, p95_b: float | None, requests: int, breach: bool) -> None:
    found = check_guardrails(
        _v("A", requests, 0, p95_a), _v("B", requests, 0, p95_b), GuardrailConfig()
    )
    assert (found is not None) == breach, found
    if breach:
        assert found == "B p95 latency 300 ms exceeds A's 200 ms by more than 20%"


def test_broken_control_is_not_a_treatment_breach() -> None:
    # Guardrails protect users from the candidate; the control is the fallback.
    assert check_guardrails(_v("A", 100, 100, 9.0), _v("B", 100, 0), GuardrailConfig()) is None


def test_p95_from_a_latency_histogram() -> None:
    bounds = [0.05, 0.1, 0.25, 0.5, 1.0, math.inf]
    # 100 requests: 50 under 50 ms, 40 in (0.1, 0.25], 10 in (0.25, 0.5].
    counts = [50, 50, 90, 100, 100, 100]
    # Rank 95 lies halfway through the (0.25, 0.5] bucket, as histogram_quantile reads it.
    assert quantile_from_histogram(bounds, counts, 0.95) == pytest.approx(0.375)
    assert quantile_from_histogram(bounds, counts, 0.5) == pytest.approx(0.05)
    assert quantile_from_histogram(bounds, [0, 0, 0, 0, 0, 10], 0.95) == 1.0  # all in +Inf
    assert quantile_from_histogram(bounds, [0] * 6, 0.95) is None
    # Fine buckets track the exact quantile of the samples.
    rng = np.random.default_rng(3)
    latencies = rng.lognormal(mean=-2, sigma=0.5, size=20_000)
    fine = [*np.linspace(0.005, 1.0, 200).tolist(), math.inf]
    cumulative = [int((latencies <= b).sum()) for b in fine]
    estimate = quantile_from_histogram(fine, cumulative, 0.95)
    assert estimate == pytest.approx(float(np.quantile(latencies, 0.95)), abs=0.005)
    with pytest.raises(ValueError, match="cumulative_counts must be >= 0 and non-decreasing"):
        quantile_from_histogram([0.1, 0.2], [5, 3], 0.95)
    with pytest.raises(ValueError, match="upper_bounds must increase"):
        quantile_from_histogram([0.2, 0.1], [1, 3], 0.95)
    with pytest.raises(ValueError, match="equally long"):
        quantile_from_histogram([0.1], [1, 3], 0.95)


# Input validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": -1, "successes": 0}, "variant 'B': n must be >= 0, got -1"),
        ({"n": 10, "successes": -2}, "variant 'B': successes must be >= 0, got -2"),
        ({"n": 10, "successes": 11}, r"variant 'B': successes \(11\) > n \(10\)"),
        ({"n": 10, "successes": 1, "requests": 3, "errors": 4}, r"errors \(4\) > requests \(3\)"),
        ({"n": 10.0, "successes": 1}, "n must be an integer count, got 10.0"),
        ({"n": True, "successes": 1}, "n must be an integer count, got True"),
        ({"n": 10, "successes": 1, "latency_p95_s": float("nan")}, "latency_p95_s must be"),
        ({"n": 10, "successes": 1, "latency_p95_s": -0.1}, "latency_p95_s must be"),
    ],
)
def test_bad_counts_are_clear_value_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VariantStats("B", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ExperimentConfig(alpha=0), r"alpha must be a number in \(0, 1\), got 0"),
        (lambda: ExperimentConfig(alpha=1.5), "alpha must be"),
        (lambda: ExperimentConfig(alpha="0.05"), "alpha must be a number in"),  # type: ignore[arg-type]
        (lambda: ExperimentConfig(alpha=float("nan")), "alpha must be"),
        (lambda: ExperimentConfig(mde=0), "mde must be"),
        (lambda: ExperimentConfig(min_samples=0), "min_samples must be an integer >= 1"),
        (lambda: GuardrailConfig(max_error_rate=-0.1), "guardrails.max_error_rate must be"),
        (lambda: GuardrailConfig(max_latency_increase=-1), "max_latency_increase must be >= 0"),
        (lambda: GuardrailConfig(min_requests=0), "guardrails.min_requests must be"),
    ],
)
def test_bad_config_is_a_clear_value_error(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_same_names_are_refused() -> None:
    with pytest.raises(ValueError, match="same name 'A'"):
        decide(VariantStats("A", 1, 1), VariantStats("A", 1, 1), CONFIG)
