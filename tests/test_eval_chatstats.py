"""Chat-eval statistics against plain reference computations written here (no Ray, no torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusion_ray.evaluate.chatstats import (
    bootstrap_ci,
    fit_logistic,
    lc_win_rate,
    lc_win_rate_ci,
    length_feature,
    resample_indices,
)


def percentile(sorted_vals: list[float], q: float) -> float:
    """Linear interpolation between order statistics (rank q * (n - 1)), by hand."""
    r = q * (len(sorted_vals) - 1)
    lo = math.floor(r)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (r - lo) * (sorted_vals[hi] - sorted_vals[lo])


def test_bootstrap_matches_a_brute_force_over_the_same_resample_set():
    values = [3.0, 7.0, 8.0, 1.0, 10.0]
    got = bootstrap_ci(values, n_resamples=200, seed=11, level=0.9)
    means = sorted(sum(values[j] for j in row) / len(row) for row in resample_indices(5, 200, 11).tolist())
    assert got["mean"] == pytest.approx(sum(values) / 5)
    assert got["ci"] == pytest.approx([percentile(means, 0.05), percentile(means, 0.95)])
    assert got["n"] == 5


def test_bootstrap_interval_approaches_the_exact_bootstrap_distribution():
    # two questions scored 0 and 1: a resampled mean is 0 (1/4), 0.5 (1/2) or 1 (1/4), so the
    # 2.5th percentile is 0 and the 97.5th is 1; the 30th and 70th are 0.5
    assert bootstrap_ci([0.0, 1.0], 20_000, seed=3)["ci"] == [0.0, 1.0]
    assert bootstrap_ci([0.0, 1.0], 20_000, seed=3, level=0.4)["ci"] == [0.5, 0.5]


def test_bootstrap_edge_cases():
    assert bootstrap_ci([4.0, 4.0, 4.0], 100, seed=0)["ci"] == [4.0, 4.0]
    assert bootstrap_ci([4.0, 6.0], 0, seed=0) == {"mean": 5.0, "ci": None, "n": 2}
    assert bootstrap_ci([], 100, seed=0) == {"mean": None, "ci": None, "n": 0}
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0], 10, seed=0, level=1.5)


def test_lc_equals_the_plain_win_rate_when_all_lengths_are_equal():
    prefs = [1, 0.5, 0, 1, 1, 0.5, 0, 1, 2 / 3]
    lens = [40] * len(prefs)
    got = lc_win_rate(prefs, lens, lens, l2=0.0)
    assert got["lc_win_rate"] == pytest.approx(sum(prefs) / len(prefs), abs=1e-12)
    assert got["length_slope"] == 0.0
    # every item a win: the plain MLE's intercept is +inf and the LC rate exactly 1
    assert lc_win_rate([1, 1, 1], [5, 5, 5], [5, 5, 5], l2=0.0)["lc_win_rate"] == 1.0


def reference_objective(t0: float, t1: float, xs, ys, l2: float) -> float:
    total = 0.0
    for x, y in zip(xs, ys):
        p = 1.0 / (1.0 + math.exp(-(t0 + t1 * x)))
        total += y * math.log(p) + (1 - y) * math.log(1 - p)
    return total - l2 / 2 * (t0 * t0 + t1 * t1)


def gradient_ascent(xs, ys, l2: float, steps: int = 20_000, lr: float = 0.05) -> tuple[float, float]:
    t0 = t1 = 0.0
    n = len(xs)
    for _ in range(steps):
        g0 = g1 = 0.0
        for x, y in zip(xs, ys):
            r = y - 1.0 / (1.0 + math.exp(-(t0 + t1 * x)))
            g0 += r
            g1 += r * x
        t0 += lr * (g0 - l2 * t0) / n
        t1 += lr * (g1 - l2 * t1) / n
    return t0, t1


def test_lc_fit_matches_plain_gradient_ascent_and_a_grid_search():
    arm = [120, 80, 300, 95, 210, 60, 150, 400, 33, 90, 250, 70]
    base = [100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100]
    prefs = [1, 0, 1, 0.5, 1, 0, 0.5, 1, 1, 0, 0.5, 0]  # mostly the longer answer wins, not always
    sd = float(np.std(np.subtract(arm, base)))
    xs = [math.tanh((a - b) / sd) for a, b in zip(arm, base)]
    for l2 in (0.0, 1e-3, 1.0):
        t0, t1 = gradient_ascent(xs, prefs, l2)
        theta = fit_logistic(length_feature(arm, base), np.array(prefs, dtype=float), l2=l2)
        assert theta == pytest.approx([t0, t1], abs=2e-4), l2
        got = lc_win_rate(prefs, arm, base, l2=l2)
        assert got["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-t0)), abs=1e-4)
        # no grid point beats the fit
        best = reference_objective(theta[0], theta[1], xs, prefs, l2)
        grid = np.linspace(-3, 3, 61)
        assert all(reference_objective(a, b, xs, prefs, l2) <= best + 1e-9 for a in grid for b in grid)


def test_lc_recovers_the_intercept_of_data_simulated_from_the_model():
    rng = np.random.default_rng(0)
    n, t0, t1 = 20_000, 0.4, 1.5
    base = rng.integers(50, 400, n).astype(float)
    arm = base + rng.normal(0, 120, n)
    x = np.tanh((arm - base) / np.std(arm - base))
    y = (rng.random(n) < 1 / (1 + np.exp(-(t0 + t1 * x)))).astype(float)
    got = lc_win_rate(y, arm, base, l2=0.0)
    assert got["intercept"] == pytest.approx(t0, abs=0.06)  # standard error ~0.02
    assert got["length_slope"] == pytest.approx(t1, abs=0.12)
    assert got["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-t0)), abs=0.015)


def test_a_win_rate_made_of_length_alone_is_discounted():
    rng = np.random.default_rng(1)
    base = np.full(400, 200.0)
    arm = base + rng.normal(60, 100, 400)  # usually longer
    y = (arm > base).astype(float)  # the judge prefers whichever is longer, nothing else
    got = lc_win_rate(y, arm, base)  # separable: the default ridge keeps the fit finite
    assert got["win_rate"] > 0.65
    assert abs(got["lc_win_rate"] - 0.5) < abs(got["win_rate"] - 0.5)
    assert math.isfinite(got["intercept"]) and math.isfinite(got["length_slope"])


def test_lc_interval_resamples_whole_questions():
    # equal lengths and no penalty: the LC rate is the mean, so its interval over questions of two
    # turns each must be the plain bootstrap interval of the per-question means
    prefs = [1, 0, 0.5, 0.5, 1, 1, 0, 0, 1, 0.5, 0, 1]
    groups = ["q1", "q1", "q2", "q2", "q3", "q3", "q4", "q4", "q5", "q5", "q6", "q6"]
    lens = [10] * len(prefs)
    per_question = [(prefs[i] + prefs[i + 1]) / 2 for i in range(0, len(prefs), 2)]
    ci = lc_win_rate_ci(prefs, lens, lens, groups, n_resamples=300, seed=5, l2=0.0)
    assert ci == pytest.approx(bootstrap_ci(per_question, 300, seed=5)["ci"], abs=1e-9)
    assert lc_win_rate_ci(prefs, lens, lens, groups, n_resamples=0, seed=5) is None
