"""Statistics of chat evaluation: bootstrap intervals over questions and a length-controlled win rate.

Pure numpy (no torch, no scipy), so the judge's numbers can be recomputed anywhere from the saved
judgements.

Bootstrap (`bootstrap_ci`, `lc_win_rate_ci`): the questions are the unit that is resampled (a
question's turns travel together, so two turns of one question are not counted as independent
evidence). Resample i draws n question indices with replacement from `resample_indices(n, B,
seed)`; the interval is the percentile interval of the B resampled statistics (numpy's linear
interpolation between order statistics), at `level` (0.95: the 2.5th and 97.5th percentiles).
No interval (None) when B is 0 or there are no questions.

Length-controlled win rate (`lc_win_rate`), in the spirit of AlpacaEval 2's LC win rate
(Dubois et al., 2024, "Length-Controlled AlpacaEval"). What is modelled, per judged item i
(a question's turn, the preference averaged over the judge's samples):

    y_i  = 1 for a win of the arm over the baseline, 0.5 a tie, 0 a loss (or a fraction: the mean
           over samples);
    d_i  = len(arm's answer) - len(baseline's answer), in characters (tokenizer-independent, so arms
           with different tokenizers compare on one scale);
    x_i  = tanh(d_i / sd(d)), sd the population standard deviation of d over the items (x_i = 0 for
           every item when sd is 0: all answers equally long);
    P(win_i) = sigmoid(theta0 + theta1 * x_i),

fitted by maximising the Bernoulli log-likelihood with fractional targets
sum_i y_i log p_i + (1 - y_i) log(1 - p_i) minus a small ridge `l2/2 * (theta0^2 + theta1^2)` (default
1e-3: it keeps the estimate finite when a resample is separable, e.g. every win has the longer
answer, and is negligible against the likelihood of a few dozen items; l2=0 gives the plain MLE),
by Newton's method (IRLS) with step halving. The LC win rate is the model's prediction with the length
term at zero, sigmoid(theta0): the win rate the arm would have had if its answers were as long as
the baseline's. With every d_i = 0 (and l2 = 0) it is the plain win rate, mean(y).

How this differs from AlpacaEval 2's GLM: theirs also fits, jointly over every model on the
leaderboard, an instruction-difficulty term per instruction (and a per-model length slope), fitted
with regularisation on the instruction terms; the LC win rate there is the prediction with the
length term zeroed and the difficulty terms kept. Here only one arm and one baseline are compared on
one question file, so there is no leaderboard to estimate difficulties from: the model has the
intercept and the length term only. It removes the part of the preference explained by answer
length; it does not adjust for which questions are hard. Its interval is a bootstrap over questions
that refits the whole model (standardisation included) in every resample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_L2 = 1e-3


def resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples, n] question indices drawn with replacement (the bootstrap's resample set)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _interval(stats: np.ndarray, level: float) -> list[float]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(stats, [100 * alpha, 100 * (1 - alpha)])
    return [float(lo), float(hi)]


def bootstrap_ci(per_question_values: Sequence[float], n_resamples: int, seed: int,
                 level: float = 0.95) -> dict:
    """{"mean", "ci": [lo, hi] | None, "n"}: the mean over questions and its percentile interval."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = np.asarray(per_question_values, dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return {"mean": None, "ci": None, "n": 0}
    mean = float(v.mean())
    if n_resamples <= 0:
        return {"mean": mean, "ci": None, "n": n}
    stats = v[resample_indices(n, n_resamples, seed)].mean(axis=1)
    return {"mean": mean, "ci": _interval(stats, level), "n": n}


