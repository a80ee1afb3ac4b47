"""WTA-CRS sampler against the math: budget rule, winner rule (brute force), per-row unbiasedness,
and the reference ``approxlinear/test.py`` experiment of ``zirui-ray-liu/WTACRS`` (arXiv 2305.15265)."""

import math

import pytest
import torch

from lowmem.activations.sampler import (GradNormTracker, budget, row_probabilities, sample_rows,
                                         winner_count)


@pytest.mark.parametrize("n, ratio, floor, expected", [(1000, 0.3, 10, 300), (20, 0.3, 10, 10), (5, 0.3, 10, 5),
                                                       (4097, 0.1, 10, 409), (7, 1.0, 1, 7)])
def test_budget_follows_reference_rule(n, ratio, floor, expected):
    assert budget(n, ratio, floor) == expected


def test_winner_count_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, k = 200, 10 + trial
        prob = torch.rand(n, generator=gen) ** (1 + trial)  # flat to very peaked
        prob /= prob.sum()
        sorted_p = prob.sort(descending=True).values.tolist()
        # variance factor of the stochastic part for |C| = c: (1 - top-c mass)/(k - c); c = 0 is plain CRS
        factors = [(1 - sum(sorted_p[:c])) / (k - c) for c in range(k)]
        best = min(range(k), key=lambda c: (factors[c], c))
        got = winner_count(prob.topk(k).values, k)
        assert math.isclose(factors[got], factors[best], rel_tol=1e-5), (trial, got, best)


def test_winner_set_empty_for_uniform_and_large_for_peaked():
    k = 20
    assert winner_count(torch.full((k,), 1 / 200), k) == 0
    peaked = torch.cat([torch.full((5,), 0.19), torch.full((195,), 0.05 / 195)])
    assert winner_count(peaked.topk(k).values, k) >= 5


def test_every_row_weight_has_expectation_one():
    """Unbiasedness row by row: E[ŵ_i] = 1 for every row i (ŵ_i = 0 when i is not kept)."""
    n, k, reps = 40, 8, 20000
    gen = torch.Generator().manual_seed(1)
    prob = torch.rand(n, generator=gen) ** 3 + 0.05  # every row is drawn often enough to estimate its mean
    prob[3] = 5.0  # a clear winner
    prob /= prob.sum()
    total = torch.zeros(n, dtype=torch.float64)
    total_sq = torch.zeros(n, dtype=torch.float64)
    for _ in range(reps):
        s = sample_rows(prob, k, gen)
        w = torch.zeros(n, dtype=torch.float64).index_add_(0, s.index, s.weight.double())
        total += w
        total_sq += w * w
    mean = total / reps
    std_err = ((total_sq / reps - mean ** 2).clamp_min(1e-12) / reps).sqrt()
    z = (mean - 1) / std_err
    assert z.abs().max() < 5.0, z
    assert s.index.numel() <= k and s.n_winners >= 1


def test_draws_come_only_from_the_private_generator():
    prob = row_probabilities(torch.rand(100))
    torch.manual_seed(0)
    global_state = torch.random.get_rng_state()
    a = sample_rows(prob, 10, torch.Generator().manual_seed(7))
    b = sample_rows(prob, 10, torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), global_state)
    assert torch.equal(a.index, b.index) and torch.equal(a.weight, b.weight)


def test_probabilities_mix_in_input_norms_defensively():
    x_norms = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = torch.tensor([0.0, 0.0, 1.0, 1.0])
    p = row_probabilities(x_norms, g)
    assert torch.allclose(p.sum(), torch.tensor(1.0))
    assert (p > 0).all() and p[3] > p[2] > p[1] > p[0]
    assert torch.allclose(row_probabilities(torch.zeros(4)), torch.full((4,), 0.25))


def test_grad_norm_tracker_is_a_per_position_ema():
    tracker = GradNormTracker(momentum=0.5)
    assert tracker.estimate(2, 3) is None
    g1 = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 4.0]] * 2)  # (B=2, L=3) rows of width 2
    tracker.update(g1, 2, 3)
    assert torch.allclose(tracker.ema, torch.tensor([3.0, 0.0, 4.0]))
    tracker.update(torch.ones(2 * 4, 2), 2, 4)  # longer sequence: new positions start at their value
    r2 = math.sqrt(2)
    assert torch.allclose(tracker.ema, torch.tensor([1.5 + r2 / 2, r2 / 2, 2 + r2 / 2, r2]))
    est = tracker.estimate(1, 6)
    assert torch.allclose(est[4:], tracker.ema.mean().expand(2))


def _crs_with_replacement(terms, prob, k, gen):
    idx = torch.multinomial(prob, k, replacement=True, generator=gen)
    return (terms[idx] / (k * prob[idx])).sum()


def _crs_without_replacement(terms, prob, k, gen):  # the reference's biased variant
    return terms[torch.multinomial(prob, k, replacement=False, generator=gen)].sum()


def _wta_crs(terms, prob, k, gen):
    s = sample_rows(prob, k, gen)
    return (terms[s.index].double() * s.weight.double()).sum()


def test_reference_experiment_test_py():
    """approxlinear/test.py: a ~ U(0,1)^N, b ~ N(0,1)^N, N = 12800, D = 1, k = 0.1 N, 500 repeats;
    relative error of aᵀb for CRS (with / without replacement) and WTA-CRS, p ∝ |a_i||b_i|."""
    n, reps = 12800, 500
    k = int(0.1 * n)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    terms, exact = a * b, (a * b).sum()
    prob = (a.abs() * b.abs()) / (a.abs() * b.abs()).sum()
    errors = {}
    for name, fn in [("crs", _crs_with_replacement), ("crs_wo", _crs_without_replacement), ("wta", _wta_crs)]:
        errors[name] = torch.stack([(fn(terms, prob, k, gen) - exact) / exact.abs() for _ in range(reps)])
    bound = 4 * errors["wta"].std() / math.sqrt(reps)
    assert errors["wta"].mean().abs() < bound, "WTA-CRS must be unbiased"
    assert errors["wta"].var() < errors["crs"].var(), "WTA-CRS must have lower variance than CRS"
    # the test has power: the biased without-replacement variant fails the same bound
    assert errors["crs_wo"].mean().abs() > 4 * errors["crs_wo"].std() / math.sqrt(reps)
