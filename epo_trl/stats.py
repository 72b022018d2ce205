"""The statistics behind the study reports (`research.study`, `research.study_llm`), apart from their plumbing: means
with Student t intervals over seeds, exact and Wilson binomial intervals for shares of seeds, and paired per-seed
differences between two methods that share each seed's warm start. Pure Python, no SciPy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

# Two-sided 95% Student t quantiles t_{0.975, df} by degrees of freedom (n - 1); 1.96 (the normal's) beyond the table.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
Z95 = 1.959964  # the normal's two-sided 95% quantile


def mean_ci(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval across seeds: t_{0.975, n-1} * s / sqrt(n). None and
    NaN values are left out; (nan, nan) if none is left, (value, nan) for a single one (no interval)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    n = len(values)
    if n == 1:
        return values[0], math.nan
    return statistics.fmean(values), T95.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n)


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly (n is a number of seeds: small)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def _bisect(f, target: float, increasing: bool) -> float:
    """The p in [0, 1] where the monotone f(p) crosses `target` (to float precision)."""
    low, high = 0.0, 1.0
    for _ in range(100):
        mid = (low + high) / 2
        if (f(mid) < target) == increasing:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided interval for a binomial proportion k/n: the lower end is the p with
    P(X >= k | p) = alpha/2 (0 if k = 0), the upper end the p with P(X <= k | p) = alpha/2 (1 if k = n). It covers the
    true proportion with at least `confidence` probability for every p and n (conservative for small n)."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    alpha = 1 - confidence
    low = 0.0 if k == 0 else _bisect(lambda p: 1 - _binom_cdf(k - 1, n, p), alpha / 2, increasing=True)
    high = 1.0 if k == n else _bisect(lambda p: _binom_cdf(k, n, p), alpha / 2, increasing=False)
    return low, high


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for k/n: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), p = k/n."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(center - half, 0.0), min(center + half, 1.0)


def share_of(count: int, seeds: int) -> dict:
    """`count` of `seeds` seeds, with the exact 95% interval of the share: {"count", "seeds", "low", "high"} (low =
    high = nan without seeds)."""
    low, high = clopper_pearson(count, seeds) if seeds else (math.nan, math.nan)
    return {"count": count, "seeds": seeds, "low": low, "high": high}


def share(flags: Sequence[float | bool]) -> dict:
    """`share_of` the seeds whose 0/1 flag is set."""
    return share_of(sum(bool(f) for f in flags), len(flags))


def paired_differences(method: Mapping[int, float], baseline: Mapping[int, float]) -> dict:
    """Per-seed differences method - baseline over the seeds both have, and their mean ± 95% t interval: {"seeds",
    "differences", "mean", "half"} (the two arms of a seed share its warm start, so the seed's own level cancels)."""
    seeds = sorted(set(method) & set(baseline))
    differences = [method[s] - baseline[s] for s in seeds]
    mean, half = mean_ci(differences)
    return {"seeds": seeds, "differences": differences, "mean": mean, "half": half}
