"""SinkGD: SR-Sinkhorn against a plain fp64 loop and against Sinkhorn-Knopp on G*G, the norm
properties, invariances, a dense fp64 reference (routing, statelessness, zeros, resume and bad keys:
test_stateless_matrix.py)."""

import math

import pytest
import torch

from _stateless_helpers import check_against_dense_reference, rand
from lowmem.optim.sinkgd import sinkhorn_direction


def loop(g: torch.Tensor, iters: int) -> torch.Tensor:
    """Algorithm 3 of arXiv 2502.06742 as read: rows to norm sqrt(n), then columns to sqrt(m)."""
    m, n = g.shape
    x = g.clone()
    for _ in range(iters):
        x = math.sqrt(n) * x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-8)
        x = math.sqrt(m) * x / torch.linalg.vector_norm(x, dim=0, keepdim=True).clamp_min(1e-8)
    return x


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (33, 65), (64, 64)])
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_equals_the_plain_loop(shape, iters):
    g = rand(*shape, seed=1) * rand(shape[0], 1, seed=2).exp() * rand(1, shape[1], seed=3).exp()
    torch.testing.assert_close(sinkhorn_direction(g, iters), loop(g, iters), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(sinkhorn_direction(g.float(), iters), loop(g, iters).float(), rtol=1e-5, atol=1e-5)


def test_norms_after_each_iteration_and_at_convergence():
    m, n = 32, 128
    g = rand(m, n, seed=4) * (2 * rand(m, 1, seed=5)).exp() * (2 * rand(1, n, seed=6)).exp()
    for iters in (1, 2, 5):
        x = sinkhorn_direction(g, iters)
        torch.testing.assert_close(x.norm(dim=0), torch.full((n,), math.sqrt(m), dtype=torch.float64),
                                   rtol=1e-13, atol=0)
        torch.testing.assert_close(x.norm(), torch.tensor(math.sqrt(m * n), dtype=torch.float64), rtol=1e-13, atol=0)
    x = sinkhorn_direction(g, 50)
    torch.testing.assert_close(x.norm(dim=1), torch.full((m,), math.sqrt(n), dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("iters", [1, 3, 5])
def test_square_equals_sinkhorn_knopp_on_the_squared_gradient(iters):
    m, n = 20, 30
    g = rand(m, n, seed=7)
    k = g * g
    for _ in range(iters):  # classical Sinkhorn-Knopp: row sums n, column sums m
        k = k * (n / k.sum(1, keepdim=True))
        k = k * (m / k.sum(0, keepdim=True))
    torch.testing.assert_close(sinkhorn_direction(g, iters).pow(2), k, rtol=1e-13, atol=1e-14)


def test_signs_and_scale_invariance():
    g = rand(24, 40, seed=8)
    x = sinkhorn_direction(g)
    assert torch.equal(x.sign(), g.sign())
    torch.testing.assert_close(sinkhorn_direction(0.013 * g), x, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(sinkhorn_direction(7.3 * g.float()), x.float(), rtol=1e-5, atol=1e-5)


def test_three_fp64_steps_equal_the_dense_reference(tiny_model, tiny_batch):
    check_against_dense_reference(tiny_model, tiny_batch, "sinkgd", lambda g: loop(g, 5), tol=1e-12)
