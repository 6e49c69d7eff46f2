"""The paired verdict as pure functions: a seeded paired bootstrap of per-query deltas, the verdict it supports,
how many queries would settle an inconclusive one, and the one way a delta is written with its interval."""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95
SEED = 0
TIE = 1e-9  # |per-query delta| at most this counts as unchanged (float noise of the same ranking)
_CHUNK_CELLS = 4_000_000  # resampled indices held at once (rows x queries): ~32 MB of int64


def paired_bootstrap(base, tuned, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                     seed: int = SEED) -> dict:
    """The mean per-query delta (tuned - base), its percentile bootstrap interval and a sign count.

    Pairs are resampled together (one index draws both of a query's scores), so what the two runs share cancels.
    `se` is the paired standard error of the mean (sample sd of the deltas / sqrt(n)).
    """
    base, tuned = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)  # [n], [n]
    if base.shape != tuned.shape or base.ndim != 1:
        raise ValueError(f"paired scores need two 1-d arrays of one length, got {base.shape} and {tuned.shape}")
    n = len(base)
    if n == 0:
        raise ValueError("paired scores are empty: no judged query")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"resamples must be >= 1 and confidence in (0, 1), got {resamples} and {confidence}")
    delta = tuned - base  # [n]
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)  # [R]
    rows = max(1, _CHUNK_CELLS // n)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))  # [r, n]
        means[start:stop] = delta[idx].mean(axis=1)  # [r]
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    se = float(delta.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    mean = float(delta.mean())
    return {"delta": mean, "low": float(low), "high": float(high), "confidence": confidence, "se": se,
            "queries": n, "better": int((delta > TIE).sum()), "worse": int((delta < -TIE).sum()),
            "unchanged": int((np.abs(delta) <= TIE).sum()), "resamples": resamples, "seed": seed,
            "queries_to_settle": queries_to_settle(n, se, mean, confidence)}


def verdict_of(interval: dict) -> str:
    """`improved` when the interval lies above zero, `worse` when below, else `inconclusive`."""
    if interval["low"] > 0:
        return "improved"
    if interval["high"] < 0:
        return "worse"
    return "inconclusive"


def z_of(confidence: float) -> float:
    """The two-sided normal quantile (1.96 at 95%), without scipy."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def queries_to_settle(n: int, se: float, delta: float, confidence: float = CONFIDENCE) -> int | None:
    """About how many queries make a delta of this size significant, if the per-query spread stays as it is:
    the normal half-width z * sd / sqrt(N) equals |delta| at N = n * (z * se / |delta|)^2. None when the delta is 0
    (no evaluation set settles it) or when there is no spread (nothing to settle)."""
    if delta == 0 or se == 0:
        return None
    return max(n, math.ceil(n * (z_of(confidence) * se / abs(delta)) ** 2))


def signed(x: float, places: int = 3) -> str:
    """+0.036, -0.012, and 0.000 for anything that rounds to zero (no sign on nothing)."""
    text = f"{x:+.{places}f}"
    return text[1:] if float(text) == 0 else text


def format_interval(interval: dict) -> str:
    """`+0.016 (95% CI 0.000 to +0.036, 100 queries)`: the figure and its uncertainty, never one without the other."""
    pct = f"{interval['confidence'] * 100:g}%"
    return (f"{signed(interval['delta'])} ({pct} CI {signed(interval['low'])} to {signed(interval['high'])}, "
            f"{interval['queries']} queries)")


def format_counts(interval: dict) -> str:
    return f"{interval['better']} queries better, {interval['worse']} worse, {interval['unchanged']} unchanged"


def verdict_line(outcome: str, delta: float, interval: dict | None) -> str:
    """`verdict: improved, nDCG@10 +0.016 (95% CI 0.000 to +0.036, 100 queries); 5 queries better, 1 worse, 94
    unchanged (paired bootstrap, 10000 resamples, seed 0)`; a report written before intervals, as it was."""
    if not interval:
        return f"verdict: {outcome} (nDCG@10 {signed(delta, 4)}; no interval in this report)"
    return (f"verdict: {outcome}, nDCG@10 {format_interval(interval)}; {format_counts(interval)} "
            f"(paired bootstrap, {interval['resamples']} resamples, seed {interval['seed']})")


def regression_line(check: dict) -> str:
    """`regression set general: nDCG@10 0.4120 -> 0.4150, +0.003 (95% CI -0.010 to +0.013, 200 queries): no
    significant drop` (`check`: the verdict's `regression`, train.report.regression_check)."""
    said = "a significant drop" if check["outcome"] == "worse" else "no significant drop"
    return (f"regression set {check['dataset']}: nDCG@10 "
            f"{check['base']['ndcg@10']:.4f} -> {check['tuned']['ndcg@10']:.4f}, {format_interval(check['interval'])}: {said}")
