"""Projectors: shapes, orthonormality, truncated-SVD identity, seed chain equal to apollo-torch."""

import pytest
import torch

from lowmem.optim import projection as pj

SHAPES = [(24, 10), (10, 24), (16, 16)]


def _grad(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _truncated_svd(g, r):
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("proj_type", pj.PROJ_TYPES)
def test_svd_projector_shapes_orthonormal_and_truncation(shape, proj_type):
    g, r = _grad(shape).float(), 4
    left, right = pj.sides(g.shape, proj_type)
    u, v = pj.svd_factors(g, r, left, right)
    low = pj.project(g, u, v)
    expected = (r if left else shape[0], r if right else shape[1])
    assert low.shape == expected
    for f, dim in ((u, 0), (v, 1)):
        if f is not None:
            gram = f.t() @ f if dim == 0 else f @ f.t()
            torch.testing.assert_close(gram, torch.eye(r), atol=1e-5, rtol=0)
    # back(project(G)) is the rank-r truncated SVD of G (dense computation in fp64)
    torch.testing.assert_close(pj.project_back(low, u, v).double(), _truncated_svd(g.double(), r), atol=1e-4, rtol=0)


def test_std_projects_the_smaller_dimension():
    assert pj.sides(torch.Size((24, 10)), "std") == (False, True)
    assert pj.sides(torch.Size((10, 24)), "std") == (True, False)
    assert pj.sides(torch.Size((10, 24)), "reverse_std") == (False, True)


def test_reverse_std_wide_full_rank_goes_back_to_the_right_side():
    # ms-swift PR #10146: the side must come from P, not from R's shape
    g = _grad((6, 20)).float()
    u, v = pj.svd_factors(g, 8, *pj.sides(g.shape, "reverse_std"))
    back = pj.project_back(pj.project(g, u, v), u, v)
    assert back.shape == g.shape
    torch.testing.assert_close(back, g, atol=1e-5, rtol=0)  # rank 8 >= min(m, n): exact


def test_gaussian_factor_and_seed_chain_equal_apollo_torch():
    rp = pytest.importorskip("apollo_torch.random_projector")
    g = _grad((24, 10)).float()
    ref = rp.GradientProjector(rank=3, update_proj_gap=2, proj_type="std", seed=7)
    ref.project(g, 0)
    u, v = pj.gaussian_factors(g.shape, 3, *pj.sides(g.shape, "std"), seed=7, device=g.device, dtype=g.dtype)
    assert u is None and torch.equal(v, ref.ortho_matrix)
    assert ref.seed == pj.next_seed(7)
    ref.project(g, 2)  # refresh draws from the next seed of the chain
    _, v2 = pj.gaussian_factors(g.shape, 3, False, True, seed=pj.next_seed(7), device=g.device, dtype=g.dtype)
    assert torch.equal(v2, ref.ortho_matrix)


def test_orthonormal_factor_rows():
    f = pj.orthonormal_factor(20, 5, seed=3, device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(f @ f.t(), torch.eye(5), atol=1e-5, rtol=0)
    assert torch.equal(f, pj.orthonormal_factor(20, 5, seed=3, device=torch.device("cpu"), dtype=torch.float32))


def test_bad_proj_type_is_a_one_line_value_error():
    from lowmem.optim.galore import GaLoreGroup

    with pytest.raises(ValueError, match="^optim.args.proj_type: .*'diagonal'$"):
        pj.check_projected_group({"params": [torch.zeros(3, 2)], "proj_type": "diagonal"}, GaLoreGroup, "GaLore")
