"""Paired statistics for a multi-seed convergence study (issue 19): for every seed k, arm and baseline
start from the same weights and see the same batches, so the per-seed difference arm_k - baseline_k
removes what the seed does to both (initialization, data order, plateau timing) and leaves what the
arm does. Reported: the differences' mean, sample standard deviation and a Student-t confidence
interval over seeds, in nats and in % of the baseline loss, and a verdict against a target.

The t quantile is computed here (bisection on the t CDF, which is a regularized incomplete beta
function evaluated by its continued fraction) so that the study needs no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

_EPS = 1e-15  # relative accuracy of the continued fraction
_TINY = 1e-300  # keeps Lentz's method away from division by zero
_MAX_TERMS = 10_000


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1 (Numerical Recipes' continued fraction, Lentz's method;
    the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps x where the fraction converges fast)."""
    if a <= 0 or b <= 0:
        raise ValueError(f"incomplete beta needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete beta needs 0 <= x <= 1, got x={x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    fraction = d
    for m in range(1, _MAX_TERMS):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            fraction *= c * d
        if abs(c * d - 1.0) < _EPS:
            return math.exp(log_front) * fraction / a
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (Student's t, df degrees of freedom), by bisection on t_cdf to
    machine precision; e.g. t_quantile(0.975, 3) = 3.18245 (the two-sided 95% critical value)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # adjacent floats: converged
            break
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation and a two-sided t confidence interval of n values."""

    n: int
    mean: float
    sd: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return 0.5 * (self.high - self.low)

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


MAX_SEEDS = 100_000  # beyond this a seed count is no plan


def seeds_for_half_width(sd: float, target: float, confidence: float = 0.95, max_seeds: int = MAX_SEEDS) -> int:
    """The fewest seeds n >= 2 whose t interval, at this sample sd of the per-seed values, has a
    half-width of at most `target` (same units): the smallest n with t_{(1+c)/2, n-1} sd / sqrt(n)
    <= target. A planning figure: it takes the sd measured so far as the true one."""
    if not (sd >= 0 and math.isfinite(sd)) or not target > 0:
        raise ValueError(f"seeds_for_half_width needs sd >= 0 and target > 0, got sd={sd!r}, target={target!r}")
    q = 0.5 + confidence / 2.0
    # t_{n-1} exceeds the normal quantile z for every n, so no n below (z sd / target)^2 reaches the
    # target: start there (one less, for rounding) instead of walking up from 2
    z = t_quantile(q, 1e9)
    n = max(2, math.ceil((z * sd / target) ** 2) - 1)
    while n <= max_seeds and t_quantile(q, n - 1) * sd / math.sqrt(n) > target:
        n += 1
    if n > max_seeds:
        raise ValueError(f"more than {max_seeds} seeds would be needed for half-width {target} at sd {sd}")
    return n


def correlation(xs: tuple[float, ...], ys: tuple[float, ...]) -> float | None:
    """Pearson correlation of two equally long samples; None when either has no spread."""
    n = len(xs)
    mx, my = math.fsum(xs) / n, math.fsum(ys) / n
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    syy = math.fsum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def t_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n); needs n >= 2 (one value has no spread)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class PairedGap:
    """Arm vs baseline over the seeds both have. `nats`: per-seed differences arm - baseline;
    `pct`: the same per seed in % of that seed's baseline loss."""

    seeds: tuple[int, ...]
    arm_losses: tuple[float, ...]
    baseline_losses: tuple[float, ...]
    nats: Interval
    pct: Interval
    confidence: float
    unpaired: tuple[int, ...]  # seeds only one of the two has (left out)

    @property
    def differences(self) -> tuple[float, ...]:
        return tuple(a - b for a, b in zip(self.arm_losses, self.baseline_losses))

    @property
    def pairing_correlation(self) -> float | None:
        """Correlation over seeds of the arm's and the baseline's losses: what pairing buys. The
        differences' variance is var(arm) + var(baseline) - 2 cov: near 0, pairing removes nothing
        (the runs of one seed have decorrelated by the end) and the seeds act as independent runs."""
        return correlation(self.arm_losses, self.baseline_losses)

    def seeds_needed(self, target_pct: float) -> int | None:
        """Seeds for a half-width of target_pct at the spread of the relative gaps measured so far;
        None when more than MAX_SEEDS would be needed (a diverged arm, say)."""
        try:
            return seeds_for_half_width(self.pct.sd, target_pct, self.confidence, MAX_SEEDS)
        except ValueError:
            return None

    def verdict(self, target_pct: float) -> Verdict:
        return Verdict.of(self, target_pct)

    def to_dict(self, target_pct: float) -> dict[str, Any]:
        def interval(i: Interval) -> dict[str, float]:
            return {"mean": i.mean, "sd": i.sd, "ci_low": i.low, "ci_high": i.high, "half_width": i.half_width}

        return {"n_seeds": len(self.seeds), "seeds": list(self.seeds), "confidence": self.confidence,
                "arm_loss": list(self.arm_losses), "baseline_loss": list(self.baseline_losses),
                "differences_nats": list(self.differences),
                "baseline_mean": math.fsum(self.baseline_losses) / len(self.seeds),
                "nats": interval(self.nats), "pct": interval(self.pct), "unpaired_seeds": list(self.unpaired),
                "pairing_correlation": self.pairing_correlation, "seeds_needed": self.seeds_needed(target_pct),
                "verdict": asdict(self.verdict(target_pct))}


@dataclass(frozen=True)
class Verdict:
    """What the interval says at a target resolution (in % of the baseline loss):
    direction: `worse` / `better` when the CI excludes zero, else `no difference detected`;
    resolved: the CI's half-width is at most the target; within_target: the whole CI lies inside
    +-target (an equivalence statement, stronger than `no difference detected`)."""

    direction: str
    excludes_zero: bool
    resolved: bool
    within_target: bool
    target_pct: float
    text: str

    @classmethod
    def of(cls, gap: PairedGap, target_pct: float) -> Verdict:
        if target_pct <= 0:
            raise ValueError(f"the target must be positive, got {target_pct}%")
        pct = gap.pct
        excludes = pct.excludes_zero
        direction = ("worse" if pct.low > 0 else "better") if excludes else "no difference detected"
        resolved = pct.half_width <= target_pct
        within = -target_pct <= pct.low and pct.high <= target_pct
        level = f"{gap.confidence:.0%} CI"
        if excludes:
            text = f"{direction} than baseline by {pct.mean:+.3f}% ({level} {pct.low:+.3f}..{pct.high:+.3f}%)"
        elif within:
            text = f"equal to baseline within +-{target_pct:g}% ({level} {pct.low:+.3f}..{pct.high:+.3f}%)"
        else:
            text = (f"no difference detected, but the {level} {pct.low:+.3f}..{pct.high:+.3f}% reaches past "
                    f"+-{target_pct:g}%")
        if not resolved:
            needed = gap.seeds_needed(target_pct)
            seeds = f"about {needed}" if needed is not None else f"more than {MAX_SEEDS}"
            text += (f"; unresolved: half-width {pct.half_width:.3f}% > target {target_pct:g}% (at this spread, "
                     f"sd {pct.sd:.3f}%, the target needs {seeds} seeds)")
        return cls(direction, excludes, resolved, within, target_pct, text)


def paired_gap(arm: Mapping[int, float], baseline: Mapping[int, float], confidence: float = 0.95) -> PairedGap:
    """Pair arm and baseline final losses by seed ({seed: loss}) and summarize the differences.
    Seeds present in only one mapping are left out and listed in `unpaired`; fewer than 2 common
    seeds raise ValueError."""
    seeds = tuple(sorted(set(arm) & set(baseline)))
    unpaired = tuple(sorted(set(arm) ^ set(baseline)))
    if len(seeds) < 2:
        raise ValueError(f"pairing needs at least 2 seeds that both runs have, got {list(seeds)} "
                         f"(arm seeds {sorted(arm)}, baseline seeds {sorted(baseline)})")
    arm_losses = tuple(float(arm[s]) for s in seeds)
    base_losses = tuple(float(baseline[s]) for s in seeds)
    if any(not math.isfinite(v) or v <= 0 for v in base_losses + arm_losses):
        raise ValueError(f"losses must be finite and positive, got arm {arm_losses}, baseline {base_losses}")
    nats = t_interval([a - b for a, b in zip(arm_losses, base_losses)], confidence)
    pct = t_interval([100.0 * (a - b) / b for a, b in zip(arm_losses, base_losses)], confidence)
    return PairedGap(seeds, arm_losses, base_losses, nats, pct, confidence, unpaired)