def length_feature(arm_lengths: Sequence[float], baseline_lengths: Sequence[float]) -> np.ndarray:
    """x_i = tanh(d_i / sd(d)), d = arm - baseline length; zeros when sd(d) is 0."""
    d = np.asarray(arm_lengths, dtype=np.float64) - np.asarray(baseline_lengths, dtype=np.float64)
    sd = float(d.std()) if d.size else 0.0
    return np.tanh(d / sd) if sd > 0 else np.zeros_like(d)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def penalized_loglik(theta: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float) -> float:
    """The objective `fit_logistic` maximises (exposed for tests and audits)."""
    z = theta[0] + theta[1] * x
    # log sigmoid(z) = -log(1 + e^-z), log(1 - sigmoid(z)) = -log(1 + e^z), both via logaddexp
    ll = -(y * np.logaddexp(0.0, -z) + (1.0 - y) * np.logaddexp(0.0, z)).sum()
    return float(ll - 0.5 * l2 * float(theta @ theta))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = DEFAULT_L2, max_iter: int = 100,
                 tol: float = 1e-10) -> np.ndarray:
    """(theta0, theta1) maximising `penalized_loglik` by Newton's method with step halving.

    A length column that is identically zero is left out (theta1 = 0): without a penalty it would
    make the Hessian singular. Without a penalty and with y all 0 or all 1 the MLE is at infinity;
    the intercept is then returned as -inf / +inf (sigmoid of it is exactly the plain win rate)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    cols = [np.ones_like(x)] + ([x] if np.any(x != 0) else [])
    X = np.stack(cols, axis=1)
    k = X.shape[1]
    if l2 == 0 and k == 1:  # intercept only: closed form logit(mean)
        m = float(y.mean())
        return np.array([np.inf if m >= 1 else -np.inf if m <= 0 else np.log(m / (1 - m)), 0.0])
    full = lambda t: np.array([t[0], t[1] if k == 2 else 0.0])  # noqa: E731
    theta = np.zeros(k)
    obj = penalized_loglik(full(theta), x, y, l2)
    for _ in range(max_iter):
        p = _sigmoid(X @ theta)
        grad = X.T @ (y - p) - l2 * theta
        w = p * (1 - p)
        hess = (X * w[:, None]).T @ X + l2 * np.eye(k)
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        t = 1.0
        while True:  # halve until the objective does not fall (Newton may overshoot far from the optimum)
            cand = theta + t * step
            new = penalized_loglik(full(cand), x, y, l2)
            if new >= obj - 1e-12 or t < 1e-8:
                break
            t /= 2
        theta, gain, obj = cand, new - obj, new
        if abs(gain) < tol and float(np.abs(t * step).max()) < 1e-8:
            break
    return full(theta)


def lc_win_rate(preferences: Sequence[float], arm_lengths: Sequence[float],
                baseline_lengths: Sequence[float], l2: float = DEFAULT_L2) -> dict:
    """{"lc_win_rate", "win_rate", "intercept", "length_slope", "n"} (see the module docstring)."""
    y = np.asarray(preferences, dtype=np.float64)
    if y.size == 0:
        return {"lc_win_rate": None, "win_rate": None, "intercept": None, "length_slope": None, "n": 0}
    if np.any((y < 0) | (y > 1)):
        raise ValueError("preferences must lie in [0, 1] (win 1, tie 0.5, loss 0)")
    x = length_feature(arm_lengths, baseline_lengths)
    theta = fit_logistic(x, y, l2=l2)
    return {"lc_win_rate": float(_sigmoid(np.array(theta[0]))), "win_rate": float(y.mean()),
            "intercept": float(theta[0]), "length_slope": float(theta[1]), "n": int(y.size)}


def lc_win_rate_ci(preferences: Sequence[float], arm_lengths: Sequence[float],
                   baseline_lengths: Sequence[float], groups: Sequence, n_resamples: int, seed: int,
                   level: float = 0.95, l2: float = DEFAULT_L2) -> list[float] | None:
    """Percentile interval of the LC win rate, resampling the groups (questions) of the items and
    refitting the model (standardisation included) in each resample."""
    y = np.asarray(preferences, dtype=np.float64)
    a = np.asarray(arm_lengths, dtype=np.float64)
    b = np.asarray(baseline_lengths, dtype=np.float64)
    keys = list(dict.fromkeys(groups))  # questions, in first-seen order
    if n_resamples <= 0 or not keys:
        return None
    members = {g: [] for g in keys}
    for i, g in enumerate(groups):
        members[g].append(i)
    rows = [np.asarray(members[g]) for g in keys]
    stats = np.empty(n_resamples)
    for r, pick in enumerate(resample_indices(len(keys), n_resamples, seed)):
        idx = np.concatenate([rows[j] for j in pick])
        stats[r] = lc_win_rate(y[idx], a[idx], b[idx], l2=l2)["lc_win_rate"]
    return _interval(stats, level)
