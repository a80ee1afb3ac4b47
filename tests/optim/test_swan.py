"""SWAN: GradNorm, Newton-Schulz whitening against the SVD polar factor and a plain fp64 loop,
orientation, invariances, a dense fp64 reference (routing, statelessness, zeros, resume and bad keys:
test_stateless_matrix.py)."""

import pytest
import torch

from _stateless_helpers import check_against_dense_reference, rand
from lowmem.optim.swan import grad_norm, newton_schulz_inv_sqrt, swan_direction


def ns_loop(a: torch.Tensor, k: int) -> torch.Tensor:
    """The coupled iteration of Gong et al. 2025 App. B.8, written out."""
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    y, z = a / torch.linalg.matrix_norm(a), eye.clone()
    for _ in range(k):
        t = 3 * eye - z @ y
        y, z = 0.5 * (y @ t), 0.5 * (t @ z)
    return z


def reference_direction(g: torch.Tensor, k: int = 10) -> torch.Tensor:
    """GradNorm -> (G G^T)^(-1/2) G by ``ns_loop`` -> rescale to sqrt(pq), wide orientation."""
    if g.shape[0] > g.shape[1]:
        return reference_direction(g.t(), k).t()
    x = (g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-8)
    d = ns_loop(x @ x.t(), k) @ x
    return d * (g.numel() ** 0.5 / torch.linalg.matrix_norm(d))


def test_grad_norm_standardises_rows():
    g = rand(12, 40) * 3 + 5
    x = grad_norm(g, eps=0.0)
    torch.testing.assert_close(x.mean(1), torch.zeros(12, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(x.std(1, unbiased=False), torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(x.pow(2).sum(), torch.tensor(12.0 * 40, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_norm(4.2 * g + rand(12, 1, seed=3), eps=0.0), x, rtol=0, atol=1e-11)


@pytest.mark.parametrize("shape", [(16, 64), (8, 33)])
def test_whitening_equals_the_svd_polar_factor_on_wide_shapes(shape):
    g = rand(*shape, seed=1)
    d = swan_direction(g, ns_steps=12)
    x = grad_norm(g)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    p = shape[0]
    assert torch.linalg.matrix_norm(d / torch.linalg.matrix_norm(d) * p ** 0.5 - u @ vh) < 1e-10
    gram = d @ d.t()
    torch.testing.assert_close(gram, gram.diagonal().mean() * torch.eye(p, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape", [(32, 32), (40, 24), (5, 9)])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_newton_schulz_equals_the_plain_loop(shape, k):
    """Square (singular after centring) and tall shapes: the same k as the loop, not the SVD."""
    x = grad_norm(rand(*shape, seed=2))
    a = x @ x.t()
    torch.testing.assert_close(newton_schulz_inv_sqrt(a, k), ns_loop(a, k), rtol=0, atol=1e-12)
    torch.testing.assert_close(swan_direction(rand(*shape, seed=2), k), reference_direction(rand(*shape, seed=2), k),
                               rtol=0, atol=1e-10)


def test_orientation_and_scale_invariance():
    g = rand(48, 20, seed=4)
    torch.testing.assert_close(swan_direction(g.t()), swan_direction(g).t(), rtol=0, atol=0)
    d = swan_direction(g)
    assert d.shape == g.shape
    torch.testing.assert_close(torch.linalg.matrix_norm(d) ** 2, torch.tensor(48.0 * 20, dtype=torch.float64))
    g32 = g.float()
    torch.testing.assert_close(swan_direction(7.3 * g32), swan_direction(g32), rtol=1e-6, atol=1e-6)
    no_orient = swan_direction(g, orient=False)
    assert no_orient.shape == g.shape and not torch.allclose(no_orient, d)


def test_three_fp64_steps_equal_the_dense_reference(tiny_model, tiny_batch):
    """Square q/o weights are singular after centring, so the reference whitens by the same-k NS loop
    (not the SVD); one NS step fewer is told apart."""
    check_against_dense_reference(tiny_model, tiny_batch, "swan", reference_direction, tol=1e-12)
    with pytest.raises(AssertionError):
        check_against_dense_reference(tiny_model, tiny_batch, "swan", reference_direction, tol=1e-9, ns_steps=9)
