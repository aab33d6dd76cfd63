"""halfbyte.bench.paired_stats: the t quantile against printed tables and closed forms, and paired
gaps / verdicts on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from halfbyte.bench.paired_stats import (Verdict, correlation, paired_gap, regularized_incomplete_beta,
                                         seeds_for_half_width, t_cdf, t_interval, t_quantile)

# Student-t critical values as printed in standard tables (5-6 significant digits).
TABLE = [(0.975, 1, 12.7062), (0.975, 2, 4.30265), (0.975, 3, 3.18245), (0.975, 4, 2.77645),
         (0.975, 7, 2.36462), (0.975, 30, 2.04227), (0.95, 10, 1.81246), (0.995, 5, 4.03214),
         (0.9, 4, 1.53321), (0.999, 2, 22.3271)]


@pytest.mark.parametrize("p, df, expected", TABLE)
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=6e-5)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=6e-5)  # symmetry


def test_t_quantile_tends_to_the_normal_and_inverts_the_cdf():
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=2e-6)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    for p in (0.6, 0.9, 0.99, 0.9999):
        for df in (1, 2.5, 9):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_t_cdf_closed_forms():
    for t in (-7.0, -0.3, 0.0, 0.8, 4.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)


def test_incomplete_beta_closed_forms():
    for x in (0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0):
        assert regularized_incomplete_beta(1, 1, x) == pytest.approx(x, abs=1e-14)
        assert regularized_incomplete_beta(3.5, 1, x) == pytest.approx(x ** 3.5, abs=1e-13)
        assert regularized_incomplete_beta(1, 4, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-13)
    assert regularized_incomplete_beta(7.3, 7.3, 0.5) == pytest.approx(0.5, abs=1e-13)
    # I_x(2, 2) = 3x^2 - 2x^3 on both sides of the symmetry switch at x = 0.5
    for x in (0.2, 0.8):
        assert regularized_incomplete_beta(2, 2, x) == pytest.approx(3 * x ** 2 - 2 * x ** 3, abs=1e-13)
    with pytest.raises(ValueError):
        regularized_incomplete_beta(0, 1, 0.5)
    with pytest.raises(ValueError):
        regularized_incomplete_beta(1, 1, 1.5)


def test_t_interval_by_hand():
    # values 1, 2, 3, 6: mean 3, sd sqrt(((4+1+0+9)/3)) = sqrt(14/3); half-width t(0.975,3) sd/2
    i = t_interval([1.0, 2.0, 3.0, 6.0])
    sd = math.sqrt(14 / 3)
    assert (i.n, i.mean, i.sd) == (4, pytest.approx(3.0), pytest.approx(sd))
    assert i.half_width == pytest.approx(3.18245 * sd / 2, rel=2e-5)
    assert not i.excludes_zero  # 3 - 3.44 < 0
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([1.0])


def test_paired_gap_by_hand():
    baseline = {0: 2.00, 1: 2.10, 2: 1.90, 3: 2.00, 9: 2.5}
    arm = {0: 2.01, 1: 2.12, 2: 1.90, 3: 2.03, 5: 3.0}
    gap = paired_gap(arm, baseline)
    assert gap.seeds == (0, 1, 2, 3) and gap.unpaired == (5, 9)
    assert gap.differences == pytest.approx((0.01, 0.02, 0.0, 0.03))
    # mean 0.015; squared deviations 0.000025 + 0.000025 + 0.000225 + 0.000225 = 0.0005; sd sqrt(0.0005/3)
    sd = math.sqrt(0.0005 / 3)
    assert gap.nats.mean == pytest.approx(0.015) and gap.nats.sd == pytest.approx(sd)
    assert gap.nats.low == pytest.approx(0.015 - 3.182446 * sd / 2, rel=1e-6)
    assert gap.nats.high == pytest.approx(0.015 + 3.182446 * sd / 2, rel=1e-6)
    rel = [0.5, 100 * 0.02 / 2.1, 0.0, 1.5]  # % of each seed's own baseline
    assert gap.pct.mean == pytest.approx(sum(rel) / 4)
    assert not gap.nats.excludes_zero and not gap.pct.excludes_zero
    v = gap.verdict(0.3)
    assert v.direction == "no difference detected" and not v.resolved and not v.within_target
    d = gap.to_dict(0.3)
    assert d["n_seeds"] == 4 and d["baseline_mean"] == pytest.approx(2.0)
    assert d["differences_nats"] == pytest.approx([0.01, 0.02, 0.0, 0.03])
    assert d["verdict"]["direction"] == "no difference detected"


def test_verdicts_worse_better_equivalent():
    base = {0: 3.0, 1: 3.1, 2: 2.9, 3: 3.05}
    worse = paired_gap({s: v * 1.02 + 0.001 * s for s, v in base.items()}, base)
    assert worse.pct.low > 0
    assert worse.verdict(0.3).direction == "worse" and worse.verdict(0.3).excludes_zero
    better = paired_gap({s: v - 0.03 - 0.001 * s for s, v in base.items()}, base)
    assert better.verdict(0.3).direction == "better"
    # tiny symmetric differences: CI well inside +-0.3%: equivalent and resolved
    same = paired_gap({0: 3.0003, 1: 3.0997, 2: 2.9002, 3: 3.0498}, base)
    v = same.verdict(0.3)
    assert v.direction == "no difference detected" and v.resolved and v.within_target
    assert "equal to baseline within +-0.3%" in v.text
    # the same gaps judged at a target they cannot meet
    assert not same.verdict(0.001).resolved
    with pytest.raises(ValueError):
        Verdict.of(same, 0.0)


def test_identical_runs_have_zero_width_and_bad_inputs_are_refused():
    base = {0: 2.0, 1: 2.2}
    gap = paired_gap({0: 2.1, 1: 2.3}, base)  # the same +0.1 for both seeds: sd 0, CI a point
    assert gap.nats.sd == pytest.approx(0.0, abs=1e-12)
    assert gap.nats.low == pytest.approx(0.1) and gap.nats.high == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_gap({0: 2.1, 7: 2.0}, base)
    with pytest.raises(ValueError, match="finite"):
        paired_gap({0: float("nan"), 1: 2.3}, base)


def test_seeds_for_half_width_is_the_smallest_n_that_reaches_the_target():
    # n = 4: t(0.975, 3) / 2 = 1.5912; n = 5: t(0.975, 4) / sqrt(5) = 1.2417; n = 3: 2.4841
    assert seeds_for_half_width(1.0, 1.6) == 4
    assert seeds_for_half_width(1.0, 1.59) == 5
    assert seeds_for_half_width(1.0, 2.5) == 3
    assert seeds_for_half_width(0.0, 0.1) == 2
    for sd, target in ((0.9066, 0.3), (0.2, 0.3), (3.0, 0.25)):
        n = seeds_for_half_width(sd, target)
        assert t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= target
        assert n == 2 or t_quantile(0.975, n - 2) * sd / math.sqrt(n - 1) > target
    with pytest.raises(ValueError, match="target > 0"):
        seeds_for_half_width(1.0, 0.0)
    with pytest.raises(ValueError, match="seeds would be needed"):
        seeds_for_half_width(1.0, 1e-3, max_seeds=100)


def test_pairing_correlation_and_seeds_needed_in_the_verdict():
    assert correlation((1.0, 2.0, 3.0), (2.0, 4.0, 6.5)) == pytest.approx(4.5 / math.sqrt(2 * 61 / 6), abs=1e-12)
    assert correlation((1.0, 2.0, 3.0), (3.0, 2.0, 1.0)) == pytest.approx(-1.0)
    assert correlation((1.0, 1.0, 1.0), (3.0, 2.0, 1.0)) is None
    base = {0: 1.00, 1: 1.02, 2: 0.98, 3: 1.01}
    tracking = {s: v + 0.001 * (-1) ** s for s, v in base.items()}  # follows the baseline seed by seed
    gap = paired_gap(tracking, base)
    assert gap.pairing_correlation > 0.99
    verdict = gap.verdict(0.05)
    assert not verdict.resolved
    n = gap.seeds_needed(0.05)
    assert n == seeds_for_half_width(gap.pct.sd, 0.05) and n > 4
    assert f"needs about {n} seeds" in verdict.text
    assert gap.to_dict(0.05)["seeds_needed"] == n
    assert gap.to_dict(0.05)["pairing_correlation"] == pytest.approx(gap.pairing_correlation)


def test_a_spread_beyond_any_seed_budget_still_gets_a_verdict():
    # a diverged arm: gaps of hundreds of % that scatter widely; the report must still print a verdict
    base = {0: 1.0, 1: 1.0, 2: 1.0}
    gap = paired_gap({0: 2.0, 1: 9.0, 2: 4.0}, base)
    assert gap.seeds_needed(0.001) is None
    verdict = gap.verdict(0.001)
    assert verdict.text.startswith("no difference detected") and "needs more than 100000 seeds" in verdict.text
    assert gap.to_dict(0.001)["seeds_needed"] is None
    n = seeds_for_half_width(30.0, 0.3)  # ~38,400 seeds: found without walking up from 2
    assert t_quantile(0.975, n - 1) * 30.0 / math.sqrt(n) <= 0.3 < t_quantile(0.975, n - 2) * 30.0 / math.sqrt(n - 1)
